"""stage: seq2seq (tiny T5 on a copy task), generation metrics (BLEU, embedding cosine), causal-LM
translation eval, and stage: mlm (masked-LM continued pre-training)."""

import json
import random

import pytest
import torch

import tunelab
from tunelab import metrics as M
from tunelab.config import ConfigError, load_config
from tunelab.models.generation import (
    embedding_cosine,
    generate_seq2seq,
    load_embedder,
    sentence_embeddings,
)
from tunelab.testing import save_tiny_model_dir, tiny_tokenizer

WORDS = ["fox", "dog", "cat", "red", "blue", "quick", "lazy", "brown"]


def copy_rows(n, seed):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        src = " ".join(rng.choice(WORDS) for _ in range(3))
        rows.append({"source": src, "target": src})
    return rows


@pytest.fixture(scope="module")
def embedder_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("emb") / "bert", arch="bert")


def test_cosine_of_identical_strings_is_one(embedder_dir):
    torch.set_num_threads(1)
    model, tok = load_embedder(embedder_dir)
    texts = ["the quick brown fox", "a lazy dog", "Guten Morgen."]
    assert embedding_cosine(texts, texts, (model, tok)) == pytest.approx(1.0, abs=1e-6)
    assert embedding_cosine(texts, texts[::-1], embedder_dir) < 1.0
    emb = sentence_embeddings(texts, model, tok)
    assert emb.shape == (3, 32)
    assert abs(float((emb**2).sum(1).max()) - 1.0) < 1e-5  # L2-normalised
    # mean pooling over the attention mask: padding a text in a batch does not change its embedding
    alone = sentence_embeddings(texts[1:2], model, tok)
    assert abs(emb[1] - alone[0]).max() < 1e-5


def s2s_config(model_dir, data_dir, out, embedder, **training):
    return load_config({
        "stage": "seq2seq",
        "output_dir": str(out),
        "model": {"name": model_dir},
        "task": {"train_file": str(data_dir / "train.jsonl"), "dev_file": str(data_dir / "dev.jsonl"),
                 "max_length": 32, "max_new_tokens": 24, "prefix": "copy: ", "embedding_model": embedder},
        "method": {"name": "full"},
        "training": {"max_steps": 40, "batch_size": 8, "lr": 3e-3, "progress": False, "tensorboard": False,
                     "warmup_steps": 2, "scheduler": "constant", "seed": 0, **training},
    })  # fmt: skip


def test_tiny_t5_learns_to_copy_and_bleu_is_sacrebleu(tmp_path, embedder_dir):
    import sacrebleu

    torch.set_num_threads(1)
    train, dev = copy_rows(16, 0), copy_rows(8, 0)  # dev = the first train rows: memorisation
    for name, rows in (("train", train), ("dev", dev)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model_dir = save_tiny_model_dir(tmp_path / "t5", arch="t5")
    result = tunelab.train(s2s_config(model_dir, tmp_path, tmp_path / "run", embedder_dir))
    m = result.metrics
    assert m["eval_loss"] < 0.7 * m["eval_loss_before"], m
    assert m["data_prefix"] == "copy: "
    assert 0.0 <= m["dev_bleu"] <= 100.0 and -1.0 <= m["dev_cosine"] <= 1.0
    manifest = json.loads((result.final_dir / "tunelab.json").read_text())
    assert manifest["stage"] == "seq2seq" and manifest["task"]["prefix"] == "copy: "

    from tunelab.stages.runs import load_run

    model, tok = load_run(str(result.run_dir), device="cpu")
    assert type(model).__name__ == "T5ForConditionalGeneration"
    hyps = generate_seq2seq(model, tok, [r["source"] for r in dev], "copy: ", 32, 24)
    refs = [r["target"] for r in dev]
    assert abs(m["dev_bleu"] - sacrebleu.corpus_bleu(hyps, [refs]).score) < 1e-9
    assert abs(m["dev_bleu"] - M.corpus_bleu(hyps, refs)) < 1e-9
    assert abs(m["dev_cosine"] - embedding_cosine(hyps, refs, embedder_dir)) < 1e-6


def test_labels_end_with_eos_and_pad_with_ignore():
    from tunelab.stages import get as get_stage
    from tunelab.stages.seq2seq import encode_seq2seq

    SEQ2SEQ = get_stage("seq2seq")

    tok = tiny_tokenizer()
    ex = encode_seq2seq(
        [{"source": "a b", "target": "fox"}, {"source": "c", "target": "the lazy dog"}], tok, "x: ", 16, 8
    )
    assert all(e["labels"][-1] == tok.eos_token_id for e in ex)
    assert tok.decode(ex[0]["input_ids"]) == "x: a b"
    batch = SEQ2SEQ.collate(ex, tok.pad_token_id)
    assert SEQ2SEQ.count(batch) == sum(len(e["labels"]) for e in ex)
    assert (batch["labels"][0, len(ex[0]["labels"]) :] == -100).all()


def test_t5_prefix_default_for_wmt(tmp_path):
    from tunelab.stages.seq2seq import seq2seq_prefix

    t5 = save_tiny_model_dir(tmp_path / "t5", arch="t5")
    llama = save_tiny_model_dir(tmp_path / "llama", arch="llama")
    cfg = load_config({"stage": "seq2seq", "model": {"name": t5}, "task": {"name": "wmt14-en-de"}})
    assert seq2seq_prefix(cfg.task, cfg.model) == "translate English to German: "
    cfg = load_config({"stage": "seq2seq", "model": {"name": llama}, "task": {"name": "wmt14-en-de"}})
    assert seq2seq_prefix(cfg.task, cfg.model) == ""
    with pytest.raises(ConfigError, match="task.name"):
        load_config({"stage": "seq2seq"})


def test_causal_lm_translation_eval(tmp_path, monkeypatch, embedder_dir):
    from tunelab.data import tasks as T
    from tunelab.evaluation import runner

    torch.set_num_threads(1)
    llama = save_tiny_model_dir(tmp_path / "llama", arch="llama")
    rows = [{"source": "good morning", "target": "Guten Morgen."}, {"source": "the dog", "target": "der Hund"}]
    monkeypatch.setattr(T, "load_split", lambda task, split, limit=None, seed=0: rows)
    prompts = []
    from tunelab.models import generation

    real = generation.generate_chat
    monkeypatch.setattr(
        generation, "generate_chat", lambda m, t, p, *a, **k: prompts.extend(p) or real(m, t, p, *a, **k)
    )
    out = runner.evaluate(llama, "wmt14-en-de", device="cpu", progress=False, embedding_model=embedder_dir,
                          max_new_tokens=8)  # fmt: skip
    assert out["method"] == "chat generation (greedy)" and out["n"] == 2
    assert prompts == ["Translate to German: good morning", "Translate to German: the dog"]
    assert 0.0 <= out["metrics"]["bleu"] <= 100.0 and "cosine" in out["metrics"]


def test_seq2seq_eval_of_a_plain_t5_folder(tmp_path, monkeypatch):
    from tunelab.data import tasks as T
    from tunelab.evaluation import runner

    t5 = save_tiny_model_dir(tmp_path / "t5", arch="t5")
    monkeypatch.setattr(T, "load_split", lambda task, split, limit=None, seed=0: copy_rows(3, 1))
    out = runner.evaluate(t5, "wmt14-en-de", device="cpu", progress=False, embedding_model=None, max_new_tokens=4)
    assert out["method"] == "generation (greedy)" and set(out["metrics"]) == {"bleu"}


# -------------------------------------------------------------------------------------------- MLM
def mlm_model_dir(path):
    from tunelab.testing import tiny_bert

    tok = tiny_tokenizer()
    tok.add_special_tokens({"mask_token": "<mask>"})
    model = tiny_bert(len(tok), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_mlm_masks_fifteen_percent():
    from tunelab.stages.mlm import mlm_collate

    torch.manual_seed(0)
    ex = [{"input_ids": list(range(5, 105)), "maskable": [0] + [1] * 98 + [0], "mask_id": 3, "vocab_size": 320}] * 40
    batch = mlm_collate(ex, 0)
    chosen = batch["labels"] != -100
    assert 0.13 < chosen.float().mean() < 0.17
    assert not chosen[:, 0].any() and not chosen[:, -1].any()  # special tokens never masked
    masked = batch["input_ids"][chosen] == 3
    assert 0.75 < masked.float().mean() < 0.85  # 80% [MASK]
    kept = batch["input_ids"][chosen] == batch["labels"][chosen]
    assert 0.06 < kept.float().mean() < 0.16  # 10% unchanged (+ random draws of the same id)
    assert (batch["input_ids"][~chosen] == torch.tensor(ex[0]["input_ids"]).expand(40, -1)[~chosen]).all()
    torch.manual_seed(0)
    again = mlm_collate(ex, 0)  # the same global RNG state masks the same way (what resume relies on)
    assert torch.equal(again["input_ids"], batch["input_ids"]) and torch.equal(again["labels"], batch["labels"])


def test_mlm_loss_falls_on_tiny_bert(tmp_path):
    torch.set_num_threads(1)
    rng = random.Random(0)
    lines = [
        " ".join(rng.choice(["the quick brown fox", "the lazy dog", "a red cat"]) for _ in range(3)) for _ in range(40)
    ]
    (tmp_path / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    cfg = load_config({
        "stage": "mlm", "output_dir": str(tmp_path / "run"), "model": {"name": mlm_model_dir(tmp_path / "m")},
        "data": {"train": str(tmp_path / "text.jsonl"), "format": "text", "max_length": 64, "val_fraction": 0.2},
        "method": {"name": "full"},
        "training": {"max_steps": 30, "batch_size": 8, "lr": 5e-3, "progress": False, "tensorboard": False,
                     "warmup_steps": 2, "scheduler": "constant"},
    })  # fmt: skip
    result = tunelab.train(cfg)
    m = result.metrics
    assert m["eval_loss"] < 0.7 * m["eval_loss_before"], m
    from tunelab.stages.runs import load_run

    model, _ = load_run(str(result.run_dir), device="cpu")
    assert type(model).__name__ == "BertForMaskedLM"
    with pytest.raises(ConfigError, match="format: text"):  # auto (the default) would detect text
        load_config({"stage": "mlm", "data": {"format": "instruction"}})
