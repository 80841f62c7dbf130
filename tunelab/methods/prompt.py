"""Prompt tuning (Lester et al. 2021): m trainable soft-prompt vectors before the input embeddings.

The model reads [P_e; X_e] instead of X_e, where P_e ∈ R^{m×d} is trained and everything else is
frozen. P_e starts as the embeddings of `init_text`'s tokens (repeated or cut to m) or, by default,
of m random vocabulary tokens (PEFT's SAMPLE_VOCAB).

Built on PEFT (`PromptTuningConfig`), with small fixes for transformers 5 in `_prompt_learning.py`
(generation, and causal-LM logits without the virtual positions). The saved adapter is PEFT's
format and loads with plain `PeftModel.from_pretrained`.

`init_text`: `apply(model, cfg)` gets no tokenizer, and PEFT's TEXT init would load one by name
(and tokenize with special tokens, e.g. a BOS in the soft prompt). We tokenize ourselves, without
special tokens, with the tokenizer at `model.name_or_path` (the folder or hub id the model was loaded
from, as in a tunelab run); if there is none, apply raises and `init_from_text(model, text, tokenizer)`
does it with a tokenizer you pass.

For classification with a causal LM, pair it with `tunelab.methods.verbalizer.Verbalizer`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tunelab.methods._prompt_learning import patch
from tunelab.methods.base import Capabilities, MethodConfig, MethodError, peft_task_type

DESCRIPTION = "soft-prompt vectors before the input embeddings"
CAPABILITIES = Capabilities(reference="adapter_off", virtual_tokens="inputs")
INFERENCE_COST = "num_virtual_tokens extra input positions"


class Config(MethodConfig):
    name: Literal["prompt"] = "prompt"
    num_virtual_tokens: int = Field(20, ge=1, description="Number m of soft-prompt vectors.")
    init_text: str | None = Field(
        None,
        description="Initialise the soft prompt from this text's token embeddings (repeated or cut to "
        "num_virtual_tokens); default: embeddings of random vocabulary tokens.",
    )


def peft_config(cfg: Config, model):
    from peft import PromptTuningConfig, PromptTuningInit

    return PromptTuningConfig(
        task_type=peft_task_type(model),
        num_virtual_tokens=cfg.num_virtual_tokens,
        # TEXT init is done by init_from_text below; RANDOM only avoids sampling first
        prompt_tuning_init=PromptTuningInit.RANDOM if cfg.init_text else PromptTuningInit.SAMPLE_VOCAB,
    )


def text_token_ids(text: str, tokenizer, n: int) -> list[int]:
    """The token ids of `text` (no special tokens), repeated or cut to n."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise MethodError(f"init_text {text!r} has no tokens")
    return (ids * (n // len(ids) + 1))[:n]


def init_from_text(model, text: str, tokenizer) -> None:
    """Set the soft prompt of a prompt-tuned PEFT model to the embeddings of `text`'s tokens."""
    import torch

    weight = model.prompt_encoder[model.active_adapter].embedding.weight
    ids = torch.tensor(
        text_token_ids(text, tokenizer, weight.shape[0]),
        device=model.word_embeddings.weight.device,
    )
    with torch.no_grad():
        weight.copy_(model.word_embeddings(ids).to(weight.dtype))


def _tokenizer_of(model):
    from transformers import AutoTokenizer

    where = getattr(model, "name_or_path", "") or ""
    try:
        if not where:
            raise OSError("the model has no name_or_path")
        return AutoTokenizer.from_pretrained(where)
    except Exception as e:  # any failure means: no tokenizer to be had
        raise MethodError(
            f"prompt tuning with init_text needs the model's tokenizer, and none loads from the model's "
            f"name_or_path ({where!r}: {e}). Load the model from a folder or hub id that holds its "
            "tokenizer, or apply without init_text and call "
            "tunelab.methods.prompt.init_from_text(model, text, tokenizer)."
        ) from e


def apply(model, cfg: Config):
    from peft import get_peft_model

    tokenizer = _tokenizer_of(model) if cfg.init_text else None
    peft_model = patch(get_peft_model(model, peft_config(cfg, model)))
    if cfg.init_text:
        init_from_text(peft_model, cfg.init_text, tokenizer)
    return peft_model


def save(model, out_dir) -> None:
    model.save_pretrained(out_dir, safe_serialization=True)


def load(base_model, out_dir):
    from peft import PeftModel

    return patch(PeftModel.from_pretrained(base_model, out_dir))
