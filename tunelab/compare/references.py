"""Reference rows of a grid, per task, scored on exactly the cells' dev rows and written with their
per-row predictions like cells:

- majority:      the train sample's most frequent class (the mean score for regression): what a model
                 that learnt nothing from the text scores;
- tfidf:         TF-IDF + logistic regression (Ridge for regression) fitted on the grid's train sample;
- tfidf-full:    the same fitted on the whole train split (what a classical model does with all the data).

The zero-shot reference (the untrained causal model through the same verbalizer) is a cell of its own
(plan.py). The TF-IDF model and features are those of `tunelab baseline tfidf`
(tunelab/evaluation/baseline.py).
"""

from __future__ import annotations

import time
from pathlib import Path

from tunelab.compare.grid import Grid, TaskEntry
from tunelab.compare.plan import Cell, digest, safe_name, seed_for, task_fingerprint, task_object, task_splits
from tunelab.evaluation.baseline import fit_and_predict, majority_predictions
from tunelab.evaluation.prediction_rows import prediction_metrics, write_predictions

# reference name -> (model column shown, which train rows)
REFERENCES = {
    "majority": ("majority-class", "train"),
    "tfidf": ("tfidf-logreg", "train"),
    "tfidf-full": ("tfidf-logreg", "train_full"),
}


def references_for(grid: Grid) -> list[str]:
    """The reference rows a grid gets for each classification / regression task."""
    out = ["majority"]
    if "tfidf" in grid.baselines:
        out += ["tfidf", "tfidf-full"]
    return out


def reference_key(kind: str, grid: Grid, t: TaskEntry) -> str:
    return f"{kind}-" + digest({"baseline": kind, "task": task_fingerprint(t, seed_for(grid, t))})


def reference_cell(kind: str, grid: Grid, t: TaskEntry) -> Cell:
    """The reference's row as planned (its labels and key), like a grid cell's; nothing of it runs in a process."""
    task = task_object(t)
    return Cell(
        key=reference_key(kind, grid, t),
        model=shown_model(kind, t),
        method=kind,
        task=t.shown,
        model_name=kind,
        method_name=kind,
        task_name=t.name,
        kind="baseline",
        mode=kind,
        config=None,
        eval={"seed": seed_for(grid, t), "main_metric": task.main_metric},
        role="reference",
    )


def reference_dir(out: Path, kind: str, t: TaskEntry, key: str) -> Path:
    return out / "references" / f"{kind}-{safe_name(t.shown, 24)}-{key.split('-')[-1][:8]}"


def shown_model(kind: str, t: TaskEntry) -> str:
    name = REFERENCES[kind][0]
    return name.replace("logreg", "ridge") if t.task_type == "regression" else name


def run_reference(kind: str, grid: Grid, t: TaskEntry, folder: Path) -> dict:
    """Fit and score one reference; writes folder/predictions.jsonl; a result dict shaped like a cell's."""
    task = task_object(t)
    seed = seed_for(grid, t)
    t0 = time.perf_counter()
    splits = task_splits(t, seed)
    train, dev = splits[REFERENCES[kind][1]], splits["dev"]
    t1 = time.perf_counter()
    if kind == "majority":
        predictions, n_params = majority_predictions(task, train, dev), 1
    else:
        predictions, n_params = fit_and_predict(task, train, dev, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    write_predictions(folder / "predictions.jsonl", predictions)
    return {
        "status": "done",
        "metrics": prediction_metrics(task, predictions),
        "n": len(predictions),
        "n_train": len(train),
        "train": {"trainable_params": n_params},  # coefficients; no "total", so no trainable %
        "wall_s": round(time.perf_counter() - t0, 3),
        # in-process, so no start-up; a reference's fit and predictions count as scoring (docs/compare.md)
        "phases": {"loading": round(t1 - t0, 3), "scoring": round(time.perf_counter() - t1, 3)},
        "run_dir": str(folder),
    }
