"""What each registered method trains on a given model: the table behind `tunelab methods`.

Only the model's config is read: each method is applied with its default Config to a fresh copy of
the model built on the meta device (no weights, no memory), and its parameters are counted. New
methods appear automatically; one that cannot be applied is reported as "n/a" with the reason.
"""

from __future__ import annotations

from tunelab.methods import registry
from tunelab.models import ModelError, count_parameters, resolve


def _auto_class(config):
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoModelForSequenceClassification,
    )

    candidates = [AutoModelForSeq2SeqLM] if getattr(config, "is_encoder_decoder", False) else []
    candidates += [AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModel]
    for auto in candidates:
        if type(config) in auto._model_mapping:
            return auto
    raise ModelError(f"no transformers model class for model_type {config.model_type!r}")


def meta_model(config):
    """The model for `config` on the meta device: right names and shapes, no storage."""
    import copy

    import torch

    config = copy.deepcopy(config)  # methods may edit the config (layer count, tying): keep ours intact
    with torch.device("meta"):
        return _auto_class(config).from_config(config)


def _fallback(mod, settings=None):
    """A method with a quantized base (qlora) quantizes real weights, which meta tensors do not have: count
    the registered method its Config extends (qlora's: lora) with the same settings instead."""
    if not mod.CAPABILITIES.quantized_base:
        return None
    for parent_name in registry.names():
        parent = registry.get(parent_name)
        if parent is not mod and issubclass(mod.Config, parent.Config):
            fields = parent.Config.model_fields
            own = (settings or mod.Config()).model_dump()
            shared = {k: v for k, v in own.items() if k in fields and k != "name"}
            note = f"counted as {parent_name} with the same settings (quantization needs real weights)"
            return parent, parent.Config(**shared), note
    return None


def method_row(name: str, config, settings=None) -> dict:
    """The row of method `name` on the model of `config`; `settings`: the method's Config (default: its defaults)."""
    import torch

    row = {"method": name, "trains": "?", "trainable": None, "total": None, "percent": None,
           "mergeable": None, "inference_cost": "?", "note": ""}  # fmt: skip
    try:
        mod = registry.get(name)
        row.update(trains=mod.DESCRIPTION, mergeable=mod.CAPABILITIES.mergeable, inference_cost=mod.INFERENCE_COST)
        base = meta_model(config)
        _, base_total = count_parameters(base)
        attempts = [(mod, settings if settings is not None else mod.Config(), "")]
        fb = _fallback(mod, settings)
        if fb:
            attempts.append(fb)
        last_error = None
        for m, cfg, note in attempts:
            try:
                with torch.device("meta"):
                    model = m.apply(meta_model(config), cfg)
                trainable, total = count_parameters(model)
                row.update(trainable=trainable, total=total, percent=100.0 * trainable / base_total, note=note)
                return row
            except Exception as e:  # noqa: BLE001 - any method failing must not break the table
                last_error = e
        raise last_error
    except Exception as e:  # noqa: BLE001
        row["note"] = f"n/a: {type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
        return row


def method_table(model_name: str = "smollm2-135m-instruct") -> list[dict]:
    """One row per registered method: what trains, trainable parameters (and % of the base model),
    mergeable, extra inference cost. `model_name` is anything `tunelab.models.resolve` accepts."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve(model_name))
    return [method_row(name, config) for name in registry.names()]
