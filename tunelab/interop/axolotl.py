"""Axolotl's YAML (base_model, adapter, datasets: [{path, type}], micro_batch_size, rl ...) -> tunelab.

Each entry of `datasets` becomes one item of `data.train` with its own format and columns:
alpaca -> instruction; chat_template / sharegpt / chatml.* -> chat (field_messages -> columns.messages,
message_property_mappings -> columns.role / .content, roles -> the source's roles); completion -> text;
with `rl: dpo`, chosen / rejected fields -> preference; `split` (slices included) -> the source's split.
`pretraining_dataset` -> stage pretrain on text.
"""

from __future__ import annotations

from tunelab.interop.llamafactory import template_note
from tunelab.interop.translation import Translation
from tunelab.peer_keys import AXOLOTL_IGNORED, AXOLOTL_LORA_VARIANTS, AXOLOTL_MAPPED

TOOL = "Axolotl"
SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant", "constant_with_warmup": "constant"}
RL = {
    "dpo": "sigmoid",
    "ipo": "ipo",
    "simpo": "simpo",
    "orpo": "orpo",
    "kto": None,
}  # rl -> dpo.loss_type (kto: stage kto)
KTO_WEIGHTS = {"kto_desirable_weight": "kto.desirable_weight", "kto_undesirable_weight": "kto.undesirable_weight"}
# the keys that turn a tracker on (-> training.report_to); those naming the project / experiment also set
# training.tracker_project, the *_name ones training.run_name
_TRACKER_KEYS = {"use_tensorboard": "tensorboard", "wandb_project": "wandb", "mlflow_tracking_uri": "mlflow",
                 "mlflow_experiment_name": "mlflow", "use_trackio": "trackio", "trackio_project_name": "trackio",
                 "wandb_name": None, "mlflow_run_name": None, "trackio_run_name": None}  # fmt: skip
_SPECIAL = {"adapter", "load_in_4bit", "lora_r", "lora_alpha", "lora_dropout", "lora_target_linear",
            "lora_target_modules", "lora_model_dir", "unfrozen_parameters", "qat", "rl", "rl_beta", "orpo_alpha",
            "simpo_gamma", "rpo_alpha", "cpo_alpha", *KTO_WEIGHTS, "datasets", "pretraining_dataset",
            "test_datasets", "val_set_size", "lr_scheduler", "trust_remote_code", "chat_template",
            *_TRACKER_KEYS, *AXOLOTL_LORA_VARIANTS}  # fmt: skip


def detect(raw: dict) -> bool:
    return "base_model" in raw and any(
        k in raw for k in ("datasets", "pretraining_dataset", "adapter", "micro_batch_size", "sequence_len")
    )


def translate(raw: dict, source: str = "config") -> Translation:
    t = Translation(TOOL, source)
    rl = raw.get("rl")
    if rl and rl not in RL:
        t.refuse(
            "rl", rl, f"stage {rl!r} is not supported by tunelab; supported: sft (no rl), dpo, ipo, simpo, orpo, kto"
        )
    stage = ("kto" if rl == "kto" else "dpo") if rl else "pretrain" if raw.get("pretraining_dataset") else "sft"
    if rl:
        t.map("rl", rl, "stage", stage)
        if RL[rl]:
            t.set("dpo.loss_type", RL[rl])
    else:
        t.set("stage", stage)
    if raw.get("rl_beta") is not None and rl != "orpo":
        t.map("rl_beta", raw["rl_beta"], f"{'kto' if stage == 'kto' else 'dpo'}.beta")
    elif raw.get("rl_beta") is not None:
        t.ignore("rl_beta", "rl: orpo weighs its odds-ratio term by orpo_alpha (-> dpo.beta)")
    t.map_where(raw, {"orpo_alpha": "dpo.beta"}, rl == "orpo", "an ORPO setting (rl: orpo), and rl is not orpo")
    t.map_where(
        raw, {"simpo_gamma": "dpo.simpo_gamma"}, rl == "simpo", "a SimPO setting (rl: simpo), and rl is not simpo"
    )
    t.map_where(raw, KTO_WEIGHTS, stage == "kto", "a stage kto setting (rl: kto), and this config's stage is not kto")
    t.map_where(raw, {"rpo_alpha": "dpo.sft_weight"}, rl in ("dpo", "ipo"), "RPO's SFT term, and rl is not dpo or ipo")
    if rl == "simpo" and raw.get("cpo_alpha") is None:  # Axolotl leaves it to TRL's CPOConfig, whose default is 1
        t.map("cpo_alpha", "unset", "dpo.sft_weight", converted=1.0, note="TRL's CPOConfig default 1: CPO-SimPO")
    else:
        t.map_where(
            raw, {"cpo_alpha": "dpo.sft_weight"}, rl == "simpo", "CPO's SFT term (rl: simpo), and rl is not simpo"
        )
    _method(raw, t)
    _data(raw, t, stage)
    if "trust_remote_code" in raw:
        t.map("trust_remote_code", raw["trust_remote_code"], "model.trust_remote_code",
              note="your explicit setting, carried over: it runs the model repo's own code")  # fmt: skip
    if "chat_template" in raw:
        t.ignore("chat_template", template_note(raw["chat_template"], TOOL))
    if raw.get("lr_scheduler") is not None:
        v = raw["lr_scheduler"]
        if v in SCHEDULERS:
            t.map("lr_scheduler", v, "training.scheduler", SCHEDULERS[v])
        else:
            t.ignore("lr_scheduler", f"{v!r} is not one of tunelab's schedules (constant, linear, cosine): cosine")
    _trackers(raw, t)
    t.map_rest(raw, AXOLOTL_MAPPED, AXOLOTL_IGNORED, _SPECIAL, floats=("num_epochs",),
               notes={"tokens": "added as special tokens: never split, as Axolotl's are, and also left out when "
                                "decoding with skip_special_tokens"},
               unknown=f"not an {TOOL} key tunelab knows")  # fmt: skip
    return t


def _trackers(raw: dict, t: Translation) -> None:
    """Axolotl turns a tracker on by naming its project (or, for TensorBoard and Trackio, a use_ flag): the trackers
    named become training.report_to; their project and run names tracker_project and run_name (one each)."""
    given = {k: raw[k] for k in _TRACKER_KEYS if k in raw}
    on = [v for k, v in _TRACKER_KEYS.items() if v and given.get(k) not in (None, False, "")]
    trackers = list(dict.fromkeys(on))
    if given.get("use_tensorboard") is False and "tensorboard" not in trackers:
        t.set("training.report_to", trackers)  # Axolotl writes no TensorBoard logs unless asked
    named: dict[str, object] = {}  # tunelab key -> the first value given
    listed = f"= {trackers}"
    for key, value in given.items():
        if value is None:
            t.ignore(key, "null: tunelab's default")
            continue
        tracker = _TRACKER_KEYS[key]
        if tracker is None or key.endswith(("_project", "_experiment_name", "_project_name")):
            target = "training.run_name" if tracker is None else "training.tracker_project"
            if named.get(target, value) != value:  # one project and one run name serve every tracker
                why = f"{target} is already {named[target]!r}: one name serves every tracker"
                if tracker is None:
                    t.ignore(key, why)
                else:
                    t.map(key, value, "training.report_to", trackers, note=f"{listed}; {why}")
                continue
            named[target] = value
            t.map(key, value, target, note="" if tracker is None else f"and training.report_to {listed}")
            if tracker is not None:
                t.set("training.report_to", trackers)
        elif key == "mlflow_tracking_uri":
            t.map(key, value, "training.report_to", trackers, note=f"{listed}; export MLFLOW_TRACKING_URI={value}")
        else:
            t.map(key, value, "training.report_to", trackers, note=listed)


def _method(raw: dict, t: Translation) -> None:
    adapter = raw.get("adapter")
    four_bit = bool(raw.get("load_in_4bit"))
    if "load_in_4bit" in raw and not four_bit:
        t.ignore("load_in_4bit", "false: the base stays unquantised")
    if raw.get("qat"):
        q = raw["qat"]
        if adapter:
            t.refuse("qat", q, "tunelab's qat trains every weight, not an adapter")
        if q.get("weight_dtype", "int4") != "int4":
            t.refuse("qat.weight_dtype", q.get("weight_dtype"), "tunelab's qat fake-quantises weights to 4 bit only")
        t.map("qat", q, "method.name", "qat", note="weights fake-quantised to 4 bit; activations stay unquantised")
        t.set("method.group_size", int(q.get("group_size", 32)))
        if q.get("activation_dtype"):
            t.ignore("qat.activation_dtype", "tunelab's qat fake-quantises the weights only")
        return
    t.map_lora_variants(raw, AXOLOTL_LORA_VARIANTS, lora=adapter in ("lora", "qlora"))
    if adapter in ("lora", "qlora"):
        name = "qlora" if adapter == "qlora" or four_bit else "lora"
        t.map("adapter", adapter, "method.name", name, note="load_in_4bit" if four_bit and adapter == "lora" else "")
        if four_bit:
            t.mapped.append(("load_in_4bit", raw["load_in_4bit"], f"method.name ({name})"))
        start = raw.get("lora_model_dir")
        if start:  # the adapter trains on with its own shape, as PEFT loads it for Axolotl
            t.map("lora_model_dir", start, "method.start_from", note="trained on, with its own r, alpha and targets")
            for key in ("lora_r", "lora_alpha", "lora_target_linear", "lora_target_modules"):
                if raw.get(key) is not None:
                    t.ignore(key, "lora_model_dir's adapter keeps its own (method.start_from)")
        elif "lora_model_dir" in raw:
            t.ignore("lora_model_dir", "empty: a new adapter")
        for key, dotted, default in (("lora_r", "method.r", 8), ("lora_alpha", "method.alpha", 16),
                                     ("lora_dropout", "method.dropout", 0.0)):  # fmt: skip
            value = raw.get(key)
            if start and key != "lora_dropout":
                continue
            t.map(key, value, dotted, default if value is None else value,
                  note=f"{TOOL}'s default" if value is None else "")  # fmt: skip
        if not start:
            _targets(raw, t)
        if raw.get("unfrozen_parameters"):
            t.ignore("unfrozen_parameters", "with an adapter only the adapter trains")
    elif adapter:
        t.refuse("adapter", adapter, "tunelab maps lora and qlora (and full fine-tuning when adapter is unset)")
    elif "lora_model_dir" in raw:
        t.ignore("lora_model_dir", "no adapter trains here (adapter is unset)")
    elif raw.get("unfrozen_parameters"):
        pats = list(raw["unfrozen_parameters"])
        t.map("unfrozen_parameters", pats, "method.patterns", pats, note="method freeze with last_k 0")
        t.set("method.name", "freeze")
        t.set("method.last_k", 0)
    else:
        t.set("method.name", "full")
        t.notes.append("no adapter: full fine-tuning (method full)")
    if four_bit and not adapter:
        t.refuse("load_in_4bit", True, "a 4-bit base trains an adapter only: set adapter: qlora")


def _targets(raw: dict, t: Translation) -> None:
    if raw.get("lora_target_linear"):
        t.map("lora_target_linear", True, "method.target_modules", "all-linear")
        if raw.get("lora_target_modules"):
            t.ignore("lora_target_modules", "lora_target_linear: true already targets every linear layer")
    elif raw.get("lora_target_modules"):
        t.map("lora_target_modules", raw["lora_target_modules"], "method.target_modules",
              list(raw["lora_target_modules"]))  # fmt: skip
    else:
        t.set("method.target_modules", "all-linear")


def _source(d: dict, t: Translation, stage: str, i: int) -> dict:
    if not isinstance(d, dict) or "path" not in d:
        t.refuse(f"datasets[{i}]", d, "each data set needs a path")
    kind = str(d.get("type", "alpaca") if stage != "pretrain" else "pretrain")
    out: dict = {"path": d["path"]}
    cols: dict = {}
    if kind == "pretrain" or kind == "completion":
        out["format"] = "text"
        if d.get("field"):
            cols["text"] = d["field"]
    elif kind == "alpaca":
        out["format"] = "instruction"
    elif (
        kind.startswith("chat_template") or kind == "sharegpt" or kind.startswith("chatml") or kind.startswith("llama3")
    ):
        if stage in ("dpo", "kto"):
            out["format"] = "preference"
            for f, col in (("field_messages", "messages"), ("field_chosen", "chosen"), ("field_rejected", "rejected"),
                           ("field_prompt", "prompt")):  # fmt: skip
                if d.get(f):
                    cols[col] = d[f]
        else:
            out["format"] = "chat"
            cols["messages"] = d.get("field_messages", "conversations" if kind == "sharegpt" else "messages")
        props = d.get("message_property_mappings") or {}
        extra = sorted(set(props) - {"role", "content"})
        if extra:
            t.refuse(f"datasets[{i}].message_property_mappings", props,
                     f"tunelab reads a message's role and content; {extra} have no place in its messages")  # fmt: skip
        cols.update({k: props[k] for k in ("role", "content") if props.get(k) and props[k] != k})
        roles = _roles(d.get("roles"), t, i)
        if roles:
            out["roles"] = roles
    else:
        t.refuse(f"datasets[{i}].type", kind, "tunelab maps alpaca, chat_template, sharegpt, chatml.*, completion "
                 "and pretrain")  # fmt: skip
    if cols:
        out["columns"] = cols
    if d.get("split"):
        out["split"] = str(d["split"])  # datasets' split grammar, slices included: data.train[].split
    for key in d:
        if key not in ("path", "type", "field", "field_messages", "field_chosen", "field_rejected", "field_prompt",
                       "message_property_mappings", "roles", "split"):  # fmt: skip
            t.ignore(f"datasets[{i}].{key}", "not read by tunelab")
    return out


def _roles(roles, t: Translation, i: int) -> dict:
    """Axolotl's `roles: {user: [human, ...], assistant: [...]}` (ours -> their names) as data.roles (their
    name -> ours)."""
    if not roles:
        return {}
    ours = {"system", "user", "assistant", "tool"}
    if not isinstance(roles, dict) or set(roles) - ours:
        t.refuse(f"datasets[{i}].roles", roles, f"roles map {', '.join(sorted(ours))} to lists of your role names")
    out = {}
    for role, names in roles.items():
        for name in [names] if isinstance(names, str) else names or []:
            out[str(name)] = role
    return {k: v for k, v in out.items() if k != v}


def _data(raw: dict, t: Translation, stage: str) -> None:
    key = "pretraining_dataset" if stage == "pretrain" else "datasets"
    sets = raw.get(key) or []
    if isinstance(sets, dict):
        sets = [sets]
    sources = [_source(d, t, stage, i) for i, d in enumerate(sets)]
    if sources:
        t.map(key, [s["path"] for s in sources], "data.train", sources)
    if raw.get("test_datasets"):
        tests = raw["test_datasets"]
        t.map("test_datasets", tests, "data.validation", tests[0]["path"] if isinstance(tests, list) else tests)
    val = raw.get("val_set_size") or 0.0
    t.map("val_set_size", raw.get("val_set_size"), "data.val_fraction", float(val))
    t.set("data.format", "text" if stage == "pretrain" else "auto")
