"""Metrics against independent references: closed forms, NumPy, scikit-learn, SciPy, sacrebleu, and
the official SQuAD v2 logic on known cases."""

import math

import numpy as np
import pytest
from scipy.stats import rankdata
from sklearn.metrics import f1_score, precision_score, recall_score

from tunelab import metrics as M

RNG = np.random.default_rng(0)


def mcc_closed_form(p, r):
    p, r = np.asarray(p), np.asarray(r)
    tp = float(np.sum((p == 1) & (r == 1)))
    tn = float(np.sum((p == 0) & (r == 0)))
    fp = float(np.sum((p == 1) & (r == 0)))
    fn = float(np.sum((p == 0) & (r == 1)))
    d = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if d == 0 else (tp * tn - fp * fn) / d


@pytest.mark.parametrize("seed", range(5))
def test_binary_classification_against_references(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    p, r = rng.integers(0, 2, n), rng.integers(0, 2, n)
    assert abs(M.accuracy(p, r) - float(np.mean(p == r))) < 1e-12
    prf = M.precision_recall_f1(p, r)
    assert abs(prf["precision"] - precision_score(r, p, zero_division=0)) < 1e-12
    assert abs(prf["recall"] - recall_score(r, p, zero_division=0)) < 1e-12
    assert abs(prf["f1"] - f1_score(r, p, zero_division=0)) < 1e-12
    assert abs(M.matthews_corr(p, r) - mcc_closed_form(p, r)) < 1e-9


def test_macro_f1_is_the_unweighted_class_mean():
    p, r = RNG.integers(0, 3, 100), RNG.integers(0, 3, 100)
    per_class = [f1_score(r == c, p == c, zero_division=0) for c in range(3)]
    assert abs(M.precision_recall_f1(p, r, average="macro")["f1"] - np.mean(per_class)) < 1e-12


def test_classification_edge_cases():
    assert M.precision_recall_f1([0, 0, 0], [0, 0, 0]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert M.matthews_corr([1, 1, 1], [1, 1, 1]) == 0.0  # a single class: undefined -> 0, as sklearn
    assert M.matthews_corr([1, 0, 1, 0], [1, 0, 1, 0]) == 1.0
    assert M.accuracy([], []) == 0.0
    with pytest.raises(ValueError, match="2 predictions but 3 references"):
        M.accuracy([1, 0], [1, 0, 1])


def test_correlations_against_numpy_with_ties():
    x = RNG.normal(size=50).round(1)  # rounding makes ties
    y = x + RNG.normal(size=50)
    assert abs(M.pearson(x, y) - np.corrcoef(x, y)[0, 1]) < 1e-9
    assert abs(M.spearman(x, y) - np.corrcoef(rankdata(x), rankdata(y))[0, 1]) < 1e-9
    assert math.isnan(M.pearson([1, 1, 1], [1, 2, 3])) and math.isnan(M.spearman([1, 2], [3, 3]))


@pytest.mark.parametrize(
    "pred, gold, em, f1",
    [
        ("The Normans", "Normans", 1, 1.0),  # article and case
        ("Normans!", "the normans", 1, 1.0),  # punctuation
        ("in   France", "in France", 1, 1.0),  # whitespace
        ("10th century", "in the 10th century", 0, 0.8),  # P=1, R=2/3
        ("Denmark, Iceland and Norway", "Denmark Iceland Norway", 0, 6 / 7),  # P=3/4, R=1
        ("", "Normans", 0, 0.0),
        ("", "", 1, 1.0),  # v2 unanswerable, abstained
        ("Normans", "", 0, 0.0),  # v2 unanswerable, answered
        ("a an the", "", 1, 1.0),  # normalises to empty
    ],
)
def test_squad_known_cases(pred, gold, em, f1):
    assert M.squad_exact(pred, gold) == em
    assert abs(M.squad_f1(pred, gold) - f1) < 1e-9


def test_squad_scores_take_the_max_over_golds_and_split_v2():
    preds = ["Normans", "10th century", "", "France"]
    golds = [["The Normans", "Norse"], ["in the 10th century", "10th century"], [], [""]]
    s = M.squad_scores(preds, golds)
    assert s["exact"] == 75.0 and abs(s["f1"] - 75.0) < 1e-9
    assert s["HasAns_total"] == 2 and s["HasAns_exact"] == 100.0
    assert s["NoAns_total"] == 2 and s["NoAns_exact"] == 50.0


def test_bleu_against_sacrebleu():
    import sacrebleu

    hyps = ["the cat sat on the mat", "a quick brown fox", ""]
    refs = ["the cat sat on a mat", "the quick brown fox jumps", "nothing"]
    assert abs(M.corpus_bleu(hyps, refs) - sacrebleu.corpus_bleu(hyps, [refs]).score) < 1e-9
    assert abs(M.corpus_bleu(["same text here ok"], ["same text here ok"]) - 100.0) < 1e-9
    multi = M.corpus_bleu(hyps, [[r, r.upper()] for r in refs])
    assert abs(multi - sacrebleu.corpus_bleu(hyps, [refs, [r.upper() for r in refs]]).score) < 1e-9


def test_cosine_and_perplexity():
    a, b = RNG.normal(size=(7, 5)), RNG.normal(size=(7, 5))
    ref = np.mean([x @ y / np.linalg.norm(x) / np.linalg.norm(y) for x, y in zip(a, b)])
    assert abs(M.mean_cosine(a, b) - ref) < 1e-12
    assert M.mean_cosine(np.zeros((1, 3)), np.ones((1, 3))) == 0.0
    assert abs(M.perplexity(10 * math.log(4), 10) - 4.0) < 1e-9
