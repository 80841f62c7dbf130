"""The key tables of other toolkits' configs: where each key goes in a tunelab config, or why it is ignored.

Imports only the bf16 table (its dtype note says what `model.dtype: auto` takes): `tunelab.config` uses TOP_LEVEL_HINTS for its "did you mean" hints on flat top-level keys,
and docs/interop.md's mapping table is generated from these tables (tests/test_interop.py checks it).
"""

from __future__ import annotations

from tunelab.bf16_table import measured_text

# key -> the tunelab key it becomes (a value translated on the way is noted in the translators)
LLAMAFACTORY_MAPPED = {
    "model_name_or_path": "model.name",
    "trust_remote_code": "model.trust_remote_code",
    "new_special_tokens": "model.new_special_tokens (comma-separated -> a list)",
    "stage": "stage",
    "finetuning_type": "method.name",
    "quantization_bit": "method.name (4 = qlora)",
    "quantization_method": "method.name (bnb = qlora)",
    "lora_rank": "method.r",
    "lora_alpha": "method.alpha",
    "neftune_noise_alpha": "training.neftune_alpha",
    "adapter_name_or_path": "method.start_from (with a stage: the adapter trains on, with its own rank, alpha and "
    "targets; one adapter, create_new_adapter false)",
    "lora_dropout": "method.dropout",
    "lora_target": "method.target_modules",
    "use_dora": "method.use_dora",
    "use_rslora": "method.use_rslora",
    "loraplus_lr_ratio": "method.loraplus_lr_ratio",
    "pissa_init": "method.init (pissa)",
    "pissa_iter": "method.pissa_niter (-1 = null: the exact SVD)",
    "freeze_trainable_layers": "method.last_k",
    "freeze_trainable_modules": "method.modules",
    "freeze_extra_modules": "method.patterns",
    "dataset": "data.train",
    "eval_dataset": "data.validation",
    "dataset_dir": "data.dataset_info",
    "cutoff_len": "data.max_length",
    "max_samples": "data.train[].limit",
    "val_size": "data.val_fraction",
    "packing": "data.packing",
    "neat_packing": "data.packing",
    "train_on_prompt": "data.train_on_prompt",
    "default_system": "data.system_prompt",
    "output_dir": "output_dir",
    "per_device_train_batch_size": "training.batch_size",
    "gradient_accumulation_steps": "training.grad_accum",
    "learning_rate": "training.lr",
    "num_train_epochs": "training.epochs",
    "max_steps": "training.max_steps",
    "lr_scheduler_type": "training.scheduler",
    "warmup_ratio": "training.warmup_ratio",
    "warmup_steps": "training.warmup_steps",
    "weight_decay": "training.weight_decay",
    "max_grad_norm": "training.max_grad_norm",
    "logging_steps": "training.log_every",
    "save_steps": "training.save_every",
    "save_total_limit": "training.keep_checkpoints",
    "eval_steps": "training.eval_every",
    "seed": "training.seed",
    "pref_beta": "dpo.beta (kto.beta with stage kto)",
    "kto_chosen_weight": "kto.desirable_weight",
    "kto_rejected_weight": "kto.undesirable_weight",
    "pref_loss": "dpo.loss_type (sigmoid, ipo, simpo, orpo)",
    "simpo_gamma": "dpo.simpo_gamma",
    "pref_ftx": "dpo.sft_weight (stage dpo)",
    "report_to": "training.report_to",
    "run_name": "training.run_name",
}

_DTYPE = (
    "tunelab picks the dtype itself (model.dtype: auto = bfloat16 on CUDA; on a CPU with native bf16, where measured "
    f"faster: {measured_text()}; float32 otherwise)"
)
_WORKERS = (
    "tunelab tokenises into its own on-disk cache, keyed by the files' content, the tokenizer and the data settings "
    "(data.cache, data.num_proc; `tunelab data prepare CONFIG` runs it alone)"
)
_NO_EMBEDDING_LORA = "tunelab's LoRA adapts linear layers, not embeddings: no embedding learning rate to set"
_HUB = "tunelab does not push while it trains: push a finished run with `tunelab push RUN REPO_ID`"
# modules trained whole beside LoRA: what configs use them for (tokens added to the vocabulary) tunelab does by rows
_WHOLE_MODULES = (
    "tunelab's LoRA trains no module of the model whole (a fresh task head aside); the rows of tokens added "
    "to the vocabulary (model.new_special_tokens) train beside the adapter, the rest of the token table "
    "and head stay frozen"
)
_ONE_PROCESS = "tunelab trains in one process; several: `tunelab train --nproc N` (docs/scale.md)"
_TEMPLATE = ("tunelab renders every conversation with the tokenizer's own chat template (the model's), "
             "not a template named in the config")  # fmt: skip
_ENV = "tunelab leaves it to the tracker's own environment variable: set {} (the tracker reads it)"
_TRACKER_EXTRAS = "tunelab logs metrics and the config to trackers, not gradients, artifacts or model files"

LLAMAFACTORY_IGNORED = {
    "do_train": "`tunelab train` always trains",
    "create_new_adapter": "false: adapter_name_or_path's adapter trains on; true is refused (merge it, then train a "
    "new one over the merged model)",
    "template": _TEMPLATE,
    "overwrite_cache": _WORKERS,
    "preprocessing_num_workers": _WORKERS,
    "dataloader_num_workers": _WORKERS,
    "tokenized_path": _WORKERS,
    "plot_loss": "tunelab logs every step to metrics.jsonl; plot it from there",
    "overwrite_output_dir": "tunelab refuses to overwrite an earlier run: choose a new output_dir",
    "save_only_model": "tunelab's checkpoints always hold what a resume needs",
    "bf16": _DTYPE,
    "fp16": _DTYPE,
    "pure_bf16": _DTYPE,
    "ddp_timeout": _ONE_PROCESS,
    "deepspeed": _ONE_PROCESS,
    "resume_from_checkpoint": "resume with `tunelab train CONFIG --resume` (the run's latest checkpoint)",
    "per_device_eval_batch_size": "tunelab evaluates with training.batch_size",
    "eval_strategy": "tunelab evaluates every training.eval_every steps (eval_steps) and at the end",
    "flash_attn": "tunelab picks the attention implementation itself",
    "resize_vocab": "tunelab grows the token table (and an untied head) whenever model.new_special_tokens needs it",
    "additional_target": _WHOLE_MODULES,
    "use_llama_pro": "LLaMA Pro's added blocks are not supported: freeze trains the top existing blocks instead",
    "loraplus_lr_embedding": _NO_EMBEDDING_LORA,
    "pissa_convert": "tunelab always saves a PiSSA adapter converted to a plain LoRA (rank 2r) of the original base, "
    "so it loads with PeftModel.from_pretrained over the model you started from",
    "push_to_hub": _HUB,
    "hub_model_id": _HUB,
    "hub_token": _HUB,
    "hub_strategy": _HUB,
    "cache_dir": "tunelab caches named models itself (see `tunelab models`)",
}

AXOLOTL_MAPPED = {
    "base_model": "model.name",
    "trust_remote_code": "model.trust_remote_code",
    "tokens": "model.new_special_tokens",
    "adapter": "method.name",
    "load_in_4bit": "method.name (qlora)",
    "lora_r": "method.r",
    "lora_alpha": "method.alpha",
    "lora_dropout": "method.dropout",
    "lora_target_linear": "method.target_modules (all-linear)",
    "lora_target_modules": "method.target_modules",
    "lora_model_dir": "method.start_from (the adapter trains on, with its own r, alpha and targets)",
    "neftune_noise_alpha": "training.neftune_alpha",
    "peft_use_dora": "method.use_dora",
    "peft_use_rslora": "method.use_rslora",
    "loraplus_lr_ratio": "method.loraplus_lr_ratio",
    "unfrozen_parameters": "method.patterns (freeze)",
    "qat": "method.name (qat), method.group_size",
    "rl": "stage",
    "rl_beta": "dpo.beta (kto.beta with rl: kto)",
    "orpo_alpha": "dpo.beta (rl: orpo's lambda)",
    "simpo_gamma": "dpo.simpo_gamma",
    "rpo_alpha": "dpo.sft_weight (rl: dpo, ipo)",
    "cpo_alpha": "dpo.sft_weight (rl: simpo; unset, 1 as TRL's default)",
    "kto_desirable_weight": "kto.desirable_weight",
    "kto_undesirable_weight": "kto.undesirable_weight",
    "datasets": "data.train",
    "pretraining_dataset": "data.train, stage pretrain",
    "test_datasets": "data.validation",
    "val_set_size": "data.val_fraction",
    "sequence_len": "data.max_length",
    "sample_packing": "data.packing",
    "train_on_inputs": "data.train_on_prompt",
    "output_dir": "output_dir",
    "micro_batch_size": "training.batch_size",
    "gradient_accumulation_steps": "training.grad_accum",
    "learning_rate": "training.lr",
    "num_epochs": "training.epochs",
    "max_steps": "training.max_steps",
    "lr_scheduler": "training.scheduler",
    "warmup_ratio": "training.warmup_ratio",
    "warmup_steps": "training.warmup_steps",
    "weight_decay": "training.weight_decay",
    "max_grad_norm": "training.max_grad_norm",
    "logging_steps": "training.log_every",
    "save_steps": "training.save_every",
    "eval_steps": "training.eval_every",
    "evals_per_epoch": "training.evals_per_epoch",
    "saves_per_epoch": "training.saves_per_epoch",
    "save_total_limit": "training.keep_checkpoints",
    "gradient_checkpointing": "training.gradient_checkpointing",
    "seed": "training.seed",
    "use_tensorboard": "training.report_to (tensorboard)",
    "wandb_project": "training.report_to (wandb), training.tracker_project",
    "wandb_name": "training.run_name",
    "mlflow_tracking_uri": "training.report_to (mlflow; the URI: MLFLOW_TRACKING_URI)",
    "mlflow_experiment_name": "training.report_to (mlflow), training.tracker_project",
    "mlflow_run_name": "training.run_name",
    "use_trackio": "training.report_to (trackio)",
    "trackio_project_name": "training.report_to (trackio), training.tracker_project",
    "trackio_run_name": "training.run_name",
}

# LoRA's variants (DoRA, rsLoRA, LoRA+): mapped when the config trains LoRA, ignored (with the reason) otherwise
LLAMAFACTORY_LORA_VARIANTS = {k: LLAMAFACTORY_MAPPED[k] for k in ("use_dora", "use_rslora", "loraplus_lr_ratio")}
AXOLOTL_LORA_VARIANTS = {k: AXOLOTL_MAPPED[k] for k in ("peft_use_dora", "peft_use_rslora", "loraplus_lr_ratio")}

AXOLOTL_IGNORED = {
    "base_model_config": "tunelab reads the model's own config",
    "model_type": "tunelab loads the model with the Auto classes",
    "tokenizer_type": "tunelab loads the model's own tokenizer (AutoTokenizer)",
    "load_in_8bit": "tunelab has no 8-bit base weights: the adapter trains over the unquantised base (more memory)",
    "strict": "tunelab refuses unknown keys of its own configs",
    "chat_template": _TEMPLATE,
    "eot_tokens": _TEMPLATE,
    "special_tokens": "tunelab uses the tokenizer's own special tokens",
    "lora_modules_to_save": _WHOLE_MODULES,
    "dataset_prepared_path": _WORKERS,
    "eval_sample_packing": "tunelab never packs validation rows",
    "pad_to_sequence_len": "tunelab pads each batch to its longest row",
    "remove_unused_columns": "tunelab reads only the columns a format needs",
    "loraplus_lr_embedding": _NO_EMBEDDING_LORA,
    "optimizer": "tunelab trains with torch's AdamW (no 8-bit / paged / fused variants)",
    "cosine_constant_lr_ratio": "tunelab's cosine schedule decays to 0",
    "cosine_min_lr_ratio": "tunelab's cosine schedule decays to 0",
    "bf16": _DTYPE,
    "fp16": _DTYPE,
    "tf32": _DTYPE,
    "gradient_checkpointing_kwargs": "tunelab's gradient checkpointing has no options",
    "attn_implementation": "tunelab picks the attention implementation itself",
    "flash_attention": "tunelab picks the attention implementation itself",
    "resume_from_checkpoint": "resume with `tunelab train CONFIG --resume` (the run's latest checkpoint)",
    "loss_watchdog_threshold": "no loss watchdog: tunelab stops on a non-finite loss",
    "loss_watchdog_patience": "no loss watchdog: tunelab stops on a non-finite loss",
    "plugins": "tunelab has its own fused kernels (training.accelerate), not Axolotl plugins",
    "liger_rope": "tunelab has its own fused kernels (training.accelerate)",
    "liger_rms_norm": "tunelab has its own fused kernels (training.accelerate)",
    "liger_glu_activation": "tunelab has its own fused kernels (training.accelerate)",
    "liger_layer_norm": "tunelab has its own fused kernels (training.accelerate)",
    "liger_fused_linear_cross_entropy": "tunelab has its own fused kernels (training.accelerate)",
    "fsdp": _ONE_PROCESS,
    "fsdp_config": _ONE_PROCESS,
    "deepspeed": _ONE_PROCESS,
    "ddp_find_unused_parameters": _ONE_PROCESS,
    "save_only_model": "tunelab's checkpoints always hold what a resume needs",
    "hub_model_id": _HUB,
    "hub_strategy": _HUB,
    "push_dataset_to_hub": _HUB,
    "wandb_entity": _ENV.format("WANDB_ENTITY"),
    "wandb_mode": _ENV.format("WANDB_MODE (offline, disabled)"),
    "wandb_run_id": "tunelab keeps the wandb run id in the run folder (trackers.json) so --resume continues it",
    "wandb_watch": _TRACKER_EXTRAS,
    "wandb_log_model": _TRACKER_EXTRAS,
    "hf_mlflow_log_artifacts": _TRACKER_EXTRAS,
    "trackio_space_id": _ENV.format("TRACKIO_SPACE_ID"),
}

# flat top-level keys of other toolkits -> the tunelab key, for the "did you mean" hint of an unknown key
TOP_LEVEL_HINTS = {
    k: v.split(" (")[0].split(",")[0]
    for table in (LLAMAFACTORY_MAPPED, AXOLOTL_MAPPED)
    for k, v in table.items()
    if "." in v
}


def mapping_markdown() -> str:
    """docs/interop.md's key tables (tests/test_interop.py checks the doc holds exactly this)."""
    out = []
    for tool, mapped, ignored in (("LLaMA-Factory", LLAMAFACTORY_MAPPED, LLAMAFACTORY_IGNORED),
                                  ("Axolotl", AXOLOTL_MAPPED, AXOLOTL_IGNORED)):  # fmt: skip
        out += [f"### {tool}", "", "| their key | tunelab key |", "|---|---|"]
        out += [f"| `{k}` | `{v}` |" for k, v in mapped.items()]
        out += ["", f"Ignored {tool} keys:", "", "| their key | why |", "|---|---|"]
        out += [f"| `{k}` | {v} |" for k, v in ignored.items()]
        out.append("")
    return "\n".join(out)
