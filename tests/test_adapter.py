"""Bottleneck adapters (`adapter`): harness on every architecture, config checks, saved format, training loop."""

import copy
import json

import pytest
import torch
from method_harness import fit_steps
from safetensors.torch import load_file, save_file

from tunelab.config import ConfigError, load_config
from tunelab.methods import get
from tunelab.testing import tiny_batch, tiny_bert, tiny_llama, tiny_t5

mod = get("adapter")


def adapter_or_head(n):
    return ".adapter." in n or n.startswith("classifier.")


@pytest.mark.parametrize("arch", ["llama", "bert", "t5"])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"preset": "houlsby"},
        {"preset": "pfeiffer"},
        # m = 32 / 0.5 = 64, the default bottleneck: the 32-wide tiny models need the width to learn in 20 steps
        {"preset": "houlsby", "reduction_factor": 0.5, "activation": "gelu"},
    ],
    ids=["houlsby", "pfeiffer", "reduction-gelu"],
)
def test_adapter_on_every_architecture(arch, kwargs, tmp_path):
    from method_harness import check_method

    check_method("adapter", arch, tmp_path, expect_trainable=adapter_or_head, identity_at_init=True, **kwargs)


def test_houlsby_with_norms(tmp_path):
    from method_harness import check_method

    check_method(
        "adapter",
        "llama",
        tmp_path,
        expect_trainable=lambda n: ".adapter." in n or "norm" in n,
        identity_at_init=True,
        preset="houlsby",
        train_norms=True,
    )


# ---- config


def test_config_bottleneck_xor_reduction_factor():
    assert mod.Config().bottleneck == 64 and mod.Config().reduction_factor is None
    cfg = mod.Config(reduction_factor=16)  # alone: replaces the default bottleneck
    assert cfg.bottleneck is None and cfg.reduction_factor == 16
    with pytest.raises(ValueError, match="exactly one of bottleneck and reduction_factor"):
        mod.Config(bottleneck=8, reduction_factor=4)
    with pytest.raises(ValueError, match="exactly one"):
        mod.Config(bottleneck=None)
    with pytest.raises(ConfigError, match="exactly one of bottleneck and reduction_factor"):
        load_config({"method": {"name": "adapter", "bottleneck": 8, "reduction_factor": 4}})
    assert load_config({"method": {"name": "adapter", "reduction_factor": 8}}).method.bottleneck is None


def test_config_placement_and_preset():
    assert mod.Config().sublayers() == ["ffn"]
    assert mod.Config(preset="houlsby").sublayers() == ["attention", "ffn"]
    assert mod.Config(preset="houlsby", placement=["attention"]).sublayers() == ["attention"]
    assert mod.Config(preset=None, placement=["ffn", "attention"]).sublayers() == ["ffn", "attention"]
    for bad in (
        {"preset": None},
        {"placement": []},
        {"placement": ["ffn", "ffn"]},
        {"placement": ["mlp"]},
        {"bottleneck": 0},
    ):
        with pytest.raises(ValueError):
            mod.Config(**bad)
    with pytest.raises(ConfigError, match="unknown key 'method.r'"):
        load_config({"method": {"name": "adapter", "r": 4}})


# ---- where adapters go, what trains, what is saved


def per_adapter(d, m):
    return 2 * d * m + m + d


@pytest.mark.parametrize(
    "make, kwargs, sites, extra",
    [
        (tiny_llama, {}, ["model.layers.0.mlp", "model.layers.1.mlp"], []),
        (
            tiny_llama,
            {"preset": "houlsby"},
            ["model.layers.0.self_attn", "model.layers.0.mlp", "model.layers.1.self_attn", "model.layers.1.mlp"],
            [],
        ),
        (
            tiny_bert,
            {"preset": "houlsby", "bottleneck": 8},
            [
                "bert.encoder.layer.0.attention.output.dense",
                "bert.encoder.layer.0.output.dense",
                "bert.encoder.layer.1.attention.output.dense",
                "bert.encoder.layer.1.output.dense",
            ],
            ["classifier.weight", "classifier.bias"],
        ),
        (
            tiny_t5,
            {"preset": "houlsby", "reduction_factor": 4},
            [
                "encoder.block.0.layer.0.SelfAttention",
                "encoder.block.0.layer.1.DenseReluDense",
                "encoder.block.1.layer.0.SelfAttention",
                "encoder.block.1.layer.1.DenseReluDense",
                "decoder.block.0.layer.0.SelfAttention",
                "decoder.block.0.layer.1.EncDecAttention",
                "decoder.block.0.layer.2.DenseReluDense",
                "decoder.block.1.layer.0.SelfAttention",
                "decoder.block.1.layer.1.EncDecAttention",
                "decoder.block.1.layer.2.DenseReluDense",
            ],
            [],
        ),
    ],
    ids=["llama-pfeiffer", "llama-houlsby", "bert-houlsby", "t5-houlsby"],
)
def test_sites_trainable_and_saved_files(make, kwargs, sites, extra, tmp_path):
    from tunelab.models import count_parameters

    cfg = mod.Config(**kwargs)
    model = mod.apply(make(), cfg)
    d = 32
    m = mod.bottleneck_size(cfg, d)
    adapter_keys = {f"{s}.adapter.{p}.{w}" for s in sites for p in ("down", "up") for w in ("weight", "bias")}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == adapter_keys | set(extra)
    head = sum(p.numel() for n, p in model.named_parameters() if n in extra)
    assert count_parameters(model)[0] == len(sites) * per_adapter(d, m) + head

    mod.save(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tunelab_adapter.safetensors", "tunelab_adapter_config.json"]
    meta = json.loads((tmp_path / "tunelab_adapter_config.json").read_text())
    assert meta["tunelab_method"] == "adapter" and meta["format_version"] == 1
    assert meta["hidden_size"] == d and meta["bottleneck"] == m
    assert meta["sites"] == sites and meta["extra_params"] == extra
    assert mod.Config(**meta["config"]) == cfg
    weights = load_file(tmp_path / "tunelab_adapter.safetensors")
    assert set(weights) == adapter_keys | set(extra)
    assert all(weights[k].dtype == torch.float32 for k in adapter_keys)


def test_train_head_false_and_true():
    def names(m):
        return {n for n, p in m.named_parameters() if p.requires_grad}

    assert not any("classifier" in n for n in names(mod.apply(tiny_bert(), mod.Config(train_head=False))))
    lm = names(mod.apply(tiny_llama(), mod.Config(train_head=True)))
    assert "model.embed_tokens.weight" in lm  # tied LM head: trained through the embedding
    assert not any("embed" in n for n in names(mod.apply(tiny_llama(), mod.Config())))


def test_adapters_themselves_learn_under_a_trained_head():
    """On BERT the new classifier could fit the batch alone; the adapters must still receive updates."""
    model = mod.apply(tiny_bert(), mod.Config(preset="houlsby"))
    batch = tiny_batch("bert")
    fit_steps(model, batch, steps=3)
    for site in model._tunelab_adapter["sites"]:
        assert model.get_submodule(site).adapter.up.weight.abs().sum() > 0, site


def test_load_is_strict(tmp_path):
    model = mod.apply(tiny_llama(), mod.Config(bottleneck=4))
    mod.save(model, tmp_path)
    path = tmp_path / "tunelab_adapter.safetensors"
    weights = load_file(path)
    save_file({**weights, "model.norm.weight": torch.ones(32)}, path)
    with pytest.raises(ValueError, match="unexpected"):
        mod.load(tiny_llama(), tmp_path)
    weights.pop("model.layers.0.mlp.adapter.up.bias")
    save_file(weights, path)
    with pytest.raises(ValueError, match="missing"):
        mod.load(tiny_llama(), tmp_path)
    with pytest.raises(ValueError, match="hidden size"):
        mod.load(tiny_llama(hidden_size=64), tmp_path)


def test_not_mistaken_for_a_peft_adapter(tmp_path):
    """Our files carry tunelab's names: PEFT finds no adapter_config.json (a ValueError saying so, not the
    TypeError on a missing peft_type it raised when our file bore PEFT's name), and tunelab's PEFT loader
    refuses the folder naming the method."""
    from peft import PeftConfig

    from tunelab.methods.base import MethodError, load_peft

    mod.save(mod.apply(tiny_llama(), mod.Config(bottleneck=4)), tmp_path)
    assert not (tmp_path / "adapter_config.json").exists() and not (tmp_path / "adapter_model.safetensors").exists()
    with pytest.raises(ValueError, match="adapter_config.json"):
        PeftConfig.from_pretrained(str(tmp_path))
    with pytest.raises(MethodError, match="bottleneck adapter.*not a PEFT adapter"):
        load_peft(tiny_llama(), tmp_path)


def test_results_saved_under_the_old_names_still_load(tmp_path):
    torch.manual_seed(0)
    model = mod.apply(tiny_llama(), mod.Config(bottleneck=4))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    mod.save(model, tmp_path)
    (tmp_path / "tunelab_adapter_config.json").rename(tmp_path / "adapter_config.json")  # as older runs hold them
    (tmp_path / "tunelab_adapter.safetensors").rename(tmp_path / "adapter_model.safetensors")
    ids = torch.tensor([[1, 5, 9, 33]])
    loaded = mod.load(tiny_llama(), tmp_path)
    with torch.no_grad():
        assert (loaded(ids).logits - model(ids).logits).abs().max() < 1e-6
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))  # a PEFT adapter
    with pytest.raises(ValueError, match="no tunelab bottleneck adapter.*PEFT adapter"):
        mod.load(tiny_llama(), tmp_path)


def test_unsupported_model_type_names_the_supported_ones():
    model = tiny_llama()
    model.config.model_type = "mystery"
    with pytest.raises(
        ValueError, match=r"'mystery' is not supported; supported model types: \[.*'bert'.*'llama'.*'t5'"
    ):
        mod.apply(model, mod.Config())


def test_not_mergeable():
    assert mod.CAPABILITIES.mergeable is False
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        mod.merge(mod.apply(tiny_llama(), mod.Config()))


def test_bf16_base_keeps_fp32_adapters_and_identity():
    base = tiny_llama().to(torch.bfloat16)
    model = mod.apply(copy.deepcopy(base), mod.Config(preset="houlsby"))
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if ".adapter." in n)
    ids = torch.tensor([[1, 5, 9, 33, 7]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)


# ---- the real training loop


def test_training_loop_end_to_end(tmp_path, monkeypatch):
    import tunelab
    from tunelab.stages.runs import load_run
    from tunelab.testing import save_tiny_model_dir

    rows = [{"instruction": f"Say the number {i}.", "input": "", "output": f"The number is {i}."} for i in range(16)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(
        {
            "output_dir": str(tmp_path / "run"),
            "model": {"name": save_tiny_model_dir(tmp_path / "model")},
            "data": {"train": str(data), "val_fraction": 0.25, "max_length": 64},
            "method": {"name": "adapter"},
            "training": {
                "max_steps": 6,
                "batch_size": 4,
                "lr": 1e-2,
                "warmup_steps": 1,
                "seed": 3,
                "progress": False,
                "tensorboard": False,
            },
        }
    )
    trained = {}
    real_save = mod.save

    def capturing_save(model, out_dir):
        trained["model"] = model
        real_save(model, out_dir)

    monkeypatch.setattr(mod, "save", capturing_save)
    result = tunelab.train(cfg)
    assert result.metrics["eval_loss"] < result.metrics["eval_loss_before"]
    final = result.final_dir
    for f in ("tunelab_adapter_config.json", "tunelab_adapter.safetensors", "tunelab.json", "tokenizer_config.json"):
        assert (final / f).exists(), f
    assert json.loads((final / "tunelab.json").read_text())["method"] == "adapter"
    from huggingface_hub import ModelCard

    card = ModelCard.load(final / "README.md")  # the card says what it is, and that PEFT is not its loader
    assert "adapter" in card.data.tags and "library_name" not in card.data.to_dict()
    assert "not PEFT's format" in card.text and "load_run" in card.text

    ours, _ = load_run(str(result.run_dir), device="cpu")
    base, _ = load_run(str(tmp_path / "model"), device="cpu")
    ids = torch.tensor([[1, 5, 9, 33, 7, 12]])
    model = trained["model"].eval()
    with torch.no_grad():
        want = model(ids).logits
        assert (ours(ids).logits - want).abs().max() < 1e-5
        assert (base(ids).logits - want).abs().max() > 1e-4  # the adapters did change the model


def _tiny(model_type: str):
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    from tunelab.testing import tiny_causal

    if model_type != "bart":
        return tiny_causal(model_type, 64, pad_token_id=0).eval()
    cfg = AutoConfig.for_model("bart", vocab_size=64, pad_token_id=0, initializer_range=0.1, d_model=32,
                               encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_layers=2, decoder_layers=2,
                               encoder_attention_heads=4, decoder_attention_heads=4, max_position_embeddings=64,
                               dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForSeq2SeqLM.from_config(cfg).eval()


@pytest.mark.parametrize(
    "model_type, sites",
    [
        ("olmo2", ["model.layers.{i}.self_attn", "model.layers.{i}.mlp"]),
        ("smollm3", ["model.layers.{i}.self_attn", "model.layers.{i}.mlp"]),
        ("granite", ["model.layers.{i}.self_attn", "model.layers.{i}.mlp"]),
        ("starcoder2", ["model.layers.{i}.self_attn", "model.layers.{i}.mlp"]),
        ("gpt_neox", ["gpt_neox.layers.{i}.attention", "gpt_neox.layers.{i}.mlp"]),
        (
            "bart",
            [
                "model.encoder.layers.{i}.self_attn",
                "model.encoder.layers.{i}.fc2",
                "model.decoder.layers.{i}.self_attn",
                "model.decoder.layers.{i}.encoder_attn",
                "model.decoder.layers.{i}.fc2",
            ],
        ),  # fmt: skip
    ],
)
def test_more_model_types_get_adapters_at_their_sublayers(model_type, sites):
    """OLMo-2, SmolLM3, Granite and StarCoder2 name their sublayers as Llama does; GPT-NeoX's attention is
    `attention`; BART's FFN is no module, so its adapter follows `fc2`. Houlsby places one after each sublayer:
    the base model's logits at step 0, and the adapters alone fit a batch."""
    from method_harness import fit_steps

    model = _tiny(model_type)
    ids = torch.randint(3, 64, (2, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with torch.no_grad():
        before = model(**batch).logits
    model = mod.apply(model, mod.Config(preset="houlsby"))
    found = sorted(
        n.removesuffix(".adapter.down.weight")
        for n, _ in model.named_parameters()
        if n.endswith(".adapter.down.weight")
    )
    assert found == sorted(s.format(i=i) for s in sites for i in range(2))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**batch).logits, before)
    losses = fit_steps(model, batch, steps=10, lr=1e-2)
    assert losses[-1] < losses[0] - 0.1, losses
