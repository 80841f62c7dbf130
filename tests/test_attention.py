"""Per-example attention over packed rows equals transformers' masked SDPA over the whole row."""

import copy

import pytest
import torch

from tunelab.methods import get
from tunelab.models import attention
from tunelab.testing import tiny_llama
from tunelab.training import loss as L
from tunelab.training.loop import enable_gradient_checkpointing


def packed_batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 320, (3, 24), generator=g)
    # row 0: examples of 10, 9 and 5 tokens; row 1: one of 24; row 2: 7 and 11, then 6 pad positions
    segments = [[10, 9, 5], [24], [7, 11, 6]]
    pos = torch.cat([torch.cat([torch.arange(n) for n in row])[None] for row in segments])
    labels = ids.clone()
    labels[0, :4] = labels[2, :3] = -100  # prompts
    labels[2, 18:] = -100  # padding
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def lora_model():
    model = get("lora").apply(tiny_llama(), get("lora").Config(r=4, dropout=0.0))
    for name, p in model.named_parameters():  # B = 0 at init would leave A's gradient zero
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model.train()


def test_varlen_boundaries_cover_flattened_rows():
    kw = attention.varlen_kwargs(packed_batch()["position_ids"])
    assert kw["cu_seq_lens_q"].tolist() == [0, 10, 19, 24, 48, 55, 66, 72]
    assert kw["max_length_q"] == 24 and kw["cu_seq_lens_k"] is kw["cu_seq_lens_q"]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_attention_loss_and_grads_equal_masked_sdpa(checkpointing):
    plain = lora_model()
    if checkpointing:  # the recomputed forward must take the same per-example path
        enable_gradient_checkpointing(plain)
    packed = copy.deepcopy(plain)
    assert attention.install(packed) and attention.active(packed) and not attention.active(plain)
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = lambda *a, **k: calls.append(k.get("is_causal")) or real(*a, **k)
    try:
        b = packed_batch()
        loss_packed, n = L.token_loss_sum(packed, b)
        loss_packed.backward()
    finally:
        torch.nn.functional.scaled_dot_product_attention = real
    # two layers, seven examples each, all causal and unmasked (once more per layer when recomputed)
    assert calls == [True] * 14 * (2 if checkpointing else 1)
    loss_plain, n_plain = L.token_loss_sum(plain, b)
    assert n == n_plain and abs(loss_packed.item() - loss_plain.item()) < 1e-5 * loss_plain.item()
    loss_plain.backward()
    grads = {k: p.grad for k, p in plain.named_parameters() if p.requires_grad}
    for k, p in packed.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[k], rtol=1e-4, atol=1e-5)


def test_without_boundaries_it_is_transformers_sdpa():
    plain = tiny_llama()
    packed = copy.deepcopy(plain)
    attention.install(packed)
    ids = torch.randint(3, 320, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    with torch.no_grad():
        torch.testing.assert_close(packed(input_ids=ids, attention_mask=mask).logits,
                                   plain(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)
        out = packed.generate(ids[:1], max_new_tokens=4, do_sample=False)  # with a KV cache
        assert torch.equal(out, plain.generate(ids[:1], max_new_tokens=4, do_sample=False))
