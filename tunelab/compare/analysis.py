"""What a grid's numbers support, per task: intervals, paired tests, seeds, and the recommendation.

Every statistic is computed from the per-row predictions each cell and reference wrote
(`predictions.jsonl`, tunelab/evaluation/predictions.py), on the task's dev rows, which every row of
the task shares; so comparisons are paired, row by row.

- Interval: a seeded percentile bootstrap over the dev rows (1,000 resamples) of the main metric; for a
  method run with several seeds, of the seed-mean of the metric (the same resampled rows for every seed).
- Paired test of two methods: exact McNemar when the metric is accuracy and each has one seed; else the
  paired bootstrap (shift method) of the difference of their (seed-mean) metrics.
- Recommendation: methods ranked by their (seed-mean) metric. The best is named the winner only when
  it beats every other method at p < 0.05 after Holm's correction; otherwise the methods the best does
  not beat at that level are *tied within noise*, and the pick among them is the one with the fewest
  trainable parameters, then the least time. Gains are measured from the strongest reference (majority
  class, zero-shot, TF-IDF), with a paired test against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tunelab.evaluation.prediction_rows import prediction_metrics, read_predictions
from tunelab.metrics import stats

ALPHA = 0.05
N_BOOT = 1000
LOWER_IS_BETTER = {"perplexity", "loss", "eval_loss", "train_loss"}


def lower_is_better(metric: str | None) -> bool:
    return (metric or "") in LOWER_IS_BETTER


def predictions_of(row: dict) -> list[dict] | None:
    """The row's per-row predictions, or None when it has none (not finished, or from an older tunelab)."""
    path = Path(row.get("cell_dir") or "") / "predictions.jsonl"
    if row.get("status") != "done" or not row.get("cell_dir") or not path.is_file():
        return None
    return read_predictions(path)


def statistic(task, metric: str, predictions: list[dict]):
    """idx -> the metric on those rows. Accuracy and perplexity are vectorised; others call the metric."""
    if metric == "accuracy":
        correct = np.array([p["prediction"] == p["label"] for p in predictions], dtype=float)
        return lambda idx: float(correct[idx].mean())
    if metric in ("perplexity", "loss"):
        loss = np.array([p["loss_sum"] for p in predictions], dtype=float)
        tokens = np.array([p["tokens"] for p in predictions], dtype=float)
        if metric == "loss":
            return lambda idx: float(loss[idx].sum() / tokens[idx].sum())
        return lambda idx: float(math.exp(min(loss[idx].sum() / tokens[idx].sum(), 700.0)))
    return lambda idx: float(prediction_metrics(task, [predictions[i] for i in idx])[metric])


@dataclass
class Group:
    """One method (model × method) of a task, over its seeds; or one reference."""

    model: str
    method: str
    role: str  # method | reference
    rows: list[dict]
    mean: float
    sd: float | None = None  # across seeds (None with one seed)
    per_seed: dict = field(default_factory=dict)  # seed -> metric
    ci: tuple[float, float] = (math.nan, math.nan)
    n: int | None = None
    stat: object = None  # idx -> seed-mean metric, when every seed has predictions
    correct: list | None = None  # per seed, 0/1 per row (accuracy only)
    p_vs_best: float = math.nan  # paired test against the best method
    p_vs_best_holm: float = math.nan  # the same after Holm's correction over the task's methods

    @property
    def name(self) -> str:
        return f"{self.model} × {self.method}" if self.role == "method" else f"{self.method} ({self.model})"

    @property
    def trainable(self) -> float:
        vals = [r.get("trainable_params") for r in self.rows if r.get("trainable_params") is not None]
        return float(vals[0]) if vals else math.inf

    @property
    def wall_s(self) -> float:
        vals = [r["wall_s"] for r in self.rows if r.get("wall_s")]
        return float(np.mean(vals)) if vals else math.inf


def groups_of(rows: list[dict], task, metric: str, seed: int = 0) -> list[Group]:
    """Finished rows of one task grouped per (model, method), with intervals; best first."""
    keyed: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("status") == "done" and isinstance(r.get("main_value"), (int, float)):
            keyed.setdefault((r["model"], r["method"], r.get("role") or "method"), []).append(r)
    groups = []
    for (model, method, role), rs in keyed.items():
        rs = sorted(rs, key=lambda r: (r.get("seed") is None, r.get("seed") or 0))
        values = [float(r["main_value"]) for r in rs]
        mean, sd = stats.mean_std(values)
        g = Group(model, method, role, rs, mean, sd if len(rs) > 1 else None)
        g.per_seed = {r.get("seed"): float(r["main_value"]) for r in rs}
        preds = [predictions_of(r) for r in rs]
        if all(p is not None for p in preds) and len({len(p) for p in preds}) == 1:
            fns = [statistic(task, metric, p) for p in preds]
            g.stat = fns[0] if len(fns) == 1 else (lambda idx, fns=fns: float(np.mean([f(idx) for f in fns])))
            g.n = len(preds[0])
            g.ci = stats.bootstrap_interval(g.stat, g.n, n_boot=N_BOOT, seed=seed)
            if metric == "accuracy":
                g.correct = [[int(p["prediction"] == p["label"]) for p in ps] for ps in preds]
        groups.append(g)
    sign = 1.0 if lower_is_better(metric) else -1.0
    return sorted(groups, key=lambda g: (sign * g.mean, g.trainable, g.wall_s))


def paired_p(a: Group, b: Group, seed: int = 0) -> float:
    """Two-sided p-value for "a and b score the same on these rows" (nan without predictions)."""
    if a.stat is None or b.stat is None or a.n != b.n:
        return math.nan
    if a.correct is not None and b.correct is not None and len(a.correct) == len(b.correct) == 1:
        return stats.mcnemar_exact(a.correct[0], b.correct[0])["p"]
    return stats.paired_bootstrap_pvalue(a.stat, b.stat, a.n, n_boot=N_BOOT, seed=seed)


def difference_ci(a: Group, b: Group, seed: int = 0) -> tuple[float, float]:
    if a.stat is None or b.stat is None or a.n != b.n:
        return (math.nan, math.nan)
    return stats.bootstrap_interval(lambda idx: a.stat(idx) - b.stat(idx), a.n, n_boot=N_BOOT, seed=seed)


def analyse(rows: list[dict], task, seed: int = 0) -> dict:
    """Everything the report says about one task (see the module docstring); {} without a finished method."""
    metric = next((r["main_metric"] for r in rows if r.get("main_metric")), None)
    if metric is None:
        return {}
    groups = groups_of(rows, task, metric, seed)
    methods = [g for g in groups if g.role == "method"]
    references = [g for g in groups if g.role == "reference"]
    if not methods:
        return {"metric": metric, "groups": groups, "methods": [], "references": references}
    low = lower_is_better(metric)
    best = methods[0]
    others = methods[1:]
    raw = [paired_p(best, g, seed) for g in others]
    adjusted = _holm_nan(raw)
    for g, p, q in zip(others, raw, adjusted):
        g.p_vs_best, g.p_vs_best_holm = p, q
    tied = [best] + [g for g, q in zip(others, adjusted) if not (q < ALPHA)]
    winner = best if others and len(tied) == 1 else None
    pick = min(tied, key=lambda g: (g.trainable, g.wall_s))
    out = {
        "metric": metric,
        "lower_is_better": low,
        "groups": groups,
        "methods": methods,
        "references": references,
        "best": best,
        "winner": winner,
        "tied": tied if len(tied) > 1 else [],
        "pick": pick,
        "single": not others,
    }
    if references:
        strongest = references[0]  # groups are sorted best first
        out["reference"] = strongest
        out["reference_p"] = paired_p(pick, strongest, seed)
        out["reference_gain"] = (strongest.mean - pick.mean) if low else (pick.mean - strongest.mean)
        out["reference_gain_ci"] = difference_ci(pick, strongest, seed)
        if low:
            lo, hi = out["reference_gain_ci"]
            out["reference_gain_ci"] = (-hi, -lo)
        # the pick against every reference (did tuning help over zero-shot? over chance?)
        out["against"] = [
            (ref, (ref.mean - pick.mean) if low else (pick.mean - ref.mean), paired_p(pick, ref, seed))
            for ref in references
        ]
    out["seed_orders"] = seed_orders(methods, low)
    return out


def _holm_nan(pvalues: list[float]) -> list[float]:
    """Holm's correction over the p-values that exist; nan stays nan."""
    known = [i for i, p in enumerate(pvalues) if not math.isnan(p)]
    adjusted = stats.holm([pvalues[i] for i in known]) if known else []
    out = [math.nan] * len(pvalues)
    for i, q in zip(known, adjusted):
        out[i] = q
    return out


def seed_orders(methods: list[Group], low: bool) -> dict:
    """seed -> the methods' order on that seed, for seeds every method ran (empty with one seed)."""
    seeds = set.intersection(*(set(g.per_seed) for g in methods)) if methods else set()
    if len(seeds) < 2:
        return {}
    sign = 1.0 if low else -1.0
    return {s: [g.name for g in sorted(methods, key=lambda g: sign * g.per_seed[s])] for s in sorted(seeds)}


def row_interval(row: dict, task, seed: int = 0) -> tuple[float, float]:
    """One row's own interval (one seed), from its predictions."""
    preds = predictions_of(row)
    if not preds or not row.get("main_metric"):
        return (math.nan, math.nan)
    fn = statistic(task, row["main_metric"], preds)
    return stats.bootstrap_interval(fn, len(preds), n_boot=N_BOOT, seed=seed)


def errors_of(row: dict, dev_rows: list[dict], limit: int = 3) -> list[dict]:
    """A few dev rows the row's predictions got wrong (classification), for the report."""
    preds = predictions_of(row) or []
    wrong = [p for p in preds if "scores" in p or isinstance(p.get("label"), int)]
    wrong = [p for p in wrong if isinstance(p.get("label"), int) and p["prediction"] != p["label"]]
    return [{**p, "row": dev_rows[p["index"]]} for p in wrong[:limit] if p["index"] < len(dev_rows)]
