"""QLoRA (Dettmers et al. 2023): LoRA on top of a frozen base whose linear weights are stored in 4-bit NF4.

The method interface hands `apply` an already-loaded full-precision model, so `apply` re-quantizes it
in place: every `nn.Linear` of the transformer body (not the LM head, the embeddings or a task head
such as BERT's `classifier`) becomes a `bitsandbytes.nn.Linear4bit` holding NF4 codes with double
quantization (the per-block absmax constants are themselves 8-bit quantized). Then LoRA (the same
fields as `method: lora`) goes on top through PEFT, which wraps `Linear4bit` layers with its 4-bit
LoRA layer. Only A, B (and a new task head) train; the 4-bit codes never change.

Compute dtype (`compute_dtype: auto`): bfloat16 on CUDA; on a CPU the model's dtype, which the training loop
makes bf16 (bf16 passes, fp32 master weights) where the CPU has native bf16 and fp32 elsewhere; the weights
are dequantized block by block to that dtype inside each matmul. On the 1.7B config with AMX, bf16 ran
3.1x fp32's tokens/s at 0.79x its peak memory; with tunelab/accel's bf16 passes (no autocast: fast LoRA over the
weights dequantized where used, its fused SwiGLU MLP, the fused head) 0.6x LoRA's peak at 0.84x its tokens/s
(docs/performance.md, scale curves). Without native bf16 a 4-bit layer is *slower* per step than a plain one on
CPU: QLoRA buys memory, not speed.

Shapes: bitsandbytes (>= 0.50) quantizes the flattened weight in blocks of 64 values and pads the
last block, so any layer shape works, on CPU (forward and backward) and on CUDA.

Saving: the LoRA adapter in PEFT format (`adapter_config.json` + `adapter_model.safetensors`) and
`tunelab_qlora.json` with the quantization settings and the list of quantized modules. The 4-bit
base is *not* saved: NF4 quantization is deterministic, so `load` re-quantizes the fresh
full-precision base the same way and gets bit-identical codes, hence the same logits.

Merging: `merge` dequantizes every `Linear4bit` to a plain `nn.Linear` (the weights the adapter was
trained against, W_deq = dequant(NF4(W))) and adds the LoRA update there, giving a plain transformers
model whose logits match the trained QLoRA model up to float rounding. Merging the adapter into the
*original* full-precision W instead (what one gets by loading the adapter onto the unquantized
base, e.g. `PeftModel.from_pretrained(fp32_base, adapter).merge_and_unload()`) is a different
model: the adapter learned to correct W_deq, not W, so the result differs by the quantization error
W - W_deq in every layer (PEFT issues #1080, #2321). Both are legitimate; only the first reproduces
what was trained and evaluated. (PEFT's own `merge_and_unload` on a 4-bit model re-quantizes the
merged weight, which adds a second rounding; `merge` here avoids that by leaving fp weights.)

Optimizer: on CUDA the loop uses bitsandbytes' paged 8-bit AdamW (`optimizer` hook below), as in
the paper; on CPU the standard AdamW (paged/8-bit optimizer states only pay off for GPU memory).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from tunelab.methods import lora
from tunelab.methods.base import Capabilities, MethodError, adamw_groups, freeze_all, wrap_peft
from tunelab.models.loading import TASK_HEADS, unwrap

if TYPE_CHECKING:  # torch is imported where a model is changed: the config reads `Config` without it
    import torch

logger = logging.getLogger(__name__)

DESCRIPTION = "LoRA matrices on a base whose linear weights are frozen in 4-bit NF4 (bitsandbytes)"
CAPABILITIES = Capabilities(reference="adapter_off", mergeable=True, quantized_base=True, new_tokens=True)
INFERENCE_COST = (
    "4-bit weights are dequantized inside every matmul (slower than fp on CPU) plus LoRA's two small matmuls; "
    "none once merged into the dequantized weights"
)

META_FILE = "tunelab_qlora.json"
BLOCKSIZE = 64  # bitsandbytes' default NF4 block size (QLoRA paper: 64 weights per absmax constant)


class Config(lora.Config):
    name: Literal["qlora"] = "qlora"  # type: ignore[assignment]
    quant_type: Literal["nf4", "fp4"] = Field(
        "nf4", description="4-bit data type: nf4 (NormalFloat, the paper's) or fp4."
    )
    double_quant: bool = Field(
        True, description="Double quantization: store the per-block absmax constants in 8 bit (~0.37 bit/param saved)."
    )
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Dtype of the dequantized matmuls. auto = bfloat16 on CUDA; on a CPU the model's dtype (bfloat16 "
        "where the CPU has native bf16 and model.dtype is auto or bfloat16, else float32).",
    )
    skip_modules: list[str] = Field(
        default_factory=list,
        description="Regexes (re.search) on module names of linear layers to keep in full precision "
        "(the output head, task heads and the model's _keep_in_fp32_modules are always kept).",
    )

    @model_validator(mode="after")
    def _no_pissa(self):
        if self.init == "pissa":
            raise ValueError(
                "method qlora: init: pissa rewrites the base weights (W - s B A), which are 4-bit here; PiSSA "
                "trains with method: lora (a bf16 or fp32 base)"
            )
        return self


# ------------------------------------------------------------------------------------ quantization
def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as e:  # pragma: no cover - bitsandbytes is a dependency
        raise ImportError("method qlora needs bitsandbytes >= 0.50: pip install 'bitsandbytes>=0.50'") from e
    return bnb


def _resolve_compute_dtype(setting: str, device: torch.device, model_dtype=None) -> torch.dtype:
    """auto: bf16 on CUDA; elsewhere the model's own dtype when it is bf16 (a run the loop trains in bf16 passes,
    `model.dtype` bfloat16 or auto on a CPU with native bf16), else fp32. bf16 weights dequantized into an fp32
    matmul would cast every activation up and back."""
    import torch

    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" or model_dtype == torch.bfloat16 else torch.float32
    return getattr(torch, setting)


def _float_dtype(model):
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def _head_names(model) -> set[str]:
    """Module names of the output head and task heads, which stay in full precision."""
    heads = set()
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if (out is not None and module is out) or name.split(".")[-1] in TASK_HEADS or name.split(".")[0] in TASK_HEADS:
            heads.add(name)
    return heads


def quantize_linear_layers_(
    model,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    skip_modules: list[str] | tuple[str, ...] = (),
) -> dict:
    """Replace the body's `nn.Linear` layers of a loaded model by `bnb.nn.Linear4bit` in place.

    `compute_dtype` None: float32. Returns {"quantized": [names], "skipped": {name: reason}}; a layer already
    4-bit (loaded straight into 4-bit: `load_plan`) counts as quantized. Deterministic: the same weights give
    the same 4-bit codes, which is what lets `load` rebuild a saved run from the fp base.
    """
    import torch

    bnb = _bnb()
    compute_dtype = torch.float32 if compute_dtype is None else compute_dtype
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("qlora quantizes real weights: the model is on the meta device")
    chosen, skipped = linears_to_quantize(model, skip_modules)
    quantized = []
    for name, module in list(model.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            quantized.append(name)
        elif name in chosen:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, _to_linear4bit(bnb, module, quant_type, double_quant, compute_dtype))
            quantized.append(name)
    if skipped:
        logger.info("qlora: kept %d linear layers in full precision: %s", len(skipped), skipped)
    return {"quantized": quantized, "skipped": skipped}


def linears_to_quantize(model, skip_modules=()) -> tuple[list[str], dict]:
    """The names of the body's plain `nn.Linear` layers that get 4-bit, and {name: reason} for those kept.
    Reads only the model's structure: the same answer on the meta device (`load_plan`) as loaded."""
    import torch

    heads = _head_names(model)
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or []) | set(
        getattr(model, "_keep_in_fp32_modules_strict", None) or []
    )
    patterns = [re.compile(p) for p in skip_modules]
    chosen, skipped = [], {}
    for name, module in model.named_modules():
        if type(module) is not torch.nn.Linear:
            continue
        if name in heads:
            skipped[name] = "output or task head"
        elif keep & set(name.split(".")):
            # e.g. T5's `wo`: its forward casts the input to wo.weight.dtype, which breaks on uint8 codes
            skipped[name] = "kept in full precision by the model class (_keep_in_fp32_modules)"
        elif any(p.search(name) for p in patterns):
            skipped[name] = "skip_modules"
        else:
            chosen.append(name)
    return chosen, skipped


def load_plan(cfg: Config, device):
    """Method hook: the base read tensor by tensor and each body linear made 4-bit as soon as its weights are
    in (models/streaming.py), the very layers `apply` would make from the loaded model (tested: same logits).
    The load then peaks near the 4-bit model, not at the fp32 one (docs/performance.md, big models)."""
    import torch

    bnb = _bnb()

    def plan(model) -> dict:  # the model on the meta device, in the dtype it loads in
        dtype = _resolve_compute_dtype(cfg.compute_dtype, torch.device(device), _float_dtype(model))
        chosen, _ = linears_to_quantize(model, cfg.skip_modules)
        convert = lambda linear: _to_linear4bit(bnb, linear, cfg.quant_type, cfg.double_quant, dtype)  # noqa: E731
        return dict.fromkeys(chosen, convert)

    return plan


def _to_linear4bit(bnb, linear: torch.nn.Linear, quant_type, double_quant, compute_dtype):
    import torch

    device = linear.weight.device
    q = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=double_quant,
        quant_type=quant_type,
        device="meta",
    )
    q.weight = bnb.nn.Params4bit(
        linear.weight.detach().clone(),
        requires_grad=False,
        blocksize=BLOCKSIZE,
        compress_statistics=double_quant,
        quant_type=quant_type,
        module=q,
    ).to(device)  # moving a not-yet-quantized Params4bit to a device quantizes it
    if linear.bias is not None:
        q.bias = torch.nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    # bitsandbytes repacks the weight into a CPU-specific layout on the first no-grad forward on CPUs
    # with AVX512-BF16; keep the standard layout so train and eval use one kernel and
    # dequantize_4bit / the memory report read the weights as stored.
    q.support_avx512bf16_for_cpu = False
    q.train(linear.training)
    return q


def _linear4bit_modules(model):
    bnb = _bnb()
    return [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]


def quantized_memory_report(model) -> dict:
    """Bytes of the quantized linear layers' weights before (original dtype) and after (4-bit).

    `after` counts the packed 4-bit codes, the per-block absmax constants (8-bit plus the nested
    fp32 constants and offset with double quantization, else fp32) and the codebooks (16 NF4 values
    and, nested, 256 8-bit code values per layer: ~1 KB a layer, which matters only for tiny layers).
    Linear layers left in full precision (heads) are reported separately.
    """
    import torch

    layers = [m for _, m in _linear4bit_modules(model)]
    before = after = weights = 0
    codebooks: dict[int, int] = {}  # by storage, so a codebook shared between layers counts once

    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    for m in layers:
        qs = m.weight.quant_state
        weights += qs.shape.numel()
        before += qs.shape.numel() * qs.dtype.itemsize
        after += nbytes(m.weight) + nbytes(qs.absmax)
        codebooks[qs.code.data_ptr()] = nbytes(qs.code)
        if qs.nested:
            after += nbytes(qs.state2.absmax) + nbytes(qs.offset)
            codebooks[qs.state2.code.data_ptr()] = nbytes(qs.state2.code)
    codebook_bytes = sum(codebooks.values())
    after += codebook_bytes
    return {
        "quantized_layers": len(layers),
        "linear_bytes_before": before,
        "linear_bytes_after": after,
        "codebook_bytes": codebook_bytes,
        "ratio": before / after if after else float("nan"),
        "bits_per_weight": 8 * after / max(weights, 1),
        "full_precision_linear_bytes": sum(nbytes(m.weight) for m in model.modules() if type(m) is torch.nn.Linear),
    }


# --------------------------------------------------------------------------------- method contract
def _refuse_nothing_to_quantize(model) -> None:
    conv = [name for name, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    if conv:  # GPT-2's family keeps its projections as transformers' Conv1D, which bitsandbytes cannot take
        raise MethodError(
            f"qlora: this model's projections are Conv1D layers ({conv[0]}, ... {len(conv)} in all: GPT-2 style), "
            "and bitsandbytes quantizes nn.Linear layers only; use method: lora (it adapts Conv1D layers)"
        )
    raise MethodError("qlora: no linear layer was quantized (all skipped)")


def check_model(cfg: Config, model_cfg) -> str | None:
    """Before the model loads: a model whose body has no nn.Linear at all (GPT-2's Conv1D) is refused now."""
    import torch

    from tunelab.models.loading import skeleton

    model = skeleton(model_cfg)  # the bare transformer: its names lack the task model's prefix, so skip_modules
    if model is not None and not any(type(m) is torch.nn.Linear for m in model.modules()):  # are read at apply
        _refuse_nothing_to_quantize(model)
    return lora.check_model(cfg, model_cfg)  # start_from's adapter


def _prepare(model, cfg: Config, device: torch.device) -> dict:
    """The CPU-sensible part of `peft.prepare_model_for_kbit_training`: quantize, freeze the base,
    mark the model as 4-bit so PEFT wraps Linear4bit with its 4-bit LoRA layer. No fp32 up-cast of
    the remaining weights (already fp32 on CPU; on CUDA the loop's bf16 autocast handles norms), and
    no gradient checkpointing (the loop does not use it)."""
    dtype = _resolve_compute_dtype(cfg.compute_dtype, device, _float_dtype(model))
    info = quantize_linear_layers_(model, cfg.quant_type, cfg.double_quant, dtype, cfg.skip_modules)
    info["compute_dtype"] = dtype
    if not info["quantized"]:
        _refuse_nothing_to_quantize(model)
    freeze_all(model)
    model.is_loaded_in_4bit = True  # what PEFT's dispatch checks to use its bnb 4-bit LoRA layer
    return info


def _meta(cfg: Config, info: dict) -> dict:
    return {
        "method_config": cfg.model_dump(mode="json"),
        "quantization": {
            "library": "bitsandbytes",
            "quant_type": cfg.quant_type,
            "double_quant": cfg.double_quant,
            "blocksize": BLOCKSIZE,
            "compute_dtype": str(info["compute_dtype"]).removeprefix("torch."),
        },
        "quantized_modules": info["quantized"],
        "full_precision_modules": info["skipped"],
    }


def apply(model, cfg: Config):
    device = next(model.parameters()).device
    info = _prepare(model, cfg, device)
    if cfg.start_from is not None:
        peft_model = lora.continued(model, cfg)
    else:
        peft_model = wrap_peft(model, lora.peft_config(cfg, model))
        if cfg.use_dora:
            lora.dora_magnitudes_in_fp32(peft_model)
    peft_model.get_base_model()._tunelab_qlora = _meta(cfg, info)
    return peft_model


def save(model, out_dir) -> None:
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    (out / META_FILE).write_text(json.dumps(model.get_base_model()._tunelab_qlora, indent=2))


def load(base_model, out_dir):
    from peft import PeftModel

    meta = json.loads((Path(out_dir) / META_FILE).read_text())
    cfg = Config(**meta["method_config"])
    device = next(base_model.parameters()).device
    info = _prepare(base_model, cfg, device)
    if info["quantized"] != meta["quantized_modules"]:
        raise MethodError(f"{out_dir}: the base model quantizes differently from the one trained (other architecture?)")
    model = PeftModel.from_pretrained(base_model, out_dir)
    model.get_base_model()._tunelab_qlora = _meta(cfg, info)
    return model


def dequantize_linear4bit(module) -> torch.nn.Linear:
    """A plain `nn.Linear` holding dequant(NF4(W)) in the dtype W had before quantization (the model's)."""
    import torch

    bnb = _bnb()
    w = module.weight
    dtype = w.quant_state.dtype  # the weight's own dtype before quantization: the rest of the model has it too
    weight = bnb.functional.dequantize_4bit(w.data, w.quant_state).to(dtype)
    lin = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    lin.weight = torch.nn.Parameter(weight, requires_grad=False)
    if module.bias is not None:
        lin.bias = torch.nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
    return lin


def merge(model):
    """Dequantize every Linear4bit and fold LoRA into it: a plain transformers model (see module doc).

    Takes the PEFT-wrapped QLoRA model (`apply` / `load`) and returns the base model class with
    plain `nn.Linear` layers W_deq + (alpha / r) B A (with DoRA, that rescaled by m / its row norms), whose logits
    match the QLoRA model's.
    """
    import torch
    from peft.tuners.lora import LoraLayer

    bnb = _bnb()
    inner = unwrap(model)
    # decided before any layer is replaced: a LoRA layer's own Linear4bit (its `base_layer`) is folded with
    # it, never dequantised a second time and hung under the new nn.Linear (which would add stray
    # `*.base_layer.weight` entries to the state dict that the exporters write)
    lora_names = [n for n, m in inner.named_modules() if isinstance(m, LoraLayer)]
    with torch.no_grad():
        for name, module in list(inner.named_modules()):
            if isinstance(module, LoraLayer):
                base = module.get_base_layer()
                if isinstance(base, bnb.nn.Linear4bit):
                    lin = dequantize_linear4bit(base)
                else:
                    lin = base
                for adapter in module.active_adapters:
                    if adapter not in module.lora_A:
                        continue
                    delta = module.get_delta_weight(adapter).to(lin.weight.dtype)
                    if module.use_dora.get(adapter):  # DoRA: m * (W + dW) / ||W + dW||, as PEFT's merge
                        magnitude = module.lora_magnitude_vector[adapter]
                        norm = magnitude.get_weight_norm(lin.weight, delta, scaling=1)
                        lin.weight.copy_((magnitude.weight / norm).view(-1, 1) * (lin.weight + delta))
                    else:
                        lin.weight += delta
                _set_module(inner, name, lin)
            elif isinstance(module, bnb.nn.Linear4bit) and not any(name.startswith(n + ".") for n in lora_names):
                _set_module(inner, name, dequantize_linear4bit(module))
    # PEFT wraps a new task head in ModulesToSaveWrapper: keep its trained copy
    from peft.utils import ModulesToSaveWrapper

    for name, module in list(inner.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            _set_module(inner, name, module.modules_to_save[module.active_adapter])
    for attr in ("is_loaded_in_4bit", "_tunelab_qlora", "peft_config"):  # PEFT's mark: export refuses models with it
        if attr in inner.__dict__:
            delattr(inner, attr)
    return inner


def _set_module(root, name: str, new) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


lr_scales = lora.lr_scales  # LoRA+: the same fields as lora's


def optimizer(params, tcfg, lr_scales: dict | None = None):
    """Optional method hook: bitsandbytes' PagedAdamW8bit on CUDA (the paper's paged optimizer: 8-bit
    states, paged to CPU RAM under memory pressure); None on CPU, where the loop's AdamW is used.
    Same parameter groups as the loop's AdamW (no weight decay on 1-D tensors; LoRA+'s B at its own rate)."""
    params = list(params)
    if not params or params[0].device.type != "cuda":
        return None
    bnb = _bnb()
    groups = adamw_groups(params, tcfg.weight_decay, tcfg.lr, lr_scales)
    return bnb.optim.PagedAdamW8bit(groups, lr=tcfg.lr, betas=tuple(tcfg.betas))
