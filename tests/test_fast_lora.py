"""The folded LoRA path gives PEFT's outputs and gradients, and steps aside where it does not apply."""

import copy

import pytest
import torch

from tunelab.accel import fast_lora, head
from tunelab.accel.fast_lora import _fast_forward
from tunelab.methods import get
from tunelab.models.loss import token_loss_sum
from tunelab.testing import tiny_batch, tiny_llama


def _lora_model(dropout: float = 0.0, base=None, targets="all-linear"):
    torch.manual_seed(0)
    method = get("lora")
    cfg = method.Config(r=4, alpha=8, dropout=dropout, target_modules=targets)
    model = method.apply(base if base is not None else tiny_llama(), cfg)
    fast_lora.enable(model)  # as the loop's accel.prepare does (training.accelerate: auto)
    head.install(model)
    for name, p in model.named_parameters():  # B starts at zero: give it values so every gradient is non-trivial
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def _grads(model, batch):
    model.zero_grad()
    loss, n = token_loss_sum(model, batch)
    (loss / n).backward()
    return float(loss), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def _peft_only(model):
    slow = copy.deepcopy(model)
    for m in slow.modules():
        if hasattr(m, "_peft_forward"):
            m.forward = m._peft_forward
        if hasattr(m, "_plain_forward"):
            m.forward = m._plain_forward
    return slow


def _batch(rows: int, width: int) -> dict:
    g = torch.Generator().manual_seed(rows)
    ids = torch.randint(3, 320, (rows, width), generator=g)
    labels = ids.clone()
    labels[:, : width // 3] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


# 1 x 12 tokens: fewer rows than any layer's width (low-rank term added to the output); 4 x 40 tokens:
# more rows than any (adapter folded into the weight). The tiny model is 32 wide, its MLP 64.
# The MLP with only down_proj adapted: gate and up are frozen plain Linears inside the fused MLP.
@pytest.mark.parametrize("shape,targets", [((1, 12), "all-linear"), ((4, 40), "all-linear"),
                                           ((4, 40), ["q_proj", "down_proj"])])
def test_fast_lora_matches_peft_loss_and_gradients(monkeypatch, shape, targets):
    model = _lora_model(targets=targets)
    fast_calls, mlp_calls = [], []
    model.get_base_model().model.layers[0].self_attn.q_proj.register_forward_hook(lambda *a: fast_calls.append(1))
    swiglu = fast_lora._SwiGLU.apply
    monkeypatch.setattr(fast_lora._SwiGLU, "apply", lambda *a: mlp_calls.append(1) or swiglu(*a))
    batch = _batch(*shape)
    loss_fast, g_fast = _grads(model, batch)
    loss_peft, g_peft = _grads(_peft_only(model), batch)
    assert fast_calls and model.get_base_model().model.layers[0].self_attn.q_proj.forward.__func__ is _fast_forward
    assert len(mlp_calls) == 2  # one fused MLP per layer, in the fast model only
    assert loss_fast == pytest.approx(loss_peft, rel=1e-5)
    assert g_fast.keys() == g_peft.keys() and len(g_fast) > 0
    for k in g_fast:
        torch.testing.assert_close(g_fast[k], g_peft[k], rtol=1e-4, atol=1e-6, msg=k)


def test_folded_lora_steps_aside_for_dropout_and_disabled_adapters():
    torch.manual_seed(0)
    base = tiny_llama()
    reference = copy.deepcopy(base).eval()
    model = _lora_model(base=base)
    ids = tiny_batch("llama")["input_ids"]
    model.eval()
    with torch.no_grad():
        with_adapter = model(input_ids=ids).logits
        with model.disable_adapter():  # DPO / PPO references rely on this being the plain base model
            disabled = model(input_ids=ids).logits
        torch.testing.assert_close(disabled, reference(input_ids=ids).logits)
        assert not torch.allclose(with_adapter, disabled, atol=1e-4)

    dropped = _lora_model(dropout=0.1).eval()  # nn.Dropout, not Identity: PEFT's own forward runs
    calls = []
    layer = dropped.get_base_model().model.layers[0].self_attn.q_proj
    layer._peft_forward = (lambda f: (lambda *a, **k: (calls.append(1), f(*a, **k))[1]))(layer._peft_forward)
    with torch.no_grad():
        dropped(input_ids=ids)
    assert calls == [1]
