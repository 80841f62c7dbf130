"""Pre-training from scratch (docs/pretraining.md): a model built from model.architecture with a tokenizer
trained for the run, on a plain-text corpus; held-out perplexity per character beside the n-gram baselines;
samples; exact resume; masked LM; the result continuing into stage sft; config errors before anything loads."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tunelab
from tunelab.cli import main
from tunelab.config import ConfigError, load_config
from tunelab.data.corpus import causal_blocks, split_documents
from tunelab.stages.runs import load_run

LINES = [
    "First Citizen:", "Before we proceed any further, hear me speak.", "", "All:", "Speak, speak.", "",
    "First Citizen:", "You are all resolved rather to die than to famish?", "", "All:", "Resolved. resolved.", "",
    "Second Citizen:", "One word, good citizens.", "",
]  # fmt: skip
TINY_LLAMA = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "max_position_embeddings": 64, "tie_word_embeddings": True, "initializer_range": 0.1}  # fmt: skip
TINY_BERT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "max_position_embeddings": 64, "initializer_range": 0.1}  # fmt: skip


pytestmark = pytest.mark.usefixtures("empty_home")  # the tokenizer and data caches


@pytest.fixture()
def corpus(tmp_path):
    path = tmp_path / "plays.txt"
    path.write_text("\n".join(LINES * 12) + "\n")
    return str(path)


def scratch_cfg(corpus, out, stage="pretrain", val_fraction=0.1, **training):
    causal = stage == "pretrain"
    return load_config({
        "stage": stage, "output_dir": str(out),
        "model": {"architecture": "llama" if causal else "bert", "config": TINY_LLAMA if causal else TINY_BERT,
                  "tokenizer": {"train": {"type": "bpe" if causal else "wordpiece", "vocab_size": 320 if causal else 200,
                                          "min_frequency": 1, "chat_template": "chatml" if causal else "none"}}},
        "data": {"train": corpus, "max_length": 32, "packing": True, "val_fraction": val_fraction},
        "method": {"name": "full"},
        "training": {"max_steps": 8, "batch_size": 4, "lr": 1e-2, "warmup_steps": 0, "eval_every": 4,
                     "sample_tokens": 6, "progress": False, "tensorboard": False, **training},
    })  # fmt: skip


def losses(run):
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def test_causal_blocks_make_every_token_a_target_once():
    ids = list(range(10, 30))
    blocks = causal_blocks(ids, 8, start=1)
    targets = [t for b in blocks for t in b["input_ids"][1:]]  # position 0 of a block is context only
    assert targets == ids  # each token predicted exactly once, in order
    assert all(len(b["input_ids"]) <= 8 for b in blocks)
    train, heldout = split_documents([("f", "a\nbb\nccc\ndddd\n")], 0.3)
    assert train == [("f", "a\nbb\nccc\n")] and heldout == [("f", "dddd\n")]  # cut where a line starts


def test_llama_from_scratch_learns_writes_samples_and_reports_per_character_perplexity(corpus, tmp_path):
    result = tunelab.train(scratch_cfg(corpus, tmp_path / "run"))
    m = result.metrics
    steps = losses(tmp_path / "run")
    assert steps[8] < steps[1] - 1.0  # the loss falls
    assert m["eval_loss"] < m["eval_loss_before"]
    # per character: the same summed NLL over the held-out characters; per token: over its tokens
    assert m["ppl_per_char"] == pytest.approx(math.exp(m["heldout_nll"] / m["heldout_characters"]))
    assert m["ppl_per_token"] == pytest.approx(math.exp(m["heldout_nll"] / m["heldout_tokens"]))
    assert m["heldout_tokens"] == m["data_heldout_tokens"]  # every held-out token scored
    heldout = (tmp_path / "plays.txt").read_text()
    assert m["heldout_characters"] == len(heldout) - m["data_train_characters"]
    assert m["baseline_bigram_ppl_per_char"] < m["baseline_unigram_ppl_per_char"]
    assert m["ppl_per_char"] < m["baseline_unigram_ppl_per_char"]  # a repetitive text: learnt in 8 steps
    samples = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert sorted({s["step"] for s in samples}) == [0, 4, 8]
    assert {s["temperature"] for s in samples} == {0.0, 0.8}
    assert all(s["prompt"] == "First Citizen:" or s["prompt"].strip() for s in samples)
    # the result is a plain transformers folder with its tokenizer, and tunelab loads it back the same
    final = result.final_dir
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    tok = AutoTokenizer.from_pretrained(final)
    assert model.config.vocab_size == len(tok) and model.config.model_type == "llama"
    loaded, _ = load_run(str(tmp_path / "run"), device="cpu")
    ids = torch.tensor([tok("Speak, speak.")["input_ids"]])
    assert torch.equal(model(ids).logits, loaded(ids).logits)
    card = (final / "README.md").read_text()
    assert "trained from scratch" in card and "base_model" not in card.split("---")[1]


def test_initialisation_is_seeded_and_the_architectures_own(corpus, tmp_path):
    from tunelab.stages.pretraining import load_scratch

    cfg = scratch_cfg(corpus, tmp_path / "r")
    a, _ = load_scratch(cfg, "cpu", AutoModelForCausalLM)
    b, _ = load_scratch(cfg, "cpu", AutoModelForCausalLM)
    cfg.training.seed = 7
    c, _ = load_scratch(cfg, "cpu", AutoModelForCausalLM)
    w = "model.layers.0.mlp.up_proj.weight"
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert torch.equal(sa[w], sb[w]) and not torch.equal(sa[w], sc[w])
    assert sa[w].std().item() == pytest.approx(0.1, rel=0.15)  # normal(0, initializer_range), Llama's init
    assert torch.equal(sa["model.norm.weight"], torch.ones(32))


def test_interrupted_and_resumed_run_matches_uninterrupted(corpus, tmp_path):
    full = tunelab.train(scratch_cfg(corpus, tmp_path / "a", eval_every=None))

    def stop_after_3(step, record):
        if step == 3:
            raise KeyboardInterrupt

    cfg = scratch_cfg(corpus, tmp_path / "b", eval_every=None)
    tunelab.train(cfg, callbacks=[stop_after_3])
    resumed = tunelab.train(cfg, resume=True)
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(b) == list(range(1, 9))
    assert all(abs(a[s] - b[s]) < 1e-6 for s in range(1, 9))
    assert abs(full.metrics["ppl_per_char"] - resumed.metrics["ppl_per_char"]) < 1e-6
    samples = [json.loads(x)["step"] for x in (tmp_path / "b" / "samples.jsonl").read_text().splitlines()]
    assert samples == [0, 0, 8, 8]  # no duplicates across the resume


def test_masked_lm_from_scratch_beats_the_most_frequent_token(tmp_path):
    path = tmp_path / "longer.txt"  # BERT's positions are absolute: it needs the lines at many offsets
    path.write_text("\n".join(LINES * 60) + "\n")
    cfg = scratch_cfg(str(path), tmp_path / "mlm", stage="mlm", max_steps=120, batch_size=16, lr=2e-3, warmup_steps=10,
                      eval_every=None)  # fmt: skip
    cfg.model.config = {**TINY_BERT, "hidden_size": 64, "intermediate_size": 128, "hidden_dropout_prob": 0.0,
                        "attention_probs_dropout_prob": 0.0}  # fmt: skip
    result = tunelab.train(cfg)
    m = result.metrics
    assert m["eval_loss"] < m["eval_loss_before"]
    assert m["masked_tokens"] > 10
    assert m["masked_accuracy"] > m["baseline_majority_token_accuracy"]
    tok = AutoTokenizer.from_pretrained(result.final_dir)
    assert tok.mask_token == "[MASK]"
    model, _ = load_run(str(tmp_path / "mlm"), device="cpu")
    assert type(model).__name__ == "BertForMaskedLM"


@pytest.mark.parametrize("architecture", ["bert", "modernbert"])
def test_masked_lm_head_is_tied_and_the_evaluation_hides_the_targets(tmp_path, architecture):
    """No label leak: a "model" that copies its input token scores 0 at the masked positions (they read
    [MASK]), and the head starts as the tied token embedding (an untied random head learns the unigram first)."""
    from types import SimpleNamespace

    from transformers import AutoModelForMaskedLM

    from tunelab.stages.pretraining import build_masked, load_scratch, masked_metrics

    path = tmp_path / "longer.txt"
    path.write_text("\n".join(LINES * 40) + "\n")
    cfg = scratch_cfg(str(path), tmp_path / "mlm", stage="mlm", val_fraction=0.3)
    cfg.model.architecture = architecture
    cfg.model.config = {k: v for k, v in TINY_BERT.items() if k != "initializer_range"}
    model, tok = load_scratch(cfg, "cpu", AutoModelForMaskedLM)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    data = build_masked(cfg, tok)

    class Copy(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return SimpleNamespace(logits=torch.nn.functional.one_hot(input_ids, len(tok)).float())

    m = masked_metrics(Copy(), tok, cfg, data, "cpu")
    assert m["masked_tokens"] > 50 and m["masked_accuracy"] == 0.0
    assert m["baseline_majority_token_accuracy"] > 0.0
    # intervals and the paired test: the copier is never right, so every position the most frequent token
    # gets right is discordant: McNemar's exact p is 2 * 0.5^k
    k = round(m["baseline_majority_token_accuracy"] * m["masked_tokens"])
    assert m["masked_accuracy_ci_low"] == 0.0 < m["masked_accuracy_ci_high"]
    assert m["baseline_majority_token_accuracy_ci_low"] < m["baseline_majority_token_accuracy"] < m[
        "baseline_majority_token_accuracy_ci_high"]  # fmt: skip
    assert m["mcnemar_p_vs_majority"] == pytest.approx(min(1.0, 2 * 0.5**k))


def test_the_result_continues_into_sft(corpus, tmp_path):
    tunelab.train(scratch_cfg(corpus, tmp_path / "pre", max_steps=2, eval_every=None))
    rows = tmp_path / "sft.jsonl"
    rows.write_text("".join(json.dumps({"instruction": "Speak.", "input": "", "output": "Speak, speak."}) + "\n"
                            for _ in range(8)))  # fmt: skip
    cfg = load_config({"stage": "sft", "output_dir": str(tmp_path / "sft"), "model": {"name": str(tmp_path / "pre" / "final")},
                       "data": {"train": str(rows), "max_length": 64}, "method": {"name": "lora", "r": 4},
                       "training": {"max_steps": 2, "batch_size": 4, "progress": False, "tensorboard": False}})  # fmt: skip
    result = tunelab.train(cfg)
    assert result.final_dir is not None and result.metrics["steps"] == 2


@pytest.mark.parametrize("model, message", [
    ({"architecture": "lama", "tokenizer": "t"}, "'lama': not a transformers model type .* Did you mean 'llama'"),
    ({"architecture": "llama", "config": {"hiden_size": 8}, "tokenizer": "t"}, "model.config.hiden_size: not a key of LlamaConfig .* 'hidden_size'"),
    ({"architecture": "llama", "config": {"vocab_size": 8}, "tokenizer": "t"}, "vocab_size: set from the tokenizer"),
    ({"architecture": "llama", "config": {"hidden_size": 30, "num_attention_heads": 4}, "tokenizer": "t"}, "LlamaConfig refuses"),
    ({"architecture": "llama"}, "model.architecture needs model.tokenizer"),
    ({"name": "x", "config": {"hidden_size": 8}}, "model.config goes with model.architecture"),
])  # fmt: skip
def test_bad_architecture_settings_are_named_before_anything_loads(model, message):
    with pytest.raises(ConfigError, match=message):
        load_config({"stage": "pretrain", "model": model, "method": {"name": "full"}})


def test_scratch_needs_full_training_a_pretraining_stage_and_text(corpus, tmp_path):
    base = {"architecture": "llama", "config": TINY_LLAMA, "tokenizer": {"train": {}}}
    with pytest.raises(ConfigError, match="method: full"):
        load_config({"stage": "pretrain", "model": base, "data": {"train": corpus}, "method": {"name": "lora"}})
    with pytest.raises(ConfigError, match="stage pretrain .* or mlm"):
        load_config({"stage": "sft", "model": base, "data": {"train": corpus}, "method": {"name": "full"}})
    with pytest.raises(ConfigError, match="tokenizer.train.corpus"):
        load_config({"stage": "pretrain", "model": base, "data": {"train": "rows.jsonl"}, "method": {"name": "full"}})
    path = tmp_path / "bad.yaml"
    path.write_text(f"stage: pretrain\nmodel: {{architecture: llama, tokenizer: {tmp_path}/none}}\n"
                    f"data: {{train: {corpus}}}\nmethod: {{name: full}}\n")  # fmt: skip
    assert main(["train", str(path)]) == 2  # a named error, exit 2, no model built


def test_sizes_counts_the_parameters_of_the_built_model(corpus, tmp_path, capsys):
    from tunelab.stages.pretraining import load_scratch

    path = tmp_path / "c.yaml"
    cfg = scratch_cfg(corpus, tmp_path / "r")
    path.write_text(json.dumps(cfg.model_dump(mode="json")))  # JSON is YAML
    model, tok = load_scratch(cfg, "cpu", AutoModelForCausalLM)
    assert main(["models", "--sizes", str(path), "--json", "--set", f"model.tokenizer={tok.name_or_path}"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["total"] == sum(p.numel() for p in model.parameters())  # tied head counted once
    assert counts["embedding"] == len(tok) * 32 and counts["head"] == 0


def test_a_modernbert_counts_and_builds_with_the_tokenizers_special_ids(corpus, tmp_path, capsys):
    """ModernBERT's config carries its own vocabulary's ids (pad 50283, cls, sep): counting with a small
    vocabulary must not trip over them, and the built model takes the trained tokenizer's."""
    from transformers import AutoModelForMaskedLM

    from tunelab.stages.pretraining import load_scratch

    cfg = scratch_cfg(corpus, tmp_path / "r", stage="mlm")
    cfg.model.architecture = "modernbert"
    cfg.model.config = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(cfg.model_dump(mode="json")))
    model, tok = load_scratch(cfg, "cpu", AutoModelForMaskedLM)
    assert main(["models", "--sizes", str(path), "--json", "--set", f"model.tokenizer={tok.name_or_path}"]) == 0
    assert json.loads(capsys.readouterr().out)["total"] == sum(p.numel() for p in model.parameters())
    ids = {k: getattr(model.config, f"{k}_token_id") for k in ("pad", "cls", "sep")}
    assert ids == {k: getattr(tok, f"{k}_token_id") for k in ids} and max(ids.values()) < len(tok)


def test_an_architecture_whose_tokenizer_would_not_reload_as_trained_is_refused_before_training():
    """transformers 5 loads the tokenizer beside a qwen2 config as Qwen2Tokenizer, which rebuilds the pre-tokenizer
    its own way: a tokenizer trained here would split `12345` into five tokens after a reload (one in training).
    Refused when the model is built; llama's (and qwen3's) folders load the tokenizer as saved."""
    from tunelab.config import ModelConfig
    from tunelab.models.scratch import build_model
    from tunelab.models.sources import ModelError
    from tunelab.testing import tiny_tokenizer

    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
             "num_key_value_heads": 2}  # fmt: skip
    tok = tiny_tokenizer()
    with pytest.raises(ModelError, match=r"'qwen2'.*Qwen2Tokenizer.*llama, mistral, qwen3"):
        build_model(ModelConfig(name="scratch", architecture="qwen2", config=small, tokenizer="tok"), tok)
    for architecture in ("llama", "qwen3"):
        cfg = ModelConfig(name="scratch", architecture=architecture, config=small, tokenizer="tok")
        assert build_model(cfg, tok) is not None


def test_causal_blocks_are_the_same_through_the_word_memo(corpus, tmp_path, monkeypatch):
    """build_causal tokenises each document through the store's word memo (tunelab/data/bytebpe.py) where it
    takes the tokenizer: the blocks are those of the tokenizer's own call."""
    import tunelab.data.bytebpe as bytebpe
    from tunelab.stages.pretraining import build_causal
    from tunelab.testing import tiny_tokenizer

    cfg = load_config({"output_dir": str(tmp_path / "r"), "stage": "pretrain", "model": {"name": "x"},
                       "method": {"name": "full"}, "data": {"train": corpus, "format": "text", "max_length": 32}})  # fmt: skip
    tok = tiny_tokenizer()
    calls = []
    real = bytebpe.WordMemo.encode
    monkeypatch.setattr(bytebpe.WordMemo, "encode", lambda self, t: calls.append(1) or real(self, t))
    memo = build_causal(cfg, tok)
    assert calls
    monkeypatch.setattr(bytebpe.WordMemo, "of", classmethod(lambda cls, backend: None))
    plain = build_causal(cfg, tok)
    assert memo.train == plain.train and memo.val == plain.val and memo.stats == plain.stats
