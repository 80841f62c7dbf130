"""stage: classification — a sequence-classification head trained on the same loop, task metrics at the end."""

import json
import random

import pytest
import torch

import tunelab
from tunelab.config import load_config
from tunelab.testing import save_tiny_model_dir

GOOD = ["good", "great", "fine", "nice"]
BAD = ["bad", "awful", "poor", "sad"]


def toy_rows(n, seed):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        word = rng.choice(GOOD if label else BAD)
        filler = " ".join(rng.choice(["the", "film", "was", "plot", "a", "it"]) for _ in range(4))
        rows.append({"text": f"{word} {word} {filler}", "label": label})
    return rows


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cls")
    for split, n, seed in (("train", 64, 0), ("dev", 32, 1)):
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy_rows(n, seed)))
    return d


def cfg_for(model_dir, files, out, method):
    return load_config(
        {
            "stage": "classification",
            "output_dir": str(out),
            "model": {"name": model_dir},
            "task": {
                "labels": ["negative", "positive"],
                "train_file": str(files / "train.jsonl"),
                "dev_file": str(files / "dev.jsonl"),
                "max_length": 32,
            },
            "method": method,
            "training": {
                "epochs": 10,
                "batch_size": 16,
                "lr": 2e-3,
                "progress": False,
                "tensorboard": False,
                "warmup_steps": 2,
            },
        }
    )


@pytest.mark.parametrize(
    "arch, method", [("bert", {"name": "full"}), ("llama", {"name": "lora", "r": 8, "dropout": 0.0})]
)
def test_classifier_learns_and_reloads(arch, method, files, tmp_path):
    model_dir = save_tiny_model_dir(tmp_path / "m", arch=arch)
    result = tunelab.train(cfg_for(model_dir, files, tmp_path / "run", method))
    m = result.metrics
    assert m["eval_loss"] < m["eval_loss_before"]
    assert m["dev_accuracy"] >= 0.9, m
    manifest = json.loads((result.final_dir / "tunelab.json").read_text())
    assert manifest["task"]["labels"] == ["negative", "positive"]

    from tunelab.stages.classification import encode_pairs, predict
    from tunelab.stages.runs import load_run

    model, tok = load_run(str(result.run_dir), device="cpu")
    rows = [json.loads(line) for line in (files / "dev.jsonl").read_text().splitlines()]
    preds = predict(model, encode_pairs(rows, tok, 32, False), tok.pad_token_id, torch.device("cpu"))
    acc = sum(p == r["label"] for p, r in zip(preds, rows)) / len(rows)
    assert abs(acc - m["dev_accuracy"]) < 1e-9


def test_regression_task_reports_correlations(tmp_path):
    rng = random.Random(0)
    rows = []
    for _ in range(48):
        k = rng.randint(0, 4)
        rows.append({"text": " ".join(["good"] * k + ["the"] * (4 - k)), "text_pair": "ok", "label": float(k)})
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:32]))
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[32:]))
    model_dir = save_tiny_model_dir(tmp_path / "m", arch="bert")
    cfg = cfg_for(model_dir, tmp_path, tmp_path / "run", {"name": "full"})
    cfg = load_config({**cfg.model_dump(), "task": {**cfg.task.model_dump(), "type": "regression", "labels": []}})
    m = tunelab.train(cfg).metrics
    assert m["dev_pearson"] > 0.8, m


def test_classification_needs_a_task():
    from tunelab.config import ConfigError

    with pytest.raises(ConfigError, match="task.name"):
        load_config({"stage": "classification"})


def test_data_prepare_reports_a_classification_tasks_rows_as_training_builds_them(files, tmp_path, capsys, monkeypatch):
    """`tunelab data prepare` on stage classification (stages/describe.py): the counts, classes, truncated rows and
    length histogram of what `tunelab train` tokenises; a bad row is named before the tokenizer loads."""
    import re

    from test_preference import data_prepare_report

    import tunelab.models
    from tunelab.cli import main
    from tunelab.models import load_tokenizer
    from tunelab.stages import get as get_stage

    cfg = cfg_for(save_tiny_model_dir(tmp_path / "m", arch="bert"), files, tmp_path / "run", {"name": "full"})
    raw = cfg.model_dump(mode="json")
    raw["task"]["max_length"] = 8  # the toy rows are 7 words + [CLS] [SEP]: every one is cut
    path, out, fields = data_prepare_report(raw, tmp_path, capsys)
    run = load_config(str(path))
    bundle = get_stage("classification", run).build_data(run, load_tokenizer(run.model))
    assert (int(fields["train rows"]), int(fields["val rows"])) == (len(bundle.train), len(bundle.val)) == (64, 32)
    assert int(fields["truncated"]) == bundle.stats["truncated"] == 96
    counts = [sum(e["label"] == c for e in bundle.train) for c in (0, 1)]
    assert f"negative: {counts[0]}, positive: {counts[1]}" in out and min(counts) > 0
    bars = [int(ln.split()[-1]) for ln in out.splitlines() if ln.startswith("  ") and "-" in ln]
    assert sum(bars) == 64 and int(re.search(r"tokens +(\d+)", out)[1]) == 64 * 8
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": 0}\n{"text": "good"}\n')
    monkeypatch.setattr(tunelab.models, "load_tokenizer", lambda *a: pytest.fail("the tokenizer loaded first"))
    assert main(["data", "prepare", str(path), "--set", f"task.train_file={bad}"]) == 2
    assert "bad.jsonl" in capsys.readouterr().err
