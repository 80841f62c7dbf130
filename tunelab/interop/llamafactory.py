"""LLaMA-Factory's flat YAML (model_name_or_path, stage, finetuning_type, lora_rank, dataset ...) -> tunelab.

Its `dataset` names are resolved through the `dataset_info.json` in `dataset_dir` (LLaMA-Factory's
default: ./data) by the data layer (`data.dataset_info`). LLaMA-Factory's own defaults are kept where
they differ from tunelab's: lora_alpha = 2 x lora_rank, lora_dropout 0, no validation split.
"""

from __future__ import annotations

from tunelab.interop.translation import Translation
from tunelab.peer_keys import LLAMAFACTORY_IGNORED, LLAMAFACTORY_LORA_VARIANTS, LLAMAFACTORY_MAPPED

TOOL = "LLaMA-Factory"
STAGES = {"sft": "sft", "pt": "pretrain", "rm": "reward", "dpo": "dpo", "kto": "kto"}
# stage kto's weights of a desirable / undesirable reply's loss
KTO_WEIGHTS = {"kto_chosen_weight": "kto.desirable_weight", "kto_rejected_weight": "kto.undesirable_weight"}
SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant", "constant_with_warmup": "constant"}
FREEZE_MODULES = {"mlp": "ffn", "self_attn": "attention", "attn": "attention", "attention": "attention"}
# keys translated by code below; the rest of LLAMAFACTORY_MAPPED map one to one
_SPECIAL = {"stage", "finetuning_type", "quantization_bit", "quantization_method", "lora_rank", "lora_alpha",
            "lora_dropout", "lora_target", "freeze_trainable_layers", "freeze_trainable_modules",
            "freeze_extra_modules", "dataset", "eval_dataset", "dataset_dir", "max_samples", "val_size",
            "lr_scheduler_type", "pref_loss", "trust_remote_code", "template", "report_to", "pissa_init",
            "pissa_iter", "adapter_name_or_path", "create_new_adapter", "pref_beta", "simpo_gamma", *KTO_WEIGHTS,
            "pref_ftx", "new_special_tokens", *LLAMAFACTORY_LORA_VARIANTS}  # fmt: skip


def detect(raw: dict) -> bool:
    return "model_name_or_path" in raw and any(
        k in raw for k in ("stage", "finetuning_type", "lora_rank", "dataset", "template", "cutoff_len", "export_dir")
    )


def translate(raw: dict, source: str = "config") -> Translation:
    t = Translation(TOOL, source)
    if "export_dir" in raw or ("adapter_name_or_path" in raw and "stage" not in raw):
        t.refuse("export_dir", raw.get("export_dir"), "this is a merge / export config, not a training one: "
                 "merge and export a tunelab run with `tunelab export RUN --format hf --out DIR`")  # fmt: skip
    stage = raw.get("stage", "sft")
    if stage not in STAGES:
        hint = (
            " (tunelab's ppo stage takes a reward run in ppo.reward.path: write that config by hand)"
            if stage == "ppo"
            else ""
        )
        t.refuse("stage", stage, f"stage {stage!r} is not supported by tunelab{hint}; supported: {', '.join(STAGES)}")
    t.map("stage", stage, "stage", STAGES[stage])
    _method(raw, t)
    _data(raw, t, STAGES[stage])
    if "trust_remote_code" in raw:
        t.map("trust_remote_code", raw["trust_remote_code"], "model.trust_remote_code",
              note="your explicit setting, carried over: it runs the model repo's own code")  # fmt: skip
    if raw.get("new_special_tokens"):  # "<a>,<b>" (its command line's form) or a YAML list
        v = raw["new_special_tokens"]
        tokens = [s.strip() for s in v.split(",") if s.strip()] if isinstance(v, str) else [str(s) for s in v]
        t.map("new_special_tokens", v, "model.new_special_tokens", converted=tokens)
    if "template" in raw:
        t.ignore("template", template_note(raw["template"], TOOL))
    if "lr_scheduler_type" in raw:
        v = raw["lr_scheduler_type"]
        if v in SCHEDULERS:
            t.map("lr_scheduler_type", v, "training.scheduler", SCHEDULERS[v])
        else:
            t.ignore("lr_scheduler_type", f"{v!r} is not one of tunelab's schedules (constant, linear, cosine): cosine")
    if raw.get("pref_beta") is not None:  # the beta of whichever preference stage this is
        t.map("pref_beta", raw["pref_beta"], "kto.beta" if stage == "kto" else "dpo.beta")
    t.map_where(raw, KTO_WEIGHTS, stage == "kto", "a stage kto setting, and this config's stage is not kto")
    if "pref_loss" in raw:
        v = raw["pref_loss"]
        if v not in ("sigmoid", "ipo", "simpo", "orpo"):
            t.refuse("pref_loss", v, "tunelab's dpo has the sigmoid (DPO), ipo, simpo and orpo losses")
        t.map("pref_loss", v, "dpo.loss_type")
    if raw.get("simpo_gamma") is not None:
        t.map_where({"simpo_gamma": raw["simpo_gamma"]}, {"simpo_gamma": "dpo.simpo_gamma"},
                    raw.get("pref_loss") == "simpo", "a SimPO setting, and pref_loss is not simpo")  # fmt: skip
    t.map_where(raw, {"pref_ftx": "dpo.sft_weight"}, stage == "dpo",
                "dpo's SFT term (pref_ftx): tunelab's kto has no SFT term, and this config's stage is not dpo")  # fmt: skip
    if raw.get("report_to") is not None:
        t.report_to("report_to", raw["report_to"])
    elif "report_to" in raw:
        t.ignore("report_to", "null: tunelab's default")
    t.map_rest(raw, LLAMAFACTORY_MAPPED, LLAMAFACTORY_IGNORED, _SPECIAL, floats=("num_train_epochs",),
               notes={"neat_packing": "tunelab's packed rows always attend per example"},
               unknown=f"not a {TOOL} key tunelab knows")  # fmt: skip
    return t


def template_note(name, tool: str) -> str:
    """What becomes of a named chat template: tunelab renders with the model's own (its tokenizer's)."""
    return (f"{name!r}: kept the model's own chat template (its tokenizer's chat_template, as in training and "
            f"`tunelab chat`; a tokenizer without one gets tunelab's ChatML fallback); {tool}'s {name!r} template "
            "is not applied, so check the model ships the template you meant")  # fmt: skip


def _method(raw: dict, t: Translation) -> None:
    kind = raw.get("finetuning_type", "lora")
    bits = raw.get("quantization_bit")
    if bits is not None:
        if bits != 4 or kind != "lora":
            t.refuse("quantization_bit", bits, "tunelab quantises the base in 4 bit for LoRA only (method qlora)")
        qmethod = raw.get("quantization_method", "bnb")
        if qmethod != "bnb":
            t.refuse("quantization_method", qmethod, "tunelab's qlora quantises with bitsandbytes (bnb) only")
        if "quantization_method" in raw:
            t.map("quantization_method", qmethod, "method.name", "qlora")
    t.map_lora_variants(raw, LLAMAFACTORY_LORA_VARIANTS, lora=kind == "lora")
    continued = _start_adapter(raw, t, kind)
    if kind == "lora":
        name = "qlora" if bits == 4 else "lora"
        t.map("finetuning_type", kind, "method.name", name, note="quantization_bit 4" if bits else "")
        if bits is not None:
            t.mapped.append(("quantization_bit", bits, "method.name (qlora: 4-bit NF4 base)"))
        if not continued:  # a continued adapter keeps its own shape
            rank = raw.get("lora_rank", 8)
            t.map("lora_rank", rank, "method.r", note="" if "lora_rank" in raw else f"{TOOL}'s default")
            alpha = raw.get("lora_alpha") or 2 * rank
            t.map("lora_alpha", raw.get("lora_alpha"), "method.alpha", alpha,
                  note="" if raw.get("lora_alpha") else f"{TOOL}'s default: 2 x lora_rank")  # fmt: skip
            target = raw.get("lora_target", "all")
            modules = "all-linear" if target == "all" else [m.strip() for m in str(target).split(",") if m.strip()]
            t.map("lora_target", target, "method.target_modules", modules)
        t.map("lora_dropout", raw.get("lora_dropout", 0.0), "method.dropout",
              note="" if "lora_dropout" in raw else f"{TOOL}'s default")  # fmt: skip
        _pissa(raw, t, bits)
    elif kind == "freeze":
        t.map("finetuning_type", kind, "method.name", "freeze")
        layers = raw.get("freeze_trainable_layers", 2)
        if layers < 0:
            t.refuse("freeze_trainable_layers", layers, "tunelab's freeze trains the top blocks (a positive number)")
        t.map("freeze_trainable_layers", layers, "method.last_k")
        mods = raw.get("freeze_trainable_modules", "all")
        parts = [] if mods == "all" else [FREEZE_MODULES.get(m.strip(), m.strip()) for m in str(mods).split(",")]
        bad = [p for p in parts if p not in ("attention", "ffn", "norms")]
        if bad:
            t.refuse("freeze_trainable_modules", mods, f"tunelab's freeze selects attention / ffn / norms, not {bad}")
        t.map("freeze_trainable_modules", mods, "method.modules", parts)
        if raw.get("freeze_extra_modules"):
            extra = [m.strip() for m in str(raw["freeze_extra_modules"]).split(",")]
            t.map("freeze_extra_modules", raw["freeze_extra_modules"], "method.patterns", extra)
    elif kind == "full":
        t.map("finetuning_type", kind, "method.name", "full")
    else:
        t.refuse("finetuning_type", kind, "tunelab maps lora, freeze and full (and qlora via quantization_bit: 4)")
    if kind != "lora":
        for key in ("pissa_init", "pissa_iter"):
            if key in raw:
                t.ignore(key, "a LoRA setting, and this config trains no LoRA")


def _start_adapter(raw: dict, t: Translation, kind: str) -> bool:
    """adapter_name_or_path in a training config (LLaMA-Factory then trains that adapter on, unless
    create_new_adapter) -> method.start_from; True when mapped. Its rank, alpha and targets are the adapter's, as in
    LLaMA-Factory, so lora_rank / lora_alpha / lora_target are ignored."""
    path, new = raw.get("adapter_name_or_path"), raw.get("create_new_adapter")
    if not path:
        if new is not None:
            t.ignore("create_new_adapter", "no adapter_name_or_path: the adapter is a new one anyway")
        return False
    merge = "merge it into its base (`tunelab export RUN --format hf --out DIR` for a tunelab run) and set "
    if kind != "lora":
        t.refuse(
            "adapter_name_or_path", path, f"finetuning_type {kind} over an adapter: {merge}model_name_or_path: DIR"
        )
    paths = [p.strip() for p in str(path).split(",") if p.strip()]
    if len(paths) > 1:
        t.refuse("adapter_name_or_path", path, "several adapters (LLaMA-Factory merges all but the last): tunelab "
                 f"continues one; {merge.replace('it', 'the others', 1)}model_name_or_path: DIR")  # fmt: skip
    if new:
        t.refuse("create_new_adapter", new, f"a new adapter over the given one: {merge}model_name_or_path: DIR, "
                 "without adapter_name_or_path")  # fmt: skip
    t.map("adapter_name_or_path", path, "method.start_from", paths[0], note="trained on, with its own rank and targets")
    if new is not None:
        t.ignore("create_new_adapter", "false: the adapter itself trains on")
    for key in ("lora_rank", "lora_alpha", "lora_target"):
        if key in raw:
            t.ignore(key, "adapter_name_or_path's adapter keeps its own (method.start_from)")
    return True


def _pissa(raw: dict, t: Translation, bits) -> None:
    """pissa_init / pissa_iter -> method.init: pissa, method.pissa_niter (LLaMA-Factory's -1: the exact SVD)."""
    if not raw.get("pissa_init"):
        for key in ("pissa_init", "pissa_iter"):
            if key in raw:
                t.ignore(key, "PiSSA is off here (pissa_init is not true): LoRA starts from B = 0")
        return
    if bits is not None:
        t.refuse("pissa_init", True, "PiSSA rewrites the base weights, which quantization_bit: 4 keeps in 4 bit; "
                 "drop one of them (tunelab's PiSSA trains over a bf16 or fp32 base)")  # fmt: skip
    t.map("pissa_init", True, "method.init", "pissa")
    niter = raw.get("pissa_iter", 16)
    if niter == -1:
        t.map("pissa_iter", niter, "method.pissa_niter", note="null: the exact SVD")
        t.set("method.pissa_niter", None)  # map's `converted` None means "the value itself"
    else:
        t.map("pissa_iter", niter, "method.pissa_niter", note="" if "pissa_iter" in raw else f"{TOOL}'s default")


def _data(raw: dict, t: Translation, stage: str) -> None:
    names = [n.strip() for n in str(raw.get("dataset", "")).split(",") if n.strip()]
    limit = raw.get("max_samples")
    sources = [{"path": n, **({"limit": limit} if limit else {})} for n in names]
    if names:
        t.map(
            "dataset",
            raw["dataset"],
            "data.train",
            sources,
            note="names resolved through dataset_info.json" + (", max_samples per data set" if limit else ""),
        )
    if limit is not None:
        t.mapped.append(("max_samples", limit, "data.train[].limit (first rows of each data set)"))
    if raw.get("eval_dataset"):
        evals = [n.strip() for n in str(raw["eval_dataset"]).split(",") if n.strip()]
        if len(evals) > 1:
            t.refuse("eval_dataset", raw["eval_dataset"], "tunelab takes one validation data set")
        t.map("eval_dataset", raw["eval_dataset"], "data.validation", evals[0])
    d = raw.get("dataset_dir", "data")
    t.map("dataset_dir", d, "data.dataset_info", note="" if "dataset_dir" in raw else f"{TOOL}'s default")
    val = raw.get("val_size", 0.0)
    t.map("val_size", val, "data.val_fraction", float(val), note="" if "val_size" in raw else f"{TOOL}'s default: none")
    t.set("data.format", "text" if stage == "pretrain" else "auto")
    t.notes.append(
        "data.format: auto: each data set's format comes from its dataset_info.json entry, else from its columns"
    )
