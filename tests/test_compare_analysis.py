"""compare/analysis.py on synthetic per-row predictions with known accuracies: who wins, what ties,
the tie rule, the reference gain, seeds whose ranking disagrees, and a lower-is-better metric."""

import json
import random

import pytest

from tunelab.compare import analysis as A
from tunelab.compare.report import statements
from tunelab.data.tasks import Task
from tunelab.evaluation.prediction_rows import write_predictions
from tunelab.metrics.stats import mcnemar_exact

TASK = Task("toy", "classification", ("neg", "pos"), main_metric="accuracy")
N = 400


def labels(seed=0):
    rng = random.Random(seed)
    return [rng.randint(0, 1) for _ in range(N)]


def row(tmp_path, name, correct, gold, trainable=1000, wall=10.0, role="method", seed=0, model="m"):
    """A finished row whose predictions are right exactly on the rows where `correct` is true."""
    folder = tmp_path / f"{model}-{name}-{seed}"
    preds = [{"index": i, "label": y, "prediction": y if ok else 1 - y} for i, (y, ok) in enumerate(zip(gold, correct))]
    write_predictions(folder / "predictions.jsonl", preds)
    acc = sum(correct) / len(correct)
    return {"model": model, "method": name, "task": "toy", "status": "done", "main_metric": "accuracy",
            "main_value": acc, "role": role, "seed": None if role == "reference" else seed,
            "cell_dir": str(folder), "trainable_params": trainable, "wall_s": wall}  # fmt: skip


def hits(k, seed):
    """A 0/1 vector with exactly k ones at seeded positions."""
    idx = set(random.Random(seed).sample(range(N), k))
    return [i in idx for i in range(N)]


def test_a_clear_winner_is_named_and_the_gain_is_from_the_strongest_reference(tmp_path):
    gold = labels()
    rows = [
        row(tmp_path, "big", hits(380, 1), gold, trainable=10_000),
        row(tmp_path, "mid", hits(300, 2), gold),
        row(tmp_path, "low", hits(280, 3), gold),
        row(tmp_path, "majority", [y == 0 for y in gold], gold, role="reference", model="majority-class"),
        row(tmp_path, "tfidf", hits(320, 4), gold, role="reference", model="tfidf-logreg"),
    ]
    a = A.analyse(rows, TASK)
    assert a["winner"].method == "big" and not a["tied"]
    assert a["reference"].method == "tfidf"  # the strongest reference, not the weakest
    assert a["reference_gain"] == pytest.approx(0.95 - 0.80) and a["reference_p"] < 0.001
    lo, hi = a["reference_gain_ci"]
    assert lo < 0.15 < hi
    # exact McNemar for one seed of accuracy, Holm over the two comparisons
    mid = a["methods"][1]
    assert mid.p_vs_best == pytest.approx(mcnemar_exact(hits(380, 1), hits(300, 2))["p"])
    assert mid.p_vs_best_holm >= mid.p_vs_best
    lo, hi = a["best"].ci
    assert lo < 0.95 < hi and hi - lo < 0.06
    text = " ".join(statements(a))
    assert "Winner: m × big" in text and "significant" in text and "Tied" not in text


def test_close_methods_are_tied_and_the_tie_rule_picks_the_smaller(tmp_path):
    gold = labels()
    base = hits(320, 5)
    close = list(base)
    flipped = [i for i, ok in enumerate(base) if ok][:4]
    for i in flipped:  # four rows fewer right: 0.79 against 0.80
        close[i] = False
    rows = [
        row(tmp_path, "full", base, gold, trainable=100_000, wall=60),
        row(tmp_path, "lora", close, gold, trainable=5_000, wall=30),
        row(tmp_path, "prompt", hits(200, 6), gold, trainable=10, wall=20),
    ]
    a = A.analyse(rows, TASK)
    assert a["winner"] is None and [g.method for g in a["tied"]] == ["full", "lora"]
    assert a["pick"].method == "lora"  # fewer trainable parameters among the tied
    text = " ".join(statements(a))
    assert "Tied within noise: m × full, m × lora" in text and "Pick by the tie rule" in text


def test_a_reference_that_is_not_beaten_is_said(tmp_path):
    gold = labels()
    rows = [row(tmp_path, "lora", hits(300, 7), gold),
            row(tmp_path, "tfidf-full", hits(305, 8), gold, role="reference", model="tfidf-logreg")]  # fmt: skip
    a = A.analyse(rows, TASK)
    assert a["reference_gain"] < 0 and a["reference_p"] > 0.05
    assert "not significant: no better than this reference" in " ".join(statements(a))


def test_seeds_average_and_a_changing_ranking_is_reported(tmp_path):
    gold = labels()
    rows = [
        row(tmp_path, "a", hits(320, 10), gold, seed=0), row(tmp_path, "a", hits(300, 11), gold, seed=1),
        row(tmp_path, "b", hits(310, 12), gold, seed=0), row(tmp_path, "b", hits(315, 13), gold, seed=1),
    ]  # fmt: skip
    a = A.analyse(rows, TASK)
    g = {x.method: x for x in a["groups"]}
    assert g["a"].mean == pytest.approx(0.775) and g["a"].sd == pytest.approx(0.05 / 2**0.5 * 1.0, rel=1e-9)
    assert g["b"].n == N and len(g["b"].rows) == 2
    assert a["seed_orders"] == {0: ["m × a", "m × b"], 1: ["m × b", "m × a"]}
    assert "The ranking changes between seeds" in " ".join(statements(a))
    # several seeds: the paired bootstrap on the seed-mean, not McNemar
    assert 0.0 < a["methods"][1].p_vs_best <= 1.0


def test_lower_is_better_perplexity(tmp_path):
    rng = random.Random(0)
    rows = []
    for name, scale in (("good", 1.0), ("bad", 1.6)):
        folder = tmp_path / name
        preds = [{"index": i, "loss_sum": scale * rng.uniform(5, 15), "tokens": 10} for i in range(200)]
        write_predictions(folder / "predictions.jsonl", preds)
        ppl = A.statistic(Task("inst", "instruction", main_metric="perplexity"), "perplexity", preds)(list(range(200)))
        rows.append({"model": "m", "method": name, "task": "inst", "status": "done", "main_metric": "perplexity",
                     "main_value": ppl, "role": "method", "seed": 0, "cell_dir": str(folder)})  # fmt: skip
    a = A.analyse(rows, Task("inst", "instruction", main_metric="perplexity"))
    assert a["lower_is_better"] and a["winner"].method == "good"
    lo, hi = a["best"].ci
    assert lo < a["best"].mean < hi


def test_rows_without_predictions_still_rank_but_claim_nothing(tmp_path):
    rows = [{"model": "m", "method": x, "task": "toy", "status": "done", "main_metric": "accuracy", "main_value": v,
             "role": "method", "seed": 0, "cell_dir": str(tmp_path / "none")} for x, v in (("a", 0.9), ("b", 0.5))]  # fmt: skip
    a = A.analyse(rows, TASK)
    assert a["best"].method == "a" and a["winner"] is None  # no paired test without predictions: no winner
    assert "[no interval]" in " ".join(statements(a))
    json.dumps([g.name for g in a["groups"]])


def test_a_model_whose_rows_ran_on_two_commits_or_in_bf16_is_said(tmp_path):
    """A hub id's branch that moved between cells (each row records the commit it loaded: `model_commit`), and rows
    scored in 16 bits (`score_dtype`), are stated under the task; rows of one commit in fp32 say nothing."""
    gold = labels()
    rows = [row(tmp_path, "lora", hits(300, 7), gold), row(tmp_path, "full", hits(310, 8), gold)]
    for r, commit in zip(rows, ("a" * 40, "a" * 40)):
        r.update(model_commit=commit, score_dtype="float32")
    text = " ".join(statements(A.analyse(rows, TASK)))
    assert "commits of its hub repo" not in text and "scored in" not in text
    rows[1].update(model_commit="b" * 40, score_dtype="bfloat16")
    text = " ".join(statements(A.analyse(rows, TASK)))
    assert f"The rows of m ran on 2 commits of its hub repo ({'a' * 10}, {'b' * 10})" in text
    assert "scored in bfloat16 and float32 (score_dtype)" in text
