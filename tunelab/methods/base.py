"""The protocol every method module follows (`Capabilities` and the default hooks), and helpers the
method modules share.

A method module declares `CAPABILITIES = Capabilities(...)`: what the rest of tunelab may know about
the method. The training loop, DPO / PPO, distributed training, export and the config checks read
these fields, never the method's name. It may also define the optional hooks `optimizer_parameters`,
`optimizer` and `on_step`; the registry (`registry.get`) gives a module that does not the defaults
below, so callers always call them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict

from tunelab.models.blocks import block_index
from tunelab.models.sources import NO_HUB_KERNELS, ModelError

if TYPE_CHECKING:  # torch is imported where a model is changed: the config reads `Config` without it
    import torch


class MethodError(ValueError):
    """A method setting the model cannot take (no layer matches, nothing would train ...): the user's to fix.
    Not ConfigError: config reads this package's registry, so it cannot be imported here."""


class MethodConfig(BaseModel):
    # as config.Section: YAML's .inf / .nan are no setting (they pass `gt=0` checks)
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), validate_assignment=True, allow_inf_nan=False)

    @property
    def rewrites_base(self) -> bool:
        """The method changes the frozen base weights it adapts (lora's PiSSA: W - s B A), so they are not the
        checkpoint's (no compact form) and the model with its adapter off is not the starting model."""
        return False

    @property
    def starts_from(self) -> str | None:
        """What the trained part starts from where it is not a new one, for the run's log (lora's start_from)."""
        return None

    def reference_refused(self, stage: str) -> str | None:
        """Why `stage` (dpo or ppo: they need the starting policy as their reference, methods/reference.py) cannot
        have it with this setting, with the fix; None when it can."""
        return None


@dataclass(frozen=True)
class Capabilities:
    """What a method declares about itself (its module's `CAPABILITIES`). Every field has the default a
    plain weight-training method (`full`) would declare, except `mergeable` and `new_tokens`, False unless said."""

    reference: Literal["adapter_off", "frozen_copy"] = "frozen_copy"
    """How DPO / PPO get the starting policy pi_ref (`tunelab/methods/reference.py`): "adapter_off" = the
    method wraps the untouched base in a PEFT adapter that can be switched off (`disable_adapter`), so the
    reference costs no memory; "frozen_copy" = the method trains the model's own weights (or modules of
    its own), so a frozen copy is taken before training."""

    changes_trainables: bool = False
    """Which parameters train changes during the run: the method defines `on_step` (gradual unfreezing).
    DDP is rebuilt when it does; FSDP / DeepSpeed refuse it."""

    virtual_tokens: Literal["inputs", "past_key_values"] | None = None
    """Positions no input token produced: "inputs" = soft-prompt vectors before the input embeddings
    (prompt; they shift every position), "past_key_values" = key/value prefixes handed to every
    attention layer as past_key_values (prefix). None: the model sees exactly its inputs."""

    mergeable: bool = False
    """`merge(model)` gives a plain transformers model with the same logits (no extra inference cost),
    so the result exports, and a run can be the starting policy of PPO."""

    new_tokens: bool = False
    """The rows of tokens `model.new_special_tokens` adds train (full, qat: every weight does; lora, qlora: PEFT's
    trainable_token_indices beside the adapter). Not said: the config refuses the setting for this method."""

    quantized_base: bool = False
    """The frozen base weights are quantized in place (qlora, 4-bit bitsandbytes): sharded training
    cannot hold them, and the process needs bitsandbytes."""


# The attribute a method sets on the model it returns when the adapter it trains starts from trained values (lora's
# start_from), not from a no-op: the reference policy is then the model with the adapter at those values
# (methods/reference.py), not with it switched off.
STARTED_ADAPTER = "tunelab_started_adapter"


# ---- the optional hooks' defaults (registry.get fills them into a module that does not define them)
def optimizer_parameters(model, cfg) -> list:
    """Every parameter that may train during the run: by default those with requires_grad after apply."""
    return [p for p in model.parameters() if p.requires_grad]


def optimizer(params, tcfg, lr_scales: dict | None = None):
    """The method's own optimizer for `params` (`lr_scales`: the `lr_scales` hook's answer); None: the loop's AdamW."""
    return None


def lr_scales(model, cfg) -> dict:
    """{parameter: factor on training.lr} for parameters that learn at a rate of their own (LoRA+'s B); default none."""
    return {}


def adamw_groups(params, weight_decay: float, lr: float, scales: dict | None = None) -> list[dict]:
    """AdamW's parameter groups: no weight decay on 1-D tensors (biases, norm weights), as is standard, and a group
    of its own per learning-rate factor in `scales` (the scheduler then scales each group's rate alike)."""
    scales = scales or {}
    groups: dict[tuple, dict] = {}
    for p in params:
        decay, scale = p.ndim >= 2, scales.get(p, 1.0)
        group = groups.setdefault((decay, scale), {"params": [], "weight_decay": weight_decay if decay else 0.0})
        if scale != 1.0:
            group["lr"] = lr * scale
        group["params"].append(p)
    return [groups[k] for k in sorted(groups, key=lambda k: (not k[0], k[1]))]


def on_step(model, cfg, step: int, steps_per_epoch: int | None = None) -> str | None:
    """Called before every optimizer step (methods with changes_trainables); a returned string is logged."""
    return None


def load_plan(cfg, device):
    """How the base loads (models.loading.loading_into): a plan naming the layers to convert as they are read,
    so the whole model never exists in its compute dtype (qlora: 4-bit); None: the ordinary load."""
    return None


def check_model(cfg, model_cfg) -> str | None:
    """Before the model loads: raise a MethodError for a model whose architecture the method cannot take
    (models.loading.skeleton(model_cfg) has its layers, without weights); a returned string is logged (lora: the
    shape start_from's adapter keeps). By default nothing to check."""
    return None


DEFAULT_HOOKS = {"optimizer_parameters": optimizer_parameters, "optimizer": optimizer, "lr_scales": lr_scales,
                 "on_step": on_step, "load_plan": load_plan, "check_model": check_model}  # fmt: skip


def freeze_all(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def num_blocks(model: torch.nn.Module) -> int:
    idx = [block_index(n) for n, _ in model.named_parameters()]
    idx = [i for i in idx if i is not None]
    if not idx:
        raise MethodError("could not find transformer blocks (parameters named like '...layers.N...')")
    return max(idx) + 1


# ---- results that are whole models (full, freeze, gradual, head): a plain safetensors folder
def save_full_model(model: torch.nn.Module, out_dir) -> None:
    """A whole-model result as a safetensors folder that `AutoModel*.from_pretrained` loads."""
    model.save_pretrained(out_dir, safe_serialization=True)


def load_full_model(base_model: torch.nn.Module, out_dir):
    """The saved whole model, in the base's dtype, or in fp32 where the folder holds fp32 weights and the base is
    half precision: a bf16 run trains fp32 master weights and saves them (the trainable ones; all of them for full
    fine-tuning), and rounding them back to bf16 lost updates smaller than bf16's step (~4e-3 of a weight), so
    evaluate / export / serve did not run the model that was trained."""
    import torch

    dtype = base_model.dtype
    if dtype in (torch.bfloat16, torch.float16) and "F32" in _saved_dtypes(out_dir):
        dtype = torch.float32
    return type(base_model).from_pretrained(out_dir, dtype=dtype, **NO_HUB_KERNELS)


def _saved_dtypes(folder) -> set[str]:
    """The dtypes of the weights in a folder's safetensors files ("F32", "BF16" ...), read from their headers."""
    from pathlib import Path

    from safetensors import safe_open

    found = set()
    for path in Path(folder).glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            found |= {f.get_slice(k).get_dtype() for k in f.keys()}
    return found


def unchanged(model):
    """`merge` for whole-model results: there is nothing to fold in."""
    return model


# ---- results in PEFT's format (lora, ia3, ...): adapter_config.json + adapter_model.safetensors
def save_peft(model, out_dir) -> None:
    # a token table grown for model.new_special_tokens: PEFT would save it whole beside the adapter (it sees a
    # resized embedding); the adapter's trainable tokens already hold the new rows, and the rest is the base's
    from tunelab.models import new_tokens

    grown = new_tokens.ids(model.get_base_model() if hasattr(model, "get_base_model") else model) is not None
    model.save_pretrained(out_dir, safe_serialization=True, **({"save_embedding_layers": False} if grown else {}))


def load_peft(base_model, out_dir):
    from pathlib import Path

    from peft import PeftModel

    if (
        not (Path(out_dir) / "adapter_config.json").is_file()
        and (Path(out_dir) / "tunelab_adapter_config.json").is_file()
    ):
        raise MethodError(
            f"{out_dir}: a tunelab bottleneck adapter (method: adapter), not a PEFT adapter: PEFT has no bottleneck "
            "adapters. Load it with tunelab (tunelab.stages.runs.load_run, or method adapter); see docs/methods.md"
        )
    return PeftModel.from_pretrained(base_model, out_dir)


def merge_peft(model):
    return model.merge_and_unload()


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train: what a checkpoint must hold (a few MB for LoRA)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def wrap_peft(model, peft_cfg):
    """PEFT's get_peft_model, with `target_modules` that match nothing turned into a named error listing the
    model's own linear layers (PEFT's message names neither the section nor what would match)."""
    import torch
    from peft import get_peft_model

    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as e:
        if "not found in the base model" not in str(e) and "target modules" not in str(e).lower():
            raise
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ModelError(  # not ConfigError: config reads this package's registry, so it cannot be imported here
            f"method.target_modules {peft_cfg.target_modules!r}: no module of {type(model).__name__} matches. "
            f"Its linear layers are named: {', '.join(linear)} (or use 'all-linear'). [PEFT: {type(e).__name__}]"
        ) from None


def peft_task_type(model: torch.nn.Module):
    """PEFT's task type for a transformers model class, so PEFT methods work on decoders, encoders and
    encoder-decoders alike (it decides how PEFT wraps forward and which heads it keeps trainable)."""
    from peft import TaskType

    from tunelab.models.heads import causal_lm_classes  # here: config loading imports this module, without torch

    cls = type(model).__name__
    # GPT2LMHeadModel was wrapped as a feature extractor: its prompt tuning kept the virtual positions' logits
    if cls in causal_lm_classes():
        return TaskType.CAUSAL_LM
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
