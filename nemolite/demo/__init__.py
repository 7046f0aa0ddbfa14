"""The bundled demo model (trained by scripts/train_demo_model.py; see model/README.md)."""

from pathlib import Path

DEMO_MODEL_PATH = Path(__file__).resolve().parent / "model"
