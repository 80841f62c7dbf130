"""Typed configuration: one YAML file (or Python object) drives the CLI and the API.

Every field has a default and a description; unknown keys are refused with the nearest
valid key, before anything heavy (torch, models, data) is loaded.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunelab.bf16_table import measured_text
from tunelab.peer_keys import TOP_LEVEL_HINTS
from tunelab.plugins import STAGES


class ConfigError(ValueError):
    """A config that cannot be used; the message says where and how to fix it."""


class OutputWriteError(Exception):
    """An output could not be written (disk full, read-only folder, a file where a folder goes ...): the
    message names the path; for a checkpoint or a run's result also the last complete checkpoint, which is
    left as it was (tunelab/training/checkpoint.py)."""


def check_output_path(path: str | Path, flag: str) -> None:
    """Refuse, before any work is done, an output path below a regular file: the write at the end would
    fail only after the model loaded and ran (or, for a folder, as an internal-looking OS error)."""
    p = Path(path).expanduser()
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputWriteError(f"{flag} {path}: {parent} is a file, not a folder; choose another path")
            return


class Section(BaseModel):
    """Base for every config section: unknown keys are an error, not silently ignored; so are YAML's .inf and
    .nan, which pass `gt=0` checks and would only show up as a run of NaN losses."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), validate_assignment=True, allow_inf_nan=False)


# ----------------------------------------------------------------------------------------- model
class TokenizerTrainConfig(Section):
    """`model.tokenizer.train`: a tokenizer trained for the run (tunelab/models/tokenizer_train.py)."""

    type: Literal["bpe", "wordpiece", "unigram"] = Field(
        "bpe",
        description="bpe: byte-level BPE (causal models); wordpiece: BERT's (masked LM); unigram: SentencePiece's.",
    )
    vocab_size: int = Field(4096, ge=64, description="Tokens in the vocabulary, special tokens included.")
    corpus: list[str] | None = Field(
        None,
        description="Text files (or data files with a text column) to train on; null = the run's training text "
        "(a plain-text data.train less its held-out part, so the tokenizer never sees the held-out text).",
    )
    min_frequency: int = Field(2, ge=1, description="bpe / wordpiece: pairs seen fewer times are not merged.")
    special_tokens: list[str] = Field(default_factory=list, description="More special tokens (never split).")
    chat_template: Literal["none", "chatml"] = Field(
        "none", description="chatml: add <|im_start|> / <|im_end|> and the ChatML template (for stage sft later)."
    )
    lowercase: bool = Field(False, description="Lower-case the text first.")


class TokenizerSource(Section):
    train: TokenizerTrainConfig = Field(description="Train a tokenizer before the model is built.")


ROPE_TYPES = ("linear", "dynamic", "yarn", "llama3")
# the keys each type takes besides `type` and `factor` (transformers' rope_parameters names); llama3 needs both
# of its frequency factors (Llama 3.1 used 1 and 4), the others default as transformers does
_ROPE_KEYS = {
    "linear": ((), ()),
    "dynamic": ((), ()),
    "yarn": ((), ("original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor")),
    "llama3": (("low_freq_factor", "high_freq_factor"), ("original_max_position_embeddings",)),
}


class RopeScalingConfig(Section):
    """Longer context for a RoPE model (docs/long-context.md): how its rotary frequencies are rescaled."""

    type: Literal["linear", "dynamic", "yarn", "llama3"] = Field(
        description="linear = position interpolation (m/F); dynamic = NTK-aware base scaling, recomputed from the "
        "current length (unchanged up to the native length); yarn = per-frequency interpolation ramp with attention "
        "temperature; llama3 = Llama 3.1's low/high frequency factors."
    )
    factor: float = Field(gt=1, description="F: the new context is F times the model's native (trained) context.")
    original_max_position_embeddings: int | None = Field(
        None, gt=0, description="yarn, llama3: the context the model was trained at (default: the model's own "
        "max_position_embeddings)."
    )  # fmt: skip
    low_freq_factor: float | None = Field(None, gt=0, description="llama3 (required): Llama 3.1 used 1.")
    high_freq_factor: float | None = Field(None, gt=0, description="llama3 (required): Llama 3.1 used 4.")
    beta_fast: float | None = Field(None, gt=0, description="yarn: rotations above which a pair extrapolates (32).")
    beta_slow: float | None = Field(None, gt=0, description="yarn: rotations below which a pair interpolates (1).")
    attention_factor: float | None = Field(
        None, gt=0, description="yarn: cos/sin multiplier (default 0.1 ln F + 1, the paper's temperature)."
    )

    @model_validator(mode="after")
    def _keys_of_type(self):
        required, optional = _ROPE_KEYS[self.type]
        given = {k for k in self.model_fields_set if k not in ("type", "factor") and getattr(self, k) is not None}
        stray = sorted(given - set(required) - set(optional))
        if stray:
            takes = ", ".join(required + optional) or "only factor"
            raise ValueError(f"rope_scaling type {self.type} does not take {', '.join(stray)} (it takes {takes})")
        missing = [k for k in required if getattr(self, k) is None]
        if missing:
            raise ValueError(f"rope_scaling type {self.type} needs {', '.join(missing)} (Llama 3.1: low_freq_factor: 1, "
                             "high_freq_factor: 4)")  # fmt: skip
        if self.type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError("rope_scaling: high_freq_factor must be greater than low_freq_factor")
        if (self.beta_fast or 32) <= (self.beta_slow or 1):
            raise ValueError("rope_scaling: beta_fast must be greater than beta_slow (defaults 32 and 1)")
        return self

    def rope_parameters(self) -> dict:
        """transformers' `rope_parameters` keys for this setting (without rope_theta)."""
        extra = {k: getattr(self, k) for k in sum(_ROPE_KEYS[self.type], ()) if getattr(self, k) is not None}
        return {"rope_type": self.type, "factor": self.factor, **extra}


class ModelConfig(Section):
    name: str = Field(
        "smollm2-135m-instruct",
        description="A named default (see `tunelab models`), a local Hugging Face folder, "
        "a .gguf file, or a hub id such as HuggingFaceTB/SmolLM2-135M-Instruct.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for hub ids.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Precision. auto = bf16 autocast with fp32 master weights on CUDA with bf16; on a CPU with "
        "native bf16 (avx512_bf16 / amx_bf16), bf16 where measured faster at the same loss (docs/performance.md; "
        "causal-LM stages: sft, pretrain, dpo, reward, distill; all but qlora with training.accelerate: auto; "
        f"full unless training.master_weights: fp32): {measured_text()}; "
        "float32 for everything else; float32 on other CPUs. bfloat16 = bf16 on a CPU too (emulated, ~250x slower, "
        "without avx512_bf16 / amx_bf16), the weights that train kept as training.master_weights says (fp32 "
        "copies; bf16 with stochastic rounding for full fine-tuning on a CPU). The run log says which and why.",
    )
    trust_remote_code: bool = Field(
        False, description="Run model code shipped with a hub repo. Off unless you trust the repo."
    )
    rope_scaling: RopeScalingConfig | None = Field(
        None,
        description="Longer context for a RoPE model: {type: linear, dynamic, yarn or llama3; factor: F; ...}, "
        "applied to the model's config before it is built, kept in the saved config and GGUF metadata "
        "(docs/long-context.md).",
    )
    architecture: str | None = Field(
        None,
        description="Build a new, randomly initialised model of this transformers architecture (llama, gpt2, "
        "bert, t5, ... any `model_type`) instead of loading weights: pre-training from scratch "
        "(docs/pretraining.md). `name` is then only the new model's label. Needs `tokenizer`.",
    )
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="With `architecture`: its config keys (hidden_size, num_hidden_layers, ...; the "
        "architecture's defaults fill the rest; vocab size and special token ids come from the tokenizer). "
        "`tunelab models --sizes CONFIG` prints the parameter count.",
    )
    tokenizer: str | TokenizerSource | None = Field(
        None,
        description="With `architecture`: a tokenizer folder (e.g. from `tunelab tokenizer train`), or "
        "{train: {...}} to train one before the model is built (cached by text and settings).",
    )
    new_special_tokens: list[str] = Field(
        default_factory=list,
        description="Tokens to add to the tokenizer as special tokens (never split: ChatML's markers for a base model "
        "without them, a tool-call tag). The model's token table (and an untied head) grow to take them, their rows "
        "starting at the mean of the others', and they train: every weight does with method full or qat, and with "
        "lora / qlora their rows train beside the adapter (PEFT's trainable_token_indices). Tokens the tokenizer "
        'already has are left as they are (docs/methods.md, "New tokens").',
    )

    @field_validator("new_special_tokens")
    @classmethod
    def _tokens(cls, tokens):
        for i, t in enumerate(tokens):
            if not t or t != t.strip():
                raise ValueError(
                    f"model.new_special_tokens[{i}] {t!r}: a token is non-empty, without spaces at its ends"
                )
            if t in tokens[:i]:
                raise ValueError(f"model.new_special_tokens[{i}] {t!r}: listed twice; list each token once")
        return tokens

    @model_validator(mode="before")
    @classmethod
    def _label(cls, data):
        """A model built from an architecture is named after it unless the config names it."""
        if isinstance(data, dict) and data.get("architecture") and "name" not in data:
            data = {**data, "name": f"{data['architecture']}-from-scratch"}
        return data

    @model_validator(mode="after")
    def _scratch(self):
        if self.architecture is None:
            if self.config or self.tokenizer is not None:
                key = "model.config" if self.config else "model.tokenizer"
                raise ValueError(
                    f"{key} goes with model.architecture (a model built from scratch); set it or drop {key}"
                )
            return self
        if self.new_special_tokens:
            raise ValueError(
                "model.new_special_tokens with model.architecture: a model built from scratch takes its vocabulary "
                "from its tokenizer; list the tokens there (model.tokenizer.train.special_tokens) and drop them here"
            )
        if self.tokenizer is None:
            raise ValueError(
                "model.architecture needs model.tokenizer: a tokenizer folder, or {train: {type: bpe, vocab_size: "
                "4096}} to train one on the training text"
            )
        check_architecture(self.architecture, self.config)  # a ValueError naming the key
        return self


# set from the tokenizer when a model is built from an architecture (models/scratch.py), never by hand
TOKENIZER_KEYS = ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")


def check_architecture(architecture: str, config: dict) -> None:
    """A ValueError naming the problem when `architecture` is no transformers model type or `config` has a key
    its config class does not know (transformers would keep a misspelt key as a stray attribute, silently),
    or a value it refuses. Imports transformers' config table only (no torch)."""
    import dataclasses

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if architecture not in CONFIG_MAPPING:
        near = difflib.get_close_matches(architecture, list(CONFIG_MAPPING.keys()), n=3)
        hint = f" Did you mean {' or '.join(repr(n) for n in near)}?" if near else ""
        raise ValueError(
            f"model.architecture {architecture!r}: not a transformers model type (llama, gpt2, bert, t5, ...).{hint}"
        )
    cls = CONFIG_MAPPING[architecture]
    known = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    known |= set(getattr(cls, "attribute_map", {}))
    if not known:  # not a dataclass config: the keyword arguments of its __init__ and its defaults
        import inspect

        known = set(inspect.signature(cls.__init__).parameters) | set(cls().to_dict())
    for key in config:
        if key in TOKENIZER_KEYS:
            raise ValueError(f"model.config.{key}: set from the tokenizer (model.tokenizer); drop it from model.config")
        if key not in known:
            near = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
            hint = f" Did you mean '{near[0]}'?" if near else ""
            raise ValueError(f"model.config.{key}: not a key of {cls.__name__} ({architecture}).{hint}")
    try:
        cls(**config)
    except Exception as e:  # transformers' strict dataclasses wrap the validator's ValueError
        cause = e.__cause__ or e
        raise ValueError(f"model.config: {cls.__name__} refuses these settings: {cause}") from None


# ------------------------------------------------------------------------------------------ data
class ColumnsConfig(Section):
    """Where each field lives in a row. Defaults follow the usual alpaca / OpenAI / ShareGPT names."""

    instruction: str = Field("instruction", description="instruction format: the task.")
    input: str = Field("input", description="instruction format: optional extra input (may be empty).")
    output: str = Field("output", description="instruction format: the response to learn.")
    system: str = Field("system", description="optional system prompt column (any format).")
    messages: str = Field(
        "messages",
        description="chat format: list of {role, content}; ShareGPT `conversations` "
        "with {from, value} is detected automatically.",
    )
    text: str = Field("text", description="text format: the raw text.")
    prompt: str = Field("prompt", description="preference format: the prompt (text or messages).")
    chosen: str = Field("chosen", description="preference format: the preferred reply (text, a message or messages).")
    rejected: str = Field("rejected", description="preference format: the other reply.")
    completion: str = Field(
        "completion", description="prompt_completion format (TRL): the reply (text or messages) after `prompt`."
    )
    label: str = Field(
        "label",
        description="stage kto: whether the row's reply is desirable (true / false; TRL's unpaired `label`; "
        "LLaMA-Factory's kto_tag is read too).",
    )
    tools: str = Field(
        "tools",
        description="chat format: the tool definitions (a JSON list, or its text) of a tool-calling row, "
        "rendered by the chat template (LLaMA-Factory's `tools` column).",
    )
    role: str = Field(
        "role",
        description="chat format: the key of a message's role (`from` is read too, as ShareGPT writes it); "
        "LLaMA-Factory's role_tag, Axolotl's message_property_mappings.role.",
    )
    content: str = Field(
        "content",
        description="chat format: the key of a message's text (`value` is read too); LLaMA-Factory's content_tag.",
    )


# what a message's role may name in data.roles: tunelab's roles, and an assistant turn that is a tool call
# (LLaMA-Factory's function_call: its text is the call as JSON)
MessageRole = Literal["system", "user", "assistant", "tool", "function_call"]
FORMATS = ("auto", "instruction", "chat", "prompt_completion", "text", "preference")
# other toolkits' names for our formats (LLaMA-Factory's `formatting`, TRL's and OpenAI's words)
FORMAT_ALIASES = {"alpaca": "instruction", "sharegpt": "chat", "messages": "chat", "openai": "chat",
                  "conversational": "chat", "completion": "prompt_completion", "pretrain": "text",
                  "ranking": "preference", "pairwise": "preference"}  # fmt: skip
Format = Literal["auto", "instruction", "chat", "prompt_completion", "text", "preference"]


def _format_alias(value):
    return FORMAT_ALIASES.get(value, value) if isinstance(value, str) else value


class DataSource(Section):
    """One training data set of several (`data.train` as a list): a file, a hub id or a name in
    `data.dataset_info`, with its own format and columns, and how much of it goes into the mix."""

    path: str = Field(description="A file, a hub id, or a dataset name of the `data.dataset_info` registry.")
    format: Format | None = Field(None, description="This data set's format; null = `data.format`.")
    columns: dict[str, str] = Field(
        default_factory=dict, description="Column names of this data set that differ from `data.columns`."
    )
    limit: int | None = Field(None, ge=1, description="Use at most the first N rows of this set.")
    samples: int | None = Field(
        None, ge=1, description="Take this many rows (a seeded sample; repeated when the set is smaller)."
    )
    weight: float | None = Field(
        None, gt=0, description="Scale the set's rows by this factor (seeded; 0.5 = half, 2 = each row twice)."
    )
    roles: dict[str, MessageRole] = Field(
        default_factory=dict, description="This data set's role names, added to `data.roles`."
    )
    split: str | None = Field(
        None,
        description="A split with an optional slice, as `datasets` writes it (`train[:10%]`, `train[100:]`): "
        "the split of a hub id (else `data.hub_split`); for a local file (one split, `train`) the slice.",
    )

    @field_validator("format", mode="before")
    @classmethod
    def _alias(cls, value):
        return _format_alias(value)


class DataConfig(Section):
    train: str | list[str | DataSource] | None = Field(
        None,
        description="Training data: a .json/.jsonl/.csv/.tsv file (optionally .gz), a `datasets` hub id, a name "
        "in `dataset_info`, or a list of these (each a name or {path, format, columns, samples, weight}) mixed "
        "into one seeded set.",
    )
    validation: str | None = Field(None, description="Validation file or hub id; else split off `val_fraction`.")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Fraction of train held out when no validation file.")
    val_max_rows: int | None = Field(
        1000,
        ge=1,
        description="At most this many validation rows (logged when it applies): of `val_fraction`, the seeded first "
        "ones, the rest of that fraction trains; of a `validation` file, a seeded sample. Every evaluation (the one "
        "before step 1 included) reads them all, so 10% of a million rows would be 100,000 rows each time. "
        "null: no cap.",
    )
    format: Format = Field(
        "auto",
        description="auto (detected per file from its columns, and logged), instruction (alpaca), chat "
        "(OpenAI messages / ShareGPT, tool calls included), prompt_completion (TRL {prompt, completion}, "
        "text or messages), text (continued pre-training) or preference (prompt + chosen / rejected replies: "
        "{prompt, chosen, rejected}, hh-rlhf transcripts, ShareGPT with chosen / rejected; stages reward and "
        "dpo). alpaca, sharegpt, openai and completion are accepted as other names.",
    )
    dataset_info: str | None = Field(
        None,
        description="A LLaMA-Factory dataset registry (dataset_info.json, or the folder holding it) that "
        "resolves the names in `train` / `validation` to files with their formatting, columns and tags; "
        "null = ./data/dataset_info.json when a name is not a file.",
    )
    columns: ColumnsConfig = Field(default_factory=ColumnsConfig, description="Column mapping.")
    hub_split: str = Field("train", description="Split to read for hub ids.")
    hub_config: str | None = Field(None, description="Config (subset) name for hub ids.")
    limit: int | None = Field(None, ge=1, description="Use at most this many training rows (before the val split).")
    max_length: int = Field(512, ge=8, description="Tokens per example; longer examples are truncated and counted.")
    train_on_prompt: bool = Field(False, description="Also put loss on prompt tokens (default: response tokens only).")
    packing: bool = Field(
        False,
        description="Pack several examples into one row of max_length tokens (stage "
        "reward: each batch's chosen and rejected sequences; dpo does not pack).",
    )
    system_prompt: str | None = Field(None, description="A system message added to every example.")
    roles: dict[str, MessageRole] = Field(
        default_factory=dict,
        description="Role names of your messages -> system, user, assistant, tool or function_call (a tool call "
        "as JSON), e.g. {human: user, bot: assistant}; the usual OpenAI / ShareGPT names are known already.",
    )
    cache: Literal["auto", "on", "off"] = Field(
        "auto",
        description="on: rows are read into an on-disk Arrow cache ($TUNELAB_HOME/cache/data), tokenised by "
        "several processes and read back memory-mapped, keyed by the files' content, tokenizer, template and "
        "these settings, so a second run starts at once; off: read and tokenised in memory; auto: on from "
        "16 MB of data files (docs/data.md).",
    )
    num_proc: int | None = Field(
        None,
        ge=1,
        description="Processes that tokenise into the cache (this one and num_proc - 1 started fresh); null = one "
        "per core, at most 8 and one per 4,000 rows.",
    )

    @field_validator("cache", mode="before")
    @classmethod
    def _on_off(cls, value):
        return ("on" if value else "off") if isinstance(value, bool) else value  # YAML reads on / off as booleans

    @field_validator("format", mode="before")
    @classmethod
    def _alias(cls, value):
        return _format_alias(value)


# ------------------------------------------------------------------------------------------ task
class TaskConfig(Section):
    """A supervised task: a preset or your own files. Used by stage classification (classification /
    regression), extractive_qa (SQuAD-style spans) and seq2seq (source -> target)."""

    name: str | None = Field(
        None,
        description="A preset (classification: sst2, cola, mrpc, stsb, rte, wnli, qnli; extractive_qa: squad; "
        "seq2seq: wmt14-en-de; see tunelab.data.tasks) or null for your own files.",
    )
    type: Literal["classification", "regression"] = Field(
        "classification", description="stage classification, your own files: classification or regression."
    )
    labels: list[str] = Field(default_factory=list, description="Class names in label-id order, for your own files.")
    train_file: str | None = Field(
        None,
        description="Your own train file: classification columns text, text_pair, label; extractive_qa a "
        "SQuAD-format .json (or rows question, context, answers); seq2seq columns source, target.",
    )
    dev_file: str | None = Field(None, description="Your own dev file (same format).")
    train_limit: int | None = Field(None, ge=1, description="Train on a seeded sample of at most this many rows.")
    dev_limit: int | None = Field(None, ge=1, description="Evaluate on a seeded sample of at most this many rows.")
    max_length: int = Field(
        128,
        ge=8,
        description="Tokens per example (classification: text and text_pair; extractive_qa: question + context "
        "window; seq2seq: the source).",
    )
    doc_stride: int | None = Field(
        None,
        ge=0,
        description="extractive_qa: tokens of overlap between consecutive windows of a long context "
        "(under half of max_length); null = a quarter of max_length.",
    )
    max_answer_tokens: int = Field(30, ge=1, description="extractive_qa: longest answer span predicted, in tokens.")
    null_threshold: float | None = Field(
        0.0,
        description="extractive_qa: predict no answer when the null (CLS) score exceeds the best span's score "
        "by more than this; null = always answer (SQuAD v1).",
    )
    prefix: str | None = Field(
        None,
        description="seq2seq: text put before every source. null = automatic: 'translate English to German: ' "
        "for a T5 model on wmt14-en-de, else none.",
    )
    max_target_length: int = Field(128, ge=1, description="seq2seq: target tokens kept for training.")
    max_new_tokens: int = Field(128, ge=1, description="seq2seq: longest generated output at evaluation.")
    num_beams: int = Field(1, ge=1, description="seq2seq: beam width at evaluation (1 = greedy).")
    embedding_model: str | None = Field(
        "minilm-l6",
        description="seq2seq: sentence-embedding model for the output/reference cosine metric (a model spec); "
        "null = BLEU only.",
    )


# ------------------------------------------------------------------------------------- training
Tracker = Literal["tensorboard", "wandb", "mlflow", "trackio"]


class TrainingConfig(Section):
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    batch_size: int = Field(4, ge=1, description="Examples per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    rows_per_pass: int | None = Field(
        None,
        ge=1,
        description="Run each micro-batch through forward and backward this many rows at a time, summing "
        "the gradients: the same update as the whole micro-batch (the loss is normalised over the step), "
        "with the activation memory of one pass. null = the whole micro-batch at once.",
    )
    accelerate: Literal["auto", "off"] = Field(
        "auto",
        description="The CPU speed code (tunelab/accel): fast LoRA layers, fused RMSNorm, per-example attention "
        "over packed rows, the fused head + cross-entropy, compact frozen weights (compact_frozen), thread shares "
        "(pass_threads), the allocator (allocator, release_memory); some as C loops compiled at first use where a "
        "C compiler (cc) is found: bf16 weights' AdamW step, LoRA dropout masks and, in bf16, RMSNorm's rows and "
        "the attention backward. auto = each where it applies, the same "
        "training to rounding; off = none of them, whatever their own settings: plain PyTorch + PEFT (packed "
        "rows still attend per example, through transformers' mask). The run log says which pieces are on and "
        "why any is not. See docs/performance.md.",
    )
    pass_threads: int | None = Field(
        None,
        ge=1,
        description="CPU: cut each micro-batch's rows into this many shares that run at once in threads, each on "
        "its share of the cores, in passes of rows_per_pass / shares rows: the same rows in flight (the same "
        "activation memory), steps ~5-8% shorter on 2 cores (docs/performance.md). Each share sums its own "
        "gradients, added in share order: the same update every run. null = one share per torch thread on a CPU "
        "in one process, unless dropout other than fast-path LoRA dropout is active (LoRA dropout: each share "
        "draws from its own generator), LoRA dropout meets gradient checkpointing, or most parameters train; "
        "1 = off.",
    )
    lr: float = Field(2e-4, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (not applied to biases and norms).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    scheduler: Literal["constant", "linear", "cosine"] = Field("cosine", description="LR schedule after warmup.")
    warmup_steps: int | None = Field(None, ge=0, description="Warmup steps (overrides warmup_ratio).")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Warmup as a fraction of total steps.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this; null = no clipping.")
    neftune_alpha: float | None = Field(
        None,
        gt=0,
        description="NEFTune (Jain et al. 2023): uniform noise of scale alpha / sqrt(width x hidden) added to the "
        "input embeddings in training passes (transformers' own hook; the paper tries 5, 10, 15). Stages sft and "
        "pretrain. Each pass then runs on all threads (its noise draws from torch's one generator). null: off.",
    )
    seed: int = Field(42, description="Seed for data order, dropout and initialisation.")
    eval_every: int | None = Field(None, ge=1, description="Evaluate every N steps (and always at the end).")
    evals_per_epoch: int | None = Field(
        None,
        ge=1,
        description="Evaluate this many times an epoch, evenly spaced in steps (Axolotl's evals_per_epoch); "
        "instead of eval_every.",
    )
    eval_batches: int | None = Field(None, ge=1, description="Evaluate on at most this many batches.")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many evaluations without a lower eval loss."
    )
    save_every: int | None = Field(None, ge=1, description="Write a resumable checkpoint every N steps.")
    saves_per_epoch: int | None = Field(
        None,
        ge=1,
        description="Write a resumable checkpoint this many times an epoch, evenly spaced in steps "
        "(Axolotl's saves_per_epoch); instead of save_every.",
    )
    keep_checkpoints: int = Field(2, ge=1, description="How many recent checkpoints to keep.")
    log_every: int = Field(1, ge=1, description="Write a metrics line every N steps.")
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|mps|(cuda|xpu)(:\d+)?)$", description="auto, cpu, cuda, cuda:1, mps, xpu."
    )
    threads: int | None = Field(None, ge=1, description="CPU threads for torch (default: torch's choice).")
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto",
        description="Keep only each layer's input and recompute the rest in the backward pass: "
        "much less activation memory for about a third more compute (docs/performance.md). auto = on when "
        "the activations a pass keeps (estimated from rows per pass, max_length and the model's size) would "
        "take over half the memory available once the model has loaded; the run log says which and why.",
    )
    checkpoint_layers: int | None = Field(
        None,
        ge=1,
        description="With gradient checkpointing on: how many of the model's layers (the first ones) keep only "
        "their input and recompute the rest in the backward pass; the others keep their activations. Fewer = "
        "faster and more memory (each layer recomputed costs about a third of its compute again). null = every "
        "layer with gradient_checkpointing: true; with auto, the fewest that bring the estimated activations under "
        "half the memory available (the run log says how many).",
    )
    master_weights: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="Under bf16 (model.dtype: bfloat16, or auto where it resolves to bf16), how the weights that "
        "train are kept. fp32 = mixed precision: fp32 weights, gradients and AdamW moments, 16 bytes a trainable "
        "weight. bf16 = the weights, gradients and moments stay bf16 and every AdamW update is rounded "
        "stochastically (tunelab/training/bf16_adamw.py), 8 bytes a weight: full fine-tuning of a 135M model in "
        "1 GB less memory at the same held-out loss, of a 1.7B model on a 24 GB box at all. auto = bf16 on a CPU "
        "when most of the model trains (full fine-tuning), or on any device when the fp32 copies would not fit "
        "in the memory available; fp32 otherwise; a resumed run keeps what it started with. Ignored in fp32 runs. "
        "See docs/performance.md, 'bf16 weights'.",
    )
    optimizer_state: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="Where the weights that train are fp32 (an fp32 run: a CPU without native bf16, or "
        "model.dtype: float32), how their gradients and AdamW moments are kept. fp32 = 12 bytes a trainable "
        "weight beside the weight's 4. bf16 = 6 bytes: each gradient added into a bf16 one as autograd makes it, "
        "the moments rounded stochastically, the weights updated in fp32 (tunelab/training/bf16_adamw.py): full "
        "fine-tuning of a 135M model in 0.55 GB less memory at the same held-out loss, of a 1.7B model in fp32 on a "
        "24 GB box at all. auto = bf16 on a CPU in one process when most of the model trains (full fine-tuning), or "
        "when the fp32 gradients and moments would not fit in the memory available; fp32 otherwise. See "
        "docs/performance.md, 'bf16 optimizer state'.",
    )
    saved_activations: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="In fp32 passes, the dtype two kinds of activations the backward pass reads are kept in (with "
        "training.accelerate: auto): a SwiGLU MLP's gate and up outputs (on accel's functions: full fine-tuning's, "
        "fast LoRA's) and each RMSNorm's input. bf16 halves them (SmolLM2-135M full fine-tuning at 1,024 tokens: "
        "~230 MB less peak) and rounds what the backward pass reads to bf16's 8 bits; the forward pass and the loss "
        "stay fp32. auto = bf16 where the optimizer state is bf16 (training.optimizer_state: the run keeps its "
        "gradients in bf16 already) or where a pass's fp32 activations would exceed half the memory available "
        "(where gradient_checkpointing: auto recomputes layers: narrower activations cost no recomputation, so "
        "they come first and checkpointing covers only what they leave), else fp32. See docs/performance.md, "
        "'Twenty-ninth session' and 'Thirtieth session'.",
    )
    release_memory: bool | None = Field(
        None,
        description="Return freed activation memory to the OS at once (Linux/glibc: malloc's mmap threshold pinned "
        "at 128 KiB): on glibc's heap peak RSS ~30% lower, steps ~1.6x slower on CPU (page faults). null = on with "
        "gradient_checkpointing: true (the low-memory setting) when the process runs on glibc's malloc, off "
        "otherwise (tbbmalloc keeps the peak near what a step holds by itself). true also keeps `tunelab train` off "
        "tbbmalloc (allocator: auto). See docs/performance.md.",
    )
    allocator: Literal["auto", "tbbmalloc", "system"] = Field(
        "auto",
        description="Linux: `tunelab train` restarts itself once with Intel's TBB allocator preloaded (the tbb "
        "wheel, a dependency): it keeps tensor sizes apart where glibc's heap lets small allocations split "
        "the holes large ones leave, so peak RSS stays near what a step holds, and steps are as fast or "
        "faster. auto = tbbmalloc unless release_memory: true (freed memory returned at once by glibc); "
        "system = never. The Python API cannot swap its own process's malloc: "
        "run python under LD_PRELOAD for the same (docs/performance.md).",
    )
    compact_frozen: bool | list[str] = Field(
        True,
        description="LoRA (and prompt / prefix tuning: every frozen linear layer of the body): keep each frozen "
        "fp32 base weight in the compact form its values came from (the 8-bit blocks of a GGUF model, or bf16) when "
        "it decodes back bit for bit, and decode it where a matmul needs it: the same training to the bit, ~300 MB "
        "less for the default model, one elementwise pass per weight use. A list compacts only the modules with those names in their path (e.g. [embed_tokens] "
        "for the token table and the head tied to it, [mlp], [down_proj]): a middle way between memory and "
        "speed. Also dpo / kto's frozen reference copy (full fine-tuning and other methods that train the model's "
        "own weights): its linear weights and token table. One process only. See docs/performance.md.",
    )
    report_to: list[Tracker] = Field(
        ["tensorboard"],
        description="Experiment trackers that get every metrics.jsonl value, under the same names (train/loss, "
        "train/learning_rate, train/grad_norm, eval/loss, dev/accuracy ...), and the config: tensorboard (event "
        "logs in the run folder's tensorboard/), wandb, mlflow, trackio (the extras tunelab[wandb], tunelab[mlflow], "
        "tunelab[trackio]). metrics.jsonl is always written; [] or none = it alone. --resume continues the same "
        "tracker run (trackers.json in the run folder keeps its id). The older `tensorboard: false` still works: "
        "it drops tensorboard from this list. See docs/getting-started.md.",
    )
    run_name: str | None = Field(None, description="The run's name in the trackers; null = the run folder's name.")
    tracker_project: str = Field(
        "tunelab", description="The wandb / trackio project, the MLflow experiment the run is filed under."
    )
    sample_prompts: list[str] | None = Field(
        None,
        description="Prompts a causal LM continues at every evaluation (greedily, and sampled at "
        "sample_temperature), written to samples.jsonl in the run folder and to the log. null = stage pretrain "
        "on a text corpus: the first line of the held-out text; other stages none. [] = none.",
    )
    sample_tokens: int = Field(64, ge=0, description="Tokens generated per sample (0 = no samples).")
    sample_temperature: float = Field(0.8, gt=0, description="Temperature of the sampled continuation.")
    progress: bool = Field(True, description="Show a progress bar.")

    @model_validator(mode="before")
    @classmethod
    def _tensorboard_flag(cls, data):
        """`tensorboard: true / false`, the setting before report_to: adds tensorboard to report_to / drops it."""
        if isinstance(data, dict) and "tensorboard" in data:
            data = dict(data)
            on = data.pop("tensorboard")
            if not isinstance(on, bool):
                raise ValueError(f"training.tensorboard: true or false (got {on!r}); better: training.report_to")
            trackers = _tracker_list(data.get("report_to", ["tensorboard"]))
            if isinstance(trackers, list):
                trackers = [t for t in trackers if t != "tensorboard"] + (["tensorboard"] if on else [])
            data["report_to"] = trackers
        return data

    @field_validator("report_to", mode="before")
    @classmethod
    def _none(cls, v):
        return _tracker_list(v)

    @model_validator(mode="after")
    def _per_epoch(self):
        for every, per in (("eval_every", "evals_per_epoch"), ("save_every", "saves_per_epoch")):
            if getattr(self, every) is not None and getattr(self, per) is not None:
                raise ValueError(f"training.{every} and training.{per} both say when: set one of them")
        return self

    @model_validator(mode="after")
    def _checkpoint_layers(self):
        if self.checkpoint_layers is not None and self.gradient_checkpointing is False:
            raise ValueError(
                f"training.checkpoint_layers: {self.checkpoint_layers} says how many layers gradient checkpointing "
                "recomputes, and training.gradient_checkpointing is false; set it to true (or auto), or drop "
                "checkpoint_layers"
            )
        return self

    @field_validator("report_to")
    @classmethod
    def _installed(cls, v):
        """A tracker whose library is missing stops here, before any model loads, not at the first step."""
        for name in v:
            problem = tracker_problem(name)
            if problem:
                raise ValueError(problem)
        return v

    @field_validator("accelerate", mode="before")
    @classmethod
    def _yaml_off(cls, v):
        """YAML reads a bare `off` as false (and `on` as true): the same setting."""
        return {False: "off", True: "auto"}.get(v, v) if isinstance(v, bool) else v


def _tracker_list(v):
    """`none`, a single name, or a list (HF TrainingArguments' `report_to` spellings) -> a list without duplicates."""
    if v is None or v == "none":
        return []
    if isinstance(v, str):
        v = [v]
    return list(dict.fromkeys(t for t in v if t != "none")) if isinstance(v, list) else v


# tracker -> (the module it needs, how to install it)
TRACKER_PACKAGES = {
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "wandb": ("wandb", "pip install 'tunelab[wandb]'"),
    "mlflow": ("mlflow", "pip install 'tunelab[mlflow]'"),
    "trackio": ("trackio", "pip install 'tunelab[trackio]'"),
}
# MLflow's database stores (its default, sqlite:///mlflow.db, among them) need SQLAlchemy and alembic, which the
# full `mlflow` package brings; the `tunelab[mlflow]` extra installs the light client, mlflow-skinny
_MLFLOW_DATABASES = ("sqlite", "postgresql", "mysql", "mssql")


def tracker_problem(name: str) -> str | None:
    """Why tracker `name` cannot run in this environment (its library is missing ...), or None."""
    import importlib.util
    import os

    module, install = TRACKER_PACKAGES[name]
    if importlib.util.find_spec(module) is None:
        return f"{name} is not installed: {install} (or drop {name} from training.report_to)"
    if name == "mlflow":
        uri = os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
        if uri.split(":", 1)[0].split("+")[0] in _MLFLOW_DATABASES and importlib.util.find_spec("sqlalchemy") is None:
            where = "MLFLOW_TRACKING_URI" if "MLFLOW_TRACKING_URI" in os.environ else "MLflow's default store"
            return (
                f"mlflow: {where} {uri} is a database, which needs the full MLflow package: pip install mlflow; or "
                "set MLFLOW_TRACKING_URI to your tracking server (http://HOST:5000)"
            )
    return None


# ------------------------------------------------------------------------------------------- dpo
class DPOConfig(Section):
    """stage dpo: Direct Preference Optimization (Rafailov et al. 2023) against the starting model."""

    beta: float = Field(
        0.1, gt=0, description="KL strength: implicit reward = beta * log(policy / reference); larger stays closer."
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="sigmoid loss: assumed probability that a pair's label is flipped (cDPO)."
    )
    loss_type: Literal["sigmoid", "ipo", "simpo", "orpo"] = Field(
        "sigmoid",
        description="sigmoid (the DPO loss), ipo ((h - 1/(2 beta))^2, Azar et al. 2023), or without a reference "
        "model: simpo (Meng et al. 2024: -log sigmoid(beta (mean log pi(y_w) - mean log pi(y_l)) - simpo_gamma); "
        "the paper's beta is 2 to 2.5) or orpo (Hong et al. 2024: the chosen reply's SFT loss + beta x the "
        "odds-ratio loss; the paper's beta (lambda) is 0.1 to 0.25).",
    )
    simpo_gamma: float = Field(
        0.5, ge=0, description="loss_type simpo: the target reward margin gamma (the paper's gamma / beta is ~0.5)."
    )
    sft_weight: float = Field(
        0.0,
        ge=0,
        description="alpha: adds alpha x the chosen reply's SFT loss (its mean token NLL) to each pair's loss, with "
        "any loss_type: RPO (Pang et al. 2024) with sigmoid, CPO-SimPO with simpo (LLaMA-Factory pref_ftx, TRL "
        "rpo_alpha / cpo_alpha); keeps the chosen replies' likelihood from falling. orpo has weight 1 built in.",
    )


class KTOConfig(Section):
    """stage kto: Kahneman-Tversky Optimization (Ethayarajh et al. 2024) on replies labelled desirable or not."""

    beta: float = Field(
        0.1, gt=0, description="Implicit reward = beta * log(policy / reference), as DPO's; larger stays closer."
    )
    desirable_weight: float = Field(
        1.0,
        gt=0,
        description="lambda_D: weight of a desirable reply's loss (the paper keeps lambda_D n_D / "
        "(lambda_U n_U) in [1, 4/3] when the kinds are unbalanced).",
    )
    undesirable_weight: float = Field(1.0, gt=0, description="lambda_U: weight of an undesirable reply's loss.")


# --------------------------------------------------------------------------------------- distill
class DistillConfig(Section):
    """stage distill: the model learns a teacher's next-token distribution (docs/distillation.md)."""

    teacher: str | None = Field(
        None,
        description="The teacher: a model spec (name, Hub id or folder) or a finished run folder (merged). It "
        "must share the student's vocabulary and chat template.",
    )
    temperature: float = Field(
        1.0, gt=0, description="tau: both distributions are softened by logits / tau; the KL term is scaled by tau^2."
    )
    alpha: float = Field(
        0.5, ge=0, le=1, description="Weight of the KL term; 1 - alpha weighs the hard-label cross-entropy."
    )
    top_k: int = Field(
        64,
        ge=1,
        description="Teacher tokens kept per position (the rest of each distribution as one 'other' bucket); "
        ">= the vocabulary = the exact KL.",
    )
    cache: bool = Field(
        True,
        description="Keep the teacher's top-k on disk (RUN/distill/) and reuse it on a resume or a rerun of the "
        "same teacher, data, top_k and temperature; false: recompute it at each start.",
    )


# ------------------------------------------------------------------------------------------- ppo
class RewardConfig(Section):
    """What scores a response in stage ppo: a reward-model run, or a builtin toy reward (tests, smoke runs)."""

    kind: Literal["model", "length", "keyword", "tokens"] = Field(
        "model",
        description="model (a `stage: reward` run folder in `path`), length (1 - |tokens - target_length| / "
        "target_length), keyword (the fraction of response tokens whose text contains `keyword`) or tokens "
        "(the fraction of response tokens whose id is in `token_ids`).",
    )
    path: str | None = Field(None, description="kind model: the reward run folder (or its final/).")
    target_length: int = Field(16, ge=1, description="kind length: the response length in tokens that scores 1.")
    keyword: str | None = Field(None, description="kind keyword: the text a rewarded token contains.")
    token_ids: list[int] = Field(default_factory=list, description="kind tokens: the rewarded token ids.")
    score_clip: float | None = Field(
        None, gt=0, description="Clip scores to [-score_clip, score_clip]; null = no clip."
    )


class PPOConfig(Section):
    """stage ppo: RLHF with PPO, KL-penalised to the starting (SFT) policy. One training step = one
    iteration (a rollout of `rollout_batch_size` prompts, then `ppo_epochs` passes over mini-batches);
    training.max_steps counts iterations (else training.epochs passes over the prompts)."""

    policy: str | None = Field(
        None,
        description="The SFT policy to start from (and stay close to): a run folder (merged before the PPO "
        "adapter is added), a model spec, or null = `model.name`.",
    )
    reward: RewardConfig = Field(default_factory=RewardConfig, description="The reward R(x, y).")
    prompts: str | None = Field(
        None,
        description="Prompt file: preference pairs (hh-rlhf, {prompt, chosen, rejected}, ShareGPT; their "
        "prompts are used) or rows with a `prompt` column (a string or chat messages).",
    )
    skip_prompts: int = Field(
        0, ge=0, description="Leave out the first N rows of the prompt file (e.g. the pairs a reward model saw)."
    )
    prompt_limit: int | None = Field(None, ge=1, description="Train on at most this many prompts (a seeded sample).")
    eval_prompts: int = Field(
        0, ge=0, description="Hold out this many prompts (never trained on) to score before and after training."
    )
    max_prompt_length: int = Field(256, ge=8, description="Skip prompts longer than this many tokens.")
    rollout_batch_size: int = Field(16, ge=1, description="Prompts sampled per iteration.")
    mini_batch_size: int = Field(4, ge=1, description="Sequences per optimizer step in the PPO epochs.")
    ppo_epochs: int = Field(2, ge=1, description="Passes over each rollout.")
    max_new_tokens: int = Field(32, ge=1, description="Longest sampled response.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (log-probs use the same scaling).")
    top_k: int = Field(0, ge=0, description="Sample from the top-k tokens only; 0 = the whole vocabulary.")
    eval_temperature: float | None = Field(
        None, ge=0, description="Held-out evaluation: null = sample like training (seeded), 0 = greedy."
    )
    cliprange: float = Field(0.2, gt=0, description="PPO clip range of the policy ratio.")
    cliprange_value: float = Field(0.2, gt=0, description="Clip range of the value update around the old values.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount factor.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss.")
    entropy_coef: float = Field(0.0, ge=0, description="Weight of the entropy bonus.")
    kl_control: Literal["adaptive", "fixed"] = Field(
        "adaptive", description="adaptive (Ziegler et al. 2019: steer beta to kl_target) or fixed beta."
    )
    init_kl_coef: float = Field(0.1, ge=0, description="beta: the per-token KL penalty coefficient at the start.")
    kl_target: float = Field(6.0, gt=0, description="adaptive: the KL (nats per sequence) to steer towards.")
    kl_horizon: int = Field(10000, ge=1, description="adaptive: the horizon (in sequences) of the beta update.")
    whiten_advantages: bool = Field(True, description="Normalise advantages to mean 0, std 1 per rollout.")


# ------------------------------------------------------------------------------------------ root
def _method_union():
    from tunelab.methods.registry import config_classes

    classes = tuple(config_classes())
    return Annotated[Union[classes], Field(discriminator="name")]  # noqa: UP007


class _Root(Section):
    stage: str = (  # the registered stage names (tunelab/plugins.py): set by _build_config_class
        Field(
            "sft",
            description="sft (supervised fine-tuning), pretrain (pre-training on text: continued, or from scratch with "
            "model.architecture; .txt files are a corpus scored per character), "
            "classification (a classification / regression head; the `task` section), extractive_qa (a "
            "start/end span head on an encoder; `task`), seq2seq (an encoder-decoder on source -> target; "
            "`task`), mlm (masked-LM pre-training of an encoder on text, continued or from scratch; `data`, format text), ppo "
            "(RLHF with PPO against a reward; the `ppo` section), reward (a reward model: a scalar head trained "
            "on preference pairs; `data`, format preference), dpo (Direct Preference Optimization on "
            "preference pairs; `data`, format preference; the `dpo` section), tagging (a tag per word: "
            "*ForTokenClassification; `data` rows {tokens, tags}, `task.labels`), distill (a student learning a "
            "teacher's next-token distribution; `data` and the `distill` section) or any stage registered in "
            "tunelab/plugins.py (its module's docstring says which sections it reads).",
        )
    )
    output_dir: str = Field("runs/run", description="Run folder: config, metrics, checkpoints and the result.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    kto: KTOConfig = Field(default_factory=KTOConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)


def _build_config_class():
    MethodUnion = _method_union()
    StageName = Literal[tuple(STAGES)]  # noqa: F821 (a Literal of the registered names)

    class Config(_Root):
        """A whole run. `tunelab train CONFIG` and `tunelab.train(config)` take the same object."""

        stage: StageName = _Root.model_fields["stage"]  # type: ignore[valid-type]

        method: MethodUnion = Field(  # type: ignore[valid-type]
            default_factory=lambda: _default_method(), description="The tuning method and its settings."
        )

        @model_validator(mode="after")
        def _check(self):
            if self.stage == "pretrain" and self.data.format not in ("text", "auto"):
                raise ValueError("stage: pretrain needs data.format: text (or auto)")
            if self.stage == "mlm" and self.data.format not in ("text", "auto"):
                raise ValueError("stage: mlm needs data.format: text (or auto)")
            if self.stage in ("reward", "dpo", "kto") and self.data.format not in ("preference", "auto"):
                raise ValueError(
                    f"stage: {self.stage} needs data.format: preference or auto (chosen / rejected pairs"
                    + (", or replies labelled desirable or not)" if self.stage == "kto" else ")")
                )
            if self.data.format == "preference" and self.stage in ("sft", "pretrain", "mlm"):
                raise ValueError("data.format: preference is for stage: reward or stage: dpo; set the stage")
            if self.stage == "reward" and _capabilities(self.method.name).virtual_tokens == "past_key_values":
                raise ValueError(
                    f"stage: reward does not support method {self.method.name} (PEFT passes its prefix as "
                    "past_key_values, which transformers' sequence-classification models do not take); use "
                    f"{_adapter_methods(lambda c: c.virtual_tokens != 'past_key_values')} or a weight-training method"
                )
            if self.training.gradient_checkpointing is True and _capabilities(self.method.name).virtual_tokens == (
                "past_key_values"
            ):
                raise ValueError(
                    f"method {self.method.name} cannot train with gradient checkpointing: transformers' checkpointed "
                    "layers drop the key/value cache its prefix is handed over in; set "
                    "training.gradient_checkpointing: false (or auto, which leaves it off for this method)"
                )
            if self.data.packing and _capabilities(self.method.name).virtual_tokens:
                # PEFT drops position_ids for prompt-learning models, and packed rows are kept apart by them
                raise ValueError(
                    f"method {self.method.name} cannot pack: PEFT ignores the position ids that keep packed "
                    "examples apart (they would attend to each other, and the virtual tokens would precede only "
                    "the first); set data.packing: false"
                )
            if self.training.neftune_alpha is not None and self.stage not in ("sft", "pretrain"):
                raise ValueError(
                    f"training.neftune_alpha with stage: {self.stage}: NEFTune is for supervised fine-tuning and "
                    "pre-training of a causal LM (sft, pretrain); a noisy pass here would also be scored (reference, "
                    "reward, rollouts); drop it"
                )
            if self.stage == "ppo" and self.ppo.policy and self.method.starts_from:
                raise ValueError(
                    f"stage: ppo with ppo.policy and {self.method.starts_from} to start from: ppo.policy merges an SFT "
                    "run into the policy, method.start_from trains an adapter on over model.name; use one of them"
                )
            if self.stage in ("dpo", "kto", "ppo") and self.method.reference_refused(self.stage):
                raise ValueError(f"stage: {self.stage} with {self.method.reference_refused(self.stage)}")
            if self.stage == "kto" and self.training.rows_per_pass is not None:
                raise ValueError(
                    "stage: kto with training.rows_per_pass: z_ref is the mean over each micro-batch's mismatched "
                    "rows, and a pass of fewer rows would take it over those alone (not the same update); to hold "
                    "fewer rows at once lower training.batch_size and raise training.grad_accum instead"
                )
            if self.stage in ("dpo", "kto") and self.data.packing:
                raise ValueError(
                    f"stage: {self.stage} does not pack: each sequence it scores is a row of its own (laid end to end "
                    "without their padding where tunelab/accel's packed attention runs); set data.packing: false"
                )
            if self.model.new_special_tokens and not _capabilities(self.method.name).new_tokens:
                from tunelab.methods.registry import names

                able = ", ".join(n for n in names() if _capabilities(n).new_tokens)
                raise ValueError(
                    f"model.new_special_tokens with method {self.method.name}: the new tokens' rows of the token table "
                    f"start untrained, and {self.method.name} leaves the table frozen; use a method that trains them "
                    f"({able}), or drop model.new_special_tokens"
                )
            if self.stage == "distill":
                _check_distill(self)
            if self.model.architecture:
                _check_scratch(self)
            if self.stage == "ppo":
                _check_ppo(self)
                for per in ("evals_per_epoch", "saves_per_epoch"):
                    if getattr(self.training, per) is not None:
                        every = per.replace("s_per_epoch", "_every")
                        raise ValueError(f"training.{per} with stage ppo: PPO counts iterations, not epochs of a data "
                                         f"set; set training.{every} (in iterations)")  # fmt: skip
            if self.training.pass_threads is not None and self.training.pass_threads > 1:
                _check_pass_threads(self)
            if self.stage in ("classification", "extractive_qa", "seq2seq") and not (
                self.task.name or self.task.train_file
            ):
                raise ValueError(f"stage: {self.stage} needs task.name (a preset) or task.train_file")
            stride = self.task.doc_stride
            if self.stage == "extractive_qa" and stride is not None and stride >= self.task.max_length // 2:
                raise ValueError(
                    f"task.doc_stride ({stride}) must be under half of task.max_length "
                    f"({self.task.max_length}): windows overlap by doc_stride tokens"
                )
            return self

    return Config


def _check_distill(cfg) -> None:
    if not cfg.distill.teacher:
        raise ValueError("stage: distill needs distill.teacher (a model spec or a finished run folder)")
    if cfg.data.packing:
        raise ValueError(
            "stage: distill does not pack: the teacher's cached top-k is kept per example; set data.packing: false"
        )
    if cfg.data.format == "preference":
        raise ValueError("stage: distill trains on sft or text rows, not preference pairs; set data.format")


def _check_scratch(cfg) -> None:
    """A model built from model.architecture: every weight trains, and a tokenizer to train has text."""
    if cfg.stage not in ("pretrain", "mlm"):
        raise ValueError(
            f"model.architecture builds a new model for pre-training: stage pretrain (causal) or mlm (masked), "
            f"not {cfg.stage}; then start stage {cfg.stage} from the result (model.name: runs/RUN/final)"
        )
    if cfg.method.name != "full":
        raise ValueError(
            f"model.architecture builds a randomly initialised model: train every weight with method: full "
            f"(method {cfg.method.name} would train a small part of random weights)"
        )
    source = cfg.model.tokenizer
    if isinstance(source, TokenizerSource) and not source.train.corpus:
        train = cfg.data.train if isinstance(cfg.data.train, list) else [cfg.data.train]
        plain = bool(cfg.data.train) and all(isinstance(t, str) and is_text_path(t) for t in train)
        if not plain:
            raise ValueError(
                "model.tokenizer.train.corpus: give the text files to train the tokenizer on (it trains on the "
                "run's own text only when data.train is plain text: .txt files)"
            )


TEXT_SUFFIXES = (".txt", ".text", ".md")


def is_text_path(path: str) -> bool:
    """A plain-text corpus file (data/corpus.py reads these whole): .txt, .text, .md, optionally .gz."""
    name = Path(str(path)).name.lower().removesuffix(".gz")
    return Path(name).suffix in TEXT_SUFFIXES


def _check_pass_threads(cfg) -> None:
    """training.pass_threads > 1 where the loop would refuse it once the model is in (tunelab/accel/threads.py),
    decided here from the settings alone; with `device: auto` or several processes the loop asks before the load."""
    t = cfg.training
    if t.accelerate == "off" or cfg.stage == "ppo":  # no thread shares: the setting is ignored (and logged so)
        return
    if t.device not in ("auto", "cpu"):
        raise ValueError(
            f"training.pass_threads: {t.pass_threads} splits a pass over the cores of one CPU process; on "
            f"training.device {t.device} set it to null or 1"
        )
    # LoRA dropout on the fast path (a dense base, not a quantized one) draws a mask per share, which the
    # recomputed forward of gradient checkpointing would not replay
    if (
        t.gradient_checkpointing is True
        and getattr(cfg.method, "dropout", 0) > 0
        and not _capabilities(cfg.method.name).quantized_base
    ):
        raise ValueError(
            f"training.pass_threads: {t.pass_threads} with LoRA dropout (method.dropout {cfg.method.dropout:g}) and "
            "training.gradient_checkpointing: true: the recomputed forward would not replay a share's dropout masks; "
            "set pass_threads to null or 1, gradient_checkpointing to false, or method.dropout to 0"
        )


def _check_ppo(cfg) -> None:
    p = cfg.ppo
    if not p.prompts:
        raise ValueError("stage: ppo needs ppo.prompts (a preference or prompt file)")
    if p.reward.kind == "model" and not p.reward.path:
        raise ValueError("stage: ppo with ppo.reward.kind: model needs ppo.reward.path (a `stage: reward` run)")
    if p.reward.kind == "keyword" and not p.reward.keyword:
        raise ValueError("stage: ppo with ppo.reward.kind: keyword needs ppo.reward.keyword")
    if p.reward.kind == "tokens" and not p.reward.token_ids:
        raise ValueError("stage: ppo with ppo.reward.kind: tokens needs ppo.reward.token_ids")
    if _capabilities(cfg.method.name).virtual_tokens:
        raise ValueError(
            f"stage: ppo does not support method {cfg.method.name} (virtual tokens shift the response "
            f"positions); use {_adapter_methods(lambda c: not c.virtual_tokens)} or a weight-training method"
        )


def _capabilities(method_name: str):
    from tunelab.methods.registry import capabilities

    return capabilities(method_name)


def _adapter_methods(allowed) -> str:
    """'lora, ia3 ...': the registered PEFT adapter methods whose capabilities pass `allowed`."""
    from tunelab.methods.registry import names

    ok = [n for n in names() if _capabilities(n).reference == "adapter_off" and allowed(_capabilities(n))]
    return ", ".join(ok)


def _default_method():
    from tunelab.methods.registry import get

    return get("lora").Config()


_CONFIG_CLASS = None


def config_class():
    global _CONFIG_CLASS
    if _CONFIG_CLASS is None:
        _CONFIG_CLASS = _build_config_class()
    return _CONFIG_CLASS


# ------------------------------------------------------------------------------- loading / errors
# Names users bring from other toolkits (HF Trainer, PEFT, Axolotl) mapped to ours.
_SYNONYMS = {
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "learning_rate": "lr",
    "num_epochs": "epochs",
    "num_train_epochs": "epochs",
    "gradient_accumulation_steps": "grad_accum",
    "per_device_train_batch_size": "batch_size",
    "micro_batch_size": "batch_size",
    "lr_scheduler_type": "scheduler",
    "sequence_len": "max_length",
    "cutoff_len": "max_length",
}


def _fields_at(loc: tuple) -> list[str]:
    """Valid keys of the section that `loc` (a pydantic error location, minus the bad key) points to."""
    from tunelab.methods.registry import get

    if loc[:1] == ("method",):
        try:
            return list(get(str(loc[1])).Config.model_fields) if len(loc) == 2 else []
        except KeyError:
            return []
    cls = config_class()
    for part in loc:
        ann = cls.model_fields[part].annotation if part in cls.model_fields else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        cls = ann
    return list(cls.model_fields)


def _nearest(key: str, loc: tuple) -> str | None:
    fields = _fields_at(loc[:-1])
    # match against our keys and the foreign names we know, so 'lerning_rate' still finds 'lr'
    known = {f: f for f in fields} | {k: v for k, v in _SYNONYMS.items() if v in fields}
    match = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.5)
    return known[match[0]] if match else None


def yaml_line(text: str | None, loc: tuple) -> int | None:
    """1-based line of the key (or list item) at `loc` in the YAML text, so errors point into the user's file."""
    if not text:
        return None
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.value == str(part):
                    line, node = key.start_mark.line + 1, value
                    break
            else:
                break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def format_validation_error(
    err: ValidationError, source: str, text: str | None = None, overrides: list[str] | None = None
) -> str:
    """One line per problem, each naming its key and where it came from: the file's line, or the --set."""
    lines = [f"{source}: invalid config"]
    for e in err.errors():
        loc = tuple(p for p in e["loc"])
        # drop the union tag from the displayed path: method.lora.r -> method.r
        shown = ".".join(str(p) for i, p in enumerate(loc) if not (i == 1 and loc[0] == "method"))
        file_loc = tuple(p for i, p in enumerate(loc) if not (i == 1 and loc[0] == "method"))
        item = _override_at(file_loc, overrides)
        at = None if item else yaml_line(text, file_loc)
        where = f" (--set {item})" if item else f" (line {at})" if at else ""
        if e["type"] == "extra_forbidden":
            near = TOP_LEVEL_HINTS.get(str(loc[-1])) if len(loc) == 1 else None
            if near:  # a flat key of LLaMA-Factory / Axolotl: name our key, and the converter
                hint = f" Did you mean '{near}'? (a LLaMA-Factory / Axolotl key; `tunelab convert FILE` translates such files)"
            else:
                near = _nearest(str(loc[-1]), loc)
                hint = f" Did you mean '{near}'?" if near else ""
            lines.append(f"  - unknown key '{shown}'{where}.{hint}")
        elif e["type"] == "union_tag_invalid":
            from tunelab.methods.registry import names

            lines.append(f"  - {shown}{where}: unknown method name {e['input'].get('name')!r}; choose one of {names()}")
        elif not loc:  # a check across sections: its message names the keys; the input is the whole config
            lines.append(f"  - {e['msg'].removeprefix('Value error, ')}")
        elif e["type"] == "value_error" and isinstance(e.get("input"), dict):  # a section's own check: it names the key
            lines.append(f"  - {shown}{where}: {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  - {shown}{where}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def _override_at(loc: tuple, overrides: list[str] | None) -> str | None:
    """The --set item that gave the value at `loc` (or the section above it), if one did: it wins over the file."""
    for item in reversed(overrides or []):
        keys = tuple(item.split("=", 1)[0].strip().split("."))
        n = min(len(keys), len(loc))
        if n and keys[:n] == tuple(str(p) for p in loc[:n]):
            return item
    return None


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        nxt = cur.get(k)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[k] = nxt
        cur = nxt
    cur[keys[-1]] = value


def apply_overrides(raw: dict, overrides: list[str] | None) -> dict:
    """Apply `section.key=value` overrides; values are parsed as YAML (so 1e-4, true, [a, b] work)."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set training.lr=1e-4")
        key, value = item.split("=", 1)
        if not all(part.strip() for part in key.split(".")):
            raise ConfigError(
                f"--set {item!r}: the key is empty or has an empty part; write SECTION.KEY=VALUE, "
                "e.g. --set training.lr=1e-4"
            )
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(
                f"--set {item!r}: the value is not valid YAML ({getattr(e, 'problem', e)}); quote text, close "
                "brackets, e.g. --set 'training.lr=1e-4' or --set 'method.target_modules=[q_proj, v_proj]'"
            ) from None
        _set_dotted(raw, key.strip(), parsed)
    return raw


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping: YAML forbids it, and PyYAML would keep the
    last value without a word, so half of what the user wrote would be ignored."""


def _mapping_without_duplicates(loader, node, deep=False):
    first: dict = {}
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
            line = key_node.start_mark.line + 1
            if key_node.value in first:
                raise yaml.constructor.ConstructorError(
                    None, None,
                    f"duplicate key {key_node.value!r} (line {line}; also on line {first[key_node.value]}): YAML keeps "
                    "only one of them; remove or merge the other",
                    key_node.start_mark,
                )  # fmt: skip
            first[key_node.value] = line
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def read_yaml_mapping(source: str | Path, what: str, expected: str) -> tuple[dict, str]:
    """(mapping, text) of a YAML file; ConfigError naming the file (and line) when it is missing or bad."""
    path = Path(source)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a {what} file; give the path of the YAML file itself")
    if not path.is_file():
        raise ConfigError(f"{path}: {what} file not found")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the {what} file ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}: line {line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); a {what} file "
            "is YAML text: save it as UTF-8"
        ) from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}:{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if raw is None:  # empty or only comments: a truncated or never-written file is not "all defaults"
        raise ConfigError(
            f"{path}: the {what} file is empty. Write its {expected}, or leave the file out to use every default."
        )
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of {expected}")
    return raw, text


def load_config(source: str | Path | dict | None = None, overrides: list[str] | None = None):
    """Read and validate a config from a YAML path or a dict; raise ConfigError with a readable message."""
    name, text, raw = "config", None, {}
    if isinstance(source, dict):
        raw = dict(source)
    elif source is not None:
        name = str(source)
        raw, text = read_yaml_mapping(source, "config", "sections (model, data, method, training)")
    raw = apply_overrides(raw, overrides)
    method = raw.get("method")
    if isinstance(method, dict) and "name" not in method:
        method["name"] = "lora"
    try:
        return config_class().model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, name, text, overrides)) from None


def dump_config(cfg) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def reference_markdown() -> str:
    """docs/configuration.md, generated from the field descriptions so the two never drift apart."""
    from tunelab.methods.registry import get, names

    def table(cls, prefix: str) -> list[str]:
        rows = ["| key | default | description |", "|---|---|---|"]
        for key, f in cls.model_fields.items():
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                continue
            default = f.default if f.default_factory is None else f.default_factory()
            shown = "required" if f.is_required() else f"`{default!r}`"
            rows.append(f"| `{prefix}{key}` | {shown} | {f.description or ''} |")
        return rows

    out = [
        "# Configuration reference",
        "",
        "Generated from `tunelab/config.py` (`python -m tunelab.config > docs/configuration.md`).",
        "Every key has a default; unknown keys are refused with the nearest valid key.",
        "Override any key on the command line with `--set section.key=value` (the value is parsed as YAML).",
        "",
        "## Top level",
        "",
        *table(_Root, ""),
    ]
    for section, cls in (
        ("model", ModelConfig),
        ("model.tokenizer.train", TokenizerTrainConfig),
        ("data", DataConfig),
        ("data.columns", ColumnsConfig),
        ("data.train[]", DataSource),
        ("task", TaskConfig),
        ("training", TrainingConfig),
        ("dpo", DPOConfig),
        ("kto", KTOConfig),
        ("distill", DistillConfig),
        ("ppo", PPOConfig),
        ("ppo.reward", RewardConfig),
    ):
        out += ["", f"## `{section}`", "", *table(cls, section + ".")]
    for name in names():
        mod = get(name)
        out += [
            "",
            f"## `method` — `name: {name}`",
            "",
            mod.DESCRIPTION[0].upper() + mod.DESCRIPTION[1:] + ".",
            "",
            *table(mod.Config, "method."),
        ]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
