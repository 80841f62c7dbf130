"""Models built from an architecture rather than loaded: `model: {architecture: llama, config: {...},
tokenizer: DIR | {train: {...}}}` (docs/pretraining.md).

    tok = scratch_tokenizer(cfg.model, texts)                   # the folder, or trained (once) on `texts`
    model = build_model(cfg.model, tok, AutoModelForCausalLM, seed=0)
    parameter_counts(cfg.model, vocab_size=4096)                # before anything is built: on the meta device

The model is transformers' own class for the architecture, built with `AutoConfig.for_model` and
`from_config`, so each architecture keeps its own initialisation (`_init_weights`: normal(0,
initializer_range) for Llama / BERT / GPT-2 linears and embeddings, ones for norms ...). The vocabulary size
and the special token ids come from the tokenizer. Saved like any full fine-tune (safetensors), the result is
an ordinary model folder: `model.name: runs/X/final` continues it in `stage: sft`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tunelab.config import ModelConfig
from tunelab.models.loading import load_tokenizer
from tunelab.models.sources import ModelError
from tunelab.models.tokenizer_train import TokenizerSpec, cached_tokenizer


def _note(msg: str) -> None:
    print(f"tunelab: {msg}", file=sys.stderr, flush=True)


def tokenizer_spec(train_cfg) -> TokenizerSpec:
    """The TokenizerSpec of a `model.tokenizer.train` section."""
    return TokenizerSpec(type=train_cfg.type, vocab_size=train_cfg.vocab_size, min_frequency=train_cfg.min_frequency,
                         special_tokens=tuple(train_cfg.special_tokens), chat_template=train_cfg.chat_template,
                         lowercase=train_cfg.lowercase)  # fmt: skip


def scratch_tokenizer(model_cfg: ModelConfig, texts: list[str] | None = None, log=_note):
    """The tokenizer of a model built from scratch: `model.tokenizer` as a folder, or trained on its
    `train.corpus` files, else on `texts` (the run's training text), and cached."""
    source = model_cfg.tokenizer
    if isinstance(source, str):
        folder = Path(source).expanduser()
        if not (folder / "tokenizer_config.json").is_file() and not (folder / "tokenizer.json").is_file():
            raise ModelError(
                f"model.tokenizer {source!r}: no tokenizer there (tokenizer.json / tokenizer_config.json); "
                "train one with `tunelab tokenizer train`, or give {train: {...}}"
            )
        return load_tokenizer(ModelConfig(name=str(folder)))
    train = source.train
    if train.corpus:
        from tunelab.data.corpus import read_documents

        texts = [t for _, t in read_documents(train.corpus)]
    if not texts:
        raise ModelError(
            "model.tokenizer.train.corpus: give the text files to train the tokenizer on (the run's own text is "
            "used when data.train is plain text, for stage pretrain or mlm)"
        )
    folder = cached_tokenizer(texts, tokenizer_spec(train), log=log)
    return load_tokenizer(ModelConfig(name=str(folder)))


SPECIAL_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "cls_token_id", "sep_token_id", "mask_token_id",
               "decoder_start_token_id")  # fmt: skip


def model_config(model_cfg: ModelConfig, tokenizer=None, vocab_size: int | None = None):
    """The transformers config: `model.config` over the architecture's defaults, vocabulary and special
    token ids from the tokenizer (or just `vocab_size`, for counting)."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_cfg.architecture, **model_cfg.config)
    config.vocab_size = len(tokenizer) if tokenizer is not None else vocab_size
    if tokenizer is not None:
        pad = tokenizer.pad_token_id
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        config.pad_token_id, config.bos_token_id, config.eos_token_id = pad, bos, eos
        for key in ("cls_token_id", "sep_token_id", "mask_token_id"):  # ModernBERT's config has these
            if hasattr(config, key):
                setattr(config, key, getattr(tokenizer, key, None))
        if getattr(config, "is_encoder_decoder", False):
            config.decoder_start_token_id = pad if pad is not None else bos
    else:  # counting: the architecture's default ids may lie past a small vocabulary (an embedding refuses that)
        for key in SPECIAL_IDS:
            value = getattr(config, key, None)
            if isinstance(value, int) and value >= config.vocab_size:
                setattr(config, key, 0)
    return config


def _from_config(auto_class, config, architecture: str):
    try:
        return auto_class.from_config(config)
    except ValueError as e:  # transformers: "Unrecognized configuration class ... for this kind of AutoModel"
        raise ModelError(
            f"model.architecture {architecture!r} has no {auto_class.__name__.removeprefix('AutoModelFor')} model "
            f"in transformers ({str(e).splitlines()[0][:160]}); choose an architecture this stage can train"
        ) from None


_PROBE = "Hello   world 12345 it's\n\n  x ÄÖ 😀 <b>done</b>"


def check_tokenizer_reloads(config, tokenizer, architecture: str) -> None:
    """Refuse, before training, a tokenizer that AutoTokenizer would not give back from the run's folder.
    transformers 5 loads the tokenizer beside a config of some model types (qwen2, qwen3_5 ...) as that type's own
    class, which rebuilds the pre-tokenizer its way: a tokenizer trained here then splits text differently after a
    reload (`12345` one token before, five after), so evaluation, serving and export would feed the model ids it
    never trained on."""
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as folder:
        config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        back = AutoTokenizer.from_pretrained(folder)
    want, got = tokenizer(_PROBE)["input_ids"], back(_PROBE)["input_ids"]
    if got != want:
        raise ModelError(
            f"model.architecture {architecture!r}: transformers loads the tokenizer saved beside this architecture's "
            f"config as {type(back).__name__}, which splits text its own way, not as this tokenizer does "
            f"({_PROBE!r}: {len(want)} tokens here, {len(got)} after a reload), so the trained model could not be "
            "reloaded with the tokens it learnt. Choose an architecture with the same layers whose tokenizer loads "
            "as saved (llama, mistral, qwen3 ...), or give model.tokenizer a tokenizer of this architecture's own kind."
        )


def build_model(model_cfg: ModelConfig, tokenizer, auto_class=None, seed: int | None = None, device="cpu",
                max_length: int | None = None):  # fmt: skip
    """A randomly initialised `auto_class` model of `model_cfg.architecture`, in float32 on `device`, in eval
    mode. `seed` seeds its initialisation alone (torch's global generator is left as it was); None draws
    from the global generator. `max_length`: the longest input the run feeds it, checked against the
    architecture's position limit."""
    import torch

    if auto_class is None:
        from transformers import AutoModelForCausalLM as auto_class

    config = model_config(model_cfg, tokenizer)
    limit = next((getattr(config, k) for k in ("max_position_embeddings", "n_positions") if hasattr(config, k)), None)
    if max_length is not None and isinstance(limit, int) and limit < max_length:
        raise ModelError(
            f"data.max_length {max_length} is longer than the model's positions ({limit}): raise "
            "model.config.max_position_embeddings (n_positions for gpt2) or lower data.max_length"
        )
    check_tokenizer_reloads(config, tokenizer, model_cfg.architecture)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = _from_config(auto_class, config, model_cfg.architecture)
    if isinstance(limit, int) and tokenizer.model_max_length > limit:
        tokenizer.model_max_length = limit
    if getattr(model, "generation_config", None) is not None:  # generative models only (BERT has none)
        for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
            setattr(model.generation_config, key, getattr(config, key))
    return model.to(device).eval()


def parameter_counts(model_cfg: ModelConfig, vocab_size: int, auto_class=None) -> dict:
    """Parameters of the model `model_cfg` describes, with a vocabulary of `vocab_size`, counted on the
    meta device (no memory, no initialisation): total (tied weights once), the token embedding, the rest."""
    import torch

    if auto_class is None:
        from transformers import AutoModelForCausalLM as auto_class

    config = model_config(model_cfg, vocab_size=vocab_size)
    with torch.device("meta"):
        model = _from_config(auto_class, config, model_cfg.architecture)
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    embedding = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    untied_head = head is not None and id(head.weight) not in {id(model.get_input_embeddings().weight)}
    out = {"architecture": model_cfg.architecture, "class": type(model).__name__, "vocab_size": vocab_size,
           "total": total, "embedding": embedding, "head": head.weight.numel() if untied_head else 0}  # fmt: skip
    out["body"] = total - embedding - out["head"]
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "max_position_embeddings",
    ):
        value = getattr(config, key, None)
        if value is not None:
            out[key] = value
    return out
