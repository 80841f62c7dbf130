"""Loading a tokenizer and model from a resolved spec onto a device, in the right dtype."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.models import new_tokens
from tunelab.models.precision import choose_precision
from tunelab.models.rope import apply_rope_scaling
from tunelab.models.sources import NAMED, NO_HUB_KERNELS, ModelError, pick_pad_token, resolve
from tunelab.models.streaming import load_streamed

if TYPE_CHECKING:
    import torch

    from tunelab.config import ModelConfig

# Used when a tokenizer ships no chat template. ChatML (`<|im_start|>role\ncontent<|im_end|>\n`) is
# what SmolLM2, Qwen and many others use; on a vocabulary without those special tokens it still
# works, the markers are just spelled out as ordinary text.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# the attribute names of the task heads transformers' *ForSequenceClassification / *ForTokenClassification /
# *ForQuestionAnswering classes add fresh (random) on a backbone: trained whole, never quantised or compacted
TASK_HEADS = ("classifier", "score", "qa_outputs")


def unwrap(model):
    """The transformers model inside a PEFT wrapper, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def soft_prompt(model) -> str | None:
    """ "PROMPT_TUNING" or "PREFIX_TUNING" for a PEFT prompt- or prefix-tuned model (only its virtual tokens train),
    else None (other prompt-learning types too: p-tuning ... keep PEFT's own paths)."""
    kind = getattr(getattr(model, "active_peft_config", None), "peft_type", None)
    return kind if kind in ("PROMPT_TUNING", "PREFIX_TUNING") else None  # PEFT's PeftType is a str enum


def no_grad(fn):
    """`torch.no_grad()` as a decorator that imports torch when `fn` first runs, not when its module is
    imported: the modules the config check reads (stages, generation, losses) then load without torch."""

    @functools.wraps(fn)
    def without_grad(*args, **kwargs):
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return without_grad


def resolve_device(device) -> torch.device:
    """`auto` picks $TUNELAB_DEVICE if set, else cuda, then mps, then cpu; anything else is handed to
    torch.device. (The test suite sets TUNELAB_DEVICE=cpu so that it behaves the same on a GPU machine.)"""
    import os

    import torch

    if str(device) == "auto" and os.environ.get("TUNELAB_DEVICE"):
        device = os.environ["TUNELAB_DEVICE"]
    if str(device) != "auto":
        return _usable(str(device))
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _usable(spec: str):
    """torch.device(spec), refusing a device this machine cannot run on, by name, before any model loads."""
    import torch

    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ModelError(f"device {spec!r}: not a device; use auto, cpu, cuda, cuda:N, mps or xpu") from None
    backend = {"cuda": torch.cuda, "mps": getattr(torch.backends, "mps", None), "xpu": getattr(torch, "xpu", None)}
    if device.type in backend:
        mod = backend[device.type]
        if mod is None or not mod.is_available():
            raise ModelError(
                f"device {spec!r}: this machine has no {device.type} device that torch can use "
                f"(torch {torch.__version__}); use device auto or cpu"
            )
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelError(f"device {spec!r}: there are {torch.cuda.device_count()} CUDA devices (0 ...)")
    return device


def compute_dtype(cfg_dtype: str, device) -> torch.dtype:
    """The dtype the weights load in: `model.dtype` resolved on the device (models/precision.py).
    `auto`: bfloat16 on CUDA with bf16, float32 elsewhere: on a CPU, only the training loop takes bf16 under auto
    (LoRA on a CPU with native bf16), and it passes the dtype it resolved (training/harness.py `resolved_dtype`)."""
    import torch

    kind = resolve_device(device).type if str(device) == "auto" else torch.device(device).type
    return choose_precision(cfg_dtype, kind).dtype


def hub_unreachable() -> str | None:
    """Why the hub surely cannot be reached, found in a moment; None when it might be.

    Without this an offline machine sits through a minute of retries before failing.
    """
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(k) for k in _PROXY_VARS):
        return None  # the proxy resolves names, not us
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError as e:
        return f"cannot resolve {host} ({e}); offline?"
    return None


_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def _from_pretrained(loader, path: str, cfg: ModelConfig, **kw):
    if Path(path).exists():
        try:
            return loader(path, trust_remote_code=cfg.trust_remote_code, **kw)
        except OSError as e:
            raise ModelError(f"{path}: cannot load model files: {e}") from e
    why = hub_unreachable()
    try:
        # unreachable hub: a model already in the HF cache still loads
        return loader(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                      local_files_only=why is not None, **kw)  # fmt: skip
    except OSError as e:
        if why is None and kw.get("use_safetensors") and _pickle_only(path, cfg.revision, str(e)):
            raise ModelError(
                f"model {cfg.name!r}: the hub repo has no safetensors weights, only a pickle (pytorch_model.bin), which "
                "tunelab does not load (unpickling runs code). Use a revision that has them (model.revision: the hub's "
                "safetensors conversion bot opens such pull requests, refs/pr/N), or convert the model yourself where "
                "you trust it (save_pretrained writes safetensors) and pass that folder."
            ) from None
        reason = why or (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(
            f"model {cfg.name!r} was not found locally, and the Hugging Face hub could not provide it "
            f"(offline, unreachable, or no such repo): {reason}\n"
            "Pass a local Hugging Face folder, a .gguf file, or a named default: "
            f"{', '.join(NAMED)} (see `tunelab models`)."
        ) from e


def _pickle_only(repo: str, revision: str | None, error: str) -> bool:
    """Whether a hub repo holds pickled weights and no safetensors: its file list, asked of the hub (the error's
    wording, transformers', only where the hub does not list the files)."""
    try:
        from huggingface_hub import HfApi

        files = HfApi().list_repo_files(repo, revision=revision)
    except Exception:  # noqa: BLE001 - no answer, no access: what transformers said
        return "cannot be loaded with `safetensors`" in error
    weights = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".safetensors"))]
    return bool(weights) and not any(f.endswith(".safetensors") for f in weights)


def _load_tokenizer(path: str, cfg: ModelConfig):
    from transformers import AutoTokenizer

    tok = _from_pretrained(AutoTokenizer.from_pretrained, path, cfg)
    if tok.pad_token is None:
        tok.pad_token = pick_pad_token(tok)
    if not tok.chat_template:
        tok.chat_template = CHATML_TEMPLATE
    tok.padding_side = "right"
    new_tokens.add_to_tokenizer(tok, cfg.new_special_tokens)
    return tok


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer for `cfg.name`, with a pad token, a chat template (CHATML_TEMPLATE if it has
    none) and right padding. `cfg.name` may also be a folder holding only a tokenizer (a run's result)."""
    from pathlib import Path

    folder = Path(cfg.name).expanduser()
    if (folder / "tokenizer_config.json").is_file() and not (folder / "config.json").is_file():
        return _load_tokenizer(str(folder), cfg)
    return _load_tokenizer(resolve(cfg.name), cfg)


def load_config(cfg: ModelConfig):
    """The transformers config of `cfg.name` (no weights loaded): its model_type, is_encoder_decoder ..."""
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig.from_pretrained, resolve(cfg.name), cfg)


def skeleton(cfg: ModelConfig):
    """`cfg.name`'s bare transformer built from its config on the meta device (no weights, no memory), for the
    checks a method makes before the model loads (its layers' names and types); None where it cannot be built
    here (a folder or hub id the full load reads its own way, a model without a config): the load reports."""
    if cfg.architecture is not None:
        return None
    try:
        import torch
        from transformers import AutoModel

        config = load_config(cfg)
        with torch.device("meta"):
            return AutoModel.from_config(config, trust_remote_code=cfg.trust_remote_code)
    except Exception:
        return None


_PLAN: contextvars.ContextVar = contextvars.ContextVar("tunelab_load_plan", default=None)


@contextlib.contextmanager
def loading_into(plan):
    """Within: `load_model` builds the model empty and reads it tensor by tensor, converting the layers `plan`
    names as they arrive (models/streaming.py), so a method that stores its frozen base in another form
    (qlora: 4-bit) never holds the whole model in its compute dtype. `plan` None: the ordinary load. The
    training loop sets it around `stage.load_model` from the method's `load_plan` hook."""
    token = _PLAN.set(plan)
    try:
        yield
    finally:
        _PLAN.reset(token)


def load_model(cfg: ModelConfig, device="cpu", auto_class=None, **model_kwargs):
    """`(model, tokenizer)` for `cfg.name`, in `cfg.dtype` on `device`, in eval mode.

    `model_kwargs` go to `from_pretrained` (e.g. num_labels for a classification head). Inside
    `loading_into(plan)`, a local safetensors folder is read tensor by tensor (models/streaming.py). A config with
    `cfg.architecture` loads no weights: models/scratch.py builds that model."""
    if auto_class is None:
        from transformers import AutoModelForCausalLM as auto_class

    if cfg.architecture:
        raise ModelError(f"model.architecture {cfg.architecture!r}: a model built from scratch, not loaded; "
                         "tunelab.models.scratch.build_model builds it")  # fmt: skip
    path = resolve(cfg.name)
    tok = _load_tokenizer(path, cfg)
    dev = resolve_device(device)
    dtype = compute_dtype(cfg.dtype, dev)
    model = None
    if cfg.rope_scaling is not None:  # in the config before the model is built: the rotary init reads it
        model_kwargs = {"config": _scaled_config(path, cfg, **model_kwargs)}
    if (plan := _PLAN.get()) is not None:
        if not Path(path).is_dir():
            why = "not a local folder (a hub id)"
        elif set(model_kwargs) - {"config"}:
            why = f"a head made at load ({', '.join(model_kwargs)})"
        else:
            model, why = load_streamed(path, auto_class, dtype, dev, plan, cfg.trust_remote_code, **model_kwargs)
        if model is None:
            _log(f"{cfg.name}: loaded whole, then converted ({why})")
    if model is None:
        # safetensors only: a pickle (pytorch_model.bin) runs code when loaded (sources.resolve refuses a local one)
        model = _from_pretrained(auto_class.from_pretrained, path, cfg, dtype=dtype, use_safetensors=True,
                                 **{**NO_HUB_KERNELS, **model_kwargs})  # fmt: skip
    added = new_tokens.grow(model, tok)
    had = [t for t in cfg.new_special_tokens if tok.convert_tokens_to_ids(t) not in added]
    if added:
        _log(f"{cfg.name}: {len(added)} new tokens (model.new_special_tokens), ids {added[0]}-{added[-1]}: the token "
             f"table has {model.get_input_embeddings().weight.shape[0]:,} rows, the new ones at the others' mean")  # fmt: skip
    if had:
        _log(f"{cfg.name}: model.new_special_tokens: the tokenizer has {', '.join(had)} already; left as they are")
    if getattr(model.config, "pad_token_id", None) is None and tok.pad_token_id is not None:
        model.config.pad_token_id = tok.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tok.pad_token_id
    return model.to(dev), tok


def hub_commit(cfg: ModelConfig) -> str | None:
    """The commit a model given as a hub id was loaded at, else None: what a run records (final/tunelab.json
    `base_commit`), so that reloading it takes the very base it trained on after the branch (`model.revision`,
    default main) has moved on. Read from the hub cache the load has just used: the snapshot folder its config.json
    lies in is named by the commit (transformers 5 no longer keeps it on the config)."""
    return None if cfg.architecture or not _hub_id(cfg.name) else _cached_commit(cfg.name, cfg.revision)


def hub_revision_commit(name: str, revision: str | None) -> str | None:
    """The commit a hub id's revision (a branch or tag; default main) names now, asked before anything loads:
    compare keys a cell by it, so a cell whose branch has moved on runs again instead of being reused. The hub
    is asked (config.json's download, which refreshes the cache's ref as any load does); offline, or where the
    hub does not answer, the cache's ref. None for a local folder, a named default, or a repo neither knows."""
    import re

    if not _hub_id(name):
        return None
    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    if hub_unreachable() is None:
        from huggingface_hub import hf_hub_download

        try:
            return _commit_in(hf_hub_download(name, "config.json", revision=revision))
        except Exception:  # noqa: BLE001 - no answer, no such repo or file, no access: what the cache says
            pass
    return _cached_commit(name, revision)


def _hub_id(name: str) -> bool:
    from tunelab.models.sources import hub_model_id

    return hub_model_id(name) == name


def _cached_commit(name: str, revision: str | None) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        return _commit_in(try_to_load_from_cache(name, "config.json", revision=revision))
    except ValueError:  # not a valid repo id after all
        return None


def _commit_in(path) -> str | None:
    """The commit in a hub cache path (…/snapshots/<commit>/config.json)."""
    import re

    found = re.search(r"[/\\]snapshots[/\\]([0-9a-f]{40})[/\\]", path) if isinstance(path, str) else None
    return found[1] if found else None


def _scaled_config(path: str, cfg: ModelConfig, **config_kwargs):
    """The model's transformers config with `cfg.rope_scaling` written in (models/rope.py); `config_kwargs`
    (a head's num_labels ...) are applied too, since from_pretrained ignores them beside a config."""
    from transformers import AutoConfig

    config = _from_pretrained(AutoConfig.from_pretrained, path, cfg, **config_kwargs)
    apply_rope_scaling(config, cfg.rope_scaling, cfg.name)
    return config


def _log(msg: str) -> None:
    print(f"[tunelab] {msg}", file=sys.stderr, flush=True)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights are counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
