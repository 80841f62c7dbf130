"""(IA)³ (Liu et al. 2022): learned vectors that rescale keys, values and the FFN's intermediate activation.

    attention: softmax(Q (l_k ⊙ K)ᵀ / √d) (l_v ⊙ V)        FFN: W_2 (l_ff ⊙ γ(W_1 x))

with l_k, l_v ∈ R^{d_k·heads}, l_ff ∈ R^{d_ff} initialised to ones, so step 0 is the base model. Only
the vectors (and a freshly added task head) train: ~0.05% of the parameters. Built on PEFT's
`IA3Config` so the result is PEFT's format (`adapter_config.json` + `adapter_model.safetensors`) and
loads with plain `PeftModel.from_pretrained`. PEFT implements l_k / l_v as a per-output-feature scale
on the key / value projections and l_ff as a per-input-feature scale on the FFN's down projection
(`feedforward_modules`). Since each vector only rescales rows or columns of a weight matrix,
`merge` folds it in: (IA)³ costs nothing at inference once merged.

Default modules (`target_modules: null`): PEFT's per-architecture defaults, which match the paper for
Llama (k_proj, v_proj, down_proj as feed-forward) and T5 (k, v, wo as feed-forward; also in the
decoder's cross-attention); for a model type PEFT has none for, Llama's names where the model has them, else
an error listing its linear layers (Phi-3's fused qkv_proj: the keys and values need a choice). For BERT/RoBERTa PEFT's default `output.dense` also matches the
attention output projection, so tunelab narrows it to the FFN's output dense layer, as in the paper.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tunelab.methods.base import (
    Capabilities,
    MethodConfig,
    MethodError,
    load_peft,
    merge_peft,
    peft_task_type,
    save_peft,
    wrap_peft,
)

DESCRIPTION = "(IA)³ vectors rescaling keys, values and the FFN's intermediate activation"
CAPABILITIES = Capabilities(reference="adapter_off", mergeable=True)
INFERENCE_COST = "an elementwise multiply per adapted layer; none once merged"

# the paper's l_k, l_v, l_ff where PEFT's defaults differ (BERT's `output.dense` suffix would also
# catch `attention.output.dense`)
_PAPER_MODULES = {
    model_type: (r".*\.(key|value)|.*\.layer\.\d+\.output\.dense", r".*\.layer\.\d+\.output\.dense")
    for model_type in ("bert", "roberta", "xlm-roberta")
}


class Config(MethodConfig):
    name: Literal["ia3"] = "ia3"
    target_modules: list[str] | str | None = Field(
        None,
        description="Modules that get a vector (names like [k_proj, v_proj, down_proj] or a regex); "
        "null: keys, values and the FFN down projection for the architecture (PEFT's defaults).",
    )
    feedforward_modules: list[str] | str | None = Field(
        None,
        description="The subset of target_modules whose *input* is scaled (l_ff, e.g. [down_proj]); the others "
        "scale their output. null with target_modules set: none.",
    )

    @model_validator(mode="after")
    def _ff_needs_targets(self):
        if self.feedforward_modules is not None and self.target_modules is None:
            raise ValueError("ia3: feedforward_modules needs target_modules (a subset of them)")
        return self


# where PEFT has no defaults for the model type (phi3, olmo2, granite ...): Llama's names when the model has them
_LLAMA_STYLE = (["k_proj", "v_proj", "down_proj"], ["down_proj"])


def peft_config(cfg: Config, model):
    from peft import IA3Config
    from peft.utils import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as peft_defaults

    target, ff = cfg.target_modules, cfg.feedforward_modules
    if target is None:
        model_type = getattr(model.config, "model_type", None)
        if model_type in _PAPER_MODULES:
            target, ff = _PAPER_MODULES[model_type]
        elif model_type not in peft_defaults:
            target, ff = _default_modules(model, model_type)
        # else: None lets PEFT pick its per-architecture defaults for both
    elif ff is None:
        ff = []
    return IA3Config(
        target_modules=target,
        feedforward_modules=ff,
        task_type=peft_task_type(model),
        init_ia3_weights=True,
    )


def _default_modules(model, model_type) -> tuple[list[str], list[str]]:
    """Llama's key, value and FFN down projections where the model has layers of those names; else an error
    that lists the model's linear layers (PEFT's own would only say "Please specify `target_modules`")."""
    import torch

    leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    if set(_LLAMA_STYLE[0]) <= set(leaves):
        return _LLAMA_STYLE
    raise MethodError(
        f"ia3: PEFT has no default modules for model type {model_type!r} and its layers are not named like "
        f"Llama's (k_proj, v_proj, down_proj); set method.target_modules to its key, value and FFN down projections "
        f"and method.feedforward_modules to the FFN one (its linear layers: {', '.join(leaves)})"
    )


def check_model(cfg: Config, model_cfg) -> None:
    """Before the model loads: a model type without default modules and without Llama's names is refused now."""
    from peft.utils import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as peft_defaults

    from tunelab.models.loading import skeleton

    if cfg.target_modules is None and (model := skeleton(model_cfg)) is not None:
        model_type = getattr(model.config, "model_type", None)
        if model_type not in _PAPER_MODULES and model_type not in peft_defaults:
            _default_modules(model, model_type)


def apply(model, cfg: Config):
    return wrap_peft(model, peft_config(cfg, model))


save, load, merge = save_peft, load_peft, merge_peft
