"""BitFit, (IA)³ and QLoRA: the acceptance harness on every architecture, plus each method's specifics
(NF4 double quantization really in place, memory saved, dequantized merge, BitFit's added biases)."""

import copy
import json

import pytest
import torch
from method_harness import fit_steps

from tunelab.methods import get
from tunelab.models import count_parameters
from tunelab.testing import tiny_batch, tiny_causal, tiny_llama

bnb = pytest.importorskip("bitsandbytes")


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


# BitFit and (IA)³ train a few hundred parameters: they take a larger learning rate than LoRA to show
# the harness's 20% loss drop in 20 steps (the papers also use larger LRs for them).
BITFIT = {"lr": 3e-2}
IA3 = {"lr": 1e-1}


@pytest.mark.parametrize("arch", ["llama", "bert", "t5"])
@pytest.mark.parametrize(
    "name, kwargs, predicate, identity",
    [
        ("bitfit", BITFIT, lambda n: n.endswith(".bias") or n.startswith("classifier."), True),
        ("ia3", IA3, lambda n: "ia3_l" in n or "classifier" in n, True),
        # step 0 of QLoRA is the *quantized* base, not the fp32 one: checked in test_qlora_step0_... below
        ("qlora", {"r": 4, "alpha": 8, "dropout": 0.0}, lambda n: "lora_" in n or "classifier" in n, False),
    ],
)
def test_method_on_every_architecture(name, kwargs, predicate, identity, arch, tmp_path):
    from method_harness import check_method

    check_method(name, arch, tmp_path, expect_trainable=predicate, identity_at_init=identity, **kwargs)


@pytest.mark.parametrize("arch", ["llama", "bert", "t5"])
def test_qlora_step0_equals_the_quantized_base(arch):
    from tunelab.methods.qlora import Config, apply, quantize_linear_layers_
    from tunelab.testing import TINY_MODELS

    batch = tiny_batch(arch)
    quantized = TINY_MODELS[arch]()
    quantize_linear_layers_(quantized)
    model = apply(TINY_MODELS[arch](), Config(r=4, alpha=8, dropout=0.0))
    assert torch.equal(_logits(model, batch), _logits(quantized, batch))
    # ... and differs from the fp32 base by the quantization error
    assert (_logits(model, batch) - _logits(TINY_MODELS[arch](), batch)).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------ QLoRA
def test_qlora_linear_layers_are_nf4_double_quantized_and_use_3x_less_memory():
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    from tunelab.methods.qlora import Config, apply, quantized_memory_report

    # hidden 64 / intermediate 128: at hidden 32 the per-layer codebooks (~1 KB) weigh as much as the weights
    model = apply(tiny_llama(hidden_size=64, intermediate_size=128), Config(r=4))
    inner = model.get_base_model()
    block = inner.model.layers[0]
    for lin in (block.self_attn.q_proj, block.self_attn.k_proj, block.mlp.down_proj):
        assert isinstance(lin, LoraLinear4bit)
        base = lin.get_base_layer()
        assert isinstance(base, bnb.nn.Linear4bit) and isinstance(base.weight, bnb.nn.Params4bit)
        qs = base.weight.quant_state
        assert base.weight.dtype == torch.uint8 and qs.quant_type == "nf4" and qs.blocksize == 64
        assert qs.nested and qs.state2 is not None and qs.absmax.dtype == torch.uint8  # double quantization
        assert base.compute_dtype == torch.float32  # CPU
    assert type(inner.lm_head) is torch.nn.Linear  # the (tied) head stays full precision
    assert not [n for n, m in inner.model.named_modules() if type(m) is torch.nn.Linear and "lora_" not in n]
    report = quantized_memory_report(model)
    assert report["quantized_layers"] == 14
    assert report["linear_bytes_before"] == 4 * 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128)
    assert report["linear_bytes_before"] >= 3 * report["linear_bytes_after"], report


@pytest.mark.parametrize("dora", [False, True])
def test_qlora_merge_uses_the_dequantized_weights_not_the_original_ones(tmp_path, dora):
    """With DoRA too: its magnitudes rescale each merged row (PEFT's get_delta_weight leaves them out)."""
    from peft import PeftModel

    mod = get("qlora")
    base = tiny_llama(hidden_size=64, intermediate_size=128)
    batch = tiny_batch("llama")
    model = mod.apply(copy.deepcopy(base), mod.Config(r=4, alpha=8, dropout=0.0, use_dora=dora))
    fit_steps(model, batch, steps=5)
    trained = _logits(model, batch)
    mod.save(model, tmp_path)
    meta = json.loads((tmp_path / "tunelab_qlora.json").read_text())
    assert meta["quantization"]["quant_type"] == "nf4" and meta["quantization"]["double_quant"]
    assert (tmp_path / "adapter_config.json").exists() and (tmp_path / "adapter_model.safetensors").exists()

    merged = mod.merge(mod.load(copy.deepcopy(base), tmp_path))
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    assert (_logits(merged, batch) - trained).abs().max() < 1e-4
    # the usual alternative: the same adapter merged into the original fp32 weights differs by the
    # quantization error the adapter never saw
    into_original = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).merge_and_unload()
    assert (_logits(into_original, batch) - trained).abs().max() > 1e-3


def test_qlora_optimizer_hook_is_plain_adamw_on_cpu():
    from tunelab.methods.qlora import optimizer

    assert optimizer([torch.nn.Parameter(torch.zeros(2, 2))], None) is None


def test_qlora_end_to_end_train_and_load_run(tmp_path):
    import tunelab
    from tunelab.config import load_config
    from tunelab.stages.runs import load_run
    from tunelab.testing import save_tiny_model_dir

    model_dir = save_tiny_model_dir(tmp_path / "model", hidden_size=64, intermediate_size=128)
    rows = [{"instruction": f"Say the number {i}.", "input": "", "output": f"The number is {i}."} for i in range(24)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(
        {
            "output_dir": str(tmp_path / "run"),
            "model": {"name": model_dir},
            "data": {"train": str(data), "val_fraction": 0.25, "max_length": 64},
            "method": {"name": "qlora", "r": 4, "alpha": 8, "dropout": 0.0},
            "training": {
                "max_steps": 10,
                "batch_size": 4,
                "lr": 1e-2,
                "warmup_steps": 1,
                "progress": False,
                "tensorboard": False,
            },
        }
    )
    result = tunelab.train(cfg)
    assert result.metrics["eval_loss"] < result.metrics["eval_loss_before"]
    for f in ("adapter_config.json", "adapter_model.safetensors", "tunelab_qlora.json", "tunelab.json"):
        assert (result.final_dir / f).exists(), f

    ids = {"input_ids": torch.tensor([[1, 17, 42, 99, 7, 250, 3, 64]])}
    model, _ = load_run(str(tmp_path / "run"), device="cpu")
    again, _ = load_run(str(tmp_path / "run"), device="cpu")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert torch.equal(_logits(model, ids), _logits(again, ids))
    merged, _ = load_run(str(tmp_path / "run"), device="cpu", merge=True)
    assert (_logits(merged, ids) - _logits(model, ids)).abs().max() < 1e-4


# ----------------------------------------------------------------------------------------- BitFit
def test_bitfit_adds_zero_biases_to_llama_and_merges_into_a_plain_biased_llama(tmp_path):
    from transformers import LlamaForCausalLM

    mod = get("bitfit")
    base = tiny_llama()
    assert not any(n.endswith(".bias") for n, _ in base.named_parameters())  # Llama has no biases
    model = mod.apply(copy.deepcopy(base), mod.Config())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 7 and all(n.endswith(".bias") for n in trainable)
    assert count_parameters(model)[0] == 2 * (32 + 16 + 16 + 32 + 64 + 64 + 32)
    assert model.lm_head.bias is None

    batch = tiny_batch("llama")
    fit_steps(model, batch, steps=3)
    trained = _logits(model, batch)
    mod.save(model, tmp_path / "bitfit")
    merged = mod.merge(mod.load(tiny_llama(), tmp_path / "bitfit"))
    assert merged.config.attention_bias and merged.config.mlp_bias
    merged.save_pretrained(tmp_path / "merged")
    plain = LlamaForCausalLM.from_pretrained(tmp_path / "merged")  # plain transformers, no tunelab
    assert (_logits(plain, batch) - trained).abs().max() < 1e-5


def test_bitfit_without_added_biases_refuses_a_bias_free_model():
    mod = get("bitfit")
    with pytest.raises(ValueError, match="no bias"):
        mod.apply(tiny_llama(), mod.Config(add_missing_biases=False))


def test_bitfit_train_head_false_on_bert_trains_only_biases():
    from tunelab.testing import tiny_bert

    mod = get("bitfit")
    model = mod.apply(tiny_bert(), mod.Config(train_head=False))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "classifier.bias" in names and all(n.endswith(".bias") for n in names)
    assert not model._tunelab_bitfit["added_biases"]  # BERT has all its biases already


def test_ia3_vectors_sit_on_keys_values_and_ffn_input():
    mod = get("ia3")
    model = mod.apply(tiny_llama(), mod.Config())
    shapes = {n.split(".")[-3]: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    assert shapes == {"k_proj": (16, 1), "v_proj": (16, 1), "down_proj": (1, 64)}
    from tunelab.testing import tiny_bert

    bert = mod.apply(tiny_bert(), mod.Config())
    names = [n for n, p in bert.named_parameters() if p.requires_grad and "ia3_l" in n]
    assert not any("attention.output" in n for n in names) and any(".output.dense" in n for n in names)


def test_bitsandbytes_hub_kernel_notice_is_dropped_and_its_other_logs_pass():
    """bitsandbytes' notice that asks for trust_remote_code (its Hub kernel refused) is dropped in any process that
    imported tunelab; its other log records reach the handlers."""
    import logging

    import tunelab

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")

    def record(msg):
        return logger.makeRecord(logger.name, logging.WARNING, __file__, 1, msg, (), None)

    assert not logger.filter(record(tunelab._BNB_HUB_KERNEL_NOTICE + ": Kernel repository ... trust_remote_code=True"))
    assert logger.filter(record("Some other bitsandbytes warning"))


def test_qlora_refuses_gpt2_conv1d_layers_naming_them_and_the_fix():
    """GPT-2 keeps its projections as transformers' Conv1D, which bitsandbytes cannot quantize: the error names
    such a layer and points to LoRA (the generic "all skipped" said neither)."""
    from tunelab.methods.base import MethodError

    model = tiny_causal("gpt2", 64)
    with pytest.raises(
        MethodError, match=r"Conv1D layers \(transformer\.h\.0\.attn\.c_attn, \.\.\. 8 in all.*method: lora"
    ):
        get("qlora").apply(model, get("qlora").Config())


def test_ia3_without_pefts_defaults_takes_llamas_names_or_says_what_to_set():
    """PEFT has no IA3 defaults for OLMo-2 or Phi-3 (its error: "Please specify `target_modules`"). OLMo-2 names its
    layers like Llama: keys, values and the FFN down projection (its input scaled) get the vectors, the base model
    at step 0. Phi-3's keys and values sit in one fused qkv_proj: the error lists its linear layers."""
    from tunelab.methods.base import MethodError

    base = tiny_causal("olmo2", 64)
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        before = base(input_ids=ids).logits
    model = get("ia3").apply(base, get("ia3").Config())
    cfg = model.peft_config["default"]
    assert set(cfg.target_modules) == {"k_proj", "v_proj", "down_proj"} and set(cfg.feedforward_modules) == {
        "down_proj"
    }
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * (16 + 16 + 64)  # l_k, l_v, l_ff a layer
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before)
    with pytest.raises(MethodError, match=r"model type 'phi3'.*method\.target_modules.*qkv_proj"):
        get("ia3").apply(tiny_causal("phi3", 64, pad_token_id=0), get("ia3").Config())


def test_bitfit_on_gpt2_in_bf16_trains_its_layernorm_biases(tmp_path):
    """BitFit trains GPT-2's LayerNorm biases in fp32 (master weights) beside their frozen bf16 weights:
    F.layer_norm refused the pair ("expected scalar type BFloat16 but found Float"); the norm's weight is now
    fp32 too. Through tunelab.train, as a user runs it; the loss goes down."""
    import tunelab
    from tunelab.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    tiny_causal("gpt2", len(tok)).save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    rows = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": f"{w} {w} {w}"}]}
            for w in ["red", "blue", "green", "pink"] * 2]  # fmt: skip
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = tunelab.train({"output_dir": str(tmp_path / "run"), "model": {"name": str(tmp_path / "gpt2"), "dtype": "bfloat16"},
                            "data": {"train": str(tmp_path / "train.jsonl"), "max_length": 32, "val_fraction": 0},
                            "method": {"name": "bitfit"},
                            "training": {"max_steps": 6, "batch_size": 8, "lr": 5e-2, "progress": False, "tensorboard": False}})  # fmt: skip
    losses = [json.loads(line)["loss"] for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line and '"step"' in line]  # fmt: skip
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.05


@pytest.mark.parametrize("method, arch, message", [("qlora", "gpt2", r"Conv1D layers \(h\.0\.attn\.c_attn"),
                                                   ("ia3", "phi3", r"model type 'phi3'.*qkv_proj")])  # fmt: skip
def test_a_model_the_method_cannot_take_is_refused_before_it_loads(method, arch, message, tmp_path):
    """qlora on GPT-2, ia3 on Phi-3: refused from the model's config (its layers built on the meta device) after
    the data is checked and before any weight is read, so a user of a 7B model does not wait for its load."""
    import tunelab
    from tunelab.methods.base import MethodError
    from tunelab.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    tiny_causal(arch, len(tok), pad_token_id=0).save_pretrained(tmp_path / arch)
    tok.save_pretrained(tmp_path / arch)
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}] * 4
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"output_dir": str(tmp_path / "run"), "model": {"name": str(tmp_path / arch)},
           "data": {"train": str(tmp_path / "train.jsonl"), "val_fraction": 0}, "method": {"name": method},
           "training": {"max_steps": 1, "progress": False, "tensorboard": False}}  # fmt: skip
    (tmp_path / arch / "model.safetensors").unlink()  # a load would fail on the missing weights instead
    with pytest.raises(MethodError, match=message):
        tunelab.train(cfg)
    assert not (tmp_path / "run").exists()
    # a model whose layers cannot be built here (no config) is left to the load, which reports it
    assert (
        get(method).check_model(get(method).Config(), tunelab.config.ModelConfig(name=str(tmp_path / "none"))) is None
    )


def test_qlora_takes_loraplus_as_lora_does():
    mod = get("qlora")
    cfg = mod.Config(r=4, alpha=8, dropout=0.0, loraplus_lr_ratio=16)
    model = mod.apply(tiny_llama(hidden_size=64, intermediate_size=128), cfg)
    scales = mod.lr_scales(model, cfg)
    named = {id(p): n for n, p in model.named_parameters()}
    assert len(scales) == 14 and all(".lora_B." in named[id(p)] and s == 16 for p, s in scales.items())
