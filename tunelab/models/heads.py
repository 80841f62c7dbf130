"""Task heads on a pre-trained backbone, built from transformers' own classes.

    clf = with_task_head(causal_lm, "classification", num_labels=3)   # LlamaForSequenceClassification
    reg = with_task_head(causal_lm, "regression")                     # one output, MSE loss
    qa  = with_task_head(bert, "span_qa")                             # BertForQuestionAnswering

The result is the architecture's `*ForSequenceClassification` / `*ForQuestionAnswering` class whose
backbone *is* the given model's backbone (the same modules, no copy); only the new head is built
(transformers' own initialisation). Saved with `save_pretrained`, it loads with the matching
`AutoModelFor...`. The new head is the only randomly initialised part, so pair it with the `head`
method (train the head, optionally extra blocks) or any other method.
"""

from __future__ import annotations

import copy
import functools
from typing import Literal

import torch


@functools.cache
def causal_lm_classes() -> frozenset[str]:
    """The class names AutoModelForCausalLM builds, whatever their suffix: GPT2LMHeadModel, the multimodal
    Gemma3ForConditionalGeneration ... (a suffix such as ForCausalLM misses them)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return frozenset(c for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for c in ([v] if isinstance(v, str) else v))


def config_parameter_names(model: torch.nn.Module, config=None) -> set[str]:
    """The parameter names a model of `model`'s class built from `config` (default: its own) has: what
    `from_pretrained` of a folder written from `model` would load (built on the meta device: no memory)."""
    with torch.device("meta"):
        reference = type(model)(config if config is not None else model.config)
    return {n for n, _ in reference.named_parameters()}


Kind = Literal["classification", "regression", "span_qa"]


def _backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The bare transformer inside a task model (`model.model`, `model.bert`, ...), or the model itself."""
    prefix = getattr(model, "base_model_prefix", "")
    sub = getattr(model, prefix, None) if prefix else None
    return sub if isinstance(sub, torch.nn.Module) else model


def with_task_head(model, kind: Kind, num_labels: int | None = None):
    """The `kind` counterpart of `model`, sharing its backbone weights, with a freshly initialised head."""
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    config = copy.deepcopy(model.config)
    if kind == "classification":
        auto, config.num_labels = AutoModelForSequenceClassification, num_labels or 2
        config.problem_type = "single_label_classification" if config.num_labels > 1 else "regression"
    elif kind == "regression":
        if num_labels not in (None, 1):
            raise ValueError("regression predicts one value: num_labels must be 1 (or omitted)")
        auto, config.num_labels, config.problem_type = AutoModelForSequenceClassification, 1, "regression"
    elif kind == "span_qa":
        if num_labels not in (None, 2):
            raise ValueError("span_qa predicts a start and an end logit: num_labels must be 2 (or omitted)")
        auto, config.num_labels = AutoModelForQuestionAnswering, 2
    else:
        raise ValueError(f"unknown head kind {kind!r}; choose classification, regression or span_qa")
    try:
        cls = auto._model_mapping[type(config)]
    except KeyError:
        raise ValueError(
            f"{type(model).__name__} (model_type {config.model_type!r}): transformers has no {auto.__name__.replace('AutoModel', '*')} "
            f"class for this architecture, so a {kind} head cannot be added"
        ) from None

    param = next(model.parameters())
    with torch.device("meta"):
        new = cls(config)
    src = _backbone(model)
    prefix = new.base_model_prefix
    target = getattr(new, prefix)
    if isinstance(src, type(target)):
        setattr(new, prefix, src)
    else:  # e.g. T5ForConditionalGeneration -> T5Model: share its parts by name
        for name, _ in list(target.named_children()):
            part = getattr(src, name, None)
            if isinstance(part, torch.nn.Module):
                setattr(target, name, part)
    shared_ids = {id(t) for t in list(src.parameters()) + list(src.buffers())}

    # materialise what is still on the meta device (the new head) and initialise it the model's way
    fresh = []
    for name, module in new.named_modules():
        own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if any(t.is_meta and id(t) not in shared_ids for t in own):
            module.to_empty(device=param.device, recurse=False)
            fresh.append(name)
    stray = [n for n in fresh if n == prefix or n.startswith(prefix + ".")]
    if stray:
        raise ValueError(f"{type(model).__name__}: could not share the backbone's weights for {stray[:3]}")
    with torch.no_grad():
        for name in fresh:
            module = new.get_submodule(name)
            new._init_weights(module)
            module.to(dtype=param.dtype)
    assert all(id(p) in shared_ids for p in getattr(new, prefix).parameters())
    return new.eval() if not model.training else new.train()
