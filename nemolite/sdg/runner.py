"""Running a pipeline: a tree of nodes expanded by model calls, written out row by row in a fixed order.

A pipeline is a list of stages (macro topics -> subtopics -> questions -> revisions, say) and a leaf
that turns one path through them into a row. Each node has a stable id from its place in the tree
(``open-qa/m3/s1/q2/r0``) and every request a seed derived from the run's seed and that id, so a
rerun asks exactly the same questions. Nodes run as soon as their parent is expanded, their
requests sharing one sliding window; a writer walks the tree depth-first behind them and appends
each finished row in that order. Hence the output of a run is always a prefix of the same sequence:
a killed run, rerun, replays its finished requests from the cache, skips the rows already written
and goes on, giving byte for byte the file an uninterrupted run gives. A failed write (a full disk)
stops the run at once, every task and request in flight cancelled, with whole rows on disk (see
``store``); the same command then resumes it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

from nemolite.errors import NemoliteError
from nemolite.sdg.backends import REQUEST_STATUSES, RequestFailed
from nemolite.sdg.config import count, render
from nemolite.sdg.dedup import Deduper, node_prefix
from nemolite.sdg.lists import ListStats, ask_for_list, list_schema
from nemolite.sdg.lookahead import Lookahead
from nemolite.sdg.quality import failed_thresholds, parse_filter
from nemolite.sdg.report import Progress, Summary
from nemolite.sdg.store import JsonlLog, RequestCache, sidecar
from nemolite.sdg.tree import Node, Pipeline, Stage, request_seed
from nemolite.sdg.window import Window


class Run:
    """One run of a pipeline into one output file; the pipelines' leaves and stages call ``chat``,
    ``score`` and ``ask_list`` on it."""

    def __init__(self, pipeline: Pipeline, settings: dict, config: dict, out: str, llm, reward, *, job: str,
                 rows: int | None, seed: int, concurrency: int, num_shards: int, shard_id: int, progress: bool):
        self.pipeline, self.settings, self.config = pipeline, settings, config
        self.llm, self.reward = llm, reward
        self.rows, self.seed = rows, seed
        self.num_shards, self.shard_id = num_shards, shard_id
        self.thresholds = parse_filter(config["filter"])
        self.list_stats = ListStats()
        # List requests ask for a JSON array where the engine is nemolite's (backends.structured_lists).
        self.structured_lists = bool(getattr(llm, "structured_lists", False))
        self.deduper = Deduper(pipeline.dedup_keys())
        self.summary = Summary(pipeline.name, str(out))
        self.window, self.reward_window = Window(concurrency), Window(concurrency)
        self.cache = RequestCache(sidecar(out, "cache.jsonl"), job)
        try:
            self.out = JsonlLog(out)
        except BaseException:
            self.cache.close()
            raise
        self.summary.repairs = [log.repair for log in (self.out, self.cache.log) if log.repair]
        self.reward_identity = model_identity(reward) if reward is not None else None
        self.existing = list(self.out.records)
        self.existing_by_id = {row["id"]: row for row in self.existing}
        self.progress = Progress([s.name for s in pipeline.stages] + ["responses"], rows, progress)
        sizes = [float(count(settings, s.size_key)) if s.size_key else 1.0 for s in pipeline.stages]
        self.lookahead = Lookahead(rows, sizes)
        # Which waiting request a free slot goes to. With several in flight, the shallowest node first:
        # the chain of requests below it is the longest (topic -> questions -> revisions -> answer), and
        # started last it would run nearly alone at the end of the run (open-qa, 200 rows, 16 in flight:
        # 14.9-17.2 s instead of 17.6-19.7 s, 3% more calls). With one, pipeline order: the order cannot
        # shorten the run then, and it wastes the least work under --rows.
        self.depth_first = concurrency > 1
        self.tasks: set[asyncio.Task] = set()
        self.stack: list[tuple[Node, int]] = []
        self.emitted = 0
        self.finished = asyncio.Event()
        self.error: BaseException | None = None

    # ------------------------------------------------------------------------------------ requests

    async def chat(self, node: Node, stage: str, messages: list[dict], attempt: str = "",
                   schema: dict | None = None) -> str:
        """One generation, replayed from the cache when this exact request was answered before; with
        ``schema`` (a JSON schema) the answer is structured output that follows it."""
        sampling = self.settings["sampling"]
        if schema is not None:
            sampling = {**sampling, "structured_outputs": {"json": schema}}
        seed = request_seed(self.seed, node.id, stage, attempt)
        key = RequestCache.key("chat", stage, messages, sampling, seed)
        answer = self.cache.get(key)
        if answer is None:
            async with self.window.slot((len(node.path) if self.depth_first else 0, node.path)):
                answer = await self.llm.chat(messages, sampling, seed)
            self._store(key, answer)
            self.summary.llm_calls += 1
            self.summary.prompt_tokens += answer["prompt_tokens"]
            self.summary.completion_tokens += answer["completion_tokens"]
        return answer["text"]

    async def score(self, node: Node, messages: list[dict]) -> dict | None:
        """{attributes, score} of the conversation's last (assistant) message; None without a reward model.
        The cached score is keyed by the reward model's identity (see ``model_identity``) as well as the
        conversation, so a resume with another reward model, server or attribute weights scores afresh."""
        if self.reward is None:
            return None
        key = RequestCache.key("reward", self.reward_identity, messages)
        result = self.cache.get(key)
        if result is None:
            async with self.reward_window.slot(node.path):
                result = await self.reward.score(messages)
            self._store(key, result)
            self.summary.reward_calls += 1
        return result

    def _store(self, key: str, value: Any) -> None:
        try:
            self.cache.put(key, value)
        except NemoliteError as error:
            # Stop the run now: the task carrying the error up may be one a parallel list awaits only
            # after an earlier attempt whose request is still in flight.
            self._fail(error)
            raise

    async def ask_list(self, node: Node, stage: str, template: str, size_key: str, **fields: Any) -> list[str]:
        """Up to ``settings[size_key]`` items from the model for ``template`` (see lists.ask_for_list).
        The top-level list multiplies the whole run and holds it up, so a weak model that lists one
        item per answer gets four times the attempts at it, asked at once. A backend that supports it
        is asked for a JSON array of ``n`` strings (lists.list_schema), which needs no reformatting."""
        n = count(self.settings, size_key)
        attempts = count(self.config, "list_attempts")
        max_item_chars = count(self.config, "max_item_chars")
        schema = None
        if self.structured_lists:
            max_tokens = self.settings["sampling"].get("max_tokens")
            schema = list_schema(n, max_item_chars, max_tokens if isinstance(max_tokens, int) else None)
        return await ask_for_list(
            lambda messages, attempt, schema=None: self.chat(node, stage, messages, attempt, schema),
            render(self.config, template, n=n, **fields), n,
            lambda answer: render(self.config, "reformat_list", answer=answer),
            attempts=attempts if node.path else 4 * attempts, parallel=not node.path,
            reformat_attempts=count(self.config, "reformat_attempts", 0), stats=self.list_stats,
            max_item_chars=max_item_chars, schema=schema)

    # ------------------------------------------------------------------------------------ the tree

    async def run(self) -> Summary:
        started = time.monotonic()
        root = Node(self.pipeline.name, (), {})
        self.stack.append((root, 0))
        self._spawn(root)
        try:
            await self.finished.wait()
        finally:
            # Every node's task, and with it its requests in flight, ends before the files close.
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            self.progress.close()
            for log in (self.cache, self.out):  # both, whatever the first does: each holds whole lines to keep
                try:
                    log.close()
                except NemoliteError as error:
                    self._fail(error)
            self._fill_summary(time.monotonic() - started)
        if self.error is not None:
            self.summary.stopped_by = str(self.error)
            raise self.error
        return self.summary

    def _spawn(self, node: Node) -> None:
        task = asyncio.ensure_future(self._work(node))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _work(self, node: Node) -> None:
        depth = len(node.path)
        leaf = depth == len(self.pipeline.stages)
        stage = "responses" if leaf else self.pipeline.stages[depth].name
        await self.lookahead.admit(node.path)
        self.progress.started(stage)
        try:
            if leaf:
                node.row = await self._row(node)
            elif self._duplicate(node):
                node.children = []
                self.summary.dedup_pruned += 1
            else:
                node.children = await self._expand(node, self.pipeline.stages[depth])
                self.lookahead.expanded(depth, sum(child is not None for child in node.children))
        except RequestFailed as error:
            if error.status not in REQUEST_STATUSES:
                return self._fail(error)
            self.summary.failed_requests += 1
            self.summary.failure = self.summary.failure or str(error)
            node.children = []
        except Exception as error:  # noqa: BLE001 - the run stops and main() re-raises it
            return self._fail(error)
        node.done = True
        self.progress.finished(stage)
        for child in node.children or ():
            if child is not None:
                self._spawn(child)
        try:
            self._advance()
        except Exception as error:  # noqa: BLE001 - a failed write above all: unreported, the run would wait for ever
            self._fail(error)

    def _fail(self, error: BaseException) -> None:
        self.error = self.error or error
        self.finished.set()

    def _duplicate(self, node: Node) -> bool:
        """True when an item on the way to ``node`` was already claimed by an earlier branch: every row
        below it would be dropped, so its requests are not worth making."""
        for field, depth in self.pipeline.dedup_keys():
            if depth <= len(node.path):
                owner = self.deduper.owner(field, node.data[field])
                if owner is not None and owner != node_prefix(node.id, depth):
                    return True
        return False

    async def _expand(self, node: Node, stage: Stage) -> list[Node | None]:
        children: list[Node | None] = []
        for index, item in enumerate(await stage.items(self, node)):
            if not node.path and index % self.num_shards != self.shard_id:
                children.append(None)
                continue
            data = {**node.data, stage.field: item} if stage.field else {**node.data, **item}
            children.append(Node(f"{node.id}/{stage.letter}{index}", node.path + (index,), data))
        return children

    async def _row(self, node: Node) -> dict | None:
        if node.id in self.existing_by_id:
            return self.existing_by_id[node.id]
        if self._duplicate(node):
            self.summary.dedup_pruned += 1
            return None
        fields = await self.pipeline.leaf(self, node)
        if fields is None:
            return None
        row = {"id": node.id, "pipeline": self.pipeline.name, **node.data, **fields, "kept": True}
        if self.thresholds and row.get("reward") is not None:
            failed = failed_thresholds(row["reward"], self.thresholds)
            if failed:
                row["kept"], row["filtered_by"] = False, failed
        return row

    # ------------------------------------------------------------------------------------ writing

    def _advance(self) -> None:
        """Write every row that is next in pipeline order and finished."""
        leaf_depth = len(self.pipeline.stages)
        while self.stack and not self.finished.is_set():
            node, index = self.stack[-1]
            if not node.done:
                break
            if len(node.path) == leaf_depth or index == len(node.children):
                self.stack.pop()
                if len(node.path) == leaf_depth:
                    self.lookahead.walked_leaf(node.row is not None and self._emit(node.row))
                continue
            self.stack[-1] = (node, index + 1)
            if node.children[index] is not None:
                self.stack.append((node.children[index], 0))
        if not self.stack:
            self.finished.set()
        elif self.rows is not None:
            self.lookahead.update(self._pending(), self.rows - self.summary.rows_kept)

    def _pending(self) -> Iterator[tuple[tuple[int, ...], float]]:
        """(path, expected kept rows) of the nodes not yet written, in pipeline order (see Lookahead)."""
        leaf_depth = len(self.pipeline.stages)

        def below(node: Node) -> Iterator[tuple[tuple[int, ...], float]]:
            depth = len(node.path)
            if depth == leaf_depth or not node.done:
                kept = bool(node.row and node.row["kept"]) if depth == leaf_depth and node.done else None
                yield node.path, self.lookahead.estimate(depth, kept)
                return
            for child in node.children:
                if child is not None:
                    yield from below(child)

        yield from below(self.stack[-1][0])
        for node, index in reversed(self.stack[:-1]):
            for child in node.children[index:]:
                if child is not None:
                    yield from below(child)

    def _emit(self, row: dict) -> bool:
        """Write ``row`` unless it is a duplicate; True when it was written as kept."""
        if not self.deduper.admit(row):
            return False
        position, self.emitted = self.emitted, self.emitted + 1
        if position < len(self.existing):
            if self.existing[position]["id"] != row["id"]:
                raise NemoliteError(f"{self.out.path} line {position + 1} holds {self.existing[position]['id']!r} "
                                    f"where this run makes {row['id']!r}: it was written by another run; give "
                                    "another --out")
            self.summary.rows_skipped += 1
        else:
            self.out.append(row)
            self.summary.rows_written += 1
        self.progress.row()
        if row.get("reward") is not None:
            self.summary.scores.append(row["reward"]["score"])
        if row["kept"]:
            self.summary.rows_kept += 1
        else:
            self.summary.rows_filtered += 1
            for condition in row.get("filtered_by", ()):
                self.summary.filtered_by[condition] = self.summary.filtered_by.get(condition, 0) + 1
        if self.rows is not None and self.summary.rows_kept >= self.rows:
            self.finished.set()
        return row["kept"]

    def _fill_summary(self, elapsed: float) -> None:
        summary = self.summary
        summary.elapsed_s = elapsed
        summary.calls_replayed = self.cache.replayed
        summary.list_reformats = self.list_stats.reformats
        summary.conversion_failures = self.list_stats.conversion_failures
        summary.dedup_exact, summary.dedup_normalised = self.deduper.exact, self.deduper.normalised
        summary.retries = sum(getattr(backend, "retries", 0) for backend in (self.llm, self.reward))
        summary.reward = "skipped (no reward model)" if self.reward is None else f"scored by {self.reward.name}"


def model_identity(backend) -> Any:
    """What decides a backend's answers, for cache keys: its ``identity`` (model, URL, weights) when it
    gives one, else its name."""
    identity = getattr(backend, "identity", None)
    return identity if identity is not None else backend.name
