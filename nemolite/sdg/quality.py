"""Judging generated data: reward thresholds, ground-truth answers, and preference pairs.

Filtered rows are kept in the output with ``"kept": false`` and the thresholds they failed, so that
a stricter or looser filter is a ``jq`` away and never a second generation run.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Mapping, Sequence

from nemolite.errors import NemoliteError
from nemolite.sdg.dedup import normalize

OPERATORS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt, "==": operator.eq}
THRESHOLD = re.compile(r"^\s*(>=|<=|==|>|<)\s*(-?\d+(?:\.\d*)?|-?\.\d+)\s*$")
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def parse_filter(spec: Mapping | None) -> list[tuple[str, str, float]]:
    """``{helpfulness: ">= 3", score: "> 0.5"}`` -> [(name, operator, value)]; a bare number means >=."""
    if not spec:
        return []
    if not isinstance(spec, Mapping):
        raise NemoliteError('filter must be a mapping such as {helpfulness: ">= 3", score: "> 0.5"}')
    thresholds = []
    for name, condition in spec.items():
        if isinstance(condition, (int, float)) and not isinstance(condition, bool):
            thresholds.append((str(name), ">=", float(condition)))
            continue
        match = THRESHOLD.match(str(condition))
        if not match:
            raise NemoliteError(f"filter.{name}: {condition!r} is not a threshold; write e.g. \">= 3\" or \"< 2.5\"")
        thresholds.append((str(name), match.group(1), float(match.group(2))))
    return thresholds


def failed_thresholds(reward: Mapping, thresholds: Sequence[tuple[str, str, float]]) -> list[str]:
    """The thresholds ``reward`` ({attributes, score}) misses, as text; [] when it passes them all."""
    values = {**reward["attributes"], "score": reward["score"]}
    failed = []
    for name, op, limit in thresholds:
        if name not in values:
            raise NemoliteError(f"filter names {name!r}, which the reward model does not give; it gives "
                                f"{sorted(values)}")
        if not OPERATORS[op](values[name], limit):
            failed.append(f"{name} {op} {limit:g}")
    return failed


def matches_answer(response: str, answer: str) -> bool:
    """A ground-truth check: a numeric answer must equal the response's last number; any other answer
    must appear in the response (case, spacing and punctuation aside)."""
    try:
        expected = float(answer.replace(",", ""))
    except ValueError:
        return bool(normalize(answer)) and normalize(answer) in normalize(response)
    numbers = NUMBER.findall(response)
    if not numbers:
        return False
    try:
        return math.isclose(float(numbers[-1].replace(",", "")), expected, rel_tol=1e-9, abs_tol=1e-9)
    except ValueError:
        return False


def choose_pair(samples: Sequence[Mapping], answer: str | None) -> tuple[int, int, str] | None:
    """(chosen, rejected, decided_by) among scored samples ({text, reward}). A ground-truth answer
    decides first: the best-scored correct sample over the worst-scored wrong one. Otherwise the
    reward: highest over lowest. None when the samples give no preference (all alike)."""
    score = [s["reward"]["score"] if s.get("reward") else 0.0 for s in samples]
    if answer is not None:
        correct = [i for i, s in enumerate(samples) if matches_answer(s["text"], answer)]
        wrong = [i for i in range(len(samples)) if i not in correct]
        if correct and wrong:
            return max(correct, key=score.__getitem__), min(wrong, key=score.__getitem__), "ground_truth"
    best = max(range(len(samples)), key=score.__getitem__)
    worst = min(range(len(samples)), key=score.__getitem__)
    if score[best] == score[worst] or samples[best]["text"] == samples[worst]["text"]:
        return None
    return best, worst, "reward"
