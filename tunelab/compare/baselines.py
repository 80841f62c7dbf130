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
    import numpy as np

    from tunelab.evaluation import metrics as M
    from tunelab.evaluation.baseline import _features

    task = task_object(t)
    seed = seed_for(grid, t)
    t0 = time.perf_counter()
    train, dev = task_rows(t, "train", seed), task_rows(t, "dev", seed)
    featurize = _features(task.is_pair or any(r.get("text_pair") for r in train))
    x_train, x_dev = featurize(train, fit=True), featurize(dev, fit=False)
    y_train = np.asarray([r["label"] for r in train])
    refs = [r["label"] for r in dev]
    if task.type == "regression":
        from sklearn.linear_model import Ridge

        model = Ridge(alpha=1.0).fit(x_train, y_train.astype(float))
        preds = model.predict(x_dev).tolist()
        scores = {"pearson": M.pearson(preds, refs), "spearman": M.spearman(preds, refs)}
        n_params = int(model.coef_.size + 1)
    else:
        from sklearn.linear_model import LogisticRegression

        if len(set(y_train.tolist())) < 2:
            raise ValueError(f"{t.shown}: the training sample has a single class; raise train_limit")
        model = LogisticRegression(C=1.0, max_iter=1000, solver="liblinear", random_state=seed).fit(x_train, y_train)
        preds = model.predict(x_dev).tolist()
        scores = M.classification_metrics(preds, refs, num_labels=len(task.labels))
        n_params = int(model.coef_.size + model.intercept_.size)
    return {
        "status": "done",
        "metrics": scores,
        "train": {"trainable_params": n_params},  # coefficients; no "total", so no trainable %
        "wall_s": round(time.perf_counter() - t0, 3),
    }
