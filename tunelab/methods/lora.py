"""LoRA (Hu et al. 2021): W x + (alpha / r) * B A x, with A random and B zero, so step 0 is the base model.

Built on PEFT so the saved adapter is the ecosystem's format (`adapter_config.json` +
`adapter_model.safetensors`) and loads with plain `PeftModel.from_pretrained`.

Variants, each a field (the maths: docs/methods.md), all PEFT's own but LoRA+, which is only a learning rate:
  use_rslora        rank-stabilised LoRA (Kalajdzievski 2023): the update scaled by alpha / sqrt(r)
  use_dora          DoRA (Liu et al. 2024): W' = m * (W + s B A) / ||W + s B A|| per output row, m trained
  loraplus_lr_ratio LoRA+ (Hayou et al. 2024): B's learning rate is that many times A's (`lr_scales`)
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
    use_rslora: bool = Field(
        False, description="Rank-stabilised LoRA: scale the update by alpha / sqrt(r) instead of alpha / r."
    )
    use_dora: bool = Field(
        False,
        description="DoRA: a trained magnitude per output row times the direction W + BA. With LoRA dropout each "
        "adapted layer multiplies W by the dropped input too (PEFT's DoRA), two big matmuls instead of one: "
        "dropout: 0 is faster. A GGUF LoRA export refuses it (export the merged model).",
    )
    loraplus_lr_ratio: float | None = Field(
        None,
        gt=0,
        description="LoRA+: B's learning rate is this many times training.lr (A's); the paper suggests 16. "
        "null: one learning rate.",
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
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
    )


def lr_scales(model, cfg: Config) -> dict:
    """LoRA+: {B matrix: loraplus_lr_ratio}; the rest at training.lr. A learning rate per parameter group is all
    LoRA+ is, so the loop's own optimizer takes it (PEFT's `create_loraplus_optimizer` builds an optimizer of its
    own, which would bypass the bf16 and fused AdamW the loop picks)."""
    if cfg.loraplus_lr_ratio is None:
        return {}
    return {p: cfg.loraplus_lr_ratio for n, p in model.named_parameters() if p.requires_grad and ".lora_B." in n}


def apply(model, cfg: Config):
    # plain PEFT; the training loop's accel.prepare routes the layers through tunelab/accel/fast_lora.py
    model = wrap_peft(model, peft_config(cfg, model))
    if cfg.use_dora:
        dora_magnitudes_in_fp32(model)
    return model


def dora_magnitudes_in_fp32(model) -> None:
    """Each new DoRA magnitude m = ||W + s B A|| per row (W as the layer computes with it: dequantized over a 4-bit
    base) taken in fp32 and kept in fp32. PEFT takes it in the weight's dtype: over a bf16 base m would be rounded
    to bf16 (2^-9), so step 0 would scale every adapted row by up to that much instead of being the base model
    (fast_lora computes the norm in fp32), and an adapter trained over bf16 would carry the rounding to a user's fp32
    base."""
    import torch
    from peft.utils.integrations import dequantize_module_weight

    for module in model.modules():
        magnitudes = getattr(module, "lora_magnitude_vector", None)
        if not magnitudes:
            continue
        weight = dequantize_module_weight(module.get_base_layer()).float()
        for name, magnitude in magnitudes.items():
            delta = module.lora_B[name].weight.float() @ module.lora_A[name].weight.float()
            norm = torch.linalg.vector_norm(weight + module.scaling[name] * delta, dim=1)
            magnitude.weight.data = norm.to(magnitude.weight.device)


save, load, merge = save_peft, load_peft, merge_peft
