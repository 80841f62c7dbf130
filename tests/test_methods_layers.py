"""freeze (block parts), gradual unfreezing and head / layer addition; task heads (tunelab.models.heads)."""

import copy
import json

import pytest
import torch

import tunelab
from tunelab.config import load_config
from tunelab.methods import get
from tunelab.testing import TINY_MODELS, save_tiny_model_dir, tiny_bert, tiny_llama, tiny_t5


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def apply(name, arch="llama", model=None, **kw):
    mod = get(name)
    return mod.apply(model if model is not None else TINY_MODELS[arch](), mod.Config(**kw))


# ----------------------------------------------------------------------------------- freeze parts
def test_freeze_modules_attention_in_top_block():
    names = trainable(apply("freeze", last_k=1, modules=["attention"]))
    assert names == {f"model.layers.1.self_attn.{p}_proj.weight" for p in "qkvo"}


def test_freeze_norms_everywhere_includes_the_final_norm():
    names = trainable(apply("freeze", last_k=None, modules=["norms"]))
    assert names == {
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.layers.1.input_layernorm.weight",
        "model.layers.1.post_attention_layernorm.weight",
        "model.norm.weight",
    }


def test_freeze_bert_ffn_and_head():
    names = trainable(apply("freeze", "bert", last_k=1, modules=["ffn", "head"]))
    assert names == {
        "bert.encoder.layer.1.intermediate.dense.weight",
        "bert.encoder.layer.1.intermediate.dense.bias",
        "bert.encoder.layer.1.output.dense.weight",
        "bert.encoder.layer.1.output.dense.bias",
        "bert.pooler.dense.weight",
        "bert.pooler.dense.bias",
        "classifier.weight",
        "classifier.bias",
    }


def test_freeze_t5_attention_covers_both_stacks_and_cross_attention():
    names = trainable(apply("freeze", "t5", last_k=1, modules=["attention"]))
    assert names and all(".block.1." in n and ("SelfAttention" in n or "EncDecAttention" in n) for n in names)
    assert any(n.startswith("encoder.") for n in names) and any("EncDecAttention" in n for n in names)


def test_freeze_head_on_tied_model_trains_the_shared_embedding():
    model = apply("freeze", last_k=0, modules=["head"])
    assert trainable(model) == {"model.embed_tokens.weight"}  # lm_head.weight is this tensor
    assert model.lm_head.weight.requires_grad


def test_freeze_embeddings_only():
    names = trainable(apply("freeze", "bert", last_k=0, modules=["embeddings"]))
    assert names and all(n.startswith("bert.embeddings.") for n in names)


def test_freeze_rejects_configs_that_train_nothing():
    with pytest.raises(ValueError):
        get("freeze").Config(last_k=0, modules=["attention"])


@pytest.mark.parametrize("arch", ["llama", "bert", "t5"])
def test_freeze_modules_on_every_architecture(arch, tmp_path):
    from method_harness import check_method

    def pred(n):
        return any(s in n for s in (".mlp.", "DenseReluDense", "intermediate", "output.dense", "classifier", "pooler"))

    modules = ["ffn"] + (["head"] if arch == "bert" else [])  # BERT's new classifier must train
    check_method("freeze", arch, tmp_path, expect_trainable=pred, last_k=None, modules=modules)


# ---------------------------------------------------------------------------------------- gradual
@pytest.mark.parametrize("arch", ["llama", "bert", "t5"])
def test_gradual_on_every_architecture(arch, tmp_path):
    from method_harness import check_method

    check_method("gradual", arch, tmp_path, every_steps=5)


def test_gradual_in_bf16_keeps_every_block_that_thaws_in_fp32(tmp_path, monkeypatch):
    """bf16 weights with autocast: the master weights are every parameter that trains at some point of the run
    (optimizer_parameters), not only those trainable at step 0. Blocks that thawed later trained in bf16, where
    AdamW's updates round away, and GPT-NeoX's thawed LayerNorms (fp32 weight, bf16 bias) failed in F.layer_norm."""
    import tunelab.training.loop as loop
    from tunelab.testing import tiny_causal, tiny_tokenizer

    tok = tiny_tokenizer()
    tiny_causal("gpt_neox", len(tok), num_hidden_layers=3).save_pretrained(tmp_path / "neox")
    tok.save_pretrained(tmp_path / "neox")
    rows = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": f"{w} {w} {w}"}]}
            for w in ["red", "blue", "green", "pink"] * 2]  # fmt: skip
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    optimizers = []
    monkeypatch.setattr(loop, "optimizer_for", lambda params, tcfg, scales, *rest, real=loop.optimizer_for: optimizers.append(
        real(params, tcfg, scales, *rest)) or optimizers[-1])  # fmt: skip
    dtypes = []
    result = tunelab.train({"output_dir": str(tmp_path / "run"), "model": {"name": str(tmp_path / "neox"), "dtype": "bfloat16"},
                            "data": {"train": str(tmp_path / "train.jsonl"), "max_length": 32, "val_fraction": 0},
                            "method": {"name": "gradual", "every_steps": 1},
                            "training": {"max_steps": 4, "batch_size": 8, "lr": 1e-2, "progress": False, "tensorboard": False,
                                         "master_weights": "fp32"}},
                           callbacks=[lambda step, record: dtypes.append({p.dtype for g in optimizers[0].param_groups
                                                                          for p in g["params"]})])  # fmt: skip
    assert len(dtypes) == 4 and all(d == {torch.float32} for d in dtypes)  # all of them, before they thaw too
    losses = [json.loads(line)["loss"] for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line and '"step"' in line]  # fmt: skip
    assert len(losses) == 4 and all(loss == loss for loss in losses)


def test_gradual_schedule_is_exact():
    mod = get("gradual")
    cfg = mod.Config(every_steps=5, unfreeze_embeddings=True)
    model = mod.apply(tiny_llama(num_hidden_layers=4), cfg)

    def blocks():
        return sorted({int(n.split(".")[2]) for n in trainable(model) if ".layers." in n})

    assert trainable(model) == {n for n in trainable(model) if ".layers.3." in n} | {"model.norm.weight"}
    seen = {}
    for step in range(26):
        note = mod.on_step(model, cfg, step)
        if note:
            seen[step] = note
        seen_blocks = blocks()
        expect = [3 - i for i in range(min(4, 1 + step // 5))][::-1]
        assert seen_blocks == expect, (step, seen_blocks)
        assert "model.norm.weight" in trainable(model)
        assert ("model.embed_tokens.weight" in trainable(model)) == (step >= 20)
    assert seen == {
        5: "unfroze block 2 (2/4 blocks trainable)",
        10: "unfroze block 1 (3/4 blocks trainable)",
        15: "unfroze block 0 (4/4 blocks trainable)",
        20: "unfroze the embeddings (4/4 blocks trainable)",
    }
    assert mod.schedule(model, cfg, 100) == [(0, "head + top 1 block(s) trainable (1/4 blocks trainable)")] + sorted(
        seen.items()
    )
    assert mod.schedule(model, cfg, 11)[-1][0] == 10
    # pure function of the step: going back to step 0 (a resumed run restarts from apply) re-freezes
    assert mod.on_step(model, cfg, 0) is None and blocks() == [3]
    # every parameter that will ever train is in the optimizer from the start
    everything = {id(p) for p in model.parameters()}
    assert {id(p) for p in mod.optimizer_parameters(model, cfg)} == everything
    no_emb = mod.optimizer_parameters(model, mod.Config(every_steps=5))
    assert model.model.embed_tokens.weight not in set(no_emb) and len(no_emb) == len(everything) - 1


def test_gradual_frozen_blocks_do_not_move_until_they_thaw():
    mod = get("gradual")
    cfg = mod.Config(every_steps=3)
    model = mod.apply(tiny_llama(), cfg)
    ids = torch.tensor([[1, 17, 42, 99, 7, 250, 3, 64]])
    opt = torch.optim.AdamW(mod.optimizer_parameters(model, cfg), lr=1e-2)
    block0 = model.model.layers[0].mlp.up_proj.weight
    start = block0.detach().clone()
    model.train()
    for step in range(6):
        mod.on_step(model, cfg, step)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert torch.equal(block0, start) == (step < 3), step
    assert torch.equal(model.model.embed_tokens.weight, tiny_llama().model.embed_tokens.weight)


ROWS = [{"instruction": f"Say the number {i}.", "input": "", "output": f"The number is {i}."} for i in range(24)]


def _gradual_cfg(model_dir, data, out):
    return load_config(
        {
            "output_dir": str(out),
            "model": {"name": model_dir},
            "data": {"train": data, "val_fraction": 0.25, "max_length": 64},
            "method": {"name": "gradual", "every_steps": 2, "unfreeze_embeddings": True},
            "training": dict(
                max_steps=8, batch_size=4, lr=5e-3, warmup_steps=1, progress=False, tensorboard=False, seed=3
            ),
        }
    )


def test_gradual_through_the_loop_logs_events_and_resumes_exactly(tmp_path):
    model_dir = save_tiny_model_dir(tmp_path / "model", num_hidden_layers=3)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    full = tunelab.train(_gradual_cfg(model_dir, str(data), tmp_path / "a"))

    def ctrl_c_after_step_3(step, record):
        if step == 3:
            raise KeyboardInterrupt

    cfg = _gradual_cfg(model_dir, str(data), tmp_path / "b")
    assert tunelab.train(cfg, callbacks=[ctrl_c_after_step_3]).metrics["interrupted"]
    resumed = tunelab.train(cfg, resume=True)

    def records(run):
        return [json.loads(ln) for ln in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    events = [(r["step"], r["event"]) for r in records("a") if "event" in r]
    assert events == [
        (2, "unfroze block 1 (2/3 blocks trainable)"),
        (4, "unfroze block 0 (3/3 blocks trainable)"),
        (6, "unfroze the embeddings (3/3 blocks trainable)"),
    ]
    assert [(r["step"], r["event"]) for r in records("b") if "event" in r] == events
    la = {r["step"]: r["loss"] for r in records("a") if "loss" in r}
    lb = {r["step"]: r["loss"] for r in records("b") if "loss" in r}
    assert sorted(lb) == list(range(1, 9))
    for step in range(1, 9):
        assert abs(la[step] - lb[step]) < 1e-6, (step, la[step], lb[step])
    assert abs(full.metrics["eval_loss"] - resumed.metrics["eval_loss"]) < 1e-6
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(resumed.final_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    assert not torch.equal(plain.model.embed_tokens.weight, base.model.embed_tokens.weight)  # thawed at step 6


# ------------------------------------------------------------------------------------------- head
@pytest.mark.parametrize(
    "arch, kw, identity, min_drop",
    [
        ("llama", {"extra_blocks": 0, "untie_head": True}, True, 0.2),
        ("llama", {"extra_blocks": 1}, True, 0.2),
        ("llama", {"extra_blocks": 2, "init": "random"}, False, 0.2),
        ("bert", {"extra_blocks": 0}, False, 0.2),
        ("bert", {"extra_blocks": 1}, False, 0.2),
        # tied T5 head: only the final norms train without extra blocks, so the loss moves little
        ("t5", {"extra_blocks": 0}, True, 0.005),
        ("t5", {"extra_blocks": 1}, True, 0.2),
    ],
)
def test_head_on_every_architecture(arch, kw, identity, min_drop, tmp_path):
    from method_harness import check_method

    n_base = 2
    new_block = lambda n: any(f"{s}.{i}." in n for s in ("layers", "layer", "block") for i in range(n_base, 4))  # noqa: E731
    pred = lambda n: (
        new_block(n)
        or "norm" in n
        and not any(f".{i}." in n for i in range(n_base))
        or any(  # noqa: E731
            h in n for h in ("lm_head", "classifier", "pooler")
        )
    )
    check_method("head", arch, tmp_path, expect_trainable=pred, identity_at_init=identity, min_drop=min_drop, **kw)


def test_head_extra_blocks_are_plain_layers_with_right_cache_index(tmp_path):
    from transformers import AutoModelForCausalLM

    mod = get("head")
    model = mod.apply(tiny_llama(), mod.Config(extra_blocks=2, init="random"))
    assert model.config.num_hidden_layers == 4
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3]
    mod.save(model, tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert len(again.model.layers) == 4
    ids = torch.tensor([[1, 17, 42, 99, 7, 250, 3, 64]])
    with torch.no_grad():
        full = again(input_ids=ids, use_cache=False).logits
        out = again(input_ids=ids[:, :5], use_cache=True)
        step = again(input_ids=ids[:, 5:], cache=out.cache, use_cache=True).logits  # incremental decoding
    assert (step - full[:, 5:]).abs().max() < 1e-5
    assert len(out.cache.layers) == 4


def test_head_identity_init_is_refused_for_post_norm_blocks():
    with pytest.raises(ValueError, match="post-norm"):
        apply("head", "bert", extra_blocks=1, init="identity")


def test_head_on_tied_lm_without_extras_trains_only_the_final_norm():
    assert trainable(apply("head")) == {"model.norm.weight"}
    with pytest.raises(ValueError, match="T5"):
        apply("head", "t5", untie_head=True)


# -------------------------------------------------------------------------------------- task heads
def _fit(model, batch, steps=30, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_with_task_head_llama_classification_shares_the_base_weights(tmp_path):
    from transformers import AutoModelForSequenceClassification, LlamaForSequenceClassification

    from tunelab.models.heads import with_task_head

    base = tiny_llama()
    clf = with_task_head(base, "classification", num_labels=3)
    assert isinstance(clf, LlamaForSequenceClassification)
    assert clf.model is base.model and clf.score.weight.shape == (3, 32)
    assert not clf.score.weight.is_meta and clf.score.weight.abs().sum() > 0
    clf = get("head").apply(clf, get("head").Config())
    assert trainable(clf) == {"score.weight", "model.norm.weight"}
    ids = torch.tensor([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": torch.tensor([0, 2])}
    losses = _fit(clf, batch)
    assert losses[-1] < 0.5 * losses[0]
    clf.save_pretrained(tmp_path)
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    clf.eval()
    with torch.no_grad():
        assert (again(**batch).logits - clf(**batch).logits).abs().max() < 1e-5


def test_with_task_head_regression():
    from tunelab.models.heads import with_task_head

    reg = with_task_head(tiny_llama(), "regression")
    assert reg.config.problem_type == "regression" and reg.config.num_labels == 1
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    batch = {"input_ids": ids, "labels": torch.tensor([0.5, -1.0])}
    assert reg(**batch).logits.shape == (2, 1)
    losses = _fit(reg, batch)
    assert losses[-1] < 0.2 * losses[0]


def test_with_task_head_bert_span_qa():
    from transformers import BertForQuestionAnswering

    from tunelab.models.heads import with_task_head

    bert = tiny_bert()
    qa = with_task_head(bert, "span_qa")
    assert isinstance(qa, BertForQuestionAnswering) and qa.bert is bert.bert
    qa = get("head").apply(qa, get("head").Config(extra_blocks=1))
    ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "start_positions": torch.tensor([2, 4]), "end_positions": torch.tensor([3, 7])}
    out = qa(input_ids=ids)
    assert out.start_logits.shape == out.end_logits.shape == (2, 10)
    losses = _fit(qa, batch)
    assert losses[-1] < 0.5 * losses[0]
    assert trainable(qa) >= {"qa_outputs.weight", "qa_outputs.bias"}


def test_with_task_head_t5_and_errors():
    from transformers import CTRLConfig, CTRLLMHeadModel

    from tunelab.models.heads import with_task_head

    t5 = tiny_t5()
    clf = with_task_head(t5, "classification", num_labels=2)
    assert clf.transformer.encoder is t5.encoder
    with pytest.raises(ValueError, match=r"no \*ForQuestionAnswering class"):
        with_task_head(CTRLLMHeadModel(CTRLConfig(vocab_size=50, n_embd=16, dff=32, n_layer=1, n_head=2)), "span_qa")
    with pytest.raises(ValueError):
        with_task_head(tiny_llama(), "regression", num_labels=3)
    with pytest.raises(ValueError):
        with_task_head(copy.deepcopy(tiny_llama()), "tagging")


def test_gradual_every_epochs_uses_the_loops_steps_per_epoch():
    from tunelab.methods import get
    from tunelab.testing import tiny_llama

    mod = get("gradual")
    cfg = mod.Config(every_epochs=1)
    assert cfg.every_steps is None
    model = mod.apply(tiny_llama(), cfg)
    assert mod.on_step(model, cfg, 3, steps_per_epoch=4) is None
    assert mod.on_step(model, cfg, 4, steps_per_epoch=4) == "unfroze block 0 (2/2 blocks trainable)"
    assert [s for s, _ in mod.schedule(model, mod.Config(every_epochs=0.5), 10, steps_per_epoch=4)] == [0, 2]
    with pytest.raises(ValueError, match="steps per epoch"):
        mod.on_step(model, cfg, 1)


def test_gpt2s_layernorms_named_ln_are_norms():
    """GPT-2 (and GPT-J, BLOOM, Falcon) name their norms ln_1, ln_2, ln_f: `head` trains the final one (it found
    "no final norm" and refused), `freeze` with modules [norms] the top block's ones and the final one."""
    from tunelab.testing import tiny_causal

    def gpt2():
        return tiny_causal("gpt2", 64)

    model = get("head").apply(gpt2(), get("head").Config())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "transformer.ln_f.weight",
        "transformer.ln_f.bias",
    }
    model = get("freeze").apply(gpt2(), get("freeze").Config(last_k=1, modules=["norms"]))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"transformer.{ln}.{w}" for ln in ("h.1.ln_1", "h.1.ln_2", "ln_f") for w in ("weight", "bias")
    }
