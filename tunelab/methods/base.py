"""Helpers shared by the method modules."""

from __future__ import annotations

import re

import torch
from pydantic import BaseModel, ConfigDict


class MethodConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), validate_assignment=True)


def freeze_all(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def block_index(name: str) -> int | None:
    """The transformer-block index in a parameter name (`...layers.12.mlp...` -> 12)."""
    m = re.search(r"\.(?:layers|layer|h|blocks|block)\.(\d+)\.", "." + name + ".")
    return int(m.group(1)) if m else None


def num_blocks(model: torch.nn.Module) -> int:
    idx = [block_index(n) for n, _ in model.named_parameters()]
    idx = [i for i in idx if i is not None]
    if not idx:
        raise ValueError("could not find transformer blocks (parameters named like '...layers.N...')")
    return max(idx) + 1


# ---- results that are whole models (full, freeze, gradual, head): a plain safetensors folder
def save_full_model(model: torch.nn.Module, out_dir) -> None:
    """A whole-model result as a safetensors folder that `AutoModel*.from_pretrained` loads."""
    model.save_pretrained(out_dir, safe_serialization=True)


def load_full_model(base_model: torch.nn.Module, out_dir):
    return type(base_model).from_pretrained(out_dir, dtype=base_model.dtype)


def unchanged(model):
    """`merge` for whole-model results: there is nothing to fold in."""
    return model


# ---- results in PEFT's format (lora, ia3, ...): adapter_config.json + adapter_model.safetensors
def save_peft(model, out_dir) -> None:
    model.save_pretrained(out_dir, safe_serialization=True)


def load_peft(base_model, out_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, out_dir)


def merge_peft(model):
    return model.merge_and_unload()


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train: what a checkpoint must hold (a few MB for LoRA)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def peft_task_type(model: torch.nn.Module):
    """PEFT's task type for a transformers model class, so PEFT methods work on decoders, encoders and
    encoder-decoders alike (it decides how PEFT wraps forward and which heads it keeps trainable)."""
    from peft import TaskType

    cls = type(model).__name__
    for suffix, task in (
        ("ForCausalLM", TaskType.CAUSAL_LM),
        ("ForConditionalGeneration", TaskType.SEQ_2_SEQ_LM),
        ("ForSeq2SeqLM", TaskType.SEQ_2_SEQ_LM),
        ("ForSequenceClassification", TaskType.SEQ_CLS),
        ("ForTokenClassification", TaskType.TOKEN_CLS),
        ("ForQuestionAnswering", TaskType.QUESTION_ANS),
    ):
        if cls.endswith(suffix):
            return task
    return TaskType.FEATURE_EXTRACTION
