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
    monkeypatch.setattr(
        head._HeadCrossEntropy, "apply", lambda *a, _f=head._HeadCrossEntropy.apply: fused.append(1) or _f(*a)
    )
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


@pytest.mark.parametrize("name", ["prompt", "prefix"])
def test_prompt_learning_takes_the_label_only_head_with_the_same_loss_and_grads(monkeypatch, name):
    """Prompt / prefix tuning: PEFT's forward with the head on one position, the backbone's output hooked,
    the head (fused) at label positions: the full-logits loss and gradients, and the reference policy's
    (adapter disabled) row sums too."""
    model = get(name).apply(tiny_llama(), get(name).Config(num_virtual_tokens=5))
    model.train()
    assert L.backbone_and_head(model) is None and L.virtual_token_split(model) is not None
    head.install(model)
    fused, full_logits = [], []
    monkeypatch.setattr(head._HeadCrossEntropy, "apply",
                        lambda *a, _f=head._HeadCrossEntropy.apply: fused.append(1) or _f(*a))  # fmt: skip
    b = batch()
    hook = model.get_base_model().lm_head.register_forward_hook(lambda m, a, out: full_logits.append(out.shape[1]))
    fast, n = L.token_loss_sum(model, b)
    hook.remove()
    assert fused and full_logits == [1]  # the head ran on one position in the forward, then fused at the labels
    assert n == int((L.shift_labels(b["labels"]) != -100).sum())
    ref = reference(model, b)
    assert abs(fast.item() - ref.item()) < 1e-5 * ref.item()
    fast.backward()
    g_fast = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    assert g_fast and all(g.abs().sum() > 0 for g in g_fast.values())
    model.zero_grad()
    reference(model, b).backward()
    for k, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(g_fast[k], p.grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(L.row_loss_sums(model, b), L.per_example_loss(model, b), rtol=1e-5, atol=1e-5)
        with model.disable_adapter():  # dpo's reference pass: no virtual positions in the output
            torch.testing.assert_close(L.row_loss_sums(model, b), L.per_example_loss(model, b), rtol=1e-5, atol=1e-5)


def test_prompt_learning_label_head_reads_its_own_threads_forward_only():
    """Thread shares run one model in several threads at once: a backbone forward of another thread while a
    pass is under way must not be taken for the pass's own (its graph would be backpropagated twice)."""
    import threading

    model = get("prompt").apply(tiny_llama(), get("prompt").Config(num_virtual_tokens=5))
    b = batch()
    expected = L.token_loss_sum(model, b)[0].item()
    backbone, _ = L.virtual_token_split(model)
    other = {"input_ids": b["input_ids"][:1, :7]}

    def foreign_forward(module, args, out):  # on the head: after the pass's backbone output was caught
        if threading.current_thread() is threading.main_thread():
            t = threading.Thread(target=lambda: model(**other, use_cache=False))
            t.start()
            t.join()

    hook = model.get_base_model().lm_head.register_forward_hook(foreign_forward)
    try:
        got = L.token_loss_sum(model, b)[0].item()
    finally:
        hook.remove()
    assert abs(got - expected) < 1e-5 * expected
