"""The bundled demo models (trained by scripts/train_demo_model.py and scripts/train_demo_reward_model.py;
see each directory's README.md)."""

from pathlib import Path

DEMO_MODEL_PATH = Path(__file__).resolve().parent / "model"
DEMO_REWARD_MODEL_PATH = Path(__file__).resolve().parent / "reward_model"
