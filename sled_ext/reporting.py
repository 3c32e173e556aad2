"""The reports of ``sled eval`` and ``sled tune``: mean metrics per method and scoring
convention, paired comparisons with their sign test, and the printed table."""
from __future__ import annotations

import math

from . import tasks
from .tasks import CONVENTIONS

CONTROL = "sled-a0"  # SLED's top-k truncation alone (alpha = 0): the control of every SLED result
PAIRS = (("sled", "greedy"), ("sled", CONTROL), ("dola", "greedy"))


def summarize_choice(task_name: str, records: list[dict], labels) -> dict:
    """Mean metrics per label and convention."""
    metric = tasks.CHOICE_METRICS[task_name]
    out = {}
    for label in labels:
        out[label] = {}
        for c in CONVENTIONS:
            sums = {}
            for r in records:
                scores = r["scores"][label][c]
                n_true = r["n_true"]
                for name, value in metric(scores[:n_true], scores[n_true:], r["best"]).items():
                    sums[name] = sums.get(name, 0.0) + value
            out[label][c] = {name: total / len(records) for name, total in sums.items()}
    return out


def summarize_generation(records, labels) -> dict:
    return {label: {"generated": {"accuracy": sum(r["methods"][label]["correct"]
                                                  for r in records) / len(records)}}
            for label in labels}


def _right(task_name: str, record: dict, label: str, convention: str) -> bool:
    """Whether ``label`` gets the item right: MC1 for TruthfulQA, accuracy otherwise."""
    if "methods" in record:
        return bool(record["methods"][label]["correct"])
    scores, n_true = record["scores"][label][convention], record["n_true"]
    metrics = tasks.CHOICE_METRICS[task_name](scores[:n_true], scores[n_true:], record["best"])
    return metrics.get("MC1", metrics.get("accuracy")) == 1.0


def sign_test(a: int, b: int) -> float:
    """Two-sided exact binomial p-value of a split of ``a + b`` discordant items into a and b."""
    n = a + b
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(a, b) + 1)) / 2 ** n)


def paired(task_name: str, records: list[dict], labels, conventions) -> dict:
    """Per pair of methods (see :data:`PAIRS`) and convention: the items only the first gets
    right, those only the second does, and the sign test's p-value of that split. Both methods
    score the same items, so this is far more sensitive than comparing two means."""
    right = {(label, c): [_right(task_name, r, label, c) for r in records]
             for label in labels for c in conventions}
    out = {}
    for first, second in PAIRS:
        if first in labels and second in labels:
            out[f"{first} vs {second}"] = by_convention = {}
            for c in conventions:
                pairs = list(zip(right[first, c], right[second, c]))
                a = sum(x and not y for x, y in pairs)
                b = sum(y and not x for x, y in pairs)
                by_convention[c] = dict(only_first=a, only_second=b, p=round(sign_test(a, b), 4))
    return out


def table(report: dict) -> str:
    """The results as a printed table: one line per method, metrics per convention; then the
    paired comparisons."""
    results = report["results"]
    lines = []
    conventions = list(next(iter(results.values())))
    metrics = list(results[next(iter(results))][conventions[0]])
    columns = [(c, m, max(10, len(c) + len(m) + 3)) for c in conventions for m in metrics]
    width = max(10, *(len(label) + 2 for label in results))
    lines.append(f"{'method':<{width}}" + "".join(f"{c + ' ' + m:>{w}}" for c, m, w in columns))
    for label, by_convention in results.items():
        lines.append(f"{label:<{width}}" + "".join(f"{by_convention[c][m]:>{w}.4f}"
                                                    for c, m, w in columns))
    for pair, by_convention in report.get("paired", {}).items():
        first, second = pair.split(" vs ")
        for c, n in by_convention.items():
            lines.append(f"{pair} ({c}): {n['only_first']} items only {first} gets right, "
                         f"{n['only_second']} only {second}; sign test p = {n['p']:.3f}")
    return "\n".join(lines)
