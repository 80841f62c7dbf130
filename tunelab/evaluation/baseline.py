"""A classical baseline for the classification/regression task presets: TF-IDF + a linear model.

Features: word 1-2 gram TF-IDF (sublinear tf, min_df=1, fitted on the train split only). For a sentence
pair, `text` and `text_pair` are vectorised by two separate vectorisers and the two matrices are
concatenated side by side (scipy hstack), so a word weighs differently in the first and the second
sentence; one extra column, the cosine similarity of the two sentences under a shared word TF-IDF,
gives the linear model the one pair interaction it cannot build from the concatenation itself.
Models: LogisticRegression(C=1.0, max_iter=1000, liblinear solver) for classification, Ridge(alpha=1.0) for regression
(stsb). Dev-set metrics come from tunelab.metrics.

    tfidf_baseline("sst2")["metrics"]["accuracy"]
"""

from __future__ import annotations

import time

from tunelab.data import tasks
from tunelab.data.errors import DataError
from tunelab.evaluation.prediction_rows import prediction_metrics


def tfidf_baseline(task: str, train_limit: int | None = None, seed: int = 0, C: float = 1.0) -> dict:
    """Train on the task's train split (a seeded sample of `train_limit` rows if given), score its dev split."""

    spec = tasks.get_task(task)
    if spec.type not in ("classification", "regression"):
        raise DataError(
            f"the TF-IDF baseline needs a classification or regression task; {spec.name!r} is {spec.type}. "
            f"Choose one of: {', '.join(_supported())}."
        )
    start = time.perf_counter()
    train = tasks.load_split(spec, "train", limit=train_limit, seed=seed)
    dev = tasks.load_split(spec, "dev")
    scores, _ = fit_and_score(spec, train, dev, C=C, seed=seed)
    return {
        "task": spec.name,
        "model": "tfidf-logreg" if spec.type == "classification" else "tfidf-ridge",
        "main_metric": spec.main_metric,
        "metrics": scores,
        "n_train": len(train),
        "n_dev": len(dev),
        "seconds": round(time.perf_counter() - start, 3),
    }


def fit_and_score(spec, train: list[dict], dev: list[dict], C: float = 1.0, seed: int = 0) -> tuple[dict, int]:
    """TF-IDF features, then logistic regression (classification) or ridge (regression): (dev metrics, #coefficients)."""
    predictions, n_params = fit_and_predict(spec, train, dev, C=C, seed=seed)
    return prediction_metrics(spec, predictions), n_params


def fit_and_predict(spec, train: list[dict], dev: list[dict], C: float = 1.0, seed: int = 0) -> tuple[list[dict], int]:
    """As fit_and_score, but one prediction per dev row (the format of tunelab.evaluation.predictions:
    index, label, prediction and, for classes, their log-probabilities) and the number of coefficients."""
    import numpy as np

    if spec.type == "classification" and len({r["label"] for r in train}) < 2:
        raise DataError(f"{spec.name}: the training sample has a single class; use a larger train_limit.")
    featurize = _features(spec.is_pair or any(r.get("text_pair") for r in train))
    x_train, x_dev = featurize(train, fit=True), featurize(dev, fit=False)
    y_train = np.asarray([r["label"] for r in train])
    if spec.type == "regression":
        from sklearn.linear_model import Ridge

        model = Ridge(alpha=1.0).fit(x_train, y_train.astype(float))
        preds = model.predict(x_dev).tolist()
        rows = [{"index": i, "label": float(r["label"]), "prediction": p} for i, (r, p) in enumerate(zip(dev, preds))]
        return rows, int(model.coef_.size + 1)
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=C, max_iter=1000, solver="liblinear", random_state=seed).fit(x_train, y_train)
    logp = np.full((len(dev), len(spec.labels)), -1e30)  # finite: JSON has no -inf
    logp[:, model.classes_] = model.predict_log_proba(x_dev)  # classes absent from train get no mass
    rows = [
        {"index": i, "label": int(r["label"]), "prediction": int(np.argmax(lp)), "scores": lp.tolist()}
        for i, (r, lp) in enumerate(zip(dev, logp))
    ]
    return rows, int(model.coef_.size + model.intercept_.size)


def majority_predictions(spec, train: list[dict], dev: list[dict]) -> list[dict]:
    """The reference every classifier must beat: the train sample's most frequent class (ties: the lowest
    id) for every dev row; for regression the train sample's mean score."""
    from collections import Counter

    if spec.type == "regression":
        mean = sum(float(r["label"]) for r in train) / len(train)
        return [{"index": i, "label": float(r["label"]), "prediction": mean} for i, r in enumerate(dev)]
    counts = Counter(int(r["label"]) for r in train)
    top = min(counts, key=lambda c: (-counts[c], c))
    return [{"index": i, "label": int(r["label"]), "prediction": top} for i, r in enumerate(dev)]


def _supported() -> list[str]:
    # qnli has no train split offline
    return [n for n in tasks.task_names() if tasks.get_task(n).type in ("classification", "regression") and n != "qnli"]


def _vectorizer():
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)


def _features(pair: bool):
    """A function rows -> sparse matrix; fit=True fits the vectorisers (train split only)."""
    vecs = {"text": _vectorizer(), "text_pair": _vectorizer(), "shared": _vectorizer()}

    def featurize(rows: list[dict], fit: bool):
        import numpy as np
        from scipy.sparse import csr_matrix, hstack

        def apply(name, texts):
            return vecs[name].fit_transform(texts) if fit else vecs[name].transform(texts)

        a = [r["text"] for r in rows]
        if not pair:
            return apply("text", a)
        b = [r["text_pair"] or "" for r in rows]
        if fit:
            vecs["shared"].fit(a + b)
        sa, sb = vecs["shared"].transform(a), vecs["shared"].transform(b)  # rows are L2-normalised
        cosine = np.asarray(sa.multiply(sb).sum(axis=1)).reshape(-1, 1)
        return hstack([apply("text", a), apply("text_pair", b), csr_matrix(cosine)]).tocsr()

    return featurize
