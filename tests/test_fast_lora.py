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


def lm_batch(rows: int, width: int) -> dict:
    """`rows` x `width` random token ids, the first third of each row's labels masked (a prompt)."""
    g = torch.Generator().manual_seed(rows)
    ids = torch.randint(3, 320, (rows, width), generator=g)
    labels = ids.clone()
    labels[:, : width // 3] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


# 1 x 12 tokens: fewer rows than any layer's width (low-rank term added to the output); 4 x 40 tokens:
# more rows than any (adapter folded into the weight). The tiny model is 32 wide, its MLP 64.
# The MLP with only down_proj adapted: gate and up are frozen plain Linears inside the fused MLP.
@pytest.mark.parametrize(
    "shape,targets", [((1, 12), "all-linear"), ((4, 40), "all-linear"), ((4, 40), ["q_proj", "down_proj"])]
)
def test_fast_lora_matches_peft_loss_and_gradients(monkeypatch, shape, targets):
    model = _lora_model(targets=targets)
    fast_calls, mlp_calls = [], []
    model.get_base_model().model.layers[0].self_attn.q_proj.register_forward_hook(lambda *a: fast_calls.append(1))
    swiglu = fast_lora._SwiGLU.apply
    monkeypatch.setattr(fast_lora._SwiGLU, "apply", lambda *a: mlp_calls.append(1) or swiglu(*a))
    batch = lm_batch(*shape)
    loss_fast, g_fast = _grads(model, batch)
    loss_peft, g_peft = _grads(_peft_only(model), batch)
    assert fast_calls and model.get_base_model().model.layers[0].self_attn.q_proj.forward.__func__ is _fast_forward
    assert len(mlp_calls) == 2  # one fused MLP per layer, in the fast model only
    assert loss_fast == pytest.approx(loss_peft, rel=1e-5)
    assert g_fast.keys() == g_peft.keys() and len(g_fast) > 0
    for k in g_fast:
        torch.testing.assert_close(g_fast[k], g_peft[k], rtol=1e-4, atol=1e-6, msg=k)


def test_folded_lora_steps_aside_for_disabled_adapters():
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


def _counting(monkeypatch) -> list:
    """Calls of the fast path's two autograd functions, with the dropout probabilities they got."""
    calls = []
    for fn in (fast_lora._LoRALinear, fast_lora._SwiGLU):
        monkeypatch.setattr(
            fn,
            "apply",
            (lambda f: lambda *a: calls.append([t for t in a if isinstance(t, float) and t < 1]) or f(*a))(fn.apply),
        )
    return calls


def dropout_drawing_fast_masks(monkeypatch) -> None:
    """nn.Dropout (PEFT's LoRA dropout) drawing its masks as the fast path does (`keep_mask`): a reference
    that differs from the fast path in nothing but where the arithmetic happens."""

    def forward(self, x):
        if not self.training or not self.p:
            return x
        return x * fast_lora.keep_mask(x, self.p)[0] / (1 - self.p)

    monkeypatch.setattr(torch.nn.Dropout, "forward", forward)


# dropout 0.3 on few rows (low-rank term added) and on many (where dropout 0 would fold)
@pytest.mark.parametrize("shape", [(1, 12), (4, 40)])
def test_dropout_on_the_fast_path_is_peft_dropout_with_the_same_masks(monkeypatch, shape):
    """With the same seed and PEFT's nn.Dropout drawing the fast path's masks, the same loss and gradients;
    another seed other masks, and so other gradients."""
    model = _lora_model(dropout=0.3).train()
    peft = _peft_only(model).train()
    calls = _counting(monkeypatch)
    batch = lm_batch(*shape)
    torch.manual_seed(7)
    loss_fast, g_fast = _grads(model, batch)
    after_fast = torch.get_rng_state()
    assert len(calls) == 2 * 5 and all(c == [0.3] * len(c) and c for c in calls)  # 4 attention + 1 MLP per layer
    dropout_drawing_fast_masks(monkeypatch)
    torch.manual_seed(7)
    loss_peft, g_peft = _grads(peft, batch)
    assert len(calls) == 10  # PEFT's own forward: no fast call
    assert torch.equal(after_fast, torch.get_rng_state())  # the same draws from torch's generator
    assert loss_fast == pytest.approx(loss_peft, rel=1e-6)
    for k in g_fast:
        torch.testing.assert_close(g_fast[k], g_peft[k], rtol=1e-4, atol=1e-6, msg=k)
    torch.manual_seed(8)
    _, g_other = _grads(model, batch)
    torch.manual_seed(7)
    model.eval()  # eval mode: no dropout, the fast path all the same
    _, g_eval = _grads(model, batch)
    _, g_none = _grads(_peft_only(_lora_model(dropout=0.0)), batch)
    for k in ("lora_A", "lora_B"):
        key = next(n for n in g_fast if k in n and "q_proj" in n)
        assert (g_other[key] - g_fast[key]).abs().max() > 1e-3, key
        assert (g_eval[key] - g_fast[key]).abs().max() > 1e-3, key
        torch.testing.assert_close(g_eval[key], g_none[key], rtol=1e-4, atol=1e-6)
    assert calls[-1] == [0.0] * len(calls[-1])


def test_the_mask_is_drawn_again_not_kept(monkeypatch):
    """With dropout the backward pass keeps what it keeps without (x, and d(x) A^T): no mask, no d(x)."""
    batch = lm_batch(1, 12)  # few rows: both keep d(x) A^T

    def saved_bytes(model):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            token_loss_sum(model, batch)[0].backward()
        return sum(sizes)

    torch.manual_seed(3)
    with_dropout = saved_bytes(_lora_model(dropout=0.3).train())
    assert with_dropout == saved_bytes(_lora_model(dropout=0.0).train())
    assert with_dropout < saved_bytes(_peft_only(_lora_model(dropout=0.3)).train())


@pytest.fixture(params=["compiled", "torch"])
def mask_path(request, monkeypatch):
    """keep_mask by the compiled loop (accel/masks.py) or, as without a C compiler, by torch's generator."""
    from tunelab.accel import masks

    if request.param == "compiled":
        assert masks.load() is not None, masks.why_not()
    else:
        monkeypatch.setattr(masks, "load", lambda: None)
    return request.param


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_keep_mask_keeps_with_probability_1_minus_p_everywhere(p, mask_path):
    """Each element kept with probability 1 - p, in every row, column and 16-bit lane of the random words
    (a lane whose sign bit never varied would keep 1 - 2p or all)."""
    torch.manual_seed(1)
    keep, _ = fast_lora.keep_mask(torch.empty(400, 500), p)
    assert keep.dtype == torch.bool and keep.shape == (400, 500)
    sd = (p * (1 - p) / keep.numel()) ** 0.5
    assert keep.float().mean().item() == pytest.approx(1 - p, abs=6 * sd)
    for lane in keep.view(-1, 4).float().mean(0):  # 50,000 draws a lane
        assert lane.item() == pytest.approx(1 - p, abs=6 * 2 * sd)
    for means in (keep.float().mean(0), keep.float().mean(1)):  # no row or column far off
        assert (means - (1 - p)).abs().max().item() < 8 * (p * (1 - p) / 400) ** 0.5
    pairs = keep[:, :-1].float() * keep[:, 1:].float()  # neighbours independent: P(both) = (1 - p)^2
    assert pairs.mean().item() == pytest.approx((1 - p) ** 2, abs=6 * sd)


def test_keep_mask_is_drawn_again_from_its_state(mask_path):
    x = torch.randn(400, 500)
    torch.manual_seed(1)
    keep, state = fast_lora.keep_mask(x, 0.05)
    again, _ = fast_lora.keep_mask(x, 0.05, state)  # the backward pass's draw, from the saved state
    assert torch.equal(again, keep)
    torch.manual_seed(1)
    gen = torch.Generator().manual_seed(5)
    with fast_lora.drawing_from(gen):  # a thread share's own generator: torch's is left alone
        own, own_state = fast_lora.keep_mask(x, 0.05)
    assert not torch.equal(own, keep) and torch.equal(fast_lora.keep_mask(x, 0.05)[0], keep)
    assert torch.equal(fast_lora.keep_mask(x, 0.05, own_state)[0], own)


def test_compiled_masks_are_the_hash_for_any_split_among_threads(monkeypatch):
    """The compiled draw is element i kept where its 16 bits of murmur3's finaliser over (key, i / 4) reach p 65536
    (checked against the formula in Python), the same bits whatever the threads and with a partial last word."""
    from tunelab.accel import compiled, masks

    def mix32(h):
        for shift, mul in ((16, 0x85EBCA6B), (13, 0xC2B2AE35), (16, None)):
            h ^= h >> shift
            h = h * mul & 0xFFFFFFFF if mul else h
        return h

    key, p = 0x0123456789ABCDEF, 0.3
    k1, k2 = mix32(key & 0xFFFFFFFF), mix32((key >> 32) ^ 0x68E31DA4)
    lanes = []
    for w in range(6):
        at = w * 0x9E3779B1 & 0xFFFFFFFF
        a, b = mix32(at ^ k1), mix32(at ^ k2)
        lanes += [a & 0xFFFF, a >> 16, b & 0xFFFF, b >> 16]
    fn = masks.load()
    small = masks.draw(fn, (23,), p, key)  # five whole words and three elements of a sixth
    assert small.tolist() == [v >= round(p * 65536) for v in lanes[:23]]
    shape = (3 * compiled.SPLIT + 5, 3)  # long enough to be split; not a multiple of 4 elements nor of the threads
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    one = masks.draw(fn, shape, p, key)
    for threads in (2, 3):
        monkeypatch.setattr(torch, "get_num_threads", lambda n=threads: n)
        assert torch.equal(masks.draw(fn, shape, p, key), one), threads
    assert torch.equal(one.flatten()[:23], small)


@pytest.mark.parametrize("dora", [False, True])
def test_dropout_under_gradient_checkpointing_is_peft_dropout(monkeypatch, dora):
    """The recomputed forward (torch's generator restored) and the backward's draw give the masks of the
    first forward: the same gradients as PEFT's layers (drawing the same masks) under checkpointing; with DoRA too
    (whose backward reads a saved output of the recomputed forward)."""
    if dora:
        torch.manual_seed(0)
        method = get("lora")
        model = _dora(method.apply(tiny_llama(), method.Config(r=4, alpha=8, dropout=0.3, use_dora=True))).train()
        peft = copy.deepcopy(model)
        fast_lora.enable(model)
    else:
        model = _lora_model(dropout=0.3).train()
        peft = _peft_only(model).train()
    grads = []
    for m in (model, peft):
        if m is peft:
            dropout_drawing_fast_masks(monkeypatch)
        m.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(7)
        grads.append(_grads(m, lm_batch(2, 40))[1])
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-6, msg=k)


def _dora(model):
    """A DoRA model with every trained weight away from its start (B at zero, m at the rows' norms: c = 1)."""
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
        if "lora_magnitude_vector" in name:
            p.data.mul_(1 + 0.1 * torch.randn_like(p))
    return model


def test_a_dora_magnitude_trained_to_exactly_zero_takes_pefts_forward(monkeypatch):
    """dm on the fast path is sum g (c z) / m, 0 / 0 where m is 0: a layer with such an element goes to PEFT's
    forward (autograd there gives dm = sum g z / ||W + s B A||), so the gradients stay PEFT's, finite, for every
    layer; the others stay on the fast path."""
    torch.manual_seed(0)
    method = get("lora")
    model = _dora(method.apply(tiny_llama(), method.Config(r=4, alpha=8, dropout=0.0, use_dora=True)))
    zeroed = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        zeroed.lora_magnitude_vector["default"].weight[3] = 0.0
    slow = copy.deepcopy(model)
    fast_lora.enable(model)
    calls = _counting(monkeypatch)
    loss_fast, g_fast = _grads(model, lm_batch(2, 12))
    loss_peft, g_peft = _grads(slow, lm_batch(2, 12))
    assert len(calls) == 9  # of 10: the zeroed q_proj left to PEFT
    assert loss_fast == pytest.approx(loss_peft, rel=1e-5)
    for k in g_fast:
        assert torch.isfinite(g_fast[k]).all(), k
        torch.testing.assert_close(g_fast[k], g_peft[k], rtol=1e-4, atol=1e-6, msg=k)
    assert g_fast[next(k for k in g_fast if "layers.0.self_attn.q_proj.lora_magnitude" in k)][3] != 0


# few rows (the low-rank term added, then the rows scaled by c), many (the scaled fold); with dropout PEFT's DoRA
# multiplies W by the dropped input too (a second product): the fast path does the same
@pytest.mark.parametrize("shape,dropout", [((1, 12), 0.0), ((4, 40), 0.0), ((1, 12), 0.3), ((4, 40), 0.3)])
def test_dora_on_the_fast_path_gives_pefts_loss_and_gradients(monkeypatch, shape, dropout):
    torch.manual_seed(0)
    method = get("lora")
    model = _dora(method.apply(tiny_llama(), method.Config(r=4, alpha=8, dropout=dropout, use_dora=True)))
    slow = copy.deepcopy(model)
    assert fast_lora.enable(model) == 14 and fast_lora.why_not(model) is None
    assert len(fast_lora.covered_dropouts(model)) == 14
    calls = _counting(monkeypatch)
    batch = lm_batch(*shape)
    torch.manual_seed(7)
    loss_fast, g_fast = _grads(model, batch)
    assert len(calls) == 10  # 4 attention layers and 1 fused MLP a block: none left to PEFT
    dropout_drawing_fast_masks(monkeypatch)
    torch.manual_seed(7)
    loss_peft, g_peft = _grads(slow, batch)
    assert loss_fast == pytest.approx(loss_peft, rel=1e-5)
    assert g_fast.keys() == g_peft.keys() and sum("lora_magnitude_vector" in k for k in g_fast) == 14
    for k in g_fast:
        torch.testing.assert_close(g_fast[k], g_peft[k], rtol=1e-4, atol=1e-6, msg=k)
    model.eval()  # evaluation takes it too (no dropout, no autograd)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, slow.eval()(**batch).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "dtype,dropout,dora",
    [(torch.float32, 0.0, False), (torch.bfloat16, 0.0, False), (torch.bfloat16, 0.3, False),
     (torch.float32, 0.3, True), (torch.bfloat16, 0.0, True)],
)  # fmt: skip
def test_lora_over_a_4bit_base_takes_the_fast_path_with_pefts_loss_and_gradients(monkeypatch, dtype, dropout, dora):
    """qlora: each LoRA layer and SwiGLU MLP over 4-bit bases as one function, the weights dequantized where used,
    against PEFT's 4-bit LoRA layers (drawing the same dropout masks): fp32 to float rounding; bf16 (fp32 master
    weights, PEFT then computing the adapter in fp32 on x cast up) to bf16's rounding of the adapter's products."""
    torch.manual_seed(0)
    method = get("qlora")
    cfg = method.Config(r=4, alpha=8, dropout=dropout, compute_dtype="auto", use_dora=dora)
    model = _dora(method.apply(tiny_llama().to(dtype), cfg).train())
    trained = 42 if dora else 28  # A and B (and DoRA's m) of 2 x 7 layers
    slow = copy.deepcopy(model)
    assert fast_lora.routes(model) and fast_lora.enable(model) == 14 and fast_lora.enable(model) == 0  # 2 x 7, once
    assert len(fast_lora.bf16_adapters(model)) == (trained if dtype == torch.bfloat16 else 0)
    assert len(fast_lora.covered_dropouts(model)) == 14
    linear, mlp = [], []
    for fn, calls in ((fast_lora._LoRALinear, linear), (fast_lora._SwiGLU, mlp)):
        monkeypatch.setattr(fn, "apply", lambda *a, real=fn.apply, calls=calls: calls.append(1) or real(*a))
    batch = lm_batch(4, 40)
    torch.manual_seed(7)
    loss_fast, g_fast = _grads(model, batch)
    dropout_drawing_fast_masks(monkeypatch)
    torch.manual_seed(7)
    loss_peft, g_peft = _grads(slow, batch)
    assert (len(linear), len(mlp)) == (8, 2) and g_fast.keys() == g_peft.keys() and len(g_fast) == trained
    assert all(g.dtype == torch.float32 for g in g_fast.values())  # fp32 master weights either way
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert loss_fast == pytest.approx(loss_peft, rel=tol)
    for k in g_fast:
        assert float((g_fast[k] - g_peft[k]).norm() / g_peft[k].norm()) < (1e-4 if dtype == torch.float32 else 5e-2), k
    model.eval()  # evaluation and generation take it too, without autograd
    with torch.no_grad():
        fast, plain = model(**batch).logits.float(), slow.eval()(**batch).logits.float()
    assert float((fast - plain).norm() / plain.norm()) < tol


def test_doras_weight_norms_are_kept_until_the_frozen_weight_changes():
    torch.manual_seed(0)
    method = get("lora")
    model = _dora(method.apply(tiny_llama(), method.Config(r=4, alpha=8, dropout=0.0, use_dora=True)))
    fast_lora.enable(model)
    ids = lm_batch(1, 12)["input_ids"]
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    with torch.no_grad():
        model(input_ids=ids)
        kept = layer.base_layer.weight._tunelab_squared_norms[1]
        torch.testing.assert_close(kept, layer.base_layer.weight.pow(2).sum(1))
        model(input_ids=ids)
        assert layer.base_layer.weight._tunelab_squared_norms[1] is kept  # once per weight, not per call
        layer.base_layer.weight.mul_(2)  # in place: a new version
        fast = model(input_ids=ids).logits
        torch.testing.assert_close(layer.base_layer.weight._tunelab_squared_norms[1], 4 * kept)
        layer.base_layer.weight.data = layer.base_layer.weight.data / 2  # new data, as PEFT's unmerge sets it
        model(input_ids=ids)
        torch.testing.assert_close(layer.base_layer.weight._tunelab_squared_norms[1], kept)
        layer.base_layer.weight.mul_(2)
        torch.testing.assert_close(fast, _peft_only(model)(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["bert", "qwen2"])  # every base with a bias; Qwen2's q, k and v
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_dora_over_biased_bases_gives_pefts_outputs_and_gradients(monkeypatch, arch, dropout):
    from tunelab.testing import tiny_bert, tiny_causal

    torch.manual_seed(0)
    method = get("lora")
    base = tiny_bert() if arch == "bert" else tiny_causal("qwen2")
    model = _dora(method.apply(base, method.Config(r=4, alpha=8, dropout=dropout, use_dora=True)))
    slow = copy.deepcopy(model)
    fast_lora.enable(model)
    assert any(getattr(m.base_layer, "bias", None) is not None for m in model.modules() if hasattr(m, "base_layer"))
    ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(0))

    def run(m):
        m.zero_grad()
        torch.manual_seed(3)
        logits = m(input_ids=ids).logits
        logits.pow(2).mean().backward()
        return logits.detach(), {k: p.grad for k, p in m.named_parameters() if p.grad is not None}

    calls = _counting(monkeypatch)
    fast, g_fast = run(model)
    assert calls  # the biased layers took the fast path
    dropout_drawing_fast_masks(monkeypatch)
    plain, g_plain = run(slow)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    assert g_fast.keys() == g_plain.keys() and any("lora_magnitude_vector" in k for k in g_fast)
    for k in g_fast:
        torch.testing.assert_close(g_fast[k], g_plain[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_a_gemma_geglu_mlp_takes_the_fast_path_with_pefts_loss_and_gradients(monkeypatch, dropout):
    """Gemma's MLP (GELU's tanh form where Llama has SiLU) as fast LoRA's one function: PEFT's loss and gradients,
    one fused call per layer."""
    from tunelab.testing import tiny_causal

    base = tiny_causal("gemma3_text", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8)  # fmt: skip
    model = _lora_model(dropout=dropout, base=base)
    mlp_calls = []
    fused = fast_lora._SwiGLU.apply
    monkeypatch.setattr(fast_lora._SwiGLU, "apply", lambda *a: mlp_calls.append(a[1]) or fused(*a))
    batch = lm_batch(2, 12)
    torch.manual_seed(3)
    loss_fast, g_fast = _grads(model, batch)
    assert mlp_calls == ["gelu_tanh", "gelu_tanh"]
    dropout_drawing_fast_masks(monkeypatch)
    torch.manual_seed(3)
    loss_peft, g_peft = _grads(_peft_only(model), batch)
    assert loss_fast == pytest.approx(loss_peft, rel=1e-5)
    assert g_fast.keys() == g_peft.keys() and len(g_fast) > 0
    for k in g_fast:
        torch.testing.assert_close(g_fast[k], g_peft[k], rtol=1e-4, atol=1e-6, msg=k)


def test_fast_lora_mlps_keeping_gate_and_up_in_bf16_give_the_same_loss_and_nearly_the_gradients():
    """training.saved_activations: bf16 (swiglu.keep_saved) on fast LoRA's MLP function: gate(x) and up(x) kept in
    bf16, the loss the same bits (the forward is unchanged), the LoRA gradients from the rounded values (within 1%)."""
    from tunelab.accel import swiglu

    model = _lora_model()
    batch = lm_batch(2, 12)
    loss, grads = _grads(model, batch)
    assert swiglu.keep_saved(model, torch.bfloat16) == (2, 0)  # one MLP per layer; no norm routed here
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.dtype) or t, lambda t: t):
        loss_kept, grads_kept = _grads(model, batch)
    assert kept.count(torch.bfloat16) == 4  # g and u of each of the two MLPs
    assert loss_kept == loss and grads_kept.keys() == grads.keys()
    mlp = [k for k in grads if "mlp" in k]
    assert mlp and any(not torch.equal(grads_kept[k], grads[k]) for k in mlp)
    for k in grads:
        assert (grads_kept[k] - grads[k]).norm() <= 1e-2 * grads[k].norm(), k
