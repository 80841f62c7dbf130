"""RoPE scaling (`model.rope_scaling`): a RoPE model's rotary frequencies rescaled for a longer context.

The maths is transformers' own (modeling_rope_utils.ROPE_INIT_FUNCTIONS, see docs/long-context.md): this
module only writes the setting into the model's config (`rope_parameters`) before the model is built, so
the rotary embedding computes its frequencies from it, `save_pretrained` keeps it in config.json and every
later load (tunelab's or plain transformers') gets the same model.

`max_position_embeddings` becomes F times the native context for linear, yarn and llama3 (what the model now
serves, and what the GGUF's context_length says); dynamic keeps it, since transformers' dynamic NTK reads it
as the length up to which the frequencies stay the original ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tunelab.models.sources import ModelError

if TYPE_CHECKING:
    from tunelab.config import RopeScalingConfig


def has_rope(config) -> bool:
    """Whether transformers builds this model's positions with rotary embeddings it reads from the config."""
    params = getattr(config, "rope_parameters", None)
    return isinstance(params, dict) and bool(params) and "rope_type" in params


def native_context(config) -> int:
    """The context the model was trained at: the scaled setting's original length if it has one."""
    params = getattr(config, "rope_parameters", None) or {}
    if params.get("original_max_position_embeddings"):
        return int(params["original_max_position_embeddings"])
    if params.get("rope_type") == "linear":  # transformers keeps no original length for linear
        return int(round(config.max_position_embeddings / params["factor"]))
    return int(config.max_position_embeddings)


def apply_rope_scaling(config, scaling: RopeScalingConfig, name: str = "the model") -> None:
    """Write `scaling` into a transformers config (in place); ModelError for a model without RoPE, or one
    already scaled otherwise (scaling a scaled model twice would compound the factors)."""
    if not has_rope(config):
        raise ModelError(
            f"model.rope_scaling: {name} ({getattr(config, 'model_type', '?')}) has no rotary position embeddings "
            "(learned or absolute positions, e.g. GPT-2, BERT), so there is nothing to scale; remove rope_scaling"
        )
    params = dict(config.rope_parameters)
    wanted = scaling.rope_parameters()
    if params.get("rope_type", "default") != "default":
        same = all(params.get(k) == v for k, v in wanted.items())
        if same:  # a saved run's config.json already carries it
            return
        raise ModelError(
            f"model.rope_scaling: {name} already has RoPE scaling {_shown(params)}; a second scaling would "
            f"compound with it. Remove rope_scaling, or start from the unscaled model"
        )
    native = int(config.max_position_embeddings)
    if scaling.type in ("yarn", "llama3"):
        wanted.setdefault("original_max_position_embeddings", native)
    keep = {k: params[k] for k in ("rope_theta", "partial_rotary_factor") if k in params}
    config.rope_parameters = {**keep, **wanted}
    if scaling.type != "dynamic":
        original = wanted.get("original_max_position_embeddings", native)
        config.max_position_embeddings = int(round(original * scaling.factor))


def _shown(params: dict) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in params.items() if k not in ("rope_theta",)) + "}"
