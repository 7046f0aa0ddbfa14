"""The Python door to SDG (the CLI's ``nemolite sdg`` is a thin layer over it).

    from nemolite.sdg import run_pipeline, OpenAIChat
    summary = run_pipeline("open-qa", "qa.jsonl", llm=OpenAIChat("http://localhost:1424"), rows=1000)

Without ``llm`` the bundled demo model generates in this process, and the demo reward model scores
when it is installed. Rerunning the same call resumes: see ``runner`` for the guarantee.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

from nemolite.errors import NemoliteError
from nemolite.sdg.backends import HttpReward, InProcessChat, InProcessReward, OpenAIChat
from nemolite.sdg.config import PIPELINES as NAMES, fingerprint, load_config, section
from nemolite.sdg.dedup import Deduper, order_key
from nemolite.sdg.pipelines import PIPELINES
from nemolite.sdg.report import Summary
from nemolite.sdg.runner import Run
from nemolite.sdg.store import JsonlLog, sidecar, write_atomic

log = logging.getLogger(__name__)


async def arun_pipeline(pipeline: str, out: str | Path, *, endpoint: str | None = None, api_key: str | None = None,
                        model: str | None = None, reward_endpoint: str | None = None, llm=None, reward=None,
                        config: str | Path | Mapping | None = None, rows: int | None = None, seed: int = 0,
                        concurrency: int = 16, num_shards: int = 1, shard_id: int = 0,
                        progress: bool = False, quantization: str | None = None) -> Summary:
    """Run ``pipeline`` into the JSONL file ``out`` (resuming it when it exists); its summary, also
    written to ``out``'s ``.summary.json``.

    Generation goes to ``llm`` (a backend object), else to the OpenAI-compatible ``endpoint``, else
    to ``model`` (a checkpoint; default the demo model) in this process, its linear layers quantized
    with ``quantization`` ("int8", "int4", ...: nemolite.quant.spec) when given. Scores come from ``reward``,
    else ``reward_endpoint``, else the config's ``reward_model``, else (for in-process generation
    only) the demo reward model when installed; with none, rows carry no reward."""
    if pipeline not in PIPELINES:
        raise NemoliteError(f"unknown pipeline {pipeline!r}; choose one of {', '.join(NAMES)}")
    if concurrency < 1:
        raise NemoliteError("--concurrency must be >= 1")
    if rows is not None and rows < 1:
        raise NemoliteError("--rows must be >= 1")
    if num_shards < 1 or not 0 <= shard_id < num_shards:
        raise NemoliteError(f"--shard-id must be in [0, --num-shards), got {shard_id} of {num_shards}")
    merged = load_config(config)
    spec = PIPELINES[pipeline]
    owned = []  # backends made here are closed here
    try:
        if llm is None:
            if endpoint:
                llm = OpenAIChat(endpoint, api_key, model)
            else:
                llm = default_llm(model, quantization) if quantization else default_llm(model)
            owned.append(llm)
        if reward is None:
            if reward_endpoint:
                reward = HttpReward(reward_endpoint, api_key, weights=merged["reward_weights"])
            elif merged["reward_model"] is not None or (llm in owned and not endpoint):
                reward = in_process_reward(merged)
            owned.extend([reward] if reward is not None else [])
        if spec.needs_reward and reward is None:
            raise NemoliteError(f"{pipeline} ranks samples with a reward model: give --reward-endpoint URL or set "
                                "reward_model: demo in the config")
        await llm.start()
        job = fingerprint({"pipeline": pipeline, "config": merged, "seed": seed, "num_shards": num_shards,
                           "shard_id": shard_id, "model": llm.name, "reward": reward is not None})
        run = Run(spec, section(merged, pipeline), merged, str(out), llm, reward, job=job, rows=rows, seed=seed,
                  concurrency=concurrency, num_shards=num_shards, shard_id=shard_id, progress=progress)
        try:
            summary = await run.run()
        except BaseException:
            _write_summary(out, run.summary, quiet=True)
            raise
        _write_summary(out, summary)
        return summary
    finally:
        for backend in owned:
            await backend.aclose()
            engine = getattr(backend, "engine", None)
            if engine is not None:
                engine.shutdown()


def _write_summary(out: str | Path, summary: Summary, quiet: bool = False) -> None:
    """``out``'s ``.summary.json``, replaced whole. ``quiet`` when the run failed already: a second
    failure (the same full disk, most likely) is logged, so that it does not hide the first."""
    try:
        write_atomic(sidecar(out, "summary.json"), json.dumps(summary.as_dict()) + "\n")
    except NemoliteError as error:
        if not quiet:
            raise
        log.warning("%s", error)


def run_pipeline(pipeline: str, out: str | Path, **options) -> Summary:
    """``arun_pipeline`` for code that is not async."""
    return asyncio.run(arun_pipeline(pipeline, out, **options))


def default_llm(model: str | None = None, quantization: str | None = None) -> InProcessChat:
    """In-process generation: ``model`` (a checkpoint) or the bundled demo model in float32, quantized
    with ``quantization`` when given (the name, and so the resume fingerprint, says so)."""
    from nemolite.engine.async_llm import AsyncLLM

    engine = AsyncLLM(model, dtype="float32" if model is None else "auto", quantization=quantization)
    name = str(model) if model else "nemolite-demo"
    return InProcessChat(engine, name=f"{name} ({quantization})" if quantization else name)


def in_process_reward(config: Mapping) -> InProcessReward | None:
    """The reward model the config names (``demo`` or a checkpoint), else the demo one when installed."""
    from nemolite.demo import DEMO_REWARD_MODEL_PATH
    from nemolite.engine.async_llm import AsyncLLM

    choice = config["reward_model"]
    if choice is None and not DEMO_REWARD_MODEL_PATH.is_dir():
        return None
    if choice in (None, "demo"):
        if not DEMO_REWARD_MODEL_PATH.is_dir():
            raise NemoliteError("this nemolite has no demo reward model; give --reward-endpoint URL")
        path, name = DEMO_REWARD_MODEL_PATH, "nemolite-demo-reward"
    else:
        path, name = choice, str(choice)
    return InProcessReward(AsyncLLM(path, dtype="float32"), config["reward_weights"], name=name)


def merge_shards(paths: Iterable[str | Path], out: str | Path) -> int:
    """The outputs of ``--num-shards K`` runs as one file: rows in pipeline order, deduplicated across
    shards as a single run would have; the number of rows written."""
    rows = []
    for path in paths:
        shard = JsonlLog(path)
        rows.extend(shard.records)
        shard.close()
    if not rows:
        raise NemoliteError("the shard files hold no rows")
    pipelines = {row["pipeline"] for row in rows}
    if len(pipelines) != 1:
        raise NemoliteError(f"the shard files mix pipelines: {sorted(pipelines)}")
    deduper = Deduper(PIPELINES[pipelines.pop()].dedup_keys())
    merged = JsonlLog(out)
    if merged.records:
        raise NemoliteError(f"{out} exists and is not empty; give a new file")
    written = 0
    for row in sorted(rows, key=lambda r: order_key(r["id"])):
        if deduper.admit(row):
            merged.append(row)
            written += 1
    merged.close()
    return written
