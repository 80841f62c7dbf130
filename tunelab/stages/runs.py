"""A finished run's result folder (`final/`: the method's saved weights, tokenizer, tunelab.json) and
loading it back: the base model rebuilt as the run's stage built it (`Stage.reload`), then the method's
own `load`."""

from __future__ import annotations

import json
from pathlib import Path

from tunelab.config import ModelConfig
from tunelab.methods import get as get_method
from tunelab.models import ModelError, load_model, load_tokenizer, resolve_device
from tunelab.stages import get as get_stage


def result_dir(run: str | Path) -> Path | None:
    """The `final/` folder of a run, given the run folder or `final/` itself; None if `run` is no run."""
    p = Path(run)
    for cand in (p / "final", p):
        if (cand / "tunelab.json").exists():
            return cand
    return None


def run_manifest(run: str | Path) -> dict | None:
    """A run's final/tunelab.json (method, base model, stage, task settings), or None for a plain model."""
    final = result_dir(run)
    return json.loads((final / "tunelab.json").read_text()) if final is not None else None


def load_run(run: str, device: str = "auto", merge: bool = False, trust_remote_code: bool = False,
             rope_scaling: dict | None = None, upcast: bool = False):  # fmt: skip
    """(model, tokenizer) for a run folder, or for a plain model spec (then the base model itself).

    `upcast` (with `merge`): the weights in fp32 before the method's are merged in, so that a bf16 run's update
    (LoRA's s B A, ...) is added in fp32 to the base as training saw it, not rounded to bf16 with it (an export
    to f32 / f16 files). Not for a quantized base (qlora: its merge dequantizes).

    Whether a model's own Python code may run (`trust_remote_code`) is the caller's decision, never the
    run folder's: a manifest asking for it is refused unless the caller allows it (a shared run folder
    must not be able to execute code on the machine that loads it)."""
    dev = resolve_device(device)
    final = result_dir(run)
    if final is None:
        if Path(run).exists() and not (Path(run) / "config.json").exists() and not str(run).endswith(".gguf"):
            raise FileNotFoundError(f"{run}: no finished run here (no final/tunelab.json); did training complete?")
        spec = ModelConfig(name=str(run), trust_remote_code=trust_remote_code, rope_scaling=rope_scaling)
        return load_model(spec, device=dev)
    manifest = json.loads((final / "tunelab.json").read_text())
    # `rope_scaling`: the caller's, else the run's own (kept in its manifest's base_model)
    rope = {"rope_scaling": rope_scaling} if rope_scaling else {}
    # a hub base at the commit it trained on (its branch may have moved on since), where the run recorded one
    pin = {"revision": manifest["base_commit"]} if manifest.get("base_commit") else {}
    base_cfg = ModelConfig(**{**manifest["base_model"], "trust_remote_code": trust_remote_code, **rope, **pin})
    if manifest["base_model"].get("trust_remote_code") and not trust_remote_code:
        raise ModelError(
            f"{final / 'tunelab.json'} asks to run the Python code shipped with {base_cfg.name!r} "
            "(trust_remote_code: true). tunelab never takes that setting from a run folder: if you trust that "
            "code, pass --trust-remote-code (Python: load_run(..., trust_remote_code=True))."
        )
    stage = get_stage(manifest.get("stage", "sft"))
    extra = stage.reload(manifest) if stage.reload is not None else {}  # e.g. the head class and its size
    if manifest.get("base_run"):  # trained on top of another run (ppo from an SFT run): that run, merged
        base, base_tokenizer = load_run(
            manifest["base_run"], device=device, merge=True, trust_remote_code=trust_remote_code
        )
    elif base_cfg.architecture:  # built from scratch (method full): the result is a whole model, its own base
        base, base_tokenizer = load_model(ModelConfig(name=str(final)), device=dev, **extra)
    else:
        base, base_tokenizer = load_model(base_cfg, device=dev, **extra)
    method = get_method(manifest["method"])
    model = method.load(base, final)
    if merge and method.CAPABILITIES.mergeable:
        if upcast and not method.CAPABILITIES.quantized_base:
            model = model.float()  # exact: bf16 and fp16 values are fp32 values
        model = method.merge(model)
    # the run's own tokenizer (it may carry a chat template set for training)
    has_tokenizer = (final / "tokenizer_config.json").exists()
    own = ModelConfig(name=str(final), trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(own) if has_tokenizer else base_tokenizer
    return model.to(dev).eval(), tokenizer
