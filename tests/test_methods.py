"""Methods on a tiny Llama: what trains, step-0 equivalence, save/load and merge round-trips."""

import copy

import pytest
import torch

from tunelab.methods import get
from tunelab.models import count_parameters
from tunelab.testing import save_bf16_valued_tiny_model_dir, tiny_llama

IDS = torch.tensor([[1, 17, 42, 99, 7, 250, 3, 64], [1, 5, 6, 7, 8, 9, 10, 11]])


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def train_steps(model, steps=20, lr=1e-2):
    """A few AdamW steps on a fixed batch; returns the losses."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def applied(name, **kw):
    mod = get(name)
    base = tiny_llama()
    return mod, base, mod.apply(copy.deepcopy(base), mod.Config(**kw))


def test_lora_step0_equals_base():
    mod, base, model = applied("lora", r=4, alpha=8)
    torch.testing.assert_close(logits(model), logits(base), rtol=0, atol=0)


def test_lora_trains_only_adapters_and_roundtrips_through_plain_peft(tmp_path):
    from peft import PeftModel

    mod, base, model = applied("lora", r=4, alpha=8, dropout=0.0)
    before = {n: p.clone() for n, p in model.named_parameters()}
    losses = train_steps(model)
    assert losses[-1] < 0.7 * losses[0]
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p)
        assert changed == ("lora_" in n), n
    trainable, total = count_parameters(model)
    assert 0 < trainable < 0.2 * total

    mod.save(model, tmp_path)
    assert (tmp_path / "adapter_config.json").exists() and (tmp_path / "adapter_model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)  # plain PEFT, no tunelab code
    assert (logits(reloaded) - logits(model)).abs().max() < 1e-5
    merged = mod.merge(mod.load(copy.deepcopy(base), tmp_path))
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert (logits(merged) - logits(model)).abs().max() < 1e-4


def test_lora_target_modules_list():
    _, _, model = applied("lora", r=2, target_modules=["q_proj", "v_proj"])
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(("q_proj" in n or "v_proj" in n) for n in names)


def test_freeze_last_k_changes_only_top_blocks(tmp_path):
    mod, base, model = applied("freeze", last_k=1)
    before = {n: p.clone() for n, p in model.named_parameters()}
    losses = train_steps(model)
    assert losses[-1] < 0.8 * losses[0]
    for n, p in model.named_parameters():
        assert torch.equal(before[n], p) == (".layers.1." not in n), n
    mod.save(model, tmp_path)
    again = mod.load(tiny_llama(), tmp_path)
    assert (logits(again) - logits(model)).abs().max() < 1e-5


def test_freeze_patterns():
    _, _, model = applied("freeze", last_k=0, patterns=[r"norm\.weight$"])
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.endswith("norm.weight") for n in names)


def test_freeze_rejects_training_nothing():
    with pytest.raises(ValueError):
        get("freeze").Config(last_k=0)


def test_full_trains_everything_and_roundtrips(tmp_path):
    mod, base, model = applied("full")
    trainable, total = count_parameters(model)
    assert trainable == total
    losses = train_steps(model, lr=3e-3)
    assert losses[-1] < 0.7 * losses[0]
    mod.save(model, tmp_path)
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert (logits(again) - logits(model)).abs().max() < 1e-5


@pytest.mark.parametrize("arch", ["llama", "bert", "t5"])
@pytest.mark.parametrize(
    "name, kwargs, predicate, identity",
    [
        ("full", {}, None, False),
        ("lora", {"r": 4, "alpha": 8, "dropout": 0.0}, lambda n: "lora_" in n or "classifier" in n, True),
        ("freeze", {"last_k": 1}, lambda n: ".1." in n or "classifier" in n, False),
    ],
)
def test_method_on_every_architecture(name, kwargs, predicate, identity, arch, tmp_path):
    from method_harness import check_method

    kw = dict(kwargs)
    if name == "freeze" and arch == "bert":
        kw["patterns"] = ["classifier"]  # a new head must train for classification
    check_method(name, arch, tmp_path, expect_trainable=predicate, identity_at_init=identity, **kw)


def test_rslora_scales_the_update_by_alpha_over_sqrt_r_and_roundtrips(tmp_path):
    from peft import PeftModel

    mod, base, model = applied("lora", r=4, alpha=8, dropout=0.0, use_rslora=True)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == 8 / 4**0.5  # plain LoRA: 8 / 4
    train_steps(model, steps=5)
    mod.save(model, tmp_path)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)  # plain PEFT reads use_rslora back
    assert (logits(reloaded) - logits(model)).abs().max() < 1e-5


def test_dora_trains_magnitudes_and_adapters_and_roundtrips_through_plain_peft(tmp_path):
    from peft import PeftModel

    mod, base, model = applied("lora", r=4, alpha=8, dropout=0.0, use_dora=True)
    torch.testing.assert_close(logits(model), logits(base), rtol=1e-5, atol=1e-5)  # step 0: the base model
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_magnitude_vector" in n for n in names)
    before = {n: p.clone() for n, p in model.named_parameters()}
    losses = train_steps(model)
    assert losses[-1] < 0.7 * losses[0]
    for n, p in model.named_parameters():
        assert (not torch.equal(before[n], p)) == ("lora_" in n), n
    mod.save(model, tmp_path)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert (logits(reloaded) - logits(model)).abs().max() < 1e-5
    merged = mod.merge(mod.load(copy.deepcopy(base), tmp_path))
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert (logits(merged) - logits(model)).abs().max() < 1e-4


def test_dora_refuses_a_layer_with_a_row_of_zeros_naming_it():
    """DoRA's direction is 0 / 0 on a base row of zeros (PEFT's forward gives NaN logits there): tunelab says which
    layer, and how to leave it out, before any step; plain LoRA takes the same model."""
    from peft import LoraConfig, get_peft_model

    from tunelab.methods.base import MethodError

    base = tiny_llama()
    with torch.no_grad():
        base.model.layers[1].mlp.down_proj.weight[5].zero_()
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["down_proj"], use_dora=True))
    assert torch.isnan(logits(peft)).all()  # what the refusal saves the user from
    with pytest.raises(MethodError, match=r"use_dora: model\.layers\.1\.mlp\.down_proj \(1 rows\) have output "
                                          r"rows of zeros .*\(use_dora: false\)"):  # fmt: skip
        get("lora").apply(copy.deepcopy(base), get("lora").Config(r=4, use_dora=True))
    lora = get("lora").apply(copy.deepcopy(base), get("lora").Config(r=4))
    torch.testing.assert_close(logits(lora), logits(base), rtol=0, atol=0)


def test_loraplus_gives_b_its_own_learning_rate_in_the_loops_optimizer():
    from tunelab.config import TrainingConfig
    from tunelab.training.harness import optimizer_for, scheduler_for

    mod, _, model = applied("lora", r=4, alpha=8, dropout=0.0, loraplus_lr_ratio=16)
    scales = mod.lr_scales(model, mod.Config(loraplus_lr_ratio=16))
    named = {id(p): n for n, p in model.named_parameters()}
    assert scales and all(".lora_B." in named[id(p)] and s == 16 for p, s in scales.items())
    assert len(scales) == sum(".lora_B." in n for n, p in model.named_parameters() if p.requires_grad)
    tcfg = TrainingConfig(lr=1e-3, weight_decay=0.01, warmup_steps=0, scheduler="linear")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer_for(params, tcfg, scales)
    rates = {named[id(p)]: g["lr"] for g in opt.param_groups for p in g["params"]}
    assert {r for n, r in rates.items() if ".lora_B." in n} == {1.6e-2}
    assert {r for n, r in rates.items() if ".lora_A." in n} == {1e-3}
    scheduler = scheduler_for(opt, tcfg, total_steps=10)
    for _ in range(5):
        opt.step()
        scheduler.step()
    lr_a, lr_b = sorted({g["lr"] for g in opt.param_groups})
    assert lr_b == pytest.approx(16 * lr_a) and lr_a == pytest.approx(5e-4)  # the schedule keeps the ratio
    # without the ratio: the two groups as before (decay, no decay), one rate
    plain = optimizer_for(params, tcfg, mod.lr_scales(model, mod.Config()))
    assert [g["lr"] for g in plain.param_groups] == [1e-3] * len(plain.param_groups)


def _variant_cfg(tiny_dir, data_file, out, **method):
    from tunelab.config import load_config

    return load_config(
        {
            "output_dir": str(out),
            "model": {"name": tiny_dir},
            "data": {"train": data_file, "val_fraction": 0.25, "max_length": 64},
            "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, **method},
            "training": {"max_steps": 6, "batch_size": 4, "lr": 5e-3, "warmup_steps": 1, "progress": False,
                         "tensorboard": False, "seed": 3, "device": "cpu"},
        }
    )  # fmt: skip


def test_dora_through_the_loop_takes_the_fast_path_to_pefts_losses(tiny_dir, data_file, tmp_path, capsys):
    import json

    from safetensors.torch import load_file

    import tunelab

    fast = tunelab.train(_variant_cfg(tiny_dir, data_file, tmp_path / "dora", use_dora=True))
    log = capsys.readouterr().err
    assert "fast LoRA (14 layers)" in log and "fast LoRA:" not in log and "DoRA with LoRA dropout" not in log
    assert fast.metrics["eval_loss"] < fast.metrics["eval_loss_before"]
    saved = load_file(str(fast.final_dir / "adapter_model.safetensors"))
    assert any("lora_magnitude_vector" in k for k in saved)
    # the same run on PEFT's own forward (accelerate off): the same losses, step by step
    cfg = _variant_cfg(tiny_dir, data_file, tmp_path / "peft", use_dora=True)
    cfg.training.accelerate = "off"
    plain = tunelab.train(cfg)
    capsys.readouterr()

    def losses(result):
        return [json.loads(x)["loss"] for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()
                if '"loss"' in x]  # fmt: skip

    assert len(losses(fast)) == 6 and losses(fast) == pytest.approx(losses(plain), rel=1e-4)
    assert fast.metrics["eval_loss"] == pytest.approx(plain.metrics["eval_loss"], rel=1e-4)
    # with LoRA dropout too (its masks are the fast path's own draws: tests/test_fast_lora.py compares them)
    dropped = tunelab.train(_variant_cfg(tiny_dir, data_file, tmp_path / "dropout", use_dora=True, dropout=0.1))
    err = capsys.readouterr().err
    assert "fast LoRA (14 layers" in err and "); DoRA with LoRA dropout on 14 of them: W multiplies" in err
    assert dropped.metrics["eval_loss"] < dropped.metrics["eval_loss_before"]


def test_loraplus_through_the_loop_trains_b_faster_and_resumes_exactly(tiny_dir, data_file, tmp_path, capsys):
    import json

    from safetensors.torch import load_file

    import tunelab

    def b_norm(result):
        saved = load_file(str(result.final_dir / "adapter_model.safetensors"))
        return sum(float(t.norm()) for k, t in saved.items() if "lora_B" in k)

    plain = tunelab.train(_variant_cfg(tiny_dir, data_file, tmp_path / "plain"))
    plus = tunelab.train(_variant_cfg(tiny_dir, data_file, tmp_path / "plus", loraplus_lr_ratio=8))
    log = capsys.readouterr().err
    assert "learning rates: 14 tensors at [8.0] x training.lr" in log
    assert b_norm(plus) > 2 * b_norm(plain)  # B starts at zero and moves at 8x the rate

    def stop_after_3(step, record):
        if step == 3:
            raise KeyboardInterrupt

    cfg = _variant_cfg(tiny_dir, data_file, tmp_path / "again", loraplus_lr_ratio=8)
    tunelab.train(cfg, callbacks=[stop_after_3])
    tunelab.train(cfg.model_copy(deep=True), resume=True)  # the optimizer's groups and rates come back

    def losses(run):
        return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]

    assert losses(tmp_path / "again") == losses(tmp_path / "plus")


def test_pissa_starts_from_the_top_singular_part_and_saves_a_plain_lora_of_the_original_base(tmp_path):
    import json

    from peft import PeftModel

    mod, base, model = applied("lora", r=4, alpha=8, dropout=0.0, init="pissa", pissa_niter=None)
    torch.testing.assert_close(logits(model), logits(base), rtol=1e-4, atol=1e-4)  # step 0: the base up to rounding
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    w = base.model.layers[0].self_attn.q_proj.weight
    u, s, vh = torch.linalg.svd(w, full_matrices=False)  # B A = W's top-4 singular part (scaled by alpha / r)
    top = (u[:, :4] * s[:4]) @ vh[:4]
    delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    torch.testing.assert_close(delta, top, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.base_layer.weight, w - top, rtol=1e-4, atol=1e-5)  # the residual stays frozen
    # seeded: the randomized SVD's default (16 iterations) gives the same start every time (a resume rebuilds it)
    again = [mod.apply(copy.deepcopy(base), mod.Config(r=4, init="pissa")) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*(m.state_dict().values() for m in again), strict=True))

    losses = train_steps(model, steps=10)
    assert losses[-1] < 0.7 * losses[0]
    mod.save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)  # rank 2r, alpha 2x
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)  # plain PEFT over the *original* base
    assert (logits(reloaded) - logits(model)).abs().max() < 1e-4
    merged = mod.merge(mod.load(copy.deepcopy(base), tmp_path))
    assert (logits(merged) - logits(model)).abs().max() < 1e-4
    # the live model is as it was (PEFT loads the starting adapter beside it to convert, then drops it)
    assert list(layer.lora_A) == ["default"] and model.active_adapter == "default"


def test_pissa_refuses_what_it_cannot_do():
    from pydantic import ValidationError

    from tunelab.config import ConfigError, load_config

    with pytest.raises(ValidationError, match="DoRA magnitude has no such conversion"):
        get("lora").Config(init="pissa", use_dora=True)
    with pytest.raises(ValidationError, match="which are 4-bit here"):
        get("qlora").Config(init="pissa")
    for stage in ("dpo", "ppo"):
        extra = (
            {"ppo": {"prompts": "p.jsonl", "reward": {"kind": "keyword", "keyword": "yes"}}} if stage == "ppo" else {}
        )
        with pytest.raises(ConfigError, match="PiSSA's base is the residual"):
            load_config({"stage": stage, "model": {"name": "m"}, "data": {"train": "d.jsonl"},
                         "method": {"name": "lora", "init": "pissa"}, **extra})  # fmt: skip


def test_pissa_through_the_loop_starts_at_the_base_model_and_resumes_exactly(tmp_path, data_file, capsys):
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import tunelab

    folder = save_bf16_valued_tiny_model_dir(tmp_path / "model")

    def cfg(name, **method):
        c = _variant_cfg(folder, data_file, tmp_path / name, **method)
        c.model.dtype = "float32"
        return c

    plain = tunelab.train(cfg("plain"))
    assert "14 since loading" in capsys.readouterr().err
    result = tunelab.train(cfg("pissa", init="pissa"))
    log = capsys.readouterr().err
    # the linears PiSSA rewrites stay dense (a compact base would drop W - s B A); the token table still compacts
    assert "fast LoRA (14 layers)" in log and "1 frozen weights kept compact" in log and "since loading" not in log
    assert result.metrics["eval_loss_before"] == pytest.approx(plain.metrics["eval_loss_before"], rel=1e-5)
    assert result.metrics["eval_loss"] < result.metrics["eval_loss_before"]
    # over a bf16 base W - s B A is rounded to bf16 (PEFT's way): step 0 is the base model up to that rounding
    half = cfg("half", init="pissa")
    half.model.dtype, half.training.max_steps = "bfloat16", 1
    start = tunelab.train(half).metrics["eval_loss_before"]
    capsys.readouterr()
    assert start == pytest.approx(plain.metrics["eval_loss_before"], rel=2e-3)  # measured 2e-4

    def stop_after_3(step, record):
        if step == 3:
            raise KeyboardInterrupt

    again = cfg("again", init="pissa")
    tunelab.train(again, callbacks=[stop_after_3])
    resumed = tunelab.train(again.model_copy(deep=True), resume=True)  # the same residual base, rebuilt

    def losses(run):
        return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]

    assert losses(tmp_path / "again") == losses(tmp_path / "pissa")
    assert resumed.metrics["eval_loss"] == result.metrics["eval_loss"]
    # saved converted (rank 2r): plain PEFT loads it over the original base, and it is not the base
    assert json.loads((result.final_dir / "adapter_config.json").read_text())["r"] == 8
    base = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor([[1, 17, 42, 99, 7, 250, 3, 64]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
        after = PeftModel.from_pretrained(base, result.final_dir)(input_ids=ids).logits
    assert (after - before).abs().max() > 1e-3


def _start_cfg(folder, data_file, out, **method):
    from tunelab.config import load_config

    return load_config(
        {
            "output_dir": str(out),
            "model": {"name": str(folder), "dtype": "float32"},
            "data": {"train": data_file, "val_fraction": 0.25, "max_length": 64},
            "method": {"name": "lora", "dropout": 0.0, **method},
            "training": {"max_steps": 6, "batch_size": 4, "lr": 5e-3, "warmup_steps": 1, "progress": False,
                         "tensorboard": False, "seed": 3, "device": "cpu"},
        }
    )  # fmt: skip


def test_start_from_trains_an_adapter_on_from_where_it_ended_and_resumes_exactly(tmp_path, data_file, capsys):
    import json

    import yaml
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import tunelab

    folder = save_bf16_valued_tiny_model_dir(tmp_path / "model")

    first = tunelab.train(_start_cfg(folder, data_file, tmp_path / "first", r=4, alpha=8, target_modules=["q_proj"]))
    capsys.readouterr()
    cfg = _start_cfg(folder, data_file, tmp_path / "second", start_from=str(tmp_path / "first"))  # the run folder
    second = tunelab.train(cfg)
    log = capsys.readouterr().err
    assert "fast LoRA (2 layers)" in log and "since loading" in log  # the fast path and the compact base, as before
    # the adapter's shape, written into the run's config (its r 4, alpha 8, q_proj only: not this config's defaults)
    assert (cfg.method.r, cfg.method.alpha, cfg.method.target_modules) == (4, 8.0, ["q_proj"])
    saved = yaml.safe_load((tmp_path / "second" / "config.yaml").read_text())["method"]
    assert (saved["r"], saved["target_modules"], saved["start_from"]) == (4, ["q_proj"], str(tmp_path / "first"))
    # it starts where the first run ended (the same validation rows: the same seed), and trains on
    assert second.metrics["eval_loss_before"] == pytest.approx(first.metrics["eval_loss"], rel=1e-6)
    assert second.metrics["eval_loss"] < second.metrics["eval_loss_before"]
    # the result is a plain PEFT adapter of the original base
    base = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor([[1, 17, 42, 99, 7, 250, 3, 64]])
    with torch.no_grad():
        outs = [
            PeftModel.from_pretrained(copy.deepcopy(base), r.final_dir)(input_ids=ids).logits for r in (first, second)
        ]
    assert json.loads((second.final_dir / "adapter_config.json").read_text())["r"] == 4
    assert (outs[0] - outs[1]).abs().max() > 1e-4

    def stop_after_3(step, record):
        if step == 3:
            raise KeyboardInterrupt

    again = _start_cfg(folder, data_file, tmp_path / "again", start_from=str(first.final_dir))  # final/ itself
    tunelab.train(again, callbacks=[stop_after_3])
    resumed = tunelab.train(again.model_copy(deep=True), resume=True)

    def losses(run):
        return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]

    assert losses(tmp_path / "again") == losses(tmp_path / "second")
    assert resumed.metrics["eval_loss"] == second.metrics["eval_loss"]


def test_start_from_is_checked_before_the_model_loads(tmp_path, tiny_dir):
    from pydantic import ValidationError

    from tunelab.config import ConfigError, ModelConfig, load_config
    from tunelab.methods.base import MethodError
    from tunelab.models.sources import ModelError, resolve
    from tunelab.testing import tiny_llama

    mod = get("lora")
    adapter = tmp_path / "adapter"
    mod.save(mod.apply(tiny_llama(), mod.Config(r=4, alpha=8, target_modules=["q_proj", "v_proj"])), adapter)
    model = ModelConfig(name=tiny_dir)

    cfg = mod.Config(start_from=str(adapter), r=4, target_modules=["v_proj", "q_proj"])  # agreeing values: no note
    assert mod.check_model(cfg, model) is None
    assert (cfg.r, cfg.alpha, sorted(cfg.target_modules)) == (4, 8.0, ["q_proj", "v_proj"])
    # values the config set otherwise give way to the adapter's own (as in PEFT and the peers), named in the log
    cfg = mod.Config(start_from=str(adapter), r=8, alpha=16, target_modules=".*q_proj")
    note = mod.check_model(cfg, model)
    assert note == ("method.start_from: the adapter keeps its own r 4 (the config's 8), alpha 8 (the config's 16), "
                    "target_modules q_proj, v_proj (the config's '.*q_proj')")  # fmt: skip
    assert (cfg.r, cfg.alpha, sorted(cfg.target_modules)) == (4, 8.0, ["q_proj", "v_proj"])
    with pytest.raises(MethodError, match="no such file or folder"):
        mod.check_model(mod.Config(start_from=str(tmp_path / "nowhere")), model)
    with pytest.raises(MethodError, match="a whole model"):
        mod.check_model(mod.Config(start_from=tiny_dir), model)
    ia3 = get("ia3")
    ia3.save(ia3.apply(tiny_llama(), ia3.Config()), tmp_path / "ia3")
    with pytest.raises(MethodError, match="a IA3 adapter, not a LoRA"):
        mod.check_model(mod.Config(start_from=str(tmp_path / "ia3")), model)
    # an adapter of another model size is named before any weight is read
    wide = tmp_path / "wide"
    mod.save(mod.apply(tiny_llama(hidden_size=48), mod.Config(r=4, target_modules=["q_proj"])), wide)
    with pytest.raises(MethodError, match="q_proj has 48 inputs, .* has 32: an adapter trained over another model"):
        mod.check_model(mod.Config(start_from=str(wide)), model)
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    with pytest.raises(MethodError, match="a pickle"):
        mod.check_model(mod.Config(start_from=str(adapter)), model)
    # an adapter given as the model says what to do instead
    with pytest.raises(ModelError, match="a PEFT adapter .* method.start_from"):
        resolve(str(wide))
    with pytest.raises(ValidationError, match="PiSSA initialises a new adapter"):
        mod.Config(start_from=str(wide), init="pissa")
    ppo = {"prompts": "p.jsonl", "reward": {"kind": "keyword", "keyword": "yes"}, "policy": "runs/sft"}
    with pytest.raises(ConfigError, match="ppo.policy merges an SFT run .* use one of them"):
        load_config({"stage": "ppo", "model": {"name": "m"}, "data": {"train": "d.jsonl"}, "ppo": ppo,
                     "method": {"name": "lora", "start_from": str(wide)}})  # fmt: skip


def test_qlora_trains_a_lora_adapter_on_over_the_4bit_base(tmp_path, tiny_dir, data_file):
    import tunelab

    lora_run = tunelab.train(_start_cfg(tiny_dir, data_file, tmp_path / "lora", r=4, alpha=8))
    cfg = _start_cfg(tiny_dir, data_file, tmp_path / "q", name="qlora", start_from=str(tmp_path / "lora"))
    result = tunelab.train(cfg)
    assert (cfg.method.r, cfg.method.alpha) == (4, 8.0)
    # the same adapter over the NF4-rounded base: near where the LoRA run ended, not back at the untrained model
    start, ended = result.metrics["eval_loss_before"], lora_run.metrics["eval_loss"]
    assert abs(start - ended) < 0.25 * abs(lora_run.metrics["eval_loss_before"] - ended)
    assert result.metrics["eval_loss"] < start


def test_start_from_a_hub_id_is_fetched_and_checked_like_a_folder_and_a_pickle_only_repo_is_refused(
    tmp_path, tiny_dir, data_file, monkeypatch
):
    """A hub id: its config and safetensors weights are fetched into the hub cache (huggingface_hub's own download,
    stood in for here by a local "hub") and checked and loaded from there like a folder; a repo with only a pickled
    adapter_model.bin is refused before PEFT could unpickle it."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    from tunelab.config import ModelConfig
    from tunelab.methods.base import MethodError
    from tunelab.testing import tiny_llama

    mod = get("lora")
    hub = tmp_path / "hub"
    mod.save(mod.apply(tiny_llama(), mod.Config(r=4, alpha=8, target_modules=["q_proj"])), hub / "me" / "sft")
    mod.save(mod.apply(tiny_llama(hidden_size=48), mod.Config(r=4, target_modules=["q_proj"])), hub / "me" / "wide")
    mod.save(mod.apply(tiny_llama(), mod.Config(r=4, target_modules=["q_proj"])), hub / "me" / "pickled")
    (hub / "me" / "pickled" / "adapter_model.safetensors").rename(hub / "me" / "pickled" / "adapter_model.bin")
    fetched = []

    def download(repo, filename, **kwargs):
        if repo == "me/offline":
            raise LocalEntryNotFoundError("no connection")
        path = hub / repo / filename
        if not path.is_file():
            raise EntryNotFoundError(f"{filename} not in {repo}")  # the hub: its subclass RemoteEntryNotFoundError
        fetched.append((repo, filename))
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    mod.hub_adapter.cache_clear()
    model = ModelConfig(name=tiny_dir)
    cfg = mod.Config(start_from="me/sft", r=16)
    assert "r 4 (the config's 16)" in mod.check_model(cfg, model)
    assert (cfg.r, cfg.alpha) == (4, 8.0) and fetched == [("me/sft", "adapter_config.json"),
                                                          ("me/sft", "adapter_model.safetensors")]  # once  # fmt: skip
    import tunelab

    trained = tunelab.train(_start_cfg(tiny_dir, data_file, tmp_path / "run", start_from="me/sft", r=16)).metrics
    assert trained["eval_loss"] < trained["eval_loss_before"] and len(fetched) == 2  # PEFT loaded the fetched folder
    with pytest.raises(MethodError, match="me/wide: its .*q_proj has 48 inputs"):  # shapes read before the load
        mod.check_model(mod.Config(start_from="me/wide"), model)
    with pytest.raises(MethodError, match="no adapter_model.safetensors in the hub repo.*unpickling runs code"):
        mod.check_model(mod.Config(start_from="me/pickled"), model)
    with pytest.raises(MethodError, match="could not be reached"):
        mod.check_model(mod.Config(start_from="me/offline"), model)
    with pytest.raises(MethodError, match="no adapter_config.json: not a PEFT adapter"):
        mod.check_model(mod.Config(start_from="me/nothing"), model)
    mod.hub_adapter.cache_clear()
