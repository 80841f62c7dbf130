"""Frozen base weights kept compact decode to the very same fp32 bits, and LoRA trains on them exactly
as on the fp32 weights (accel/compact.py)."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from test_fast_lora import _lora_model  # tests/ is on sys.path (conftest.py)

import tunelab
from tunelab.accel import compact as C
from tunelab.accel.compact import BLOCK, CompactLinear, compact_frozen_linears, encode
from tunelab.config import load_config
from tunelab.models.loss import token_loss_sum
from tunelab.testing import save_tiny_model_dir, tiny_llama


def gguf_like(shape, kind: str = "q4_1", stride: int = 1, seed: int = 0) -> torch.Tensor:
    """fp32 values as GGUF's decoders make them, per block of 32: Q4_1 offset + step * code (codes 0..15,
    fp16 step and offset), Q8_0 step * code (codes -128..127); stride 2 leaves every other code unused."""
    g = torch.Generator().manual_seed(seed)
    blocks = shape[0] * shape[1] // BLOCK
    step = (torch.rand(blocks, 1, generator=g) * 0.02 + 1e-3).half().float()
    if kind == "q8_0":
        codes = torch.randint(-128, 128, (blocks, BLOCK), generator=g).float()
        return (codes * step).view(shape)
    if kind == "q8_0_ggml":  # ggml's own quantizer: d = max |x| / 127 in fp16, codes round(x / d)
        x = torch.randn(blocks, BLOCK, generator=g) * 0.05
        d = (x.abs().amax(1, keepdim=True) / 127).half().float()
        return (torch.round(x / d).clamp(-127, 127) * d).view(shape)
    offset = (-torch.rand(blocks, 1, generator=g) * 0.2).half().float()
    codes = (torch.randint(0, 16 // stride, (blocks, BLOCK), generator=g) * stride).float()
    return (codes * step + offset).view(shape)


@pytest.mark.parametrize("kind,stride", [("q4_1", 1), ("q4_1", 2), ("q8_0", 1), ("q8_0_ggml", 1)])
def test_gguf_blocks_round_trip_bit_for_bit(kind, stride):
    w = gguf_like((48, 96), kind, stride)
    c = encode(w)
    assert c is not None and c.codes.dtype == torch.uint8
    assert torch.equal(c.dense(), w)
    assert torch.equal(c.dense(scratch=True), w)
    assert c.nbytes < w.numel() * 4 / 3  # 1 byte per weight + 8 per block, against 4


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
def test_the_compiled_decode_gives_the_torch_passes_bits(kind, monkeypatch):
    """One compiled pass (compact.DECODE) decodes the 8-bit blocks to the bits of the three PyTorch passes, whole,
    by row blocks, and split among threads (a weight past compiled.SPLIT elements)."""
    if C._decoder() is None:
        pytest.skip(f"no compiled decode: {C.compiled.why_not('compact_decode')}")  # no C compiler
    w = gguf_like((640, 256), kind)  # 163,840 weights: split between two threads
    c = encode(w)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        compiled = c.dense(), c.block(100, 300).clone(), c.rows(torch.tensor([[3, 639], [0, 7]]))
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(C, "_decoder", lambda: None)
    plain = c.dense(), c.block(100, 300).clone(), c.rows(torch.tensor([[3, 639], [0, 7]]))
    assert all(torch.equal(a, b) for a, b in zip(compiled, plain)) and torch.equal(compiled[0], w)


def test_bf16_values_are_kept_as_bf16_and_other_weights_are_left_alone():
    w = torch.randn(8, 64).bfloat16().float()
    c = encode(w)
    assert c.codes.dtype == torch.bfloat16 and torch.equal(c.dense(), w)
    assert encode(torch.randn(8, 64)) is None  # arbitrary fp32: nothing smaller decodes exactly
    assert encode(gguf_like((8, 64))[:, :32].contiguous()) is not None  # whole blocks
    assert encode(gguf_like((8, 64))[:, :40].contiguous()) is None  # 40 inputs: not whole blocks


def _gguf_llama():
    model = tiny_llama()
    for i, (name, p) in enumerate(model.named_parameters()):
        if p.dim() == 2 and "layers" in name:
            p.data = gguf_like(tuple(p.shape), seed=i)
    return model


def _loss_and_grads(model, batch):
    model.zero_grad()
    torch.manual_seed(1)  # the same dropout masks on both sides
    loss, n = token_loss_sum(model, batch)
    (loss / n).backward()
    return loss.detach(), {k: p.grad for k, p in model.named_parameters() if p.requires_grad}


# dropout 0: tunelab's fused LoRA path, 1 x 12 tokens (low-rank term added) and 4 x 40 (folded);
# dropout 0.1: PEFT's own forward around the compact base layer; then both with gradient checkpointing.
@pytest.mark.parametrize(
    "dropout,shape,checkpointing",
    [(0.0, (1, 12), False), (0.0, (4, 40), False), (0.1, (4, 40), False), (0.0, (4, 40), True), (0.1, (4, 40), True)],
)
def test_lora_on_a_compact_base_gives_the_same_loss_and_gradients(dropout, shape, checkpointing):
    from tunelab.training.loop import enable_gradient_checkpointing

    plain = _lora_model(dropout, base=_gguf_llama())
    if checkpointing:
        enable_gradient_checkpointing(plain)
        plain.train()
    compact = copy.deepcopy(plain)
    n, saved = compact_frozen_linears(compact)
    assert n == 14 and saved > 0  # 2 layers x 7 linear layers
    bases = [m.base_layer for m in compact.modules() if hasattr(m, "lora_A")]
    assert bases and all(type(b) is CompactLinear for b in bases)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 320, shape, generator=g)
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    loss, grads = _loss_and_grads(plain, batch)
    loss_c, grads_c = _loss_and_grads(compact, batch)
    assert torch.equal(loss, loss_c)
    assert grads.keys() == grads_c.keys() and len(grads) == 28
    for k in grads:
        assert torch.equal(grads[k], grads_c[k]), k
    # the decoded weight is what the model had
    first = plain.get_base_model().model.layers[0].mlp.down_proj.base_layer.weight
    assert torch.equal(compact.get_base_model().model.layers[0].mlp.down_proj.base_layer.weight, first)


def test_compaction_leaves_fp32_weights_that_do_not_decode_exactly():
    model = _lora_model(0.0)  # random fp32 weights
    assert compact_frozen_linears(model) == (0, 0)
    assert not any(isinstance(m, CompactLinear) for m in model.modules())


def test_training_with_compact_base_writes_the_same_adapter(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    folder = save_tiny_model_dir(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(folder)
    for p in model.parameters():  # a bf16 checkpoint loaded as fp32
        p.data = p.data.bfloat16().float()
    model.save_pretrained(folder)
    rows = [{"instruction": f"Say {i}.", "input": "", "output": f"It is {i}."} for i in range(16)]
    (tmp_path / "train.json").write_text(json.dumps(rows))

    def run(name, compact):
        cfg = load_config(
            {
                "output_dir": str(tmp_path / name),
                "model": {"name": folder, "dtype": "float32"},
                "data": {"train": str(tmp_path / "train.json"), "val_fraction": 0.0, "max_length": 64},
                "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
                "training": {
                    "max_steps": 3,
                    "batch_size": 4,
                    "lr": 1e-2,
                    "progress": False,
                    "tensorboard": False,
                    "device": "cpu",
                    "compact_frozen": compact,
                },
            }
        )
        result = tunelab.train(cfg)
        lines = [json.loads(ln) for ln in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in lines if "loss" in r]
        return losses, load_file(str(result.final_dir / "adapter_model.safetensors"))

    compact_losses, compact_adapter = run("compact", True)
    assert "15 frozen weights kept compact" in capsys.readouterr().err  # 14 linears and the token table
    partial_losses, partial_adapter = run("partial", ["down_proj"])
    assert "2 frozen weights kept compact" in capsys.readouterr().err  # the two layers' down_proj
    plain_losses, plain_adapter = run("plain", False)
    assert "kept compact" not in capsys.readouterr().err
    assert len(plain_losses) == 3 and compact_losses == plain_losses == partial_losses
    assert compact_adapter.keys() == plain_adapter.keys() == partial_adapter.keys()
    for k in plain_adapter:
        assert torch.equal(compact_adapter[k], plain_adapter[k]), k
        assert torch.equal(partial_adapter[k], plain_adapter[k]), k


def test_expand_gives_back_the_dense_frozen_linears():
    from tunelab.accel.compact import expand_compact

    plain = _lora_model(0.0, base=_gguf_llama())
    model = copy.deepcopy(plain)
    compact_frozen_linears(model)
    assert expand_compact(model) == 14
    for (name, m), (_, m0) in zip(model.named_modules(), plain.named_modules()):
        if hasattr(m, "lora_A"):
            assert type(m.base_layer) is torch.nn.Linear and not m.base_layer.weight.requires_grad, name
            assert torch.equal(m.base_layer.weight, m0.base_layer.weight), name
    ids = torch.randint(3, 320, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_a_compacted_model_moves_with_to_and_refuses_a_dtype_cast():
    model = _lora_model(0.0, base=_gguf_llama())
    compact_frozen_linears(model)
    ids = torch.randint(3, 320, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        model.to("cpu")
        assert torch.equal(model(input_ids=ids).logits, before)
    with pytest.raises(TypeError, match="fp32"):
        model.half()


def _gguf_tied_llama():
    """The tiny Llama with GGUF-like layers and a Q8_0-like token table shared with the head (SmolLM2's shape)."""
    model = _gguf_llama()
    emb = model.get_input_embeddings()
    emb.weight.data = gguf_like(tuple(emb.weight.shape), "q8_0", seed=99)
    model.get_output_embeddings().weight = emb.weight
    return model


@pytest.mark.parametrize("rows_at_once", [4096, 64])
def test_a_tied_token_table_is_kept_compact_and_the_head_reads_it_block_by_block(monkeypatch, rows_at_once):
    from tunelab.models.loss import row_loss_sums

    monkeypatch.setattr(C, "ROWS_AT_ONCE", rows_at_once)  # 64: the head's 320 rows in 5 blocks
    plain = _lora_model(0.0, base=_gguf_tied_llama())
    model = copy.deepcopy(plain)
    n, saved = compact_frozen_linears(model)
    inner = model.get_base_model()
    assert type(inner.get_input_embeddings()) is C.CompactEmbedding
    assert type(inner.get_output_embeddings()) is CompactLinear
    assert inner.get_output_embeddings().compact is inner.get_input_embeddings().compact  # one table, still tied
    table = plain.get_input_embeddings().weight
    assert n == 15 and saved > compact_frozen_linears(_lora_model(0.0, base=_gguf_llama()))[1] + table.numel() * 2
    ids = torch.randint(3, 320, (3, 20), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    loss, grads = _loss_and_grads(plain, batch)  # the fused head + cross-entropy
    loss_c, grads_c = _loss_and_grads(model, batch)
    with torch.no_grad():  # the head as a module: evaluation, DPO's log-probs
        rows, rows_c = row_loss_sums(plain, batch), row_loss_sums(model, batch)
    exact = rows_at_once >= 320  # one block: the same products; several: sums in another order
    check = torch.equal if exact else lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert check(loss, loss_c) and check(rows, rows_c)
    for k in grads:
        assert check(grads[k], grads_c[k]), k
    # expanded: an nn.Embedding and an nn.Linear sharing one dense tensor again, the same logits
    C.expand_compact(model)
    emb, head = inner.get_input_embeddings(), inner.get_output_embeddings()
    assert type(emb) is torch.nn.Embedding and type(head) is torch.nn.Linear and head.weight is emb.weight
    assert torch.equal(emb.weight, table) and not emb.weight.requires_grad
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_a_list_compacts_only_the_modules_it_names():
    plain = _lora_model(0.0, base=_gguf_tied_llama())
    bases = lambda m: {n: type(x.base_layer) for n, x in m.named_modules() if hasattr(x, "base_layer")}  # noqa: E731
    table_only = copy.deepcopy(plain)
    n, saved = compact_frozen_linears(table_only, ["embed_tokens"])
    inner = table_only.get_base_model()
    assert n == 1 and saved > 0 and set(bases(table_only).values()) == {torch.nn.Linear}
    assert type(inner.get_input_embeddings()) is C.CompactEmbedding
    assert inner.get_output_embeddings().compact is inner.get_input_embeddings().compact
    mlp = copy.deepcopy(plain)
    n, _ = compact_frozen_linears(mlp, ["down_proj", "up_proj"])
    compacted = {name.rsplit(".", 1)[-1] for name, kind in bases(mlp).items() if kind is CompactLinear}
    assert n == 4 and compacted == {"down_proj", "up_proj"}  # two layers
    assert type(mlp.get_base_model().get_input_embeddings()) is torch.nn.Embedding
    ids = torch.randint(3, 320, (3, 20), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    loss, grads = _loss_and_grads(plain, batch)
    for model in (table_only, mlp):
        loss_c, grads_c = _loss_and_grads(model, batch)
        assert torch.allclose(loss, loss_c, rtol=1e-6)
        for k in grads:
            assert torch.allclose(grads[k], grads_c[k], rtol=1e-5, atol=1e-7), k


def test_a_name_no_module_has_is_refused_with_the_names_there_are():
    model = _lora_model(0.0, base=_gguf_tied_llama())
    with pytest.raises(ValueError, match=r"no module named 'mpl'.*down_proj.*mlp"):
        compact_frozen_linears(model, ["mpl"])
    assert not any(isinstance(m, CompactLinear) for m in model.modules())


def test_compact_frozen_takes_a_list_of_module_names():
    cfg = load_config({"model": {"name": "x"}, "data": {"train": "t.json"}, "training": {"compact_frozen": ["mlp"]}})
    assert cfg.training.compact_frozen == ["mlp"]
    cfg = load_config(
        {"model": {"name": "x"}, "data": {"train": "t.json"}}, ["training.compact_frozen=[embed_tokens,down_proj]"]
    )
    assert cfg.training.compact_frozen == ["embed_tokens", "down_proj"]


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_a_soft_prompts_frozen_body_is_kept_compact_and_trains_as_dense(method):
    """Prompt and prefix tuning: every frozen linear of the body compact (not the head, not the token table,
    which PEFT reads through a reference of its own), the MLPs on fast LoRA's function (it decodes where used);
    the same loss and virtual-token gradients as the dense model, and `expand_compact` gives the body back."""
    from tunelab.accel import fast_lora
    from tunelab.accel.compact import expand_compact
    from tunelab.methods import get
    from tunelab.models.loading import soft_prompt

    torch.manual_seed(0)
    mod = get(method)
    dense = mod.apply(_gguf_llama(), mod.Config(num_virtual_tokens=4))
    model = copy.deepcopy(dense)
    assert soft_prompt(model) == method.upper() + "_TUNING" and soft_prompt(tiny_llama()) is None
    fast_lora.enable(model)  # as accel's prepare does for a soft prompt whose body it compacts
    n, saved = compact_frozen_linears(model)
    assert n == 14 and saved > 0  # 2 blocks x (q, k, v, o, gate, up, down)
    body = model.get_base_model()
    assert type(body.lm_head) is torch.nn.Linear and type(body.model.embed_tokens) is torch.nn.Embedding
    mlps = [layer.mlp for layer in body.model.layers]
    assert all(type(getattr(m, k)) is CompactLinear for m in mlps for k in ("gate_proj", "up_proj", "down_proj"))
    ids = torch.randint(3, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    loss, grads = _loss_and_grads(model, batch)
    loss_dense, grads_dense = _loss_and_grads(dense, batch)
    torch.testing.assert_close(loss, loss_dense, rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads_dense.keys() and len(grads) > 0
    for k in grads:
        torch.testing.assert_close(grads[k], grads_dense[k], rtol=1e-4, atol=1e-6)
    assert expand_compact(model) == 14
    assert not any(type(m) is CompactLinear for m in model.modules())
