"""Loading a model one tensor at a time, each layer put into its stored form as it arrives.

`from_pretrained` gives a whole model in its compute dtype; a method that stores its frozen layers in
another form (qlora: 4-bit NF4) then converts them, so the load peaks at the whole fp32 model plus the
converted copy: 7 GB and more for a 1.7B model before the first step. Here the model is built on the
meta device (no memory), the safetensors files are read memory-mapped (`safe_open`, one mapping per
tensor), and each tensor is read, cast to the compute dtype, moved to the device and put in its place; a layer named in the
method's plan is converted as soon as its last tensor is in, so at most one fp32 layer exists besides
the converted model and the layers that stay as they are (embeddings, norms).

Why by hand: transformers' own quantised loading (`quantization_config=BitsAndBytesConfig(...)`) decides
itself which layers to quantise and how, and on a CPU is not the path tunelab's QLoRA trains, tests and
reloads; this gives the very modules `quantize_linear_layers_` makes from a loaded model (tested: the same
logits), from any causal LM whose checkpoint keys are its own parameter names. A checkpoint that needs
transformers' key renaming (older formats, fused layouts) is loaded the ordinary way: `load_streamed`
returns None and says why.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

# plan(model on the meta device) -> {module name: convert(module with real weights) -> its replacement}
Plan = Callable[[object], dict[str, Callable]]


def checkpoint_files(folder: str | Path) -> list[Path] | None:
    """The safetensors files of a model folder (one file or an index's shards), or None where there are none."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else None


def load_streamed(folder: str, auto_class, dtype, device, plan: Plan, trust_remote_code: bool = False,
                  config=None, **kw):  # fmt: skip
    """The model in `folder` (a local Hugging Face folder), built empty, filled tensor by tensor, the layers
    `plan` names converted as they complete; eval mode, on `device`. (model, None), or (None, why) when this
    folder cannot be loaded so (no safetensors files, keys other than the model's parameter names)."""
    import torch
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, GenerationConfig

    files = checkpoint_files(folder)
    if not files:
        return None, "no safetensors files"
    if config is None:  # else the folder's, already adjusted (a RoPE scaling)
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    # buffers (rotary frequencies) stay real: the checkpoint does not hold the non-persistent ones
    with init_empty_weights(include_buffers=False):
        model = auto_class.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code, **kw)
    model.tie_weights()  # tied names share one parameter from here on (from_pretrained ties after loading)
    names = _parameter_names(model)
    keys = set()
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            keys |= set(st.keys())
    unknown = sorted(keys - set(names))
    missing = sorted({k for k, group in names.items() if not keys & group})
    if unknown or missing:
        return None, f"checkpoint keys other than the model's ({(unknown or missing)[:3]}...)"
    todo = plan(model)
    waiting = {m: {n for n, _ in model.get_submodule(m).named_parameters(remove_duplicate=False)} for m in todo}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            file_keys = list(st.keys())
        for key in file_keys:
            # a mapping per tensor: pages read through one long-lived mapping stay in this process's resident
            # set (RssFile) until it closes, the whole file by the end (3.4 GB for a 1.7B bf16 checkpoint)
            with safe_open(str(f), framework="pt") as st:
                tensor = st.get_tensor(key)
            tensor = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
            _set_parameter(model, names[key], tensor)
            del tensor
            owner = key.rpartition(".")[0]
            if owner in waiting:
                waiting[owner].discard(key.rpartition(".")[2])
                if not waiting[owner]:
                    parent, _, child = owner.rpartition(".")
                    setattr(
                        model.get_submodule(parent) if parent else model, child, todo[owner](model.get_submodule(owner))
                    )
                    del waiting[owner]
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left or waiting:
        raise RuntimeError(f"{folder}: tensors never filled in: {(left or list(waiting))[:5]}")
    if (Path(folder) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    for b_name, buf in list(model.named_buffers()):
        if buf.device != torch.device(device):
            owner, _, attr = b_name.rpartition(".")
            (model.get_submodule(owner) if owner else model)._buffers[attr] = buf.to(device)
    return model.eval(), None


def _parameter_names(model) -> dict[str, set[str]]:
    """Every parameter name -> the names of that parameter (more than one when tied: lm_head / embed_tokens)."""
    by_id: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), set()).add(name)
    return {name: group for group in by_id.values() for name in group}


def _set_parameter(model, names: set[str], tensor) -> None:
    """One Parameter holding `tensor`, put under each of its names (tied weights stay one parameter)."""
    import torch

    param = None
    for name in sorted(names):
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        if param is None:
            param = torch.nn.Parameter(tensor, requires_grad=module._parameters[attr].requires_grad)
        module._parameters[attr] = param
