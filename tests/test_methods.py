"""Methods on a tiny Llama: what trains, step-0 equivalence, save/load and merge round-trips."""

import copy

import pytest
import torch

from tunelab.methods import get
from tunelab.models import count_parameters
from tunelab.testing import tiny_llama

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
