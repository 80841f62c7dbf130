"""The model(s) behind the endpoint: a base model and optional named PEFT adapters on it."""

from __future__ import annotations

import contextlib
import functools
import time
from pathlib import Path

from tunelab.serve.protocol import APIError


class ServeError(ValueError):
    """A `tunelab serve` setting that cannot work (a bad --adapter or --port ...): the user's to fix."""


def adapter_methods() -> list[str]:
    """The methods whose result is a PEFT adapter over the untouched, unquantized base and without virtual
    tokens (lora, ia3): several of them load side by side on one served base."""
    from tunelab.methods.registry import capabilities, names

    caps = {n: capabilities(n) for n in names()}
    return [
        n for n, c in caps.items() if c.reference == "adapter_off" and not c.virtual_tokens and not c.quantized_base
    ]


class Served:
    """A base model and optional named PEFT adapters on it. Only the scheduler thread runs the model."""

    def __init__(self, model, tokenizer, name: str, adapters: list[str] | None = None):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.adapters = list(adapters or [])
        self.created = int(time.time())

    def ids(self) -> list[str]:
        return [self.name, *self.adapters]

    def check(self, model_id: str) -> None:
        if model_id not in self.ids():
            raise APIError(404, f"The model '{model_id}' does not exist; served: {', '.join(self.ids())}",
                           param="model", code="model_not_found")  # fmt: skip

    @contextlib.contextmanager
    def selected(self, model_id: str):
        """Hold the model with `model_id` active: the base (adapters disabled) or one adapter. Switching
        is global to the PEFT model, so only one adapter's batch runs at a time."""
        if not self.adapters:
            yield self.model
        elif model_id == self.name:
            with self.model.disable_adapter():
                yield self.model
        else:
            self.model.set_adapter(model_id)
            yield self.model

    @property
    def context_length(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The longest token in the vocabulary, in characters of its vocabulary entry (bytes, for a byte-level
        BPE): a text of C characters has at least C / this many tokens, a bound known before tokenising."""
        return max((len(t) for t in self.tokenizer.get_vocab()), default=1) or 1


def _default_name(spec: str) -> str:
    p = Path(spec.rstrip("/"))
    if p.name == "final":
        p = p.parent
    return p.name if p.exists() else spec


SERVE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def load_served(
    spec: str,
    adapters: list[tuple[str, str]] = (),
    device: str = "auto",
    name: str | None = None,
    trust_remote_code: bool = False,
    dtype: str = "auto",
):
    """Load `spec` (run folder or model spec) merged, and each (name, run) LoRA adapter on top. `dtype`: the
    weights' type while serving; auto: as loaded (a bf16 run's whole-model result loads as its fp32 master
    weights, twice bf16's memory: bfloat16 serves it at half)."""
    from tunelab.models import resolve
    from tunelab.stages.runs import load_run, result_dir, run_manifest

    name = name or _default_name(spec)
    names = [a for a, _ in adapters]
    if len(set(names)) != len(names) or name in names:  # before the model loads: the names alone decide
        raise ServeError(f"adapter names must be unique and differ from the served model's name {name!r}: {names}")
    if dtype not in SERVE_DTYPES:
        raise ServeError(f"--dtype {dtype!r}: choose one of {', '.join(SERVE_DTYPES)}")
    model, tokenizer = load_run(spec, device=device, merge=True, trust_remote_code=trust_remote_code)
    if dtype != "auto":
        import torch

        model = model.to(getattr(torch, dtype))
    main = run_manifest(spec)
    if adapters and hasattr(model, "peft_config"):
        raise ServeError(f"{spec}: its method keeps PEFT modules unmerged; serve adapters over a plain base model")
    if adapters:
        from peft import PeftModel

        base = resolve(main["base_model"]["name"]) if main else resolve(spec)
        for i, (aname, arun) in enumerate(adapters):
            final, manifest = result_dir(arun), run_manifest(arun)
            if manifest is None or manifest.get("method") not in adapter_methods():
                raise ServeError(
                    f"--adapter {aname}={arun}: not a finished {' / '.join(adapter_methods())} run "
                    f"(found method {manifest and manifest.get('method')!r}); other methods: serve the run itself"
                )
            if manifest["base_model"].get("new_special_tokens"):
                raise ServeError(
                    f"--adapter {aname}={arun}: the run added tokens to the vocabulary "
                    f"({', '.join(manifest['base_model']['new_special_tokens'])}), which the shared base lacks; "
                    "serve that run itself"
                )
            if resolve(manifest["base_model"]["name"]) != base:
                raise ServeError(
                    f"--adapter {aname}={arun}: trained on {manifest['base_model']['name']!r}, but the served base "
                    f"is {spec!r}; serve that base model instead"
                )
            if i == 0:
                model = PeftModel.from_pretrained(model, str(final), adapter_name=aname)
            else:
                model.load_adapter(str(final), adapter_name=aname)
        model.eval()
    return Served(model, tokenizer, name, names)


def parse_adapter(text: str) -> tuple[str, str]:
    name, sep, run = text.partition("=")
    if not sep or not name or not run:
        raise ServeError(f"--adapter {text!r}: write NAME=RUN, e.g. --adapter alpaca=runs/sft-lora")
    return name, run
