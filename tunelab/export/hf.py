"""`tunelab export`: a finished run (or any model spec) as a merged Hugging Face folder or a GGUF file."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from tunelab.config import OutputWriteError, check_output_path
from tunelab.export import ExportError
from tunelab.export import check as check_mod
from tunelab.export.gguf import QUANT_TYPES, write_gguf
from tunelab.export.gguf_lora import write_gguf_lora
from tunelab.export.ollama import modelfile_text
from tunelab.methods import get as get_method
from tunelab.methods.qat import settings
from tunelab.models.sources import gguf_source_metadata
from tunelab.stages.runs import load_run, result_dir, run_manifest
from tunelab.training.card import CARD_FILE, merged_card

HF_QUANTS = ("f32", "f16", "bf16")
FORMATS = ("hf", "gguf", "gguf-lora")


def load_merged(run: str, device: str = "cpu", trust_remote_code: bool = False, upcast: bool = False):
    """(plain transformers model, tokenizer, manifest or None) for a run folder or model spec.

    The method's weights are folded into the base model (LoRA's B A added to W, QAT's fake
    quantisation written into the weights, ...); with `upcast` in fp32 (load_run). Methods that cannot be merged
    (prefix, prompt, bottleneck adapters) keep extra modules a plain model does not have, so they cannot be
    exported.
    """
    manifest = run_manifest(run)
    if manifest is not None and not get_method(manifest["method"]).CAPABILITIES.mergeable:
        raise ExportError(
            f"{run}: method {manifest['method']!r} cannot be merged into plain weights, so it cannot be exported "
            "as a standalone model; serve it with `tunelab serve` or load it with `tunelab.stages.runs.load_run`."
        )
    model, tokenizer = load_run(run, device=device, merge=True, trust_remote_code=trust_remote_code, upcast=upcast)
    if hasattr(model, "merge_and_unload") or hasattr(model, "peft_config"):
        raise ExportError(f"{run}: the merged model still carries PEFT modules; it cannot be exported")
    if extra := beyond_config(model):  # e.g. bitfit's added biases on Qwen2, which has no flag for them
        raise ExportError(
            f"{run}: the merged model has {len(extra)} weights its config ({type(model.config).__name__}) cannot "
            f"describe ({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''}): a model loaded from the exported "
            "files would silently lack them. Use the run itself (tunelab generate / serve / evaluate load it)."
        )
    return model.eval(), tokenizer, manifest


def beyond_config(model) -> list[str]:
    """The parameters of `model` that a model built from its config would not have: `from_pretrained` of a
    folder written from it would drop them (no error, other logits)."""
    from tunelab.models.heads import config_parameter_names

    return sorted({n for n, _ in model.named_parameters()} - config_parameter_names(model))


def write_hf(model, tokenizer, out_dir, dtype: str = "f32", card: str | None = None) -> Path:
    """A folder that `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load:
    safetensors weights, config, generation config, tokenizer with its chat template, and `card` as its
    README.md when given. Written atomically (a temporary folder renamed into place)."""
    import torch

    if dtype not in HF_QUANTS:
        raise ExportError(f"--format hf stores {', '.join(HF_QUANTS)}; for quantised files use --format gguf")
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    target_dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    original = next(model.parameters()).dtype
    model.to(target_dtype)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if card is not None:
            (tmp / CARD_FILE).write_text(card)
        if out.exists():
            shutil.rmtree(out)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    except OSError as e:  # disk full, read-only: the half-written folder goes, the message names the target
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputWriteError(f"cannot write {out}: {e.strerror or e}; free space or choose another --out") from None
    finally:
        model.to(original)
    return out


def _qat_advice(manifest: dict | None, run: str, quant: str) -> str | None:
    """A note when a QAT run is exported to a 4-bit type other than the one it was trained for."""
    if not manifest:
        return None

    s = settings(result_dir(run))  # None: not a QAT result
    if s is None:
        return None
    match = {(32, False): "q4_1", (32, True): "q4_0"}.get((s.get("group_size"), s.get("symmetric")))
    if quant == match or quant in ("f32", "f16"):
        return None
    if match is None:
        return f"note: this QAT run used group_size {s.get('group_size')}, which no GGUF type matches exactly"
    return f"note: this QAT run was trained for --quant {match}; {quant} re-quantises its weights (less accurate)"


def base_model_spec(run: str, manifest: dict | None) -> str:
    """The model spec a run was trained from (through `base_run` chains), or `run` itself for a plain model."""
    seen = set()
    while manifest is not None:
        if not manifest.get("base_run") or manifest["base_run"] in seen:
            return manifest["base_model"]["name"]
        run = manifest["base_run"]
        seen.add(run)
        manifest = run_manifest(run)
    return run


def export(
    run: str,
    fmt: str = "hf",
    quant: str | None = None,
    out: str | None = None,
    device: str = "cpu",
    trust_remote_code: bool = False,
    pre_tokenizer: str | None = None,
    modelfile: bool = False,
    check: bool = False,
    check_data: str | None = None,
    check_texts: int = check_mod.TEXTS,
    check_task: str | None = None,
    check_task_rows: int = 200,
) -> dict:
    """Export a run (or a model spec) and return a report {format, path, bytes, quant, ...}.

    GGUF: `pre_tokenizer` overrides llama.cpp's pre-tokenizer name; by default it is carried over from
    the GGUF file the base model was converted from, else recognised from the tokenizer (write_gguf);
    `modelfile` also writes an Ollama Modelfile beside the file (export/ollama.py). `check` runs the
    written file in llama.cpp against the model it came from (export/check.py) and adds the report as
    "check": on `check_texts` held-out texts (the run's validation rows, or `check_data`), and on
    `check_task_rows` dev rows of the classification preset `check_task`."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose {', '.join(FORMATS)}")
    if out:
        check_output_path(out, "--out")
    if fmt == "gguf-lora":
        if modelfile or check:
            raise ExportError(
                "--modelfile and --check go with --format gguf (a whole model); gguf-lora writes the adapter only"
            )
        return export_gguf_lora(run, quant or "f32", out, device, trust_remote_code)
    if modelfile and fmt != "gguf":
        raise ExportError("--modelfile goes with --format gguf (Ollama runs GGUF files)")
    if check and fmt != "gguf":
        raise ExportError("--check runs a GGUF file in llama.cpp; it goes with --format gguf")
    if check:
        check_mod.require_llama_cpp()
        task, task_rows = check_mod.task_setup(check_task, check_task_rows)
    quant = quant or ("f32" if fmt == "hf" else "f16")
    allowed = HF_QUANTS if fmt == "hf" else QUANT_TYPES
    if quant not in allowed:
        raise ExportError(f"--format {fmt} takes --quant {' | '.join(allowed)}, not {quant!r}")
    # f32 and f16 files hold more than bf16's 8 bits of mantissa: a bf16 run's update is merged in fp32 for them
    # (merged in bf16, each weight was rounded with it: an error of the order of a fine-tune's update itself)
    upcast = quant in ("f32", "f16")
    model, tokenizer, manifest = load_merged(run, device=device, trust_remote_code=trust_remote_code, upcast=upcast)
    note = _qat_advice(manifest, run, quant) if fmt == "gguf" else None
    if note:
        print(f"tunelab: {note}", file=sys.stderr)
    base = Path(run.rstrip("/"))
    base = base.parent if base.name == "final" else base
    if fmt == "hf":
        path = Path(out) if out else base.with_name(base.name + "-hf") if manifest else Path(base.name + "-hf")
        card = None
        if manifest is not None:  # a run: its card, rewritten for the merged folder
            run_card = result_dir(run) / CARD_FILE
            card = merged_card(run_card.read_text() if run_card.is_file() else None, manifest,
                               base_model_spec(run, manifest), model, quant, str(path))  # fmt: skip
        write_hf(model, tokenizer, path, quant, card)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        return {"format": "hf", "path": str(path), "bytes": size, "quant": quant}
    path = Path(out) if out else Path(f"{base}-{quant}.gguf" if manifest else f"{base.name}-{quant}.gguf")
    if pre_tokenizer is None:
        pre_tokenizer = (gguf_source_metadata(base_model_spec(run, manifest)) or {}).get("tokenizer.ggml.pre")
    ollama = modelfile_text(tokenizer, path.name) if modelfile else None  # refused before any file is written
    try:
        report = write_gguf(model, tokenizer, path, quant, name=base.name, pre_tokenizer=pre_tokenizer)
        for line in report["notes"]:  # what llama.cpp will do otherwise than transformers, and where
            print(f"tunelab: note: {line}", file=sys.stderr)
        if ollama is not None:
            report["modelfile"] = str(path.with_suffix(".Modelfile"))
            Path(report["modelfile"]).write_text(ollama)
    except OSError as e:
        raise OutputWriteError(f"cannot write {path}: {e.strerror or e}; free space or choose another --out") from None
    if check:
        texts, source = check_mod.heldout_texts(run, tokenizer, check_data, check_texts)
        reference = check_mod.Reference(model, tokenizer, texts, task, task_rows)
        report["check"] = {"texts_from": source, **check_mod.check_file(path, reference)}
        print(f"tunelab: check: {check_mod.summary_line(report['check'])}", file=sys.stderr)
    return {"format": "gguf", **report, **({"note": note} if note else {})}


def export_gguf_lora(run: str, quant: str, out: str | None, device: str, trust_remote_code: bool) -> dict:
    """A LoRA run's adapter as a llama.cpp LoRA GGUF (export/gguf_lora.py), to apply over the base model's GGUF."""
    manifest = run_manifest(run)
    if manifest is None:
        raise ExportError(f"{run}: --format gguf-lora writes the adapter of a LoRA run; this is no run folder")
    if tokens := manifest["base_model"].get("new_special_tokens"):
        raise ExportError(
            f"{run}: the run added tokens to the vocabulary ({', '.join(tokens)}), and a llama.cpp LoRA adapter "
            "cannot add rows to its base's token table; export the merged model instead (--format gguf)"
        )
    model, _ = load_run(run, device=device, merge=False, trust_remote_code=trust_remote_code)
    base = Path(run.rstrip("/"))
    base = base.parent if base.name == "final" else base
    path = Path(out) if out else Path(f"{base}-lora-{quant}.gguf")
    try:
        report = write_gguf_lora(model, path, quant, name=base.name)
    except OSError as e:
        raise OutputWriteError(f"cannot write {path}: {e.strerror or e}; free space or choose another --out") from None
    spec = base_model_spec(run, manifest)
    report["base_model"] = spec
    report["usage"] = (
        f"llama-cli -m BASE.gguf --lora {path}   (BASE.gguf: tunelab export {spec} --format gguf; "
        "a LoRA applies at full strength over an f16/f32 base, approximately over a quantised one)"
    )
    return {"format": "gguf-lora", **report}
