"""LoRA (Hu et al. 2021): W x + (alpha / r) * B A x, with A random and B zero, so step 0 is the base model.

Built on PEFT so the saved adapter is the ecosystem's format (`adapter_config.json` +
`adapter_model.safetensors`) and loads with plain `PeftModel.from_pretrained`.

Variants, each a field (the maths: docs/methods.md), all PEFT's own but LoRA+, which is only a learning rate:
  use_rslora        rank-stabilised LoRA (Kalajdzievski 2023): the update scaled by alpha / sqrt(r)
  use_dora          DoRA (Liu et al. 2024): W' = m * (W + s B A) / ||W + s B A|| per output row, m trained
  loraplus_lr_ratio LoRA+ (Hayou et al. 2024): B's learning rate is that many times A's (`lr_scales`)
  init: pissa       PiSSA (Meng et al. 2024): B A starts as W's top-r singular part, the frozen base keeps the rest;
                    saved converted to a plain rank-2r LoRA of the original base (`save`), as PEFT converts it
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

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
    init: Literal["default", "pissa"] = Field(
        "default",
        description="How A and B start. default: A random, B = 0 (step 0 is the base model). pissa (PiSSA): B A "
        "starts as the top-r singular part of each adapted weight W and the frozen base keeps the rest, W - s B A, "
        "so the adapter trains W's principal directions (step 0 is the base model up to rounding). The result is "
        "saved as a plain LoRA of the original base, rank 2r (PEFT's conversion). Not with use_dora, qlora, dpo "
        "or ppo. See docs/methods.md.",
    )
    pissa_niter: int | None = Field(
        16,
        ge=0,
        description="init: pissa: subspace iterations of the fast randomized SVD (PEFT's pissa_niter_K; "
        "LLaMA-Factory's pissa_iter); null = the exact SVD (minutes for a 1B model's layers).",
    )

    @property
    def rewrites_base(self) -> bool:
        return self.init == "pissa"

    @model_validator(mode="after")
    def _pissa(self):
        if self.init == "pissa" and self.use_dora:
            raise ValueError(
                "method.init: pissa with use_dora: PEFT converts a PiSSA adapter to a plain LoRA on saving, and a "
                "DoRA magnitude has no such conversion; set one of them"
            )
        return self


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
        init_lora_weights=_init(cfg),
    )


def _init(cfg: Config) -> bool | str:
    if cfg.init == "default":
        return True
    return "pissa" if cfg.pissa_niter is None else f"pissa_niter_{cfg.pissa_niter}"


def lr_scales(model, cfg: Config) -> dict:
    """LoRA+: {B matrix: loraplus_lr_ratio}; the rest at training.lr. A learning rate per parameter group is all
    LoRA+ is, so the loop's own optimizer takes it (PEFT's `create_loraplus_optimizer` builds an optimizer of its
    own, which would bypass the bf16 and fused AdamW the loop picks)."""
    if cfg.loraplus_lr_ratio is None:
        return {}
    return {p: cfg.loraplus_lr_ratio for n, p in model.named_parameters() if p.requires_grad and ".lora_B." in n}


def apply(model, cfg: Config):
    # plain PEFT; the training loop's accel.prepare routes the layers through tunelab/accel/fast_lora.py
    if cfg.init == "pissa":
        return pissa(model, cfg)
    model = wrap_peft(model, peft_config(cfg, model))
    if cfg.use_dora:
        dora_magnitudes_in_fp32(model)
    return model


def pissa(model, cfg: Config):
    """PEFT's PiSSA initialisation, seeded: the randomized SVD draws its test matrix from torch's generator, and a
    resumed run must rebuild the very same residual base (a checkpoint holds A and B only, not W - s B0 A0). The
    run's own random stream is left as it was. A0, B0 are kept on the model for `save`'s conversion."""
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = wrap_peft(model, peft_config(cfg, model))
    model.tunelab_pissa_initial = {
        name: p.detach().clone() for name, p in model.named_parameters() if ".lora_A." in name or ".lora_B." in name
    }
    return model


def save(model, out_dir) -> None:
    """The adapter in PEFT's format. A PiSSA adapter trained over the residual base W - s B0 A0; saved as the plain
    LoRA [B, -B0] [A; A0] (rank 2r, alpha doubled, PEFT's own conversion), it loads with `PeftModel.from_pretrained`
    over the original base and gives the trained model: W + s (B A - B0 A0) = (W - s B0 A0) + s B A."""
    initial = getattr(model, "tunelab_pissa_initial", None)
    if initial is None:
        return save_peft(model, out_dir)
    import warnings

    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # PEFT warns that PiSSA changes the base when the conversion loads the starting adapter beside the trained one
        warnings.filterwarnings("ignore", message="PiSSA changes the base weights")
        start = Path(tmp) / "pissa_init"  # PEFT writes its adapter_config (init_lora_weights: true) beside these
        start.mkdir()
        state = get_peft_model_state_dict(model, state_dict=initial)
        save_file({k: v.contiguous().cpu() for k, v in state.items()}, start / "adapter_model.safetensors")
        model.save_pretrained(out_dir, safe_serialization=True, path_initial_model_for_weight_conversion=str(start))


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


load, merge = load_peft, merge_peft
