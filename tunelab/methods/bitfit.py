"""BitFit (Ben Zaken et al. 2022): train only the bias terms, b <- b + Δb; every weight matrix stays frozen.

All parameters named `*.bias` train: linear-layer biases and LayerNorm shifts (β), as in the paper.

Bias-free models. Llama (and so SmolLM2, the default model) and T5 have no bias terms at all
(`attention_bias=False`, `mlp_bias=False`; T5's linear layers are bias-free and its RMS norms have
no shift), so plain BitFit would train nothing. With `add_missing_biases: true` (default) every
bias-free `nn.Linear` of the transformer body (not the output head / task head) gets a
zero-initialised bias, as the BitFit-for-LLaMA follow-ups do: y = W x + b with b = 0, so step 0 is
the base model exactly, and the biases then train.

Task head. A freshly added, randomly initialised task head (BERT's `classifier`, a Llama `score`)
must train or the model cannot fit the task: `train_head: null` (default) trains such a head fully
when the model has one (the paper does the same for GLUE); `true` requires one; `false` trains its
bias only. The LM head of a causal / seq2seq LM is never trained (it is tied to the embeddings).

Saving (one format for every architecture): `bitfit.safetensors` holds the trained tensors (the
biases and, when it trained, the head) and `bitfit.json` which modules got added biases; `load`
re-creates the zero biases on the fresh base and loads the tensors. For a 135M model this is
~0.6 MB instead of a 540 MB model copy.

Merging: the biases already live inside the linear layers, so there is no extra inference cost and
`merge` returns the plain transformers model. For Llama-style configs whose `attention_bias` /
`mlp_bias` flags describe exactly the added biases, `merge` switches those flags on, so the merged
model also round-trips through `save_pretrained` / `from_pretrained`. For architectures that cannot
express the added biases in their config (T5 has no such flag), the merged model is correct in
memory but `save_pretrained` -> `from_pretrained` would drop the added biases: `merge` warns (and
`tunelab export` refuses: export/hf.py `beyond_config`); keep
the bitfit folder (loaded with tunelab) as the artifact there. Models that already have biases
(BERT) need nothing: the merged model is simply the trained model.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Literal

from pydantic import Field

from tunelab.methods.base import Capabilities, MethodConfig, MethodError, freeze_all
from tunelab.models.loading import TASK_HEADS

logger = logging.getLogger(__name__)

DESCRIPTION = "bias terms only (zero biases are added to bias-free linear layers, e.g. Llama's)"
CAPABILITIES = Capabilities(mergeable=True)
INFERENCE_COST = "none (the biases are part of the linear layers)"

WEIGHTS_FILE = "bitfit.safetensors"
META_FILE = "bitfit.json"
# config flags that switch on biases in architectures that have them optional (Llama, Mistral, Qwen2 ...)
_BIAS_FLAGS = ("attention_bias", "mlp_bias")


class Config(MethodConfig):
    name: Literal["bitfit"] = "bitfit"
    add_missing_biases: bool = Field(
        True,
        description="Give bias-free linear layers (Llama, SmolLM2, T5) a zero-initialised bias that trains; "
        "step 0 equals the base. false: train only biases the model already has.",
    )
    train_head: bool | None = Field(
        None,
        description="Train a task head (BERT's classifier) fully. null: yes if the model has a freshly added "
        "task head; false: only its bias. The LM head is never trained.",
    )


def _head_modules(model) -> list[str]:
    return [n for n, _ in model.named_modules() if n and n.split(".")[0] in TASK_HEADS and "." not in n]


def _excluded_linears(model) -> set[str]:
    """Linear layers that never get an added bias: the output embeddings and task heads."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    heads = set(_head_modules(model))
    return {n for n, m in model.named_modules() if (out is not None and m is out) or n.split(".")[0] in heads}


def add_zero_biases_(model, names: list[str] | None = None) -> list[str]:
    """Give bias-free `nn.Linear` layers a zero bias (all of the body's, or exactly `names`)."""
    import torch

    excluded = _excluded_linears(model)
    added = []
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear) or m.bias is not None:
            continue
        if (names is None and name not in excluded) or (names is not None and name in names):
            m.bias = torch.nn.Parameter(torch.zeros(m.out_features, dtype=m.weight.dtype, device=m.weight.device))
            added.append(name)
    if names is not None and sorted(added) != sorted(names):
        raise MethodError(
            f"bitfit: could not add biases to {sorted(set(names) - set(added))[:3]} (other architecture?)"
        )
    return added


def _train_head(model, cfg: Config) -> bool:
    heads = _head_modules(model)
    if cfg.train_head and not heads:
        raise MethodError(f"bitfit: train_head is true but {type(model).__name__} has no task head ({TASK_HEADS})")
    return bool(heads) if cfg.train_head is None else cfg.train_head


def _set_trainable(model, train_head: bool) -> None:
    freeze_all(model)
    heads = tuple(_head_modules(model)) if train_head else ()
    for name, p in model.named_parameters():
        if name.endswith(".bias") or name == "bias" or (heads and name.split(".")[0] in heads):
            p.requires_grad_(True)


def apply(model, cfg: Config):
    added = add_zero_biases_(model) if cfg.add_missing_biases else []
    train_head = _train_head(model, cfg)
    _set_trainable(model, train_head)
    if not any(p.requires_grad for p in model.parameters()):
        raise MethodError(
            f"bitfit: {type(model).__name__} has no bias terms to train; set method.add_missing_biases: true"
        )
    if added:
        logger.info("bitfit: added zero biases to %d linear layers", len(added))
    model._tunelab_bitfit = {"added_biases": added, "train_head": train_head}
    return model


def save(model, out_dir) -> None:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(model._tunelab_bitfit)
    tensors = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    save_file(tensors, out / WEIGHTS_FILE)
    meta.update(model_class=type(model).__name__, trained=sorted(tensors))
    (out / META_FILE).write_text(json.dumps(meta, indent=2))


def load(base_model, out_dir):
    import torch
    from safetensors.torch import load_file

    out = Path(out_dir)
    meta = json.loads((out / META_FILE).read_text())
    model = base_model
    add_zero_biases_(model, meta["added_biases"])
    _set_trainable(model, meta["train_head"])
    params = dict(model.named_parameters())
    tensors = load_file(out / WEIGHTS_FILE)
    missing = [k for k in tensors if k not in params]
    if missing:
        raise MethodError(f"{out}: bitfit weights the model lacks ({missing[:3]}); other base model?")
    with torch.no_grad():
        for k, v in tensors.items():
            params[k].copy_(v.to(params[k].device, params[k].dtype))
    model._tunelab_bitfit = {"added_biases": meta["added_biases"], "train_head": meta["train_head"]}
    return model


def _representable(model, added: list[str]) -> bool:
    """Whether switching on the config's bias flags yields exactly the model's bias parameters."""
    from tunelab.models.heads import config_parameter_names

    cfg = model.config
    flags = [f for f in _BIAS_FLAGS if hasattr(cfg, f)]
    if not flags:
        return False
    new_cfg = cfg.__class__.from_dict({**cfg.to_dict(), **{f: True for f in flags}})
    return config_parameter_names(model, new_cfg) == {n for n, _ in model.named_parameters()}


def merge(model):
    """The trained model as a plain transformers model (see the module docstring)."""
    meta = getattr(model, "_tunelab_bitfit", {"added_biases": []})
    if meta["added_biases"]:
        if _representable(model, meta["added_biases"]):
            for f in _BIAS_FLAGS:
                if hasattr(model.config, f):
                    setattr(model.config, f, True)
        else:
            warnings.warn(
                f"bitfit: {type(model.config).__name__} cannot express the {len(meta['added_biases'])} added biases; "
                "the merged model is right in memory, but save_pretrained -> from_pretrained would drop them. "
                "Keep the bitfit folder (tunelab load) as the artifact.",
                stacklevel=2,
            )
    if "_tunelab_bitfit" in model.__dict__:
        del model._tunelab_bitfit
    for p in model.parameters():
        p.requires_grad_(False)
    return model
