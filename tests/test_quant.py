"""PyTorch quantisation (tunelab/models/quant.py) and the QAT method: error bounds, GGUF bit-exactness,
fake-quant forward = quantise-dequantise, the straight-through gradient, and the method harness."""

import copy

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from method_harness import check_method

from tunelab.methods import get
from tunelab.models.quant import (
    dequantize_4bit,
    fake_quant_4bit,
    fake_quant_int8,
    fake_quant_ste,
    quantize_4bit,
    quantize_int8,
    quantize_model_,
)
from tunelab.testing import tiny_batch, tiny_llama


def _weights(shape=(48, 256), seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [False, True])
def test_4bit_error_is_within_half_a_step(group_size, symmetric):
    w = _weights()
    q, scale, zero = quantize_4bit(w, group_size, symmetric)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and q.shape == w.shape
    assert scale.dtype == zero.dtype == torch.float16 and scale.numel() == w.numel() // group_size
    w_hat = dequantize_4bit(q, scale, zero, group_size)
    err = (w - w_hat).abs().reshape(-1, group_size)
    step = scale.float().abs()[:, None]
    # half a step, plus the fp16 rounding of scale and zero point (relative 2^-11 of their size)
    slack = 16 * step * 2**-10 + zero.float().abs()[:, None] * 2**-10
    # symmetric: the value opposite the largest magnitude may sit at +8 steps, clamped to +7
    bound = (1.0 if symmetric else 0.5) * step + slack
    assert bool((err <= bound).all())
    assert float(err.mean()) < 0.3 * float(step.mean())  # rounding, not truncation: mean error ~ step / 4
    assert torch.equal(fake_quant_4bit(w, group_size, symmetric), w_hat)


@pytest.mark.parametrize(("symmetric", "qtype"), [(False, "Q4_1"), (True, "Q4_0")])
def test_4bit_at_group_32_is_bit_identical_to_gguf(symmetric, qtype):
    """What QAT trains with is exactly what the exported GGUF file holds."""
    w = _weights((64, 128), seed=1)
    t = getattr(gguf.GGMLQuantizationType, qtype)
    ref = gguf.dequantize(gguf.quantize(w.numpy(), t), t)
    assert torch.equal(fake_quant_4bit(w, 32, symmetric), torch.from_numpy(np.ascontiguousarray(ref)))


def test_int8_per_channel_error_bound():
    w = _weights((16, 192)) * torch.linspace(0.1, 3, 16)[:, None]  # rows of very different scale
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (16,)
    err = (w - fake_quant_int8(w)).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-7).all())
    assert float(err.max()) < float((w - fake_quant_4bit(w, 32)).abs().max()) / 8


def test_group_size_must_divide_the_row():
    with pytest.raises(ValueError, match="multiple of the group size"):
        quantize_4bit(torch.zeros(4, 48), 32)


def test_ptq_of_a_model_reports_size_and_stays_close_to_dense():
    model, batch = tiny_llama(), tiny_batch("llama")
    with torch.no_grad():
        dense = model(**batch).logits
    results = {}
    for bits in (8, 4):
        m = copy.deepcopy(model)
        report = quantize_model_(m, bits=bits, group_size=32)
        with torch.no_grad():
            results[bits] = float((m(**batch).logits - dense).abs().max())
        assert report["layers"] == 14 and "lm_head" in report["skipped"]  # 7 linears x 2 blocks; head kept
        assert torch.equal(m.model.embed_tokens.weight, model.model.embed_tokens.weight)
        assert report["bytes_quantized"] < report["bytes_fp16"] < report["bytes_fp32"]
        q_share = report["quantized_parameters"] / report["parameters"]
        # quantised layers shrink from 2 bytes to ~bits/8 (+ scales): the saving follows their share
        assert report["bytes_quantized"] < report["bytes_fp16"] * (1 - q_share * (0.4 if bits == 8 else 0.6))
    assert 0 < results[8] < results[4] / 4, results  # int8 per channel is far closer than 4-bit
    assert results[4] < float(dense.std()), results  # and 4-bit is still the same model, roughly


def test_qat_forward_equals_quantise_dequantise_and_gradient_passes_straight_through():
    lin = torch.nn.Linear(64, 8)
    model = get("qat").apply(torch.nn.Sequential(lin, torch.nn.Linear(8, 8)), get("qat").Config(group_size=32))
    x = torch.randn(5, 64)
    layer = model[0]
    expected = F.linear(x, fake_quant_4bit(layer.weight, 32), layer.bias)
    assert torch.equal(layer(x), expected)
    assert not torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))  # it does quantise
    assert type(model[1]) is torch.nn.Linear  # 8 inputs: not a multiple of 32, kept dense

    # STE: d loss / d W equals d loss / d W_q (the rounding counts as the identity)
    w = layer.weight
    (layer(x) ** 2).sum().backward()
    wq = fake_quant_4bit(w.detach(), 32).requires_grad_(True)
    (F.linear(x, wq, layer.bias.detach()) ** 2).sum().backward()
    assert torch.allclose(w.grad, wq.grad) and float(w.grad.abs().sum()) > 0

    w2 = torch.randn(4, 32, requires_grad=True)
    fake_quant_ste(w2, 32, True).sum().backward()
    assert torch.equal(w2.grad, torch.ones_like(w2))


@pytest.mark.parametrize("arch", ["llama", "bert", "t5"])
def test_qat_method_harness(arch, tmp_path):
    # learns, save -> load gives the same logits, merge (weights := their 4-bit values) too
    check_method("qat", arch, tmp_path, expect_trainable=lambda n: True)


def test_qat_merge_puts_the_weights_on_the_4bit_grid(tmp_path):
    mod = get("qat")
    model = mod.apply(tiny_llama(), mod.Config(symmetric=True))
    merged = mod.merge(copy.deepcopy(model))
    w = merged.model.layers[0].mlp.down_proj.weight
    assert type(merged.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert torch.equal(fake_quant_4bit(w, 32, True), w)  # idempotent: already 4-bit values
    assert torch.equal(merged.lm_head.weight, tiny_llama().lm_head.weight)  # head untouched
