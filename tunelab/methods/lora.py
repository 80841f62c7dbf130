"""LoRA (Hu et al. 2021): W x + (alpha / r) * B A x, with A random and B zero, so step 0 is the base model.

Built on PEFT so the saved adapter is the ecosystem's format (`adapter_config.json` +
`adapter_model.safetensors`) and loads with plain `PeftModel.from_pretrained`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tunelab.methods.base import Capabilities, MethodConfig, load_peft, merge_peft, peft_task_type, save_peft, wrap_peft

DESCRIPTION = "low-rank matrices A, B beside the chosen linear layers"
CAPABILITIES = Capabilities(reference="adapter_off", mergeable=True)
INFERENCE_COST = "two small matmuls per adapted layer; none once merged"


class Config(MethodConfig):
    name: Literal["lora"] = "lora"
    r: int = Field(16, ge=1, description="Rank of the update B A.")
    alpha: float = Field(32, gt=0, description="Scale; the update is multiplied by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | str = Field(
        "all-linear",
        description="'all-linear' (every linear layer but the output head) or module names like [q_proj, v_proj].",
    )


def peft_config(cfg: Config, model):
    from peft import LoraConfig, TaskType

    task = peft_task_type(model)
    # A fresh head trains whole (PEFT's modules_to_save); 'all-linear' would also wrap it in LoRA, which
    # PEFT refuses for token-classification heads ("modules_to_save cannot be applied to ... lora Linear")
    heads = {TaskType.TOKEN_CLS: ["classifier", "score"], TaskType.QUESTION_ANS: ["qa_outputs"]}.get(task)
    exclude = heads if cfg.target_modules == "all-linear" and heads else None
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        exclude_modules=exclude,
        task_type=task,
        bias="none",
    )


def apply(model, cfg: Config):
    # plain PEFT; the training loop's accel.prepare routes the layers through tunelab/accel/fast_lora.py
    return wrap_peft(model, peft_config(cfg, model))


save, load, merge = save_peft, load_peft, merge_peft
