"""Task presets over the offline shared data, user task files, and the TF-IDF baseline (+ its CLI)."""

import dataclasses
import json

import pytest

from tunelab.data import DataError, shared_data_dir
from tunelab.data.tasks import (
    Task,
    get_task,
    load_split,
    load_task_file,
    task_names,
)

needs_data = pytest.mark.skipif(
    not (shared_data_dir() / "glue").is_dir(), reason=f"shared data not found at {shared_data_dir()}"
)

# task -> (train rows, dev rows); the GLUE numbers are the published split sizes (shared/data/README.md)
COUNTS = {
    "sst2": (67_349, 872),
    "cola": (8_551, 527),
    "mrpc": (3_668, 408),
    "stsb": (5_749, 1_500),
    "rte": (2_490, 277),
    "wnli": (635, 71),
    "qnli": (None, 5_463),
    "squad": (1_160, 247),  # 1,407 questions: first 4 articles / the 5th
    "wmt14-en-de": (2_003, 1_000),  # newstest2014's 3,003 lines
    "lima": (926, 103),
    "alpaca": (90, 10),
    "hh-rlhf": (1_849, 463),  # 2,312 pairs, 80/20
}
ROW_KEYS = {
    "classification": {"text", "text_pair", "label"},
    "regression": {"text", "text_pair", "label"},
    "extractive_qa": {"id", "question", "context", "answers", "answer_starts"},
    "seq2seq": {"source", "target"},
    "preference": {"chosen", "rejected"},
}


def test_registry():
    assert set(task_names()) == set(COUNTS)
    assert get_task("SST2") is get_task("sst2")
    assert get_task(get_task("cola")).main_metric == "mcc"
    with pytest.raises(DataError, match="unknown task 'nope'.*sst2"):
        get_task("nope")


@needs_data
@pytest.mark.parametrize("name", list(COUNTS))
def test_preset_splits(name):
    task = get_task(name)
    n_train, n_dev = COUNTS[name]
    dev = load_split(task, "dev")
    assert len(dev) == n_dev
    if n_train is not None:
        assert len(load_split(name, "train")) == n_train
    if task.type in ROW_KEYS:
        assert all(set(r) == ROW_KEYS[task.type] for r in dev)
    if task.type == "classification":
        assert len(task.labels) == 2
        assert {r["label"] for r in dev} == {0, 1}
        assert all(isinstance(r["text"], str) and r["text"] for r in dev)
        assert all((r["text_pair"] is not None) == task.is_pair for r in dev)
    if task.type == "instruction":
        assert all(r["instruction"] and "output" in r for r in dev)


@needs_data
def test_label_ids_follow_the_label_names():
    rte = get_task("rte")
    assert rte.labels == ("entailment", "not_entailment")
    dev = load_split(rte, "dev")
    assert sum(r["label"] == 0 for r in dev) == 146  # entailment, per the README
    assert sum(r["label"] == 0 for r in load_split("qnli", "dev")) == 2_702
    mrpc = load_split("mrpc", "dev")
    assert mrpc[0]["text_pair"].startswith('"The foodservice pie')  # a bare quote char: QUOTE_NONE kept the line


@needs_data
def test_qnli_train_is_a_clear_error():
    with pytest.raises(DataError, match="QNLI train is not available offline.*own file"):
        load_split("qnli", "train")


@needs_data
def test_stsb_scores_are_floats_in_range():
    for split in ("train", "dev"):
        rows = load_split("stsb", split)
        assert all(isinstance(r["label"], float) and 0.0 <= r["label"] <= 5.0 for r in rows)
        assert all(r["text"] and r["text_pair"] for r in rows)
    assert len({r["label"] for r in rows}) > 20


@needs_data
def test_squad_v2_rows_and_disjoint_split():
    train, dev = load_split("squad", "train"), load_split("squad", "dev")
    assert len(train) + len(dev) == 1_407
    rows = train + dev
    answerable = [r for r in rows if r["answers"]]
    assert len(answerable) == 705 and len(rows) - len(answerable) == 702
    for r in rows:
        assert len(r["answers"]) == len(r["answer_starts"])
        for text, start in zip(r["answers"], r["answer_starts"]):
            assert r["context"][start : start + len(text)] == text
    assert not {r["id"] for r in train} & {r["id"] for r in dev}
    assert not {r["context"] for r in train} & {r["context"] for r in dev}
    assert any(r["answers"] for r in dev) and any(not r["answers"] for r in dev)


@needs_data
def test_limit_is_a_stable_seeded_sample():
    full = load_split("cola", "dev")
    a = load_split("cola", "dev", limit=50, seed=1)
    assert len(a) == 50 and a == load_split("cola", "dev", limit=50, seed=1)
    assert a != load_split("cola", "dev", limit=50, seed=2)
    assert a != full[:50]
    assert [full.index(r) for r in a] == sorted(full.index(r) for r in a)  # file order kept
    small = load_split("cola", "dev", limit=20, seed=1)
    assert all(r in a for r in small)  # nested
    assert load_split("cola", "dev", limit=10_000) == full


def test_missing_shared_folder_says_where_it_looked(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    monkeypatch.setenv("TUNELAB_SHARED_DATA", str(missing))
    with pytest.raises(DataError, match="TUNELAB_SHARED_DATA") as e:
        load_split("sst2", "dev")
    assert str(missing) in str(e.value)


# ----------------------------------------------------------------------------------- user files
def test_user_file_through_the_task_fields(tmp_path):
    csv_file = tmp_path / "reviews.csv"
    csv_file.write_text('text,label\ngreat film,positive\n"dull, long",0\n', encoding="utf-8")
    assert load_task_file("sst2", csv_file) == [
        {"text": "great film", "text_pair": None, "label": 1},
        {"text": "dull, long", "text_pair": None, "label": 0},
    ]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"sentence1": "a", "sentence2": "b", "label": 3.5}) + "\n", encoding="utf-8")
    assert load_split("stsb", "train", path=pairs) == [{"text": "a", "text_pair": "b", "label": 3.5}]


def test_malformed_user_files_give_clear_errors(tmp_path):
    no_label = tmp_path / "no_label.tsv"
    no_label.write_text("text\tscore\nfine\t1\n", encoding="utf-8")
    with pytest.raises(
        DataError, match=r"no_label.tsv line 2: missing or empty field 'label'.*Fields present: 'text', 'score'"
    ):
        load_task_file("sst2", no_label)

    bad_label = tmp_path / "bad_label.jsonl"
    bad_label.write_text('{"text": "ok", "label": 1}\n{"text": "meh", "label": "neutral"}\n', encoding="utf-8")
    with pytest.raises(
        DataError, match=r"bad_label.jsonl line 2: field 'label' is 'neutral'.*0 \(negative\), 1 \(positive\)"
    ):
        load_task_file(get_task("sst2"), bad_label)

    no_pair = tmp_path / "no_pair.json"
    no_pair.write_text('[{"text": "a", "label": 1}]', encoding="utf-8")
    with pytest.raises(DataError, match=r"no_pair.json row 1: missing or empty field 'text_pair'.*'sentence2'"):
        load_task_file("rte", no_pair)

    bad_score = tmp_path / "bad_score.csv"
    bad_score.write_text("text,text_pair,label\na,b,high\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad_score.csv line 2: field 'label' is 'high', not a number"):
        load_task_file("stsb", bad_score)


def test_task_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_task("sst2").name = "x"  # type: ignore[misc]
    assert Task("t", "classification").main_metric == "accuracy"


# ------------------------------------------------------------------------------------ baseline
@needs_data
def test_tfidf_baseline_sst2():
    from tunelab.evaluation.baseline import tfidf_baseline

    result = tfidf_baseline("sst2", train_limit=5000)
    assert result["model"] == "tfidf-logreg" and result["task"] == "sst2"
    assert result["n_train"] == 5000 and result["n_dev"] == 872
    assert result["metrics"]["accuracy"] > 0.70
    assert {"accuracy", "f1", "mcc"} <= set(result["metrics"])


@needs_data
def test_tfidf_baseline_stsb_regression():
    from tunelab.evaluation.baseline import tfidf_baseline

    result = tfidf_baseline("stsb")
    assert set(result["metrics"]) == {"pearson", "spearman"}
    assert result["metrics"]["pearson"] > 0.3


def test_tfidf_baseline_refuses_other_task_types():
    from tunelab.evaluation.baseline import tfidf_baseline

    with pytest.raises(DataError, match="classification or regression"):
        tfidf_baseline("squad")


@needs_data
def test_baseline_cli(capsys, tmp_path):
    from tunelab.cli import main

    out = tmp_path / "res" / "rte.json"
    assert main(["baseline", "tfidf", "--task", "rte", "--limit", "1000", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "metric" in printed and "accuracy" in printed and "train 1,000" in printed
    saved = json.loads(out.read_text())
    assert saved["n_train"] == 1000 and saved["n_dev"] == 277
    assert f"{saved['metrics']['accuracy']:.4f}" in printed

    assert main(["baseline", "tfidf", "--task", "hh-rlhf"]) == 2
    assert "classification or regression" in capsys.readouterr().err


def test_shared_data_is_found_from_the_working_folder_when_the_package_is_installed_elsewhere(tmp_path, monkeypatch):
    """A non-editable install has no repository around the package: `shared/data` in or beside the working
    folder is found; TUNELAB_SHARED_DATA wins over both."""
    from tunelab.data import tasks as T

    monkeypatch.delenv(T.ENV_VAR, raising=False)
    monkeypatch.setattr(T, "__file__", str(tmp_path / "site-packages" / "tunelab" / "data" / "tasks.py"))
    (tmp_path / "proj" / "shared" / "data").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "proj")
    assert T.shared_data_dir() == tmp_path / "proj" / "shared" / "data"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.setenv(T.ENV_VAR, str(tmp_path / "elsewhere"))
    assert T.shared_data_dir() == tmp_path / "elsewhere"
