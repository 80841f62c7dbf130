"""Big models on a small box: a base read tensor by tensor straight into 4-bit (models/streaming.py, qlora's
load_plan) gives the model load-then-quantise gives; gradient checkpointing chosen when memory requires it.
(The 1.7B figures are a bench, bench/big_model.py, never a test.)"""

import json

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file, save_file

from tunelab.config import ConfigError, ModelConfig
from tunelab.methods import get
from tunelab.models import load_model
from tunelab.models.loading import loading_into
from tunelab.models.streaming import load_streamed
from tunelab.testing import save_tiny_model_dir

qlora = get("qlora")
IDS = torch.tensor([[1, 17, 42, 99, 7, 250, 3, 64], [5, 6, 7, 8, 9, 10, 11, 12]])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny"), hidden_size=64, intermediate_size=128)


def _state(model) -> dict:
    """Every tensor a 4-bit layer holds (codes, absmax, nested constants) and every plain parameter."""
    out = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            qs = m.weight.quant_state
            out.update({f"{name}.absmax": qs.absmax, f"{name}.absmax2": qs.state2.absmax, f"{name}.offset": qs.offset})
    return out


@pytest.mark.parametrize("settings", [{}, {"quant_type": "fp4", "double_quant": True, "skip_modules": ["down_proj"]}])
def test_straight_into_4bit_equals_load_then_quantise(model_dir, settings, capsys):
    cfg = qlora.Config(r=4, alpha=8, dropout=0.0, **settings)
    base, _ = load_model(ModelConfig(name=model_dir), device="cpu")
    torch.manual_seed(0)  # LoRA's A starts random: the same draw on both sides
    then = qlora.apply(base, cfg)
    with loading_into(qlora.load_plan(cfg, "cpu")):
        streamed, _ = load_model(ModelConfig(name=model_dir), device="cpu")
    assert "loaded whole" not in capsys.readouterr().err
    inner = streamed
    assert all(inner.get_submodule(n).weight.quant_state.quant_type == cfg.quant_type for n in
               [n for n, m in inner.named_modules() if isinstance(m, bnb.nn.Linear4bit)])  # fmt: skip
    layers = [n for n, m in inner.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14 - 2 * bool(settings)  # 2 blocks x 7 linears, less the skipped down_proj
    assert type(inner.lm_head) is torch.nn.Linear and inner.lm_head.weight is inner.model.embed_tokens.weight
    torch.manual_seed(0)
    straight = qlora.apply(streamed, cfg)
    assert straight.get_base_model()._tunelab_qlora == then.get_base_model()._tunelab_qlora  # same layers, settings
    a, b = _state(then), _state(straight)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), [
        k for k in a if not torch.equal(a[k], b[k])
    ]
    with torch.no_grad():
        assert torch.equal(then(input_ids=IDS).logits, straight(input_ids=IDS).logits)
    assert not straight.get_base_model().training


def test_a_checkpoint_with_other_key_names_loads_whole_with_a_note(model_dir, tmp_path, capsys):
    import shutil

    other = tmp_path / "renamed"
    shutil.copytree(model_dir, other)
    tensors = load_file(str(other / "model.safetensors"))
    tensors["transformer.wte.weight"] = tensors.pop("model.embed_tokens.weight")  # an older layout's name
    save_file(tensors, str(other / "model.safetensors"))
    model, why = load_streamed(str(other), _auto(), torch.float32, "cpu", lambda m: {})
    assert model is None and "transformer.wte.weight" in why
    (other / "model.safetensors").unlink()
    assert load_streamed(str(other), _auto(), torch.float32, "cpu", lambda m: {}) == (None, "no safetensors files")
    with loading_into(qlora.load_plan(qlora.Config(), "cpu")):
        load_model(ModelConfig(name=model_dir), device="cpu", num_labels=3)  # a head made at load
    assert "loaded whole, then converted (a head made at load (num_labels))" in capsys.readouterr().err


def test_sharded_checkpoints_stream_shard_by_shard(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model_dir)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())["weight_map"]
    streamed, why = load_streamed(str(tmp_path / "sharded"), _auto(), torch.float32, "cpu", lambda m: {})
    assert why is None and len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    with torch.no_grad():
        assert torch.equal(ref(input_ids=IDS).logits, streamed(input_ids=IDS).logits)


def _auto():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM


# ------------------------------------------------------------------------- gradient checkpointing: auto
SMOLLM2_1_7B = type("Config", (), {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24})()


def test_activation_estimate_scales_with_rows_length_width_and_layers():
    from tunelab.training.harness import activation_bytes

    one = activation_bytes(1, 256, SMOLLM2_1_7B)
    assert one == 256 * 24 * (6 * 2048 + 4 * 8192) * 4  # 1.1 GB: 45,056 fp32 values per token and layer
    assert activation_bytes(4, 256, SMOLLM2_1_7B) == 4 * one == 2 * activation_bytes(4, 128, SMOLLM2_1_7B)
    assert activation_bytes(4, 256, SMOLLM2_1_7B, bytes_per_value=2) == 2 * one
    kept = activation_bytes(4, 256, SMOLLM2_1_7B, checkpointed=True)
    assert kept == 4 * 256 * 2048 * 24 * 4 + 4 * one // 24 and kept < 4 * one / 8
    assert activation_bytes(4, 256, SMOLLM2_1_7B, checkpointed=24) == kept  # every layer, by number
    some = activation_bytes(4, 256, SMOLLM2_1_7B, checkpointed=8)  # 16 layers keep theirs, 8 their input, 1 recomputed
    assert some == 17 * (4 * one // 24) + 8 * 4 * 256 * 2048 * 4 and kept < some < 4 * one


def test_checkpointing_is_chosen_when_memory_requires_it_and_an_explicit_setting_wins():
    from tunelab.training.harness import activation_bytes, checkpointing_choice

    gib = 2**30
    # 4.1 GiB > 3: the fewest layers whose checkpointing brings the estimate under 3 GiB (8 of 24), not all 24
    n, why = checkpointing_choice("auto", 4, 256, SMOLLM2_1_7B, 4, available=6 * gib)
    assert n == 8 and "auto: on for 8 of 24 layers, activations ~4.1 GiB a pass (4 rows x 256 tokens) > 50% of the " \
        "6.0 GiB" in why and "~3.0 GiB checkpointed" in why  # fmt: skip
    assert activation_bytes(4, 256, SMOLLM2_1_7B, 4, checkpointed=7) > 3 * gib >= activation_bytes(
        4, 256, SMOLLM2_1_7B, 4, checkpointed=8)  # fmt: skip
    n, why = checkpointing_choice("auto", 4, 256, SMOLLM2_1_7B, 4, available=gib)  # even all 24 leave 0.5 GiB: all
    assert n == 24 and "auto: on, activations" in why and "~0.4 GiB checkpointed" in why
    assert checkpointing_choice("auto", 4, 256, SMOLLM2_1_7B, 4, available=6 * gib, layers=20)[0] == 20  # as set
    unnamed = type("Config", (), {"hidden_size": 64})()  # no layer count: true still turns it on (every layer)
    assert checkpointing_choice(True, 1, 8, unnamed, 4, available=gib)[0] == 1
    assert checkpointing_choice(True, 1, 8, SMOLLM2_1_7B, 4, available=gib, layers=6) == (
        6, "training.gradient_checkpointing: true, 6 of 24 layers (training.checkpoint_layers)")  # fmt: skip
    on, why = checkpointing_choice("auto", 1, 256, SMOLLM2_1_7B, 4, available=6 * gib)  # 1.0 GiB < 3
    assert not on and "<= 50%" in why
    assert checkpointing_choice(False, 4, 256, SMOLLM2_1_7B, 4, available=gib) == (
        False, "training.gradient_checkpointing: false")  # fmt: skip
    assert checkpointing_choice(True, 1, 8, SMOLLM2_1_7B, 4, available=100 * gib)[0]
    on, why = checkpointing_choice("auto", 4, 256, SMOLLM2_1_7B, 4, available=None)
    assert not on and "unknown" in why


def test_narrower_saved_activations_come_before_checkpointing_when_memory_is_short():
    from tunelab.training.harness import (
        activation_bytes,
        checkpointing_choice,
        narrowable,
        saved_activations_choice,
    )

    gib = 2**30
    full, narrow = activation_bytes(4, 256, SMOLLM2_1_7B), activation_bytes(4, 256, SMOLLM2_1_7B, narrowed=True)
    # the two norms' inputs and gate / up lose 2 of their 4 bytes: 40,960 of 180,224 bytes a token and layer
    assert full - narrow == 4 * 256 * 24 * (2 * 2048 + 2 * 8192) * 2 and round(narrow / gib, 2) == 3.19
    assert activation_bytes(4, 256, SMOLLM2_1_7B, 2, narrowed=True) == activation_bytes(4, 256, SMOLLM2_1_7B, 2)
    # 7 GiB: fp32's 4.1 GiB would checkpoint layers; in bf16 3.2 GiB fit under 3.5: no recomputation at all
    keep, why = saved_activations_choice("auto", False, 4, 256, SMOLLM2_1_7B, 7 * gib, narrows=True)
    assert keep and "auto: bf16, activations ~4.1 GiB a pass in fp32 (4 rows x 256 tokens) > 50% of the 7.0" in why
    assert "~3.2 GiB with the MLPs' gate and up outputs and the norms' inputs in bf16" in why
    assert checkpointing_choice("auto", 4, 256, SMOLLM2_1_7B, 4, 7 * gib)[0] == 5  # what fp32 alone would recompute
    n, why = checkpointing_choice("auto", 4, 256, SMOLLM2_1_7B, 4, 7 * gib, narrowed=True)
    assert n == 0 and "auto: off, activations ~3.2 GiB a pass (4 rows x 256 tokens, some in bf16) <= 50%" in why
    # 6 GiB: bf16 is not enough alone; checkpointing then covers fewer layers than fp32 needed (8)
    assert saved_activations_choice("auto", False, 4, 256, SMOLLM2_1_7B, 6 * gib, narrows=True)[0]
    n_narrow = checkpointing_choice("auto", 4, 256, SMOLLM2_1_7B, 4, 6 * gib, narrowed=True)[0]
    assert 0 < n_narrow < checkpointing_choice("auto", 4, 256, SMOLLM2_1_7B, 4, 6 * gib)[0] == 8
    # room to spare, blocks accel does not narrow, or unknown memory: fp32 (nothing to say)
    assert saved_activations_choice("auto", False, 1, 256, SMOLLM2_1_7B, 7 * gib, narrows=True) == (False, "")
    assert saved_activations_choice("auto", False, 4, 256, SMOLLM2_1_7B, 7 * gib, narrows=False) == (False, "")
    assert saved_activations_choice("auto", False, 4, 256, SMOLLM2_1_7B, None, narrows=True) == (False, "")
    # a setting wins; bf16 optimizer state takes bf16 whatever the memory
    assert saved_activations_choice("fp32", True, 4, 256, SMOLLM2_1_7B, gib, narrows=True) == (False, "")
    assert saved_activations_choice("bf16", False, 1, 8, SMOLLM2_1_7B, 100 * gib, narrows=False) == (True, "")
    assert saved_activations_choice("auto", True, 1, 8, SMOLLM2_1_7B, 100 * gib, narrows=False) == (True, "")
    from tunelab.testing import tiny_causal, tiny_llama

    on = type("T", (), {"accelerate": "auto"})()
    llama = tiny_llama()
    assert narrowable(on, llama, 4) and not narrowable(on, llama, 2)  # bf16 passes: nothing to narrow
    assert not narrowable(on, tiny_causal("gpt2"), 4)  # GPT-2's MLP is not gated: not accel's SwiGLU function
    assert not narrowable(type("T", (), {"accelerate": "off"})(), llama, 4)


def test_the_loop_keeps_saved_activations_in_bf16_instead_of_recomputing_where_that_fits(monkeypatch, tmp_path, capsys):
    import tunelab
    from tunelab.config import load_config
    from tunelab.training import loop

    left = {}  # the memory left once the model and optimizer are in, as the loop's plan would say
    real_plan = loop.master_weights_plan
    monkeypatch.setattr(loop, "master_weights_plan", lambda *a, **k: (*real_plan(*a, **k)[:2], left["bytes"]))
    model_dir, cfg, seen = _tiny_lora_run(tmp_path, monkeypatch, repeat=30)
    from tunelab.training.harness import activation_bytes

    config = __import__("transformers").AutoConfig.from_pretrained(model_dir)
    fp32, bf16 = activation_bytes(4, 64, config), activation_bytes(4, 64, config, narrowed=True)
    left["bytes"] = fp32 + bf16  # half of it lies between the two estimates
    tunelab.train(load_config(cfg))
    err = capsys.readouterr().err
    assert seen == {} and "saved activations: auto: bf16" in err and "gradient checkpointing: auto: off" in err
    assert "saved activations in bfloat16: 2 MLPs' gate and up outputs and 5 norms' inputs" in err
    left["bytes"], cfg["output_dir"] = bf16, str(tmp_path / "run2")  # not even bf16 fits in half: both
    tunelab.train(load_config(cfg))
    err = capsys.readouterr().err
    assert seen == {"on": 1.0} and "saved activations: auto: bf16" in err and "some in bf16) > 50%" in err
    seen.clear()
    left["bytes"], cfg["output_dir"] = 4 * fp32, str(tmp_path / "run3")  # room: fp32, as before
    tunelab.train(load_config(cfg))
    err = capsys.readouterr().err
    assert seen == {} and "saved activations" not in err


def test_selective_checkpointing_recomputes_the_first_layers_only_and_gives_the_same_gradients():
    from tunelab.testing import tiny_llama
    from tunelab.training.loop import enable_gradient_checkpointing

    ids = torch.tensor([[1, 17, 42, 99, 7, 250, 3, 64, 5, 9]])

    def grads(share):
        model = tiny_llama(num_hidden_layers=4).train()
        if share is not None:
            assert enable_gradient_checkpointing(model, share) == (round(4 * share), 4)
            assert [b.gradient_checkpointing for b in model.model.layers] == [i < 4 * share for i in range(4)]
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters()}

    plain = grads(None)
    for share in (0.5, 1.0):
        for name, g in grads(share).items():
            torch.testing.assert_close(g, plain[name], rtol=1e-5, atol=1e-6, msg=name)


def _tiny_lora_run(tmp_path, monkeypatch, repeat: int) -> tuple[str, dict, dict]:
    """(the tiny model's folder, a one-step LoRA config over rows of `repeat` words, the checkpointing the loop turned
    on: {"on": share} once it does; the checkpointing itself is not run)."""
    from tunelab.training import loop

    model_dir = save_tiny_model_dir(tmp_path / "m")
    rows = "".join(json.dumps({"text": f"row {i} " * repeat}) + "\n" for i in range(8))
    (tmp_path / "d.jsonl").write_text(rows)
    seen = {}
    monkeypatch.setattr(
        loop, "enable_gradient_checkpointing", lambda model, share: seen.setdefault("on", share) and None
    )
    cfg = {"output_dir": str(tmp_path / "run"), "model": {"name": model_dir},
           "data": {"train": str(tmp_path / "d.jsonl"), "format": "text", "val_fraction": 0.0, "max_length": 64},
           "method": {"name": "lora", "r": 2, "alpha": 4, "dropout": 0.0},
           "training": {"max_steps": 1, "batch_size": 4, "progress": False, "tensorboard": False}}  # fmt: skip
    return model_dir, cfg, seen


def test_the_loop_turns_checkpointing_on_when_memory_is_short(monkeypatch, tmp_path, capsys):
    import tunelab
    from tunelab.config import load_config
    from tunelab.training import harness

    # 1 MiB left (harness.master_weights_plan reads it for the loop): the tiny model's 1.3 MiB is too much
    monkeypatch.setattr(harness, "available_memory", lambda: 2**20)
    _, cfg, seen = _tiny_lora_run(tmp_path, monkeypatch, repeat=8)
    tunelab.train(load_config(cfg))
    assert seen == {"on": 1.0} and "gradient checkpointing: auto: on" in capsys.readouterr().err
    cfg["output_dir"], cfg["training"]["gradient_checkpointing"] = str(tmp_path / "run2"), False
    seen.clear()
    tunelab.train(load_config(cfg))
    assert seen == {} and "gradient checkpointing: training.gradient_checkpointing: false" in capsys.readouterr().err
    cfg["training"].update(gradient_checkpointing=True, checkpoint_layers=1)
    cfg["output_dir"] = str(tmp_path / "run-half")
    tunelab.train(load_config(cfg))
    assert seen == {"on": 0.5} and "true, 1 of 2 layers (training.checkpoint_layers)" in capsys.readouterr().err
    seen.clear()
    with pytest.raises(ConfigError, match="training.checkpoint_layers: 1 says how many layers"):
        load_config({**cfg, "training": {**cfg["training"], "gradient_checkpointing": False}})
    del cfg["training"]["checkpoint_layers"]
    # prefix tuning: transformers' checkpointed layers would drop the KV cache its prefix comes in, so auto stays off
    cfg["output_dir"], cfg["training"]["gradient_checkpointing"] = str(tmp_path / "run3"), "auto"
    cfg["method"] = {"name": "prefix", "num_virtual_tokens": 2}
    cfg["data"].update(format="text", packing=False)
    tunelab.train(load_config(cfg))
    assert seen == {} and "drop method prefix's KV cache: off" in capsys.readouterr().err


# ------------------------------------------------------------------------- lora: straight into compact weights
def _bf16_checkpoint(path, max_shard_size=None) -> str:
    """A tiny model whose weights bf16 holds exactly (a bf16 checkpoint, as published ones are), saved in fp32,
    with one layer in GGUF-like 8-bit blocks instead (offset + step x code per 32 weights, not bf16-exact)."""
    from tunelab.testing import tiny_llama, tiny_tokenizer

    model = tiny_llama(len(tiny_tokenizer()), hidden_size=64, intermediate_size=128)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
        w = model.model.layers[1].mlp.down_proj.weight  # 64 x 128: 256 blocks of 32
        codes = torch.randint(0, 256, w.shape, generator=g).float().view(-1, 32)
        codes[:, :2] = torch.tensor([0.0, 1.0])  # the block's minimum and its step both occur, as usual in 8 bits
        step = 2.0 ** -torch.randint(9, 12, (len(codes), 1), generator=g).float()
        offset = -torch.rand(len(codes), 1, generator=g) * 0.1
        w.copy_((codes * step + offset).view(w.shape))
        assert not torch.equal(w.to(torch.bfloat16).float(), w)
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def _lora_model(folder, plan, target_modules="all-linear"):
    from tunelab.accel import compact

    lora = get("lora")
    cfg = lora.Config(r=4, alpha=8, dropout=0.0, target_modules=target_modules)
    with loading_into(plan):
        model, _ = load_model(ModelConfig(name=folder), device="cpu")
    loaded = {n: type(m).__name__ for n, m in model.named_modules()}
    torch.manual_seed(0)  # LoRA's A starts random: the same draw on both sides
    model = lora.apply(model, cfg)
    compact.compact_frozen_linears(model)
    return model, loaded


def _compact_state(model) -> dict:
    from tunelab.accel.compact import CompactEmbedding, CompactLinear

    out = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name, m in model.named_modules():
        if type(m) in (CompactLinear, CompactEmbedding):
            out.update({f"{name}.{k}": getattr(m.compact, k) for k in ("codes", "step", "offset")})
            out[f"{name}.kind"] = type(m).__name__
    return out


def _same(a: dict, b: dict) -> bool:
    def eq(x, y):
        return x == y if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) else torch.equal(x, y)

    return a.keys() == b.keys() and all(eq(a[k], b[k]) for k in a)


def _first_step(model) -> tuple[torch.Tensor, dict]:
    model.train()
    out = model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out.loss.detach(), grads


@pytest.mark.parametrize("shards", [None, "40KB"])
def test_lora_straight_into_compact_equals_load_then_compact(tmp_path, shards, capsys):
    from tunelab.accel import compact
    from tunelab.accel.compact import CompactLinear

    folder = _bf16_checkpoint(tmp_path / "m", shards)
    assert (len(list((tmp_path / "m").glob("model-*.safetensors"))) > 1) == bool(shards)
    then, _ = _lora_model(folder, None)
    counted = []
    straight, loaded = _lora_model(folder, compact.load_plan(counted=counted))
    assert "loaded whole" not in capsys.readouterr().err
    # every body linear arrived compact (the 8-bit-block one too), the head stayed the tied nn.Linear
    body = [n for n, kind in loaded.items() if n.endswith("_proj")]
    assert len(body) == 14 and all(loaded[n] == "CompactLinear" for n in body) and loaded["lm_head"] == "Linear"
    assert sum(counted) == sum(
        then.get_submodule(f"base_model.model.{n}").base_layer.compact.shape.numel() for n in body
    )
    assert straight.get_submodule("base_model.model.model.layers.1.mlp.down_proj").base_layer.compact.step is not None
    a, b = _compact_state(then), _compact_state(straight)
    assert sum(v == "CompactLinear" for v in a.values()) == 15  # 14 bases + the tied head (with the table)
    assert _same(a, b), [k for k in a if k in b and not _same({k: a[k]}, {k: b[k]})]
    with torch.no_grad():
        assert torch.equal(then(input_ids=IDS).logits, straight(input_ids=IDS).logits)
    (loss_a, grads_a), (loss_b, grads_b) = _first_step(then), _first_step(straight)
    assert torch.equal(loss_a, loss_b) and _same(grads_a, grads_b) and len(grads_a) == 28  # A and B of 14 layers
    assert isinstance(
        straight.get_submodule("base_model.model.model.layers.0.self_attn.q_proj").base_layer, CompactLinear
    )


def test_compact_layers_lora_leaves_get_their_dense_weight_back(tmp_path):
    from tunelab.accel import compact

    folder = _bf16_checkpoint(tmp_path / "m")
    then, _ = _lora_model(folder, None, ["q_proj", "v_proj"])
    straight, loaded = _lora_model(folder, compact.load_plan(), ["q_proj", "v_proj"])
    assert loaded["model.layers.0.mlp.up_proj"] == "CompactLinear"
    up = straight.get_submodule("base_model.model.model.layers.0.mlp.up_proj")
    assert type(up) is torch.nn.Linear and not up.weight.requires_grad
    assert torch.equal(up.weight, then.get_submodule("base_model.model.model.layers.0.mlp.up_proj").weight)
    assert _same(_compact_state(then), _compact_state(straight))
    with torch.no_grad():
        assert torch.equal(then(input_ids=IDS).logits, straight(input_ids=IDS).logits)


def test_a_lora_run_loads_its_base_compact_and_counts_every_parameter(tmp_path, capsys):
    import tunelab
    from tunelab.config import load_config

    folder = _bf16_checkpoint(tmp_path / "m")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": f"row {i} " * 8}) + "\n" for i in range(8)))
    runs = {}
    for compact_frozen in (True, False):
        cfg = {"output_dir": str(tmp_path / f"run-{compact_frozen}"), "model": {"name": folder},
               "data": {"train": str(tmp_path / "d.jsonl"), "format": "text", "val_fraction": 0.0, "max_length": 32},
               "method": {"name": "lora", "r": 2, "alpha": 4, "dropout": 0.0},
               "training": {"max_steps": 2, "batch_size": 4, "progress": False, "tensorboard": False,
                            "compact_frozen": compact_frozen, "pass_threads": 1}}  # fmt: skip
        runs[compact_frozen] = tunelab.train(load_config(cfg)).metrics
        err = capsys.readouterr().err
        assert ("15 frozen weights kept compact (14 since loading)" in err) == compact_frozen, err
    assert runs[True]["total_params"] == runs[False]["total_params"]
    assert runs[True]["trainable_params"] == runs[False]["trainable_params"]
    assert runs[True]["train_loss"] == runs[False]["train_loss"]
