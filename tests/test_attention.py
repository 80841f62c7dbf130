"""Per-example attention over packed rows equals transformers' masked SDPA over the whole row."""

import contextlib
import copy
import threading

import pytest
import torch
import torch.nn.functional as F

from tunelab.accel import attention, compact
from tunelab.methods import get
from tunelab.models import loss as L
from tunelab.testing import tiny_llama
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


@contextlib.contextmanager
def causal_calls():
    """The query lengths of the packed path's causal kernel calls, in order."""
    calls, real = [], attention._causal
    attention._causal = lambda q, *a: calls.append(q.shape[2]) or real(q, *a)
    try:
        yield calls
    finally:
        attention._causal = real


def padded_batch(seed: int, ends: dict[int, int], prompt: int) -> dict:
    """Three right-padded rows of 20 (row r's tokens end at ends[r]), the first `prompt` tokens of each unlabelled."""
    ids = torch.randint(3, 320, (3, 20), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    for row, end in ends.items():
        mask[row, end:] = 0
    labels = torch.where(mask.bool(), ids, -100)
    labels[:, :prompt] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def same_as_masked(packed, plain) -> list[int]:
    """The packed model's loss and gradients on packed_batch against the masked call's (plain); returns the packed
    path's causal kernel calls."""
    b = packed_batch()
    with causal_calls() as calls:
        loss_packed, n = L.token_loss_sum(packed, b)
        loss_packed.backward()
    loss_plain, n_plain = L.token_loss_sum(plain, b)
    assert n == n_plain and abs(loss_packed.item() - loss_plain.item()) < 1e-5 * loss_plain.item()
    loss_plain.backward()
    grads = {k: p.grad for k, p in plain.named_parameters() if p.requires_grad}
    for k, p in packed.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[k], rtol=1e-4, atol=1e-5)
    return calls


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
    # two layers, seven examples each, one causal call each (once more per layer when recomputed)
    assert same_as_masked(packed, plain) == [10, 9, 5, 24, 7, 11, 6] * 2 * (2 if checkpointing else 1)


@pytest.mark.parametrize("window", [24, 8])
def test_a_sliding_window_takes_the_packed_path(window):
    """Gemma 3's local layers pass a sliding window: where every packed example fits in it, the window changes
    nothing; where one is longer, that example is attended with the window's band as the kernel's mask. Either way
    every layer attends per example, with the masked call's loss and gradients."""
    from tunelab.testing import tiny_causal

    base = tiny_causal("gemma3_text", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, sliding_window=window,
                       layer_types=["sliding_attention", "full_attention"])  # fmt: skip
    plain = get("lora").apply(base, get("lora").Config(r=4, dropout=0.0)).train()
    for name, p in plain.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    packed = copy.deepcopy(plain)
    assert attention.install(packed)
    with band_masks() as bands:
        assert same_as_masked(packed, plain) == [10, 9, 5, 24, 7, 11, 6] * 2  # packed_batch's examples, two layers
    # the local layer's examples longer than the window take a band, forward and backward; none with window 24
    assert bands == ([] if window >= 24 else [10, 9, 24, 11] * 2)


def test_a_sliding_window_with_attention_dropout_is_attended_per_example_under_its_band(monkeypatch):
    """With attention dropout (as on a GPU) the examples go to one SDPA call each: an example longer than the
    window under the window's boolean band, not the masked call over the whole row."""
    from transformers.integrations import sdpa_attention

    from tunelab.testing import tiny_causal

    base = tiny_causal("gemma3_text", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, sliding_window=8, attention_dropout=0.1,
                       layer_types=["sliding_attention", "full_attention"])  # fmt: skip
    model = get("lora").apply(base, get("lora").Config(r=4, dropout=0.0)).train()
    assert attention.install(model)
    masked, banded = [], []
    real_sdpa, real_mask = sdpa_attention.sdpa_attention_forward, attention._window_mask
    monkeypatch.setattr(
        sdpa_attention, "sdpa_attention_forward", lambda *a, **k: masked.append(1) or real_sdpa(*a, **k)
    )
    monkeypatch.setattr(
        attention, "_window_mask", lambda w, n, d: (banded.append(n) if w else None) or real_mask(w, n, d)
    )
    loss, n = L.token_loss_sum(model, packed_batch())
    loss.backward()
    assert torch.isfinite(loss) and not masked
    assert [m for m in banded if m > 8] == [10, 9, 24, 11]  # the local layer's examples longer than its window


@contextlib.contextmanager
def band_masks():
    """The example lengths `_band` gave a mask for, in order."""
    made, real = [], attention._band

    def band(window, n, *args):
        if window is not None and n > window:
            made.append(n)
        return real(window, n, *args)

    attention._band = band
    try:
        yield made
    finally:
        attention._band = real


@pytest.mark.parametrize(
    "path, dtype, block",
    [("kernel", torch.float32, None), ("kernel", torch.bfloat16, None), ("sdpa", torch.float32, None),
     ("kernel", torch.float32, 8), ("kernel", torch.float32, 7), ("kernel", torch.bfloat16, 8),
     ("sdpa", torch.float32, 7), ("products", torch.bfloat16, None), ("products", torch.bfloat16, 8)],
)  # fmt: skip
def test_a_sliding_window_longer_examples_match_sdpa_with_the_band(path, dtype, block, monkeypatch):
    """The packed function (the CPU kernel's path) and the per-example SDPA calls (the path of GPUs and attention
    dropout) with a window some examples exceed, against one SDPA call per example under the window's boolean mask
    (fp32): output and gradients; in bf16 the examples are attended at bucketed lengths. `block`: examples longer
    than two windows attended that many queries at a time (`_band_blocks`; 256 by default, so here small blocks, 7
    leaving a short last one), each block against the keys its windows reach. `products`: the kernel's path with the
    backward as bf16 products (attention_backward, from 16 tokens here) under the window."""
    taken = []
    if path == "products":
        from tunelab.accel import attention_backward as ab

        if ab.load() is None:
            pytest.skip(f"no compiled pass: {ab.why_not()}")
        monkeypatch.setattr(ab, "FROM", 16)
        real_causal = ab.causal
        monkeypatch.setattr(ab, "causal", lambda *a: taken.append(a[-1]) or real_causal(*a))
    if block is not None:
        monkeypatch.setattr(attention, "BAND_BLOCK", block)
        blocked = []
        real = attention._blocks
        monkeypatch.setattr(attention, "_blocks", lambda length, w: blocked.append(length) or real(length, w))
    g = torch.Generator().manual_seed(1)
    rows, heads, kv_heads, length, dim, window = 2, 4, 2, 80, 16, 12
    pieces = [(0, 0, 5), (0, 5, 40), (0, 45, 35), (1, 0, 80)]
    q, k, v = (torch.randn(rows, length, h, dim, generator=g).transpose(1, 2) for h in (heads, kv_heads, kv_heads))
    grad = torch.randn(rows * length, heads, dim, generator=g)
    inputs = [t.to(dtype).detach().requires_grad_() for t in (q, k, v)]
    if path in ("kernel", "products"):
        out = attention._PackedCausal.apply(*inputs, pieces, dim**-0.5, window)
    else:
        out = attention._per_example_sdpa(*inputs, pieces, 0.0, dim**-0.5, window)
    out.backward(grad.to(dtype))
    ref_in = [t.detach().requires_grad_() for t in (q, k, v)]
    outs = []
    for r, p, n in pieces:
        i = torch.arange(n)
        seen = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
        q_, k_, v_ = (t[r : r + 1, :, p : p + n] for t in ref_in)
        o = F.scaled_dot_product_attention(q_, k_, v_, attn_mask=seen, scale=dim**-0.5, enable_gqa=True)
        outs.append(o[0].transpose(0, 1))
    ref = torch.cat(outs)
    ref.backward(grad)
    tol = {} if dtype == torch.float32 else {"rtol": 0.03, "atol": 0.03}
    torch.testing.assert_close(out.float(), ref.detach(), **tol)
    for a, b in zip(inputs, ref_in):
        torch.testing.assert_close(a.grad.float(), b.grad, **tol)
    if block is not None:  # the three examples longer than two windows (at their bucketed widths in bf16)
        # the kernel's: forward and backward; the products' backward takes its own blocks
        assert len(blocked) == (6 if path == "kernel" else 3) and min(blocked) >= 35
    if path == "products":  # every example (the 5-token one at its bucket of 32), under the window where longer
        assert taken == [None, 12, 12, 12]


@pytest.mark.parametrize("kv_heads", [2, 6])
def test_the_packed_function_gives_sdpas_bits_and_keeps_the_output_once(kv_heads):
    """The autograd function around the CPU flash kernel against one SDPA call per example and a cat (the
    path it replaces, still taken on GPUs and with dropout): the same output and gradients bit for bit,
    and the attention output kept once for the backward pass where the SDPA path keeps it twice."""
    g = torch.Generator().manual_seed(0)
    rows, heads, length, dim = 2, 6, 16, 8
    pieces = [(0, 0, 5), (0, 5, 11), (1, 0, 16)]
    # q, k, v as the model hands them over: head-major views of [rows, length, heads, dim] projections
    q, k, v = (torch.randn(rows, length, h, dim, generator=g).transpose(1, 2) for h in (heads, kv_heads, kv_heads))
    w = torch.randn(heads * dim, 4, generator=g, requires_grad=True)  # the output projection: keeps its input
    grad = torch.randn(rows * length, 4, generator=g)

    def run(attend):
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            out = attend(*inputs)
            y = out.reshape(rows * length, heads * dim) @ w
        y.backward(grad)
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in kept}
        return out.detach(), [t.grad for t in inputs], sum(storages.values())

    out, grads, kept = run(lambda *t: attention._PackedCausal.apply(*t, pieces, dim**-0.5, None))
    out_ref, grads_ref, kept_ref = run(lambda *t: attention._per_example_sdpa(*t, pieces, 0.0, None))
    assert torch.equal(out, out_ref)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_ref))
    assert kept_ref - kept == rows * length * heads * dim * 4  # bytes: one fp32 copy of the output


def test_without_boundaries_it_is_transformers_sdpa():
    plain = tiny_llama()
    packed = copy.deepcopy(plain)
    attention.install(packed)
    ids = torch.randint(3, 320, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    with torch.no_grad():
        torch.testing.assert_close(
            packed(input_ids=ids, attention_mask=mask).logits,
            plain(input_ids=ids, attention_mask=mask).logits,
            rtol=0,
            atol=0,
        )
        out = packed.generate(ids[:1], max_new_tokens=4, do_sample=False)  # with a KV cache
        assert torch.equal(out, plain.generate(ids[:1], max_new_tokens=4, do_sample=False))


def test_packed_attention_under_bf16_autocast_with_fp32_master_weights():
    """Full fine-tuning in bf16 autocast keeps fp32 weights, so the hidden states (and the rotary q, k) are fp32
    while v comes from a bf16 matmul: the packed call casts them as autocast casts SDPA's inputs (it failed with
    "expected scalar type Float but found BFloat16"), and gives the masked SDPA path's loss and gradients."""
    torch.manual_seed(0)
    plain = tiny_llama().train()
    packed = copy.deepcopy(plain)
    assert attention.install(packed)
    b = packed_batch()
    out = []
    for model in (packed, plain):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            total, n = L.token_loss_sum(model, b)
        (total / n).backward()
        out.append((float(total / n), model.model.layers[0].self_attn.q_proj.weight.grad))
    (loss_packed, grad_packed), (loss_plain, grad_plain) = out
    assert loss_packed == pytest.approx(loss_plain, rel=1e-2)
    assert float((grad_packed - grad_plain).norm() / grad_plain.norm()) < 0.05  # bf16's rounding, another order


def test_bf16_examples_are_attended_at_bucketed_lengths_with_the_same_result():
    """In bf16 each example is attended at its length rounded up to memory.SHAPE_BUCKET (oneDNN keeps a kernel
    per length): the rows after it (the next example's, or zeros past the row's end) change neither its output
    nor any gradient, against one SDPA call per example at its own length."""
    from tunelab.accel.memory import SHAPE_BUCKET

    g = torch.Generator().manual_seed(0)
    rows, heads, kv_heads, length, dim = 2, 6, 2, 80, 16
    pieces = [(0, 0, 5), (0, 5, 40), (0, 45, 35), (1, 0, 33), (1, 33, 47)]  # ends at the row's end: zero-padded
    q, k, v = (torch.randn(rows, length, h, dim, generator=g).transpose(1, 2).bfloat16()
               for h in (heads, kv_heads, kv_heads))  # fmt: skip
    grad = torch.randn(rows * length, heads, dim, generator=g).bfloat16()
    results = []
    with causal_calls() as calls:
        for attend in (lambda *t: attention._PackedCausal.apply(*t, pieces, dim**-0.5, None),
                       lambda *t: attention._per_example_sdpa(*t, pieces, 0.0, None)):  # fmt: skip
            inputs = [t.detach().requires_grad_() for t in (q, k, v)]
            out = attend(*inputs)
            out.backward(grad)
            results.append((out.detach(), [t.grad for t in inputs]))
    assert calls == [SHAPE_BUCKET, 64, 64, 64, 64]
    (out, grads), (out_ref, grads_ref) = results
    # within bf16's rounding (one or two units in the last place: the kernel blocks the longer length otherwise)
    torch.testing.assert_close(out, out_ref, rtol=0.02, atol=0.02)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=0.02, atol=0.02)


def test_prompt_tuning_rows_are_laid_end_to_end_with_the_masked_calls_loss_and_grads():
    """Prompt tuning's batches are right-padded rows with the virtual tokens in front: with packed attention
    installed the loss lays each row, after its own soft prompt, end to end in one row without the padding, one
    causal call each, for the masked call's loss and gradients; prefix tuning likewise, each row after the one
    prefix of keys (positions starting after it, as PEFT's padded call numbers them)."""
    b = padded_batch(0, {1: 12, 2: 17}, prompt=6)
    for name, want in (("prompt", [24, 16, 21]), ("prefix", [20, 12, 17])):
        plain = get(name).apply(tiny_llama(), get(name).Config(num_virtual_tokens=4)).train()
        fast = copy.deepcopy(plain)
        assert attention.install(fast)
        with causal_calls() as calls:
            loss_fast, n = L.token_loss_sum(fast, b)
            loss_fast.backward()
        assert calls == want * 2  # two layers
        loss_plain, n_plain = L.token_loss_sum(plain, b)
        loss_plain.backward()
        assert n == n_plain and abs(loss_fast.item() - loss_plain.item()) < 1e-5 * loss_plain.item()
        grads = {k: p.grad for k, p in plain.named_parameters() if p.requires_grad}
        for k, p in fast.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.grad, grads[k], rtol=1e-4, atol=1e-6)


def test_with_the_prompt_switched_off_rows_are_laid_end_to_end_as_the_base_models():
    """dpo's reference pass switches a prompt- or prefix-tuned model's adapter off (PEFT's disable_adapter): the
    base model then runs on the rows end to end too (it ran PEFT's padded forward), for the base model's per-row
    loss sums."""
    b = padded_batch(0, {1: 12, 2: 17}, prompt=6)
    for name in ("prompt", "prefix"):
        plain = get(name).apply(tiny_llama(), get(name).Config(num_virtual_tokens=4)).eval()
        fast = copy.deepcopy(plain)
        assert attention.install(fast)
        with torch.no_grad(), fast.disable_adapter(), causal_calls() as calls:
            rows_fast = L.row_loss_sums(fast, b)
        assert calls == [20, 12, 17] * 2  # each row at its own length, two layers: no virtual positions
        with torch.no_grad(), plain.disable_adapter():
            rows_plain = L.row_loss_sums(plain, b)
            rows_base = L.row_loss_sums(plain.get_base_model(), b)
        torch.testing.assert_close(rows_fast, rows_plain, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rows_fast, rows_base, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            assert not torch.allclose(L.row_loss_sums(fast, b), rows_fast)  # switched on again: the prompt counts


@pytest.mark.parametrize("dtype,widen_below", [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, 48)])
def test_a_prefix_of_keys_is_seen_by_every_example_as_by_one_masked_call_each(dtype, widen_below, monkeypatch):
    """Prefix tuning's keys: the first `prefix` keys seen by every query, each example's own causally. The
    autograd function (two kernel calls per example merged by their log-sum-exps, each part's backward given the
    merged output) and the SDPA path (the prefix concatenated, a causal mask aligned to the last key) against one
    masked SDPA call per example in fp32, outputs and gradients (the prefix's summed over the examples, in fp32).
    In bf16 the backward widens short examples to fp32 and runs long ones in bf16 (`WIDEN_BELOW`): with 48, the
    examples narrower than that (widths rounded up to 32 in bf16) take the first path, the 33-token one the second."""
    if widen_below is not None:
        monkeypatch.setattr(attention, "WIDEN_BELOW", widen_below)
        widened = []
        backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward",
                            lambda *a, **k: widened.append(a[1].dtype == torch.float32) or backward(*a, **k))  # fmt: skip
    g = torch.Generator().manual_seed(3)
    rows, heads, kv_heads, length, dim, prefix = 2, 6, 2, 40, 8, 5
    pieces = [(0, 0, 7), (0, 7, 33), (1, 0, 25), (1, 25, 15)]
    q = torch.randn(rows, length, heads, dim, generator=g).transpose(1, 2).to(dtype)
    k, v = (torch.randn(rows, prefix + length, kv_heads, dim, generator=g).transpose(1, 2).to(dtype) for _ in "kv")
    grad = torch.randn(rows * length, heads, dim, generator=g).to(dtype)

    def reference(q, k, v):
        outs = []
        for r, p, n in pieces:
            keys = [
                torch.cat([t[r : r + 1, :, :prefix], t[r : r + 1, :, prefix + p : prefix + p + n]], 2) for t in (k, v)
            ]
            mask = torch.ones(n, prefix + n, dtype=torch.bool).tril(prefix)
            out = torch.nn.functional.scaled_dot_product_attention(
                q[r : r + 1, :, p : p + n], *keys, attn_mask=mask, scale=dim**-0.5, enable_gqa=True
            )
            outs.append(out[0].transpose(0, 1))
        return torch.cat(outs)

    results = []
    for attend in (lambda *t: attention._PackedCausal.apply(*t, pieces, dim**-0.5, None),
                   lambda *t: attention._per_example_sdpa(*t, pieces, 0.0, None), reference):  # fmt: skip
        wide = attend is reference  # the reference in fp32 on the same values
        inputs = [(t.float() if wide else t).detach().requires_grad_() for t in (q, k, v)]
        out = attend(*inputs)
        out.backward(grad.float() if wide else grad)
        results.append((out.detach().float(), [t.grad.float() for t in inputs]))
    tol = 1e-5 if dtype == torch.float32 else 0.03
    if widen_below is not None:  # two calls an example (own keys, prefix); only the 33-token one at 64 is not widened
        assert widened == [True, True, False, False, True, True, True, True]
    for out, grads in results[:2]:
        torch.testing.assert_close(out, results[2][0], rtol=tol, atol=tol)
        for a, b in zip(grads, results[2][1]):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_right_padded_rows_are_laid_end_to_end_with_the_masked_calls_loss_and_grads():
    """`data.packing: false` (and dpo's pairs): with packed attention installed the loss lays the rows end to end
    without their padding, one causal call each, for the masked call's loss, per-row sums and gradients."""
    b = padded_batch(1, {0: 9, 2: 14}, prompt=5)
    plain = lora_model()
    fast = copy.deepcopy(plain)
    assert attention.install(fast)
    with causal_calls() as calls:
        loss_fast, n = L.token_loss_sum(fast, b)
        loss_fast.backward()
        with torch.no_grad():
            rows_fast = L.row_loss_sums(fast, b)
    assert calls == [9, 20, 14] * 2 * 2  # two layers, two forwards
    loss_plain, n_plain = L.token_loss_sum(plain, b)
    loss_plain.backward()
    assert n == n_plain and abs(loss_fast.item() - loss_plain.item()) < 1e-5 * loss_plain.item()
    with torch.no_grad():
        torch.testing.assert_close(rows_fast, L.row_loss_sums(plain, b), rtol=1e-5, atol=1e-5)
    grads = {k: p.grad for k, p in plain.named_parameters() if p.requires_grad}
    for k, p in fast.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("key0, window", [(0, 0), (2, 4)])
def test_the_compiled_pass_gives_each_kept_probability_rounded_once_and_zeros_elsewhere(key0, window):
    """attention_backward's C pass over a block of rows in place: e^(scale s) to within a bf16 rounding of torch's
    exp for the keys each row's query (at first + row % block) sees, exactly 0 for the others: those after it, and
    with a window those `window` or more positions before it (key j at position key0 + j); a NaN stays a NaN."""
    from tunelab.accel import attention_backward as ab

    fn = ab.load()
    if fn is None:
        pytest.skip(f"no compiled pass: {ab.why_not()}")
    g = torch.Generator().manual_seed(0)
    block, first, keys, scale = 5, 3 + key0, 9, 0.125  # two groups of 5 queries over 9 keys
    s = (torch.randn(2 * block, keys, generator=g) * 40 - 20).bfloat16()
    s[4, 5] = -2000.0  # under e^-87
    s[9, 6] = float("nan")
    got = s.clone()
    fn(0, got.shape[0], got.data_ptr(), keys, block, first, key0, window, scale)
    query = first + torch.arange(2 * block)[:, None] % block
    position = key0 + torch.arange(keys)[None]
    seen = (position <= query) & ((position > query - window) if window else True)
    want = torch.exp(s.float() * scale).masked_fill(~seen, 0)
    assert seen[4, 5] and seen[9, 6] and not seen.all()
    assert torch.equal(got[~seen], torch.zeros_like(got[~seen]))
    assert got[9, 6].isnan() and float(got[4, 5]) < 1e-37
    ok = seen.clone()
    ok[4, 5] = ok[9, 6] = False
    torch.testing.assert_close(got[ok].float(), want[ok], rtol=2**-8, atol=0)


@pytest.mark.parametrize(
    "heads, kv_heads, length, blocks, window",
    [(6, 2, 40, False, None), (4, 4, 37, False, None), (6, 3, 45, True, None), (6, 2, 40, False, 12),
     (6, 3, 45, True, 10)],
)  # fmt: skip
def test_the_bf16_backward_by_products_matches_the_fp32_kernel(heads, kv_heads, length, blocks, window, monkeypatch):
    """attention_backward.causal on bf16 inputs against the CPU kernel's backward on the same values in fp32:
    within bf16's rounding (relative error <= 5e-3 here, the kernel's own bf16 backward 2-6e-3); grouped-query
    and plain heads, an example taken 16 queries at a time (the last block short), and under a sliding window (as
    the kernel's band mask; with blocks each against the keys its windows reach). Seeing one key past the diagonal,
    or lse rounded to bf16 alone, fails it."""
    from tunelab.accel import attention_backward as ab

    if ab.load() is None:
        pytest.skip(f"no compiled pass: {ab.why_not()}")
    if blocks:
        monkeypatch.setattr(ab, "WHOLE_UP_TO", 16)
        monkeypatch.setattr(ab, "BLOCK", 16)
    g = torch.Generator().manual_seed(0)
    dim, scale = 16, 16**-0.5
    q, k, v = (torch.randn(1, h, length, dim, generator=g).bfloat16() for h in (heads, kv_heads, kv_heads))
    q = q * 3  # peaked softmaxes: large scores are where a rounded one would show
    band = attention._band(window, length, length, q)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, True, attn_mask=band, scale=scale
    )[:2]
    grad = torch.randn(out.shape, generator=g).bfloat16()
    backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    band = None if band is None else band.float()
    ref = backward(*(t.float() for t in (grad, q, k, v, out)), lse, 0.0, True, attn_mask=band, scale=scale)
    got = ab.causal(grad, q, k, v, out, lse, scale, window)
    for a, b in zip(got, ref):
        assert a.dtype == torch.bfloat16 and a.shape == b.shape
        assert float((a.float() - b).norm() / b.norm()) < 0.008  # measured <= 0.005; lse in bf16 alone 0.010-0.012


@pytest.mark.parametrize("products", [True, False])
def test_bf16_packed_examples_take_the_products_backward_with_sdpas_gradients(products, monkeypatch):
    """The packed function in bf16 hands each example at least attention_backward.FROM long (here 48) to the
    products' backward, and its gradients stay SDPA's per example (fp32, within bf16's rounding); without the
    compiled pass (products False: as without a C compiler) the kernel's backward runs instead, to the same."""
    from tunelab.accel import attention_backward as ab

    if products and ab.load() is None:
        pytest.skip(f"no compiled pass: {ab.why_not()}")
    monkeypatch.setattr(ab, "FROM", 48)
    if not products:
        monkeypatch.setattr(ab, "load", lambda: None)
    taken, real = [], ab.causal
    monkeypatch.setattr(ab, "causal", lambda *a: taken.append(a[1].shape[2]) or real(*a))
    g = torch.Generator().manual_seed(2)
    rows, heads, kv_heads, length, dim = 2, 6, 2, 80, 16
    pieces = [(0, 0, 9), (0, 9, 40), (0, 49, 31), (1, 0, 80)]
    q, k, v = (torch.randn(rows, length, h, dim, generator=g).transpose(1, 2) for h in (heads, kv_heads, kv_heads))
    grad = torch.randn(rows * length, heads, dim, generator=g)
    inputs = [t.bfloat16().detach().requires_grad_() for t in (q, k, v)]
    attention._PackedCausal.apply(*inputs, pieces, dim**-0.5, None).backward(grad.bfloat16())
    ref_in = [t.detach().requires_grad_() for t in (q, k, v)]
    outs = [F.scaled_dot_product_attention(*(t[r : r + 1, :, p : p + n] for t in ref_in), is_causal=True,
                                           scale=dim**-0.5, enable_gqa=True)[0].transpose(0, 1)
            for r, p, n in pieces]  # fmt: skip
    torch.cat(outs).backward(grad)
    for a, b in zip(inputs, ref_in):
        torch.testing.assert_close(a.grad.float(), b.grad, rtol=0.03, atol=0.03)
    assert taken == ([64, 96] if products else [])  # 40 and 80 at their bucketed widths (9 and 31 at 32: below 48)
    # the probabilities' scratch buffer stays with this thread, sized to the widest example, until it is freed
    held = compact._SCRATCH.get((torch.device("cpu"), torch.bfloat16, threading.get_ident()))
    assert (held is not None and held.numel() == 2 * kv_heads * (heads // kv_heads) * 96 * 96) == products
    compact.free_scratch()
    assert not compact._SCRATCH
