"""model.new_special_tokens: tokens added to a pre-trained vocabulary, the token table grown for them, their rows
trained (full fine-tuning; lora / qlora through PEFT's trainable tokens), and the result loading where users load it
(tunelab's load_run, plain PEFT over a base grown the documented way, transformers for merged and whole models)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tunelab
from tunelab.config import ConfigError, ModelConfig, load_config
from tunelab.models import load_model
from tunelab.models.fingerprint import tokenizer_digest
from tunelab.stages.runs import load_run

pytestmark = pytest.mark.usefixtures("empty_home")

NEW = ["<tool>", "</tool>"]
ROWS = [{"instruction": f"Call tool {i}.", "input": "", "output": f"<tool> run {i} </tool>"} for i in range(24)]


def _config(tmp_path, model_dir, method: dict, tokens=NEW, steps: int = 12):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return load_config({
        "output_dir": str(tmp_path / "run"),
        "model": {"name": model_dir, "new_special_tokens": tokens},
        "data": {"train": str(data), "val_fraction": 0.0, "max_length": 64},
        "method": method,
        "training": {"max_steps": steps, "batch_size": 4, "lr": 1e-2, "progress": False, "tensorboard": False,
                     "seed": 0},
    })  # fmt: skip


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_the_tokens_join_the_tokenizer_and_the_table_grows_at_the_mean(tiny_dir, capfd):
    plain, tok0 = load_model(ModelConfig(name=tiny_dir))
    eos = tok0.eos_token  # a token the tokenizer has: left as it is, and the log says so
    capfd.readouterr()
    model, tok = load_model(ModelConfig(name=tiny_dir, new_special_tokens=[*NEW, eos]))
    err = capfd.readouterr().err
    assert "2 new tokens (model.new_special_tokens), ids 320-321" in err and f"has {eos} already" in err
    assert len(tok) == len(tok0) + 2
    ids = tok.convert_tokens_to_ids(NEW)
    assert ids == [len(tok0), len(tok0) + 1] and tok.convert_tokens_to_ids(eos) == tok0.eos_token_id
    assert tok("a <tool> b", add_special_tokens=False)["input_ids"].count(ids[0]) == 1  # never split
    assert tok.decode(tok("x <tool>", add_special_tokens=False)["input_ids"], skip_special_tokens=True).strip() == "x"
    table = model.get_input_embeddings().weight
    assert table.shape[0] == len(tok)
    assert model.get_output_embeddings().weight is table  # the tied head grew with it
    old = plain.get_input_embeddings().weight
    assert torch.equal(table[: len(tok0)], old)
    mean = old.float().mean(0).to(table.dtype)
    assert torch.equal(table[ids[0]], mean) and torch.equal(table[ids[1]], mean)
    # the data cache is keyed by what splits the text: the tokens change it
    assert tokenizer_digest(ModelConfig(name=tiny_dir)) != tokenizer_digest(
        ModelConfig(name=tiny_dir, new_special_tokens=NEW)
    )


def test_an_untied_head_grows_at_its_own_mean(tmp_path):
    from tunelab.testing import save_tiny_model_dir

    folder = save_tiny_model_dir(tmp_path / "untied", tie_word_embeddings=False)
    plain, _ = load_model(ModelConfig(name=folder))
    model, tok = load_model(ModelConfig(name=folder, new_special_tokens=NEW))
    head = model.get_output_embeddings().weight
    assert head is not model.get_input_embeddings().weight and head.shape[0] == len(tok)
    old = plain.get_output_embeddings().weight
    assert torch.equal(head[-1], old.float().mean(0).to(head.dtype))
    assert not torch.equal(head[-1], model.get_input_embeddings().weight[-1])
    # lora trains the head's new rows too (PEFT's trainable tokens in both tables): the merged result has both moved
    tunelab.train(_config(tmp_path, folder, {"name": "lora", "r": 4, "dropout": 0.0}, steps=6))
    merged, _ = load_run(str(tmp_path / "run"), device="cpu", merge=True)
    new = tok.convert_tokens_to_ids(NEW)
    for table, start in ((merged.get_input_embeddings(), model.get_input_embeddings()),
                         (merged.get_output_embeddings(), model.get_output_embeddings())):  # fmt: skip
        assert torch.equal(table.weight[: new[0]], start.weight[: new[0]])
        assert (table.weight[new] - start.weight[new]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["lora", "qlora"])
def test_lora_trains_the_new_rows_and_plain_peft_loads_them(tiny_dir, tmp_path, name, capfd):
    from peft import PeftModel

    cfg = _config(tmp_path, tiny_dir, {"name": name, "r": 4, "dropout": 0.0})
    losses = []
    tunelab.train(cfg, callbacks=[lambda step, rec: losses.append(rec["loss"])])
    assert losses[-1] < losses[0] * 0.8
    err = capfd.readouterr().err  # the fast path takes the new rows (accel/token_rows.py), and says so
    assert "new tokens' rows put in beside the frozen token table" in err and "fused LM head + cross-entropy" in err
    assert "not on: fused LM head" not in err
    ours, tok = load_run(str(tmp_path / "run"), device="cpu")
    new = tok.convert_tokens_to_ids(NEW)
    ids = torch.tensor([tok("Call tool 3. <tool> run 3 </tool>")["input_ids"]])
    assert set(new) <= set(ids[0].tolist())
    # trained: the new rows left the mean they started at; the old rows are the base's (LoRA does not touch them)
    merged, _ = load_run(str(tmp_path / "run"), device="cpu", merge=True)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    table, old = merged.get_input_embeddings().weight, base.get_input_embeddings().weight
    assert torch.equal(table[: old.shape[0]], old)
    assert (table[new] - old.mean(0)).abs().max() > 1e-3
    assert (_logits(merged, ids) - _logits(ours, ids)).abs().max() < 1e-4
    if name == "lora":  # qlora's adapter trained over the 4-bit base, not this fp32 one
        # plain PEFT, as the run's model card says: the base's table grown to the run's tokenizer (at any values:
        # the adapter holds the new rows whole)
        final = tmp_path / "run" / "final"
        their_tok = AutoTokenizer.from_pretrained(final)
        plain = AutoModelForCausalLM.from_pretrained(tiny_dir)
        plain.resize_token_embeddings(len(their_tok))
        plain = PeftModel.from_pretrained(plain, final).eval()
        assert their_tok("Call tool 3. <tool> run 3 </tool>")["input_ids"] == ids[0].tolist()
        assert (_logits(plain, ids) - _logits(ours, ids)).abs().max() < 1e-5
        assert "base.resize_token_embeddings(len(tokenizer))" in (final / "README.md").read_text()


def test_full_fine_tuning_trains_them_and_transformers_loads_the_result(tiny_dir, tmp_path):
    cfg = _config(tmp_path, tiny_dir, {"name": "full"}, steps=6)
    tunelab.train(cfg)
    ours, tok = load_run(str(tmp_path / "run"), device="cpu")
    final = tmp_path / "run" / "final"
    plain = AutoModelForCausalLM.from_pretrained(final).eval()
    assert plain.get_input_embeddings().weight.shape[0] == len(tok) == len(AutoTokenizer.from_pretrained(final))
    ids = torch.tensor([tok("Call tool 5. <tool> run 5 </tool>")["input_ids"]])
    assert (_logits(plain, ids) - _logits(ours, ids)).abs().max() < 1e-5
    new = tok.convert_tokens_to_ids(NEW)
    start = AutoModelForCausalLM.from_pretrained(tiny_dir).get_input_embeddings().weight.mean(0)
    assert (plain.get_input_embeddings().weight[new] - start).abs().max() > 1e-3


def test_the_config_refuses_what_cannot_train_the_new_rows(tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"new_special_tokens with method adapter.*\(full, .*lora"):
        _config(tmp_path, tiny_dir, {"name": "adapter"})
    with pytest.raises(ConfigError, match=r"new_special_tokens\[1\] '<tool>': listed twice"):
        _config(tmp_path, tiny_dir, {"name": "lora"}, tokens=["<tool>", "<tool>"])
    with pytest.raises(ConfigError, match=r"new_special_tokens\[0\] ' <x>'"):
        _config(tmp_path, tiny_dir, {"name": "lora"}, tokens=[" <x>"])
    with pytest.raises(ConfigError, match="model.tokenizer.train.special_tokens"):
        load_config({"stage": "pretrain", "model": {"architecture": "llama", "tokenizer": tiny_dir,
                                                     "new_special_tokens": NEW}, "method": {"name": "full"},
                     "data": {"train": "x.txt"}})  # fmt: skip


def test_the_merged_gguf_carries_the_new_tokens_and_the_adapter_alone_is_refused(tiny_dir, tmp_path):
    """`tunelab export --format gguf` of a run that added tokens: the file's vocabulary has them at their ids, as
    special (control) tokens, its token table their trained rows (transformers' GGUF reader gives the merged model's
    logits on text using them); --format gguf-lora is refused (a llama.cpp adapter cannot grow its base's table)."""
    import gguf

    from tunelab.export.gguf import ExportError
    from tunelab.export.hf import export

    tunelab.train(_config(tmp_path, tiny_dir, {"name": "lora", "r": 4, "dropout": 0.0}, steps=6))
    run = str(tmp_path / "run")
    path = export(run, "gguf", "f32", str(tmp_path / "out" / "m.gguf"))["path"]
    merged, tok = load_run(run, device="cpu", merge=True)
    reader = gguf.GGUFReader(path)
    field = reader.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(field.parts[i]).decode() for i in field.data]
    kinds = reader.fields["tokenizer.ggml.token_type"]
    types = [int(kinds.parts[i][0]) for i in kinds.data]
    assert len(tokens) == len(tok) and all(tokens[i] == t for t, i in zip(NEW, tok.convert_tokens_to_ids(NEW)))
    assert all(types[i] == gguf.TokenType.CONTROL for i in tok.convert_tokens_to_ids(NEW))
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), gguf_file="m.gguf", dtype=torch.float32)
    ids = torch.tensor([tok("Call tool 3. <tool> run 3 </tool>")["input_ids"]])
    assert (_logits(back.eval(), ids) - _logits(merged, ids)).abs().max() < 1e-4
    with pytest.raises(ExportError, match=r"added tokens.*\(<tool>, </tool>\).*--format gguf\)"):
        export(run, "gguf-lora", out=str(tmp_path / "adapter.gguf"))
    # --format hf: a plain transformers folder with the grown vocabulary and the tokenizer that has the tokens
    folder = export(run, "hf", out=str(tmp_path / "hf"))["path"]
    plain, their_tok = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    assert len(their_tok) == len(tok) == plain.get_input_embeddings().weight.shape[0]
    assert their_tok("Call tool 3. <tool> run 3 </tool>")["input_ids"] == ids[0].tolist()
    assert (_logits(plain, ids) - _logits(merged, ids)).abs().max() < 1e-5


def test_the_fast_path_trains_the_new_rows_as_peft_does(tmp_path, capfd):
    """accelerate auto (the lookup beside the frozen table, the fused head with the new rows apart, the table kept
    compact inside PEFT's layers: a bf16 checkpoint read in fp32, whose new rows start at the mean rounded to bf16)
    against off (PEFT's trainable-token layer: the rows written into a copy of the table): the same losses step by
    step and the same trained rows."""
    import re

    from safetensors.torch import load_file

    from tunelab.testing import save_bf16_valued_tiny_model_dir

    model_dir = save_bf16_valued_tiny_model_dir(tmp_path / "model")

    def run(accelerate: str) -> tuple[list[float], dict]:
        cfg = _config(tmp_path / accelerate, model_dir, {"name": "lora", "r": 4, "dropout": 0.0}, steps=8)
        cfg.training.accelerate = accelerate
        losses = []
        tunelab.train(cfg, callbacks=[lambda step, rec: losses.append(rec["loss"])])
        saved = load_file(tmp_path / accelerate / "run" / "final" / "adapter_model.safetensors")
        return losses, {k: v for k, v in saved.items() if "trainable_tokens" in k}

    (tmp_path / "auto").mkdir(), (tmp_path / "off").mkdir()
    fast, fast_rows = run("auto")
    kept = re.search(r"(\d+) frozen weights kept compact \((\d+) since loading\)", capfd.readouterr().err)
    assert kept and int(kept[1]) == int(kept[2]) + 1  # the linear layers since loading, and the token table
    plain, plain_rows = run("off")
    assert fast == pytest.approx(plain, rel=1e-5)
    assert fast_rows.keys() == plain_rows.keys() and len(fast_rows) == 1
    for k in fast_rows:
        assert torch.allclose(fast_rows[k], plain_rows[k], atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["llama", "llama-untied", "gemma3_text"])
def test_the_lookup_and_the_fused_head_give_peft_layers_values_and_gradients(dtype, family):
    """One pass of a PEFT model with trainable token rows: the token_rows lookup and the fused head's rows against
    PEFT's own layers (the table copied with the rows in) and the plain cross-entropy: loss, the rows' gradients and
    an adapter's gradient, fp32 and bf16 (the rows fp32, as master weights); tied and untied heads, and Gemma 3's
    scaled token table (its rows times sqrt(hidden), the new ones too)."""
    from peft import LoraConfig, get_peft_model

    from tunelab.accel import head, token_rows
    from tunelab.testing import tiny_causal, tiny_llama

    tied = family != "llama-untied"
    model = tiny_causal(family, 103) if family == "gemma3_text" else tiny_llama(103, tie_word_embeddings=tied)
    model = model.to(dtype)
    new = [100, 101, 102]
    where = new if tied else {"embed_tokens": new, "lm_head": new}
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=where))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
            with torch.no_grad():
                p.add_(torch.randn_like(p) * 0.1)
    trained = [p for p in model.parameters() if p.requires_grad]
    ids = torch.tensor([[1, 100, 5, 101, 7, 102, 9, 3]])
    target = torch.tensor([100, 5, 101, 7, 102, 9, 3])
    inner = model.base_model.model

    def step():
        hidden = inner.model(input_ids=ids).last_hidden_state[0, :-1]
        lm_head = inner.lm_head
        if getattr(inner, "fast", False):
            loss = head.fused_loss(lm_head, hidden, target)
        else:
            logits = lm_head(hidden).float()
            loss = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
        grads = torch.autograd.grad(loss, trained)
        return loss.detach(), grads

    plain = step()
    assert token_rows.install(model) == 1
    inner.fast = True
    fast = step()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(fast[0], plain[0], rtol=tol)
    for a, b in zip(fast[1], plain[1]):
        assert (a - b).abs().max() <= tol * b.abs().max() + 1e-7


def test_an_adapter_with_new_rows_goes_on_only_over_a_base_grown_the_same_way(tiny_dir, tmp_path):
    """method.start_from on a run that added tokens: with the same model.new_special_tokens it goes on where the run
    ended (its first eval loss is the run's last); without them, with others, or with tokens over an adapter that
    holds no token rows, a named error before the model loads (not an index error from inside PEFT)."""
    from tunelab.methods.base import MethodError

    def run(name: str, tokens: list[str], start: str | None = None, val: float = 0.25):
        cfg = _config(tmp_path / name, tiny_dir, {"name": "lora", "r": 4, "dropout": 0.0, "start_from": start},
                      tokens=tokens, steps=4)  # fmt: skip
        cfg.data.val_fraction = val
        return tunelab.train(cfg)

    for name in ("first", "again", "plain", "none", "other"):
        (tmp_path / name).mkdir()
    first = run("first", NEW)
    again = run("again", NEW, str(tmp_path / "first" / "run"))
    assert again.metrics["eval_loss_before"] == pytest.approx(first.metrics["eval_loss"], rel=1e-6)
    with pytest.raises(MethodError, match=r"trained the rows of 2 tokens.*\['<tool>', '</tool>'\]"):
        run("none", [], str(tmp_path / "first" / "run"))
    with pytest.raises(MethodError, match=r"its run added the tokens \['<tool>', '</tool>'\], this config \['<x>'\]"):
        run("other", ["<x>"], str(tmp_path / "first" / "run"))
    run("plain", [])
    with pytest.raises(MethodError, match="the adapter trains no token rows"):
        run("other", NEW, str(tmp_path / "plain" / "run"))


def test_the_data_pipeline_gives_each_new_token_one_id(tiny_dir, tmp_path):
    """The cached data pipeline (data/store.py's encoder and word memo) tokenises text holding the new tokens as the
    tokenizer does: each one id, never split."""
    from tunelab.data.build import build_datasets
    from tunelab.models import load_tokenizer

    cfg = _config(tmp_path, tiny_dir, {"name": "lora"})
    bundle = build_datasets(cfg.data, lambda: load_tokenizer(cfg.model), seed=0, stage="sft",
                            fingerprint=tokenizer_digest(cfg.model))  # fmt: skip
    tok = load_tokenizer(cfg.model)
    new = tok.convert_tokens_to_ids(NEW)
    ids = [list(e["input_ids"]) for e in bundle.train]
    assert all(i.count(new[0]) == 1 and i.count(new[1]) == 1 for i in ids)
    text = tok.decode(ids[0])
    assert tok(text, add_special_tokens=False)["input_ids"] == ids[0]


def test_the_table_is_kept_compact_inside_pefts_layers_and_given_back_dense():
    """A frozen bf16-valued fp32 table (and its tied head) inside PEFT's trainable-token layers: compacted where they
    are (accel/compact.py), the logits unchanged, and given back dense and tied again (expand_compact, before
    generation), the logits still unchanged."""
    from peft import LoraConfig, get_peft_model

    from tunelab.accel import compact, token_rows
    from tunelab.accel.compact import CompactEmbedding, CompactLinear
    from tunelab.testing import tiny_llama

    model = tiny_llama(103)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[100, 101, 102]))
    inner = model.base_model.model
    ids = torch.tensor([[1, 100, 5, 101]])
    before = _logits(model, ids)
    token_rows.install(model)
    layers, saved = compact.compact_frozen_linears(model)
    table, head = inner.model.embed_tokens.token_adapter, inner.lm_head.token_adapter
    assert type(table.base_layer) is CompactEmbedding and type(head.base_layer) is CompactLinear and saved > 0
    assert torch.equal(_logits(model, ids), before)
    assert compact.expand_compact(model) == layers
    assert type(table.base_layer) is torch.nn.Embedding and head.base_layer.weight is table.base_layer.weight
    assert torch.equal(_logits(model, ids), before)
