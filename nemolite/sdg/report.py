"""What a run tells its user: a progress bar per stage while it runs, a summary when it ends."""

from __future__ import annotations

import dataclasses
import sys

HISTOGRAM_BINS = 10
HISTOGRAM_WIDTH = 40


@dataclasses.dataclass
class Summary:
    pipeline: str
    out: str
    rows_written: int = 0
    rows_skipped: int = 0  # already in the output from an earlier run
    rows_kept: int = 0
    rows_filtered: int = 0
    failed_requests: int = 0  # refused by the server (the first message in failure): that node gives no row
    llm_calls: int = 0
    reward_calls: int = 0
    calls_replayed: int = 0  # answered from the request cache
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    list_reformats: int = 0
    conversion_failures: int = 0
    dedup_exact: int = 0
    dedup_normalised: int = 0
    dedup_pruned: int = 0  # nodes whose whole subtree was skipped as a duplicate
    no_preference: int = 0  # preference prompts whose samples were all alike
    filtered_by: dict = dataclasses.field(default_factory=dict)
    reward: str = "skipped"
    failure: str | None = None
    stopped_by: str | None = None  # the error that ended the run early (a failed write, say); None: it finished
    repairs: list = dataclasses.field(default_factory=list)  # torn last lines cut off the files on resume
    elapsed_s: float = 0.0
    scores: list = dataclasses.field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        record = dataclasses.asdict(self)
        del record["scores"]
        record["rows_per_s"] = round(self.rows_written / self.elapsed_s, 3) if self.elapsed_s else 0.0
        record["tokens_per_s"] = round(self.completion_tokens / self.elapsed_s, 1) if self.elapsed_s else 0.0
        record["reward_histogram"] = histogram(self.scores)
        return record

    def format(self) -> str:
        record = self.as_dict()
        lines = [f"nemolite sdg {self.pipeline}: {self.rows_written} rows written to {self.out} "
                 f"({self.rows_skipped} already there), {self.rows_kept} kept, {self.rows_filtered} filtered, "
                 f"{self.failed_requests} failed requests, in {self.elapsed_s:.1f} s ({record['rows_per_s']} rows/s)",
                 f"  calls: {self.llm_calls} LLM, {self.reward_calls} reward, {self.calls_replayed} replayed from "
                 f"cache, {self.retries} retries; tokens: {self.prompt_tokens} prompt, {self.completion_tokens} "
                 f"completion ({record['tokens_per_s']} tok/s)",
                 f"  lists: {self.list_reformats} reformat requests, {self.conversion_failures} conversion failures;"
                 f" dedup: {self.dedup_exact} exact, {self.dedup_normalised} normalised, {self.dedup_pruned} "
                 "subtrees skipped",
                 f"  reward: {self.reward}"]
        if self.filtered_by:
            lines.append("  filtered by: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.filtered_by.items())))
        if self.no_preference:
            lines.append(f"  preference: {self.no_preference} prompts gave no pair (all samples alike)")
        if self.failure:
            lines.append(f"  first failed request: {self.failure}")
        lines.extend(f"  resumed: {repair}" for repair in self.repairs)
        if self.stopped_by:
            lines.append(f"  stopped by: {self.stopped_by}")
        lines.extend(f"  {line}" for line in record["reward_histogram"])
        return "\n".join(lines)


def histogram(scores: list[float]) -> list[str]:
    """A text histogram of weighted reward scores, one line per bin."""
    if not scores:
        return []
    low, high = min(scores), max(scores)
    width = (high - low) / HISTOGRAM_BINS or 1.0
    counts = [0] * HISTOGRAM_BINS
    for score in scores:
        counts[min(HISTOGRAM_BINS - 1, int((score - low) / width))] += 1
    top = max(counts)
    return [f"[{low + i * width:8.3f}, {low + (i + 1) * width:8.3f}) "
            f"{'#' * round(HISTOGRAM_WIDTH * c / top):<{HISTOGRAM_WIDTH}} {c}" for i, c in enumerate(counts)]


class Progress:
    """One tqdm bar per stage on stderr (nodes done of nodes known so far) and one for rows."""

    def __init__(self, stages: list[str], rows: int | None, enabled: bool):
        from tqdm import tqdm

        self.bars = {name: tqdm(desc=name, total=0, position=i, unit="", file=sys.stderr, disable=not enabled,
                                leave=True, dynamic_ncols=True) for i, name in enumerate(stages)}
        self.rows = tqdm(desc="rows", total=rows, position=len(stages), unit="row", file=sys.stderr,
                         disable=not enabled, leave=True, dynamic_ncols=True)

    def started(self, stage: str) -> None:
        self.bars[stage].total += 1
        self.bars[stage].refresh()

    def finished(self, stage: str) -> None:
        self.bars[stage].update(1)

    def row(self) -> None:
        self.rows.update(1)

    def close(self) -> None:
        for bar in [*self.bars.values(), self.rows]:
            bar.close()
