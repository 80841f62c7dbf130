"""Every registered method declares its capabilities (methods/base.py) consistently with what its apply()
does, and the one reference-policy helper (methods/reference.py) keeps the starting policy for DPO / PPO."""

import copy

import pytest
import torch

from tunelab.methods import base, reference, registry
from tunelab.testing import tiny_llama

IDS = torch.tensor([[1, 17, 42, 99, 7, 250, 3, 64], [1, 5, 6, 7, 8, 9, 10, 11]])


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def one_step(model, lr=1e-2):
    """One AdamW step on a fixed batch (train mode), then eval mode."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model(input_ids=IDS, labels=IDS).loss.backward()
    opt.step()
    opt.zero_grad()
    model.eval()


def nudge_trainables_(model, seed=0):
    """Move every trainable parameter a little, so a merge has something to fold in."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.dtype))


def _quantized_modules(model) -> int:
    import bitsandbytes as bnb

    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


@pytest.mark.parametrize("name", registry.names())
def test_declared_capabilities_match_what_apply_does(name):
    mod = registry.get(name)
    caps = mod.CAPABILITIES
    assert isinstance(caps, base.Capabilities)
    for hook in base.DEFAULT_HOOKS:  # the registry gives every method the optional hooks
        assert callable(getattr(mod, hook))
    # on_step is the method's own exactly when it declares that what trains changes during the run
    assert (mod.on_step is not base.on_step) == caps.changes_trainables

    model = mod.apply(copy.deepcopy(tiny_llama()), mod.Config())
    peft_config = getattr(model, "active_peft_config", None)
    # adapter_off: a switchable PEFT adapter over the untouched base; frozen_copy methods have none
    assert hasattr(model, "disable_adapter") == (caps.reference == "adapter_off")
    # virtual tokens: PEFT's prompt learning; past_key_values exactly for prefix tuning
    prompt_learning = peft_config is not None and peft_config.is_prompt_learning
    assert prompt_learning == bool(caps.virtual_tokens)
    if caps.virtual_tokens:
        kind = "past_key_values" if peft_config.peft_type.value == "PREFIX_TUNING" else "inputs"
        assert caps.virtual_tokens == kind
    assert (_quantized_modules(model) > 0) == caps.quantized_base
    # params for the optimizer: at least what trains now; the default optimizer hook leaves it to AdamW on CPU
    params = mod.optimizer_parameters(model, mod.Config())
    assert {id(p) for p in model.parameters() if p.requires_grad} <= {id(p) for p in params}


@pytest.mark.parametrize("name", registry.names())
def test_mergeable_methods_merge_to_the_same_logits(name):
    mod = registry.get(name)
    model = mod.apply(copy.deepcopy(tiny_llama()), mod.Config())
    if not mod.CAPABILITIES.mergeable:
        if hasattr(mod, "merge"):
            with pytest.raises(NotImplementedError):
                mod.merge(model)
        return
    nudge_trainables_(model)
    before = logits(model)
    merged = mod.merge(model)
    assert not hasattr(merged, "peft_config"), "a merged model is a plain transformers model"
    assert (logits(merged) - before).abs().max() < 1e-4


def test_changes_trainables_means_on_step_changes_what_trains():
    mod = registry.get("gradual")
    cfg = mod.Config(every_steps=1)
    model = mod.apply(tiny_llama(), cfg)
    trainable = lambda: sum(p.requires_grad for p in model.parameters())  # noqa: E731
    at_start = trainable()
    mod.on_step(model, cfg, 1)
    assert trainable() > at_start
    full = registry.get("full")  # the default hook: nothing changes
    other = full.apply(tiny_llama(), full.Config())
    assert full.on_step(other, full.Config(), 5) is None


# ------------------------------------------------------------------------------ the reference policy
@pytest.mark.parametrize("name", ["lora", "prompt", "full", "bitfit"])
def test_reference_policy_is_the_unchanged_start_after_a_training_step(name):
    """adapter methods (lora, prompt: the adapter and the virtual tokens switched off) and weight-training
    methods (full; bitfit's added zero biases are in the copy) alike."""
    mod = registry.get(name)
    base_model = tiny_llama()
    start = logits(base_model)
    model = mod.apply(copy.deepcopy(base_model), mod.Config())
    reference.prepare(model, mod)
    one_step(model, lr=5e-2)
    trained = logits(model)
    assert (trained - start).abs().max() > 1e-3, "the policy moved"
    with reference.policy(model) as ref:
        assert ref is not model
        assert (logits(ref) - start).abs().max() < 1e-5, "the reference is still the starting model"
        if mod.CAPABILITIES.reference == "frozen_copy":
            assert not any(p.requires_grad for p in ref.parameters())
    # leaving the context gives the trained policy back (the adapter switched on again)
    assert (logits(model) - trained).abs().max() < 1e-6


def test_reference_policy_needs_prepare():
    mod = registry.get("full")
    model = mod.apply(tiny_llama(), mod.Config())
    with pytest.raises(RuntimeError, match="reference.prepare"):
        with reference.policy(model):
            pass


def test_adapter_off_needs_a_switchable_adapter():
    lora = registry.get("lora")
    with pytest.raises(TypeError, match="declares reference 'adapter_off'"):
        reference.prepare(tiny_llama(), lora)  # lora not applied: a plain model has no disable_adapter
