"""Classical baselines as grid rows: TF-IDF + logistic regression (Ridge for regression).

The model and features are those of `tunelab baseline tfidf` (tunelab/evaluation/baseline.py), fitted on
the same seeded train sample and scored on the same dev sample as the grid's cells, so the rows compare
like for like (`tunelab baseline` itself scores the whole dev split).
"""

from __future__ import annotations

import time

from tunelab.compare.cells import digest, seed_for, task_fingerprint, task_object, task_rows
from tunelab.compare.grid import Grid, TaskEntry


def baseline_key(kind: str, grid: Grid, t: TaskEntry) -> str:
    return f"{kind}-" + digest({"baseline": kind, "task": task_fingerprint(t, seed_for(grid, t))})


def tfidf(grid: Grid, t: TaskEntry) -> dict:
    """A result dict shaped like a cell's result.json (status, metrics, wall_s ...)."""
    from tunelab.evaluation.baseline import fit_and_score

    task = task_object(t)
    seed = seed_for(grid, t)
    t0 = time.perf_counter()
    train, dev = task_rows(t, "train", seed), task_rows(t, "dev", seed)
    scores, n_params = fit_and_score(task, train, dev, seed=seed)
    return {
        "status": "done",
        "metrics": scores,
        "train": {"trainable_params": n_params},  # coefficients; no "total", so no trainable %
        "wall_s": round(time.perf_counter() - t0, 3),
    }
