"""stage: tagging — the worked example of adding a stage (docs/architecture.md): one module, one registry line."""

import json
import random

import pytest
import torch

import tunelab
from tunelab.config import load_config
from tunelab.data.errors import DataError
from tunelab.stages.runs import load_run
from tunelab.testing import save_tiny_model_dir

TAGS = ["O", "PER", "LOC"]
WORDS = {"PER": ["anna", "bob", "carl", "dora"], "LOC": ["paris", "rome", "oslo", "lima"],
         "O": ["the", "went", "to", "with", "and", "saw"]}  # fmt: skip


def toy_rows(n, seed):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        tags = [rng.choice(["O", "O", "PER", "LOC"]) for _ in range(rng.randint(3, 7))]
        rows.append({"tokens": [rng.choice(WORDS[t]) for t in tags], "tags": tags})
    return rows


def cfg_for(model_dir, train, out, method):
    return load_config({
        "stage": "tagging",
        "output_dir": str(out),
        "model": {"name": model_dir},
        "task": {"labels": TAGS},
        "data": {"train": str(train), "val_fraction": 0.25, "max_length": 32},
        "method": method,
        "training": {"epochs": 16, "batch_size": 16, "lr": 3e-3, "progress": False, "tensorboard": False,
                     "warmup_steps": 2},
    })  # fmt: skip


@pytest.mark.parametrize("method", [{"name": "full"}, {"name": "lora", "r": 8, "dropout": 0.0}])
def test_tagger_learns_and_reloads_with_identical_logits(method, tmp_path):
    train = tmp_path / "ner.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in toy_rows(96, 0)))
    model_dir = save_tiny_model_dir(tmp_path / "bert", arch="bert")
    result = tunelab.train(cfg_for(model_dir, train, tmp_path / "run", method))
    m = result.metrics
    assert m["eval_loss"] < 0.5 * m["eval_loss_before"], m
    # half the words are O: a tagger that learned nothing about the words scores about 0.5
    assert m["dev_word_accuracy"] >= 0.9 and m["dev_words"] > 100, m

    from tunelab.stages import get as get_stage
    from tunelab.stages.tagging import encode

    model, tok = load_run(str(result.run_dir))
    stage = get_stage("tagging")
    rows = [encode(r, tok, {t: i for i, t in enumerate(TAGS)}, 32, "row") for r in toy_rows(32, 9)]
    batch = stage.collate(rows, tok.pad_token_id)
    again, _ = load_run(str(result.run_dir))
    with torch.no_grad():
        a = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = again(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert a.shape[-1] == len(TAGS) and torch.equal(a, b)
    word_acc = (a.argmax(-1)[batch["labels"] != -100] == batch["labels"][batch["labels"] != -100]).float().mean()
    assert word_acc >= 0.8  # the reloaded model is the trained one (untrained: about 0.5)


def test_bad_rows_name_the_row_and_the_fix(tmp_path):
    train = tmp_path / "ner.jsonl"
    train.write_text(
        json.dumps({"tokens": ["anna"], "tags": ["O"]}) + "\n" + json.dumps({"tokens": ["x"], "tags": ["ORG"]}) + "\n"
    )
    model_dir = save_tiny_model_dir(tmp_path / "bert", arch="bert")
    with pytest.raises(DataError, match=r"ner.jsonl line 2: tag 'ORG' is not in task.labels"):
        tunelab.train(cfg_for(model_dir, train, tmp_path / "run", {"name": "full"}))


def test_tagging_is_a_registered_stage_name():
    from tunelab.stages import names

    assert "tagging" in names()
    with pytest.raises(Exception, match="tagging"):
        load_config({"stage": "tagger"})  # the error lists the registered names
