"""The fast loss (head applied at label positions only) equals the full-logits loss."""

import copy

import pytest
import torch

from tunelab.accel import head
from tunelab.methods import get
from tunelab.models import loss as L
from tunelab.testing import tiny_llama
from tunelab.training.loop import enable_gradient_checkpointing


def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 320, (3, 20), generator=g)
    labels = ids.clone()
    labels[:, :8] = -100  # a prompt
    labels[2, 15:] = -100  # padding
    mask = torch.ones_like(ids)
    mask[2, 15:] = 0
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def reference(model, b):
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    target = L.shift_labels(b["labels"])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("case", ["lora", "lora+checkpointing", "full"])
def test_label_only_loss_and_grads_match_full_logits(monkeypatch, case):
    base = tiny_llama()
    if case == "full":  # the head (tied to the embeddings) is trained too: the fused loss gives its gradient
        model = copy.deepcopy(base)
        assert model.lm_head.weight.requires_grad
    else:
        model = get("lora").apply(copy.deepcopy(base), get("lora").Config(r=4, dropout=0.0))
        for name, p in model.named_parameters():  # B = 0 at init would leave A's gradient zero
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
    if case.endswith("checkpointing"):
        enable_gradient_checkpointing(model)
    model.train()
    assert L.backbone_and_head(model) is not None
    head.install(model)  # as the loop's accel.prepare does (training.accelerate: auto)
    monkeypatch.setattr(head, "FUSED_CHUNK", 7)  # several chunks, one partial
    fused = []
    monkeypatch.setattr(head._HeadCrossEntropy, "apply",
                        lambda *a, _f=head._HeadCrossEntropy.apply: fused.append(1) or _f(*a))
    b = batch()
    fast, n = L.token_loss_sum(model, b)
    ref = reference(model, b)
    assert fused and n == int((L.shift_labels(b["labels"]) != -100).sum()) > 7
    assert abs(fast.item() - ref.item()) < 1e-5 * max(1.0, ref.item())
    (fast * 0.5).backward()  # a scale on the loss reaches the gradients computed in the forward pass
    g_fast = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    (reference(model, b) * 0.5).backward()
    for k, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(g_fast[k], p.grad, rtol=1e-4, atol=1e-6)


def test_label_only_loss_without_grad_matches_full_logits(monkeypatch):
    model = tiny_llama()
    monkeypatch.setattr(L, "CHUNK", 7)
    b = batch()
    with torch.no_grad():
        fast, _ = L.token_loss_sum(model, b)
        ref = reference(model, b)
    assert abs(fast.item() - ref.item()) < 1e-5 * max(1.0, ref.item())


def test_per_example_loss_sums_to_token_loss():
    model = tiny_llama()
    b = batch()
    total, _ = L.token_loss_sum(model, b)
    assert abs(L.per_example_loss(model, b).sum().item() - total.item()) < 1e-4
