"""Synthetic data generation: the Nemotron-4 340B pipelines, resumable, against any OpenAI-compatible
server or an in-process engine (``nemolite sdg PIPELINE --out FILE.jsonl``)."""

from nemolite.sdg.api import arun_pipeline, merge_shards, run_pipeline
from nemolite.sdg.backends import HttpReward, InProcessChat, InProcessReward, OpenAIChat
from nemolite.sdg.config import PIPELINES, load_config

__all__ = ["run_pipeline", "arun_pipeline", "merge_shards", "load_config", "PIPELINES", "OpenAIChat",
           "InProcessChat", "HttpReward", "InProcessReward"]
