"""Task metrics as pure functions of predictions and references, exactly as each benchmark defines them.

Classification and correlation metrics call scikit-learn and SciPy (what GLUE's own evaluation
uses); BLEU calls sacrebleu. SQuAD's exact match and F1 follow the official v2.0 evaluation script's
logic, which no maintained library ships as a function, so it is written here.
Edge cases follow the references: an undefined precision/recall/F1 is 0 (sklearn's
zero_division=0), an undefined correlation (constant input) is NaN as in SciPy, a single-class
Matthews correlation is 0.
"""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Sequence

import numpy as np


# ------------------------------------------------------------------------------ classification
def accuracy(preds: Sequence, refs: Sequence) -> float:
    _same_length(preds, refs)
    if len(refs) == 0:
        return 0.0
    return float(np.mean(np.asarray(preds) == np.asarray(refs)))


def precision_recall_f1(preds: Sequence, refs: Sequence, average: str = "binary", pos_label=1) -> dict:
    """Precision, recall and F1; `average` is 'binary' (of `pos_label`) or 'macro' (unweighted class mean)."""
    from sklearn.metrics import precision_recall_fscore_support

    _same_length(preds, refs)
    kw = {"pos_label": pos_label} if average == "binary" else {}
    p, r, f, _ = precision_recall_fscore_support(refs, preds, average=average, zero_division=0, **kw)
    return {"precision": float(p), "recall": float(r), "f1": float(f)}


def matthews_corr(preds: Sequence, refs: Sequence) -> float:
    """Matthews correlation coefficient (CoLA's metric)."""
    from sklearn.metrics import matthews_corrcoef

    _same_length(preds, refs)
    return float(matthews_corrcoef(refs, preds))


def classification_metrics(preds: Sequence, refs: Sequence, num_labels: int = 2) -> dict:
    """Accuracy plus P/R/F1 (binary for 2 classes, macro otherwise) and Matthews correlation."""
    out = {"accuracy": accuracy(preds, refs)}
    average = "binary" if num_labels == 2 else "macro"
    out.update({f"{k}": v for k, v in precision_recall_f1(preds, refs, average=average).items()})
    out["mcc"] = matthews_corr(preds, refs)
    return out


# --------------------------------------------------------------------------------- regression
def pearson(preds: Sequence[float], refs: Sequence[float]) -> float:
    from scipy.stats import pearsonr

    return _correlation(pearsonr, preds, refs)


def spearman(preds: Sequence[float], refs: Sequence[float]) -> float:
    from scipy.stats import spearmanr

    return _correlation(spearmanr, preds, refs)


def _correlation(fn, preds, refs) -> float:
    _same_length(preds, refs)
    x, y = np.asarray(preds, dtype=float), np.asarray(refs, dtype=float)
    if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")  # undefined, as SciPy says (it warns and returns NaN)
    return float(fn(x, y)[0])


# -------------------------------------------------------------------------------------- SQuAD
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower-case, strip punctuation and the articles a/an/the, collapse whitespace (official script)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _tokens(s: str) -> list[str]:
    return normalize_answer(s).split() if s else []


def squad_exact(prediction: str, gold: str) -> int:
    return int(normalize_answer(gold) == normalize_answer(prediction))


def squad_f1(prediction: str, gold: str) -> float:
    gold_toks, pred_toks = _tokens(gold), _tokens(prediction)
    if not gold_toks or not pred_toks:
        # v2: an unanswerable question (empty gold) scores 1 only for an empty prediction
        return float(gold_toks == pred_toks)
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_toks), same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> dict:
    """SQuAD v1/v2 exact match and F1 in percent: max over the gold answers of each question.

    A question with no gold answer (v2 unanswerable) has gold [""]: only an empty prediction scores.
    Also reports the answerable (HasAns) and unanswerable (NoAns) parts, as the official v2 script does.
    """
    _same_length(predictions, golds)
    em, f1, has = [], [], []
    for pred, answers in zip(predictions, golds):
        answers = [a for a in answers if normalize_answer(a)] or [""]
        has.append(answers != [""])
        em.append(max(squad_exact(pred, a) for a in answers))
        f1.append(max(squad_f1(pred, a) for a in answers))
    out = {"exact": _pct(em), "f1": _pct(f1), "total": len(em)}
    for name, keep in (("HasAns", True), ("NoAns", False)):
        idx = [i for i, h in enumerate(has) if h == keep]
        if idx:
            out[f"{name}_exact"] = _pct([em[i] for i in idx])
            out[f"{name}_f1"] = _pct([f1[i] for i in idx])
            out[f"{name}_total"] = len(idx)
    return out


def _pct(values: list[float]) -> float:
    return 100.0 * sum(values) / len(values) if values else 0.0


# ---------------------------------------------------------------------------------- generation
def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]], **kw) -> float:
    """Corpus BLEU with sacrebleu's defaults (13a tokenisation, exponential smoothing off for corpus)."""
    import sacrebleu

    _same_length(hypotheses, references)
    refs = [references] if references and isinstance(references[0], str) else [list(r) for r in zip(*references)]
    return float(sacrebleu.corpus_bleu(list(hypotheses), refs, **kw).score)


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine similarity of paired rows of two embedding matrices (a zero vector scores 0)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"embedding shapes differ: {a.shape} vs {b.shape}")
    if len(a) == 0:
        return 0.0
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    denom = na * nb
    cos = np.divide((a * b).sum(axis=1), denom, out=np.zeros(len(a)), where=denom > 0)
    return float(cos.mean())


def perplexity(total_nll: float, n_tokens: int) -> float:
    """exp(mean negative log-likelihood per token)."""
    if n_tokens <= 0:
        raise ValueError("perplexity needs at least one token")
    return math.exp(total_nll / n_tokens)


def _same_length(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} predictions but {len(b)} references")
