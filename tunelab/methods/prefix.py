"""Prefix tuning (Li & Liang 2021): trainable key/value prefixes in every attention layer.

Every attention layer i attends over [P_K^(i); K] and [P_V^(i); V]: `num_virtual_tokens` extra
key/value positions that no input token produced. The prefixes are trained through a
reparameterisation, P_θ = MLP(P'_θ): a small embedding P'_θ [num_virtual_tokens, d_kv] goes through
Linear(d_kv -> projection_hidden) -> tanh -> Linear(-> num_layers * 2 * d_kv), where d_kv is the
model's key/value width (num_key_value_heads * head_dim, so grouped-query attention gets prefixes
with the KV-head count). The MLP only stabilises training: on save it is folded, P_θ is computed
once and written as the prefix tensor; the MLP is not saved.

Built on PEFT (`PrefixTuningConfig(prefix_projection=True, encoder_hidden_size=...)`), with small
fixes for transformers 5 in `_prompt_learning.py` (generation ignored the prefix; BERT-style task
heads raised). PEFT's `save_pretrained` already writes the folded prefix (`prompt_embeddings`,
[num_virtual_tokens, num_layers * 2 * d_kv]); we then mark the saved config `prefix_projection:
false`, which is what that file holds (plain `PeftModel.from_pretrained` loads it either way: in
inference mode PEFT reads the prefix tensor and builds no MLP).

Encoder-decoders (T5): PEFT puts the prefix into the decoder's self-attention only (not the
encoder, and the cross-attention keys stay those of the encoder output), unlike the paper, which
prefixes encoder and decoder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field

from tunelab.methods._prompt_learning import patch
from tunelab.methods.base import Capabilities, MethodConfig, peft_task_type

DESCRIPTION = "key/value prefixes in every attention layer (through a reparameterisation MLP while training)"
CAPABILITIES = Capabilities(reference="adapter_off", virtual_tokens="past_key_values")
INFERENCE_COST = "prefix_length extra key/value positions in every attention layer"


class Config(MethodConfig):
    name: Literal["prefix"] = "prefix"
    num_virtual_tokens: int = Field(20, ge=1, description="Prefix length: extra key/value positions per layer.")
    projection: bool = Field(
        True,
        description="Train through the reparameterisation MLP (folded into plain prefixes on save); "
        "false trains the prefixes directly.",
    )
    projection_hidden: int = Field(512, ge=1, description="Hidden width of the reparameterisation MLP.")


def peft_config(cfg: Config, model):
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(
        task_type=peft_task_type(model),
        num_virtual_tokens=cfg.num_virtual_tokens,
        prefix_projection=cfg.projection,
        encoder_hidden_size=cfg.projection_hidden,
    )


def apply(model, cfg: Config):
    from peft import get_peft_model

    return patch(get_peft_model(model, peft_config(cfg, model)))


def save(model, out_dir) -> None:
    model.save_pretrained(out_dir, safe_serialization=True)  # writes P_θ = MLP(P'_θ), not the MLP
    path = Path(out_dir) / "adapter_config.json"
    config = json.loads(path.read_text())
    if config.get("prefix_projection"):
        config["prefix_projection"] = False
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load(base_model, out_dir):
    from peft import PeftModel

    return patch(PeftModel.from_pretrained(base_model, out_dir))


def fold(model):
    """The prefixes the model uses now, [num_virtual_tokens, num_layers * 2 * d_kv] (the MLP applied once)."""
    return model.get_prompt_embedding_to_save(model.active_adapter)
