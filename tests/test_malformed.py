"""Malformed inputs, through the command line: every user-caused failure is one named error, exit 2.

Each case is one `tunelab ...` call (tunelab.cli.main, in this process) that must return 2 and print one
`tunelab: error:` message naming the problem: the file and its line / row / field where that applies, and
the key or flag. No traceback, no internal error (exit 1), nothing silently accepted (exit 0).

Bad data files are given to `train` with a model that does not exist: the data error being the one
reported shows that the data is checked before any model loads. Output failures (a full disk, a read-only
folder) are injected into the write functions, since the suite runs as root, where chmod stops no write.
docs/getting-started.md ("When something is wrong") has the measured result.
"""

from __future__ import annotations

import builtins
import errno
import gzip
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tunelab.cli import main


@dataclass
class Case:
    id: str
    argv: list[str]
    expected: list[str]  # substrings of the error message; {d} = the case's folder, {src} = its first file
    files: dict = field(default_factory=dict)  # name -> text or bytes, written into the case's folder
    fault: str | None = None  # an injected write failure (see _inject)


CASES: list[Case] = []


def case(id, argv, *expected, files=None, fault=None):
    CASES.append(Case(id, list(argv), list(expected), dict(files or {}), fault))


# ------------------------------------------------------------------------------------------ configs
def config(id, text, *expected, cmd="config"):
    """A YAML config file `c.yaml`, validated by `tunelab config` (or given to `tunelab train`)."""
    case(id, [cmd, "{d}/c.yaml"], "{d}/c.yaml", *expected, files={"c.yaml": text})


# unknown keys, at the top level and in every section
config("unknown-top", "modle:\n  name: x\n", "unknown key 'modle' (line 1)", "Did you mean 'model'?")
config("unknown-model", "model:\n  nam: x\n", "unknown key 'model.nam' (line 2)", "'name'")
config("unknown-data", "data:\n  trian: a.jsonl\n", "unknown key 'data.trian' (line 2)", "'train'")
config("unknown-columns", "data:\n  columns:\n    outptu: y\n", "'data.columns.outptu' (line 3)", "'output'")
config("unknown-training", "training:\n  lr: 1.0e-4\n  epocs: 2\n", "'training.epocs' (line 3)", "'epochs'")
config("foreign-name", "training:\n  learning_rate: 1.0e-4\n", "'training.learning_rate' (line 2)", "'lr'")
config("unknown-task", "task:\n  lables: [a, b]\n", "unknown key 'task.lables' (line 2)", "'labels'")
config("unknown-dpo", "dpo:\n  betta: 0.1\n", "unknown key 'dpo.betta' (line 2)", "'beta'")
config("unknown-ppo-reward", "ppo:\n  reward:\n    kinds: length\n", "'ppo.reward.kinds' (line 3)", "'kind'")
config("unknown-method", "method:\n  name: lora\n  r: 8\n  alpah: 16\n", "'method.alpah' (line 4)", "'alpha'")
config("method-option-of-another", "method:\n  name: freeze\n  r: 8\n", "unknown key 'method.r' (line 3)")
config("lora-option-for-freeze", "method:\n  name: lora\n  last_k: 2\n", "unknown key 'method.last_k' (line 3)")
# wrong types
config("lr-text", "training:\n  lr: fast\n", "training.lr (line 2)", "valid number", "'fast'")
config("batch-size-float", "training:\n  batch_size: 2.5\n", "training.batch_size (line 2)", "integer")
config("max-steps-text", "training:\n  max_steps: 1e3\n", "training.max_steps (line 2)", "integer")
config("seed-float", "training:\n  seed: 1.5\n", "training.seed (line 2)", "integer")
config("progress-maybe", "training:\n  progress: maybe\n", "training.progress (line 2)", "boolean")
config("betas-one", "training:\n  betas: [0.9]\n", "training.betas", "(line 2)")
config("output-dir-list", "output_dir: [a]\n", "output_dir (line 1)", "valid string")
config("target-modules-int", "method:\n  name: lora\n  target_modules: 5\n", "method.target_modules", "(line 3)")
# out-of-range numbers
config("lr-negative", "training:\n  lr: -0.001\n", "training.lr (line 2)", "greater than 0", "-0.001", cmd="train")
config("lr-infinite", "training:\n  lr: .inf\n", "training.lr (line 2)", "finite")
config("lr-nan", "training:\n  lr: .nan\n", "training.lr (line 2)")
config("batch-size-0", "training:\n  batch_size: 0\n", "training.batch_size (line 2)", "greater than or equal to 1")
config("grad-accum-negative", "training:\n  grad_accum: -2\n", "training.grad_accum (line 2)", "-2")
config("epochs-0", "training:\n  epochs: 0\n", "training.epochs (line 2)", "greater than 0", cmd="train")
config("warmup-ratio-1", "training:\n  warmup_ratio: 1\n", "training.warmup_ratio (line 2)", "less than 1")
config("max-grad-norm-0", "training:\n  max_grad_norm: 0\n", "training.max_grad_norm (line 2)")
config("max-length-0", "data:\n  max_length: 0\n", "data.max_length (line 2)", "greater than or equal to 8")
config("val-fraction-1.5", "data:\n  val_fraction: 1.5\n", "data.val_fraction (line 2)", "less than 1")
config("lora-r-0", "method:\n  name: lora\n  r: 0\n", "method.r (line 3)", "greater than or equal to 1")
config("lora-dropout-1.5", "method:\n  name: lora\n  dropout: 1.5\n", "method.dropout (line 3)", "less than 1")
config("dpo-beta-0", "dpo:\n  beta: 0\n", "dpo.beta (line 2)", "greater than 0")
config("ppo-gamma-2", "ppo:\n  gamma: 2\n", "ppo.gamma (line 2)", "less than or equal to 1")
config("doc-stride-negative", "task:\n  doc_stride: -1\n", "task.doc_stride (line 2)")
# invalid choices
config("stage", "stage: sfft\n", "stage (line 1)", "'sft'", "'sfft'", cmd="train")
config("method-name", "method:\n  name: lorra\n", "unknown method name 'lorra'", "lora", cmd="train")
config("scheduler", "training:\n  scheduler: cosin\n", "training.scheduler (line 2)", "'cosine'")
config("dtype", "model:\n  dtype: fp16\n", "model.dtype (line 2)", "'float16'")
config("data-format", "data:\n  format: alpacca\n", "data.format (line 2)", "'instruction'")
config("task-type", "task:\n  type: ranking\n", "task.type (line 2)", "'classification'")
config("device", "training:\n  device: gpu\n", "training.device (line 2)", "'gpu'")
# combinations the stages refuse
config(
    "pretrain-needs-text", "stage: pretrain\ndata:\n  format: instruction\n", "stage: pretrain needs data.format: text"
)
config("dpo-needs-preference", "stage: dpo\ndata:\n  format: instruction\n", "stage: dpo needs data.format: preference")
config("classification-needs-task", "stage: classification\n", "needs task.name (a preset) or task.train_file")
config("ppo-needs-prompts", "stage: ppo\n", "stage: ppo needs ppo.prompts")
config("ppo-keyword-reward", "stage: ppo\nppo:\n  prompts: p.jsonl\n  reward:\n    kind: keyword\n",
       "needs ppo.reward.keyword")  # fmt: skip
config("reward-prefix", "stage: reward\ndata:\n  format: preference\nmethod:\n  name: prefix\n",
       "stage: reward does not support method prefix")  # fmt: skip
config("qa-doc-stride", "stage: extractive_qa\ntask:\n  name: squad\n  max_length: 64\n  doc_stride: 40\n",
       "task.doc_stride (40) must be under half of task.max_length (64)")  # fmt: skip
# a section of the wrong shape
config("section-list", "training:\n  - lr: 1.0e-4\n", "training (line 1)", "dictionary")
config("section-null", "training: null\n", "training (line 1)", "dictionary")
config("section-scalar", "model: smollm2\n", "model (line 1)", "dictionary")
config("method-scalar", "method: lora\n", "method (line 1)", "dictionary")
config("columns-list", "data:\n  columns: [a, b]\n", "data.columns (line 2)", "dictionary")
config("top-level-list", "- model\n- data\n", "the top level must be a mapping")
config("top-level-text", "just a sentence\n", "the top level must be a mapping")
# not YAML, or not a file
config("tab", "training:\n\tlr: 1.0e-4\n", "line 2, column 1: not valid YAML", "'\\t'")
config("unclosed-bracket", "model:\n  name: [unclosed\n", "not valid YAML", "expected ',' or ']'")
config("unclosed-brace", "training: {lr: 1.0e-4\n", "not valid YAML", "expected ',' or '}}'")
config("indentation", "model:\n  name: x\n   extra: y\n", "line 3, column 9: not valid YAML")
config("python-tag", "a: !!python/object:os.system {}\n", "line 1", "not valid YAML", "python/object")
config("duplicate-key", "training:\n  lr: 1.0e-4\n  lr: 2.0e-4\n", "duplicate key 'lr'", "line 3", "line 2")
config("duplicate-section", "training:\n  lr: 1.0e-4\ntraining:\n  epochs: 2\n", "duplicate key 'training'",
       "line 3", cmd="train")  # fmt: skip
config("binary", b"\xff\xfe\x00\x01bin\x00\x02", "not UTF-8 text", "byte 0xff", cmd="train")
config("latin-1", b"model:\n  name: caf\xe9\n", "not UTF-8 text", "line 2")
config("empty-file", "# nothing here\n", "the config file is empty")
case("config-missing", ["train", "{d}/nothere.yaml"], "{d}/nothere.yaml: config file not found")
case("config-is-a-folder", ["config", "{d}/sub.yaml"], "{d}/sub.yaml", "is a folder", files={"sub.yaml/x": ""})

# --set overrides
case("set-no-equals", ["config", "--set", "training.lr"], "--set 'training.lr'", "KEY=VALUE")
case("set-bad-yaml", ["train", "--set", "training.lr=[1,"], "--set 'training.lr=[1,'", "not valid YAML")
case("set-unknown-section", ["config", "--set", "trainng.lr=1"], "unknown key 'trainng' (--set", "'training'")
case("set-unknown-key", ["train", "--set", "training.lr_rate=1"], "'training.lr_rate' (--set", "'lr'")
case("set-empty-key", ["config", "--set", "=1"], "--set '=1'", "empty")
case("set-empty-part", ["config", "--set", "training..lr=1"], "--set 'training..lr=1'", "empty")
case("set-section-to-number", ["config", "--set", "training=5"], "training (--set", "dictionary")
case("set-below-a-number", ["config", "--set", "training.lr.x=1"], "training.lr (--set", "valid number")
case("set-method-name", ["train", "--set", "method.name=nope"], "unknown method name 'nope'")
case("set-method-option", ["config", "--set", "method.r=abc"], "method.r (--set", "'abc'")
case("set-out-of-range", ["train", "--set", "data.max_length=-5"], "data.max_length (--set", "-5")
case("set-on-a-grid", ["config", "{d}/grid.yaml", "--set", "training.lr=1"], "--set applies to a run config",
     files={"grid.yaml": "models: [a]\nmethods: [lora]\ntasks: [sst2]\n"})  # fmt: skip

# ------------------------------------------------------------------------------------- commands
case("train-nproc-0", ["train", "--nproc", "0"], "--nproc 0", "1 or more")
case("train-output-dir-is-a-file", ["train", "--set", "data.train={good}", "--output-dir", "{file}"],
     "output_dir {file}", "is a file")  # fmt: skip
case("train-output-under-a-file", ["train", "--set", "data.train={good}", "--output-dir", "{file}/run"],
     "output_dir {file}/run", "cannot write the run folder")  # fmt: skip
case("train-over-a-finished-run", ["train", "--set", "model.name={model}", "--set", "data.train={good}",
     "--output-dir", "{lora}"], "{lora}", "finished run", "--resume")  # fmt: skip
case("generate-no-run", ["generate", "{d}/nothere", "hi"], "{d}/nothere", "not found")
case("generate-not-a-run", ["generate", "{d}/empty", "hi"], "{d}/empty: no finished run here",
     files={"empty/notes.txt": "x"})  # fmt: skip
case("generate-max-new-tokens", ["generate", "{lora}", "hi", "--max-new-tokens", "-1"], "--max-new-tokens -1")
case("generate-temperature", ["generate", "{lora}", "hi", "--temperature", "-1"], "--temperature -1")
case("generate-device", ["generate", "{lora}", "hi", "--device", "gpu"], "device 'gpu'", "not a device")
case("chat-no-run", ["chat", "{d}/nothere"], "{d}/nothere", "not found")
case("chat-max-new-tokens", ["chat", "{lora}", "--max-new-tokens", "0"], "--max-new-tokens 0")
case("eval-no-run", ["eval", "{d}/nothere", "--task", "sst2"], "{d}/nothere", "not found")
case("eval-unknown-task", ["eval", "{lora}", "--task", "sst3"], "unknown task 'sst3'", "sst2")
case("eval-limit-0", ["eval", "{lora}", "--task", "sst2", "--limit", "0"], "--limit 0", "1 or more")
case("eval-limit-negative", ["eval", "{lora}", "--task", "sst2", "--limit", "-3"], "--limit -3")
case("eval-batch-size-0", ["eval", "{lora}", "--task", "sst2", "--batch-size", "0"], "--batch-size 0")
NO_EMBEDDER = ["--task", "wmt14-en-de", "--limit", "2", "--embedding-model", "none"]
case("eval-num-beams-0", ["eval", "{lora}", *NO_EMBEDDER, "--num-beams", "0"], "--num-beams 0")
case("eval-max-new-tokens", ["eval", "{lora}", *NO_EMBEDDER, "--max-new-tokens", "-1"], "--max-new-tokens -1")
case("eval-preference-task", ["eval", "{nomodel}", "--task", "hh-rlhf"], "hh-rlhf", "preference")
case("eval-out-under-a-file", ["eval", "{lora}", "--task", "sst2", "--limit", "2", "--out", "{file}/r.json"],
     "--out {file}/r.json", "is a file")  # fmt: skip
case("export-no-run", ["export", "{d}/nothere"], "{d}/nothere", "not found")
case("export-not-a-run", ["export", "{d}/empty"], "{d}/empty: no finished run here", files={"empty/x": ""})
case("export-quant-for-hf", ["export", "{lora}", "--quant", "q4_0"], "--format hf takes --quant", "'q4_0'")
case("export-quant-unknown", ["export", "{lora}", "--format", "gguf", "--quant", "q3"], "--quant", "'q3'")
case("export-quant-for-gguf-lora", ["export", "{lora}", "--format", "gguf-lora", "--quant", "q8_0"],
     "--format gguf-lora takes --quant", "'q8_0'")  # fmt: skip
case("export-gguf-lora-of-full", ["export", "{full}", "--format", "gguf-lora"], "no LoRA layers in this run")
case("export-gguf-lora-of-a-model", ["export", "{model}", "--format", "gguf-lora"], "this is no run folder")
case("export-modelfile-with-hf", ["export", "{lora}", "--modelfile"], "--modelfile goes with --format gguf")
case("export-check-with-hf", ["export", "{lora}", "--check"], "--check", "--format gguf")
case("export-check-texts-alone", ["export", "{lora}", "--format", "gguf", "--check-texts", "0"],
     "--check-texts", "--check")  # fmt: skip
case("export-out-under-a-file", ["export", "{lora}", "--out", "{file}/hf"], "--out {file}/hf", "is a file")
case("export-gguf-out-under-a-file", ["export", "{lora}", "--format", "gguf", "--out", "{file}/m.gguf"],
     "--out {file}/m.gguf", "is a file")  # fmt: skip
case("export-pre-tokenizer", ["export", "{lora}", "--format", "gguf", "--pre-tokenizer", "nonsense"],
     "pre-tokenizer 'nonsense'")  # fmt: skip
case("serve-no-run", ["serve", "{d}/nothere"], "{d}/nothere", "not found")
case("serve-not-a-run", ["serve", "{d}/empty"], "{d}/empty: no finished run here", files={"empty/x": ""})
case("serve-port-too-high", ["serve", "{lora}", "--port", "70000"], "--port 70000", "65535")
case("serve-port-negative", ["serve", "{lora}", "--port", "-1"], "--port -1")
case("serve-adapter-syntax", ["serve", "{lora}", "--adapter", "noequals"], "--adapter 'noequals'", "NAME=RUN")
case("serve-adapter-not-lora", ["serve", "{model}", "--adapter", "a={full}"], "--adapter a={full}", "'full'")
case("serve-adapter-names", ["serve", "{model}", "--adapter", "a={lora}", "--adapter", "a={lora}"],
     "adapter names must be unique")  # fmt: skip
case("serve-max-batch-0", ["serve", "{lora}", "--max-batch", "0"], "--max-batch 0")
case("serve-max-queue-negative", ["serve", "{lora}", "--max-queue", "-1"], "--max-queue -1")
case("serve-max-body-0", ["serve", "{lora}", "--max-body-bytes", "0"], "--max-body-bytes 0")
case("compare-no-grid", ["compare", "{d}/nothere.yaml"], "{d}/nothere.yaml: grid file not found")
case("compare-grid-tab", ["compare", "{d}/g.yaml"], "{d}/g.yaml: line 2", "not valid YAML",
     files={"g.yaml": "models:\n\t- a\n"})  # fmt: skip
case("compare-grid-binary", ["compare", "{d}/g.yaml"], "{d}/g.yaml", "not UTF-8 text", files={"g.yaml": b"\xff\x00"})
case("compare-grid-unknown-key", ["compare", "{d}/g.yaml"], "{d}/g.yaml: invalid grid", "unknown key 'modles'",
     files={"g.yaml": "modles: [a]\nmethods: [lora]\ntasks: [sst2]\n"})  # fmt: skip
case("compare-grid-unknown-method", ["compare", "{d}/g.yaml"], "{d}/g.yaml", "unknown method 'lorra'",
     files={"g.yaml": "models: [a]\nmethods: [lorra]\ntasks: [sst2]\n"})  # fmt: skip
case("baseline-task-type", ["baseline", "tfidf", "--task", "squad"], "'squad' is extractive_qa")
case("baseline-unknown-task", ["baseline", "tfidf", "--task", "nope"], "unknown task 'nope'")
case("baseline-limit-0", ["baseline", "tfidf", "--task", "sst2", "--limit", "0"], "--limit 0")
case("baseline-limit-negative", ["baseline", "tfidf", "--task", "sst2", "--limit", "-1"], "--limit -1")
case("baseline-out-under-a-file", ["baseline", "tfidf", "--task", "sst2", "--limit", "20", "--out", "{file}/b.json"],
     "--out {file}/b.json", "is a file")  # fmt: skip
case("methods-no-model", ["methods", "--model", "{d}/nothere"], "{d}/nothere", "not found")
case("methods-not-a-model", ["methods", "--model", "{d}/empty"], "{d}/empty", "no config.json",
     files={"empty/x": ""})  # fmt: skip


# ---------------------------------------------------------------------------------------- data
def data(id, name, content, *expected, sets=(), files=None):
    """`tunelab train` on the file `name` (data.train) with a model that does not exist."""
    argv = ["train", "--set", "model.name={nomodel}", "--set", "data.train={d}/" + name, "--set", "training.max_steps=1",
            "--output-dir", "{d}/run"]  # fmt: skip
    for kv in sets:
        argv += ["--set", kv]
    case(id, argv, *expected, files={name: content, **(files or {})})


def lines(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


GOOD = [{"instruction": f"Say {i}.", "output": f"It is {i}."} for i in range(4)]
CHAT_OK = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
CHAT = ("data.format=chat",)
PREF = {"prompt": "hi", "chosen": "hello", "rejected": "go away"}
DPO = ("stage=dpo", "data.format=preference")
REWARD = ("stage=reward", "data.format=preference")
_gz = gzip.compress(lines(GOOD * 100).encode())

data("empty-jsonl", "d.jsonl", "", "{src}: no rows to train on")
data("blank-jsonl", "d.jsonl", "\n\n\n", "{src}: no rows to train on")
data("empty-json", "d.json", "", "{src} line 1: not valid JSON")
data("jsonl-bad-line", "d.jsonl", lines(GOOD) + '{"instruction": "x", "output": \n' + lines(GOOD),
     "{src} line 5: not valid JSON")  # fmt: skip
data("json-bad-line", "d.json", '[\n {"instruction": "a", "output": "b"},\n {"instruction": "a" "output": "b"}\n]\n',
     "{src} line 3: not valid JSON")  # fmt: skip
data("json-object-not-list", "d.json", json.dumps(GOOD[0]), "{src}: a .json file must hold a list of objects",
     "Did you mean .jsonl")  # fmt: skip
data("json-list-of-numbers", "d.json", "[1, 2, 3]", "{src} row 1: expected an object", "got int")
data("jsonl-number-line", "d.jsonl", lines(GOOD) + "42\n", "{src} line 5: expected an object", "got int")
data("jsonl-list-line", "d.jsonl", lines(GOOD) + "[1, 2]\n", "{src} line 5: expected an object", "got list")
data("missing-output", "d.jsonl", lines(GOOD) + lines([{"instruction": "a"}]), "{src} line 5: field 'output' is missing",
     "data.columns.output")  # fmt: skip
data("missing-instruction", "d.jsonl", lines([{"output": "a"}] + GOOD), "{src} line 1: field 'instruction' is missing")
data("null-instruction", "d.jsonl", lines(GOOD + [{"instruction": None, "output": "x"}]), "{src} line 5",
     "'instruction' is missing")  # fmt: skip
data("number-output", "d.jsonl", lines(GOOD + [{"instruction": "a", "output": 5}]),
     "{src} line 5: field 'output' should be text, got int")  # fmt: skip
data("list-instruction", "d.json", json.dumps(GOOD + [{"instruction": ["a"], "output": "b"}]),
     "{src} row 5: field 'instruction' should be text, got list")  # fmt: skip
data("nan-instruction", "d.jsonl", lines(GOOD) + '{"instruction": NaN, "output": "x"}\n',
     "{src} line 5: field 'instruction' should be text, got float")  # fmt: skip
data("history-not-pairs", "d.jsonl", lines(GOOD + [{"instruction": "a", "output": "b", "history": "oops"}]),
     "{src} line 5: field 'history'")  # fmt: skip
data("duplicate-field", "d.jsonl", lines(GOOD) + '{"instruction": "a", "output": "b", "output": "c"}\n',
     "{src} line 5", "'output' appears twice")  # fmt: skip
data("duplicate-field-json", "d.json", '[{"instruction": "a", "instruction": "b", "output": "c"}]',
     "{src} row 1", "'instruction' appears twice")  # fmt: skip
data("mapped-column-missing", "d.jsonl", lines(GOOD), "{src} line", "field 'answer' is missing",
     "data.columns.output", sets=("data.columns.output=answer",))  # fmt: skip
data("messages-not-a-list", "d.jsonl", lines([CHAT_OK, {"messages": "hello"}]),
     "{src} line 2: field 'messages' should be a non-empty list", sets=CHAT)  # fmt: skip
data("messages-empty", "d.jsonl", lines([CHAT_OK, {"messages": []}]), "{src} line 2", "non-empty list", sets=CHAT)
data("message-without-role", "d.jsonl", lines([CHAT_OK, {"messages": [{"content": "hi"}]}]),
     "{src} line 2: message 1 in 'messages' has role None", sets=CHAT)  # fmt: skip
data("message-unknown-role", "d.jsonl",
     lines([CHAT_OK, {"messages": [{"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}]}]),
     "{src} line 2: message 2 in 'messages' has role 'wizard'", sets=CHAT)  # fmt: skip
data("message-without-content", "d.jsonl", lines([CHAT_OK, {"messages": [{"role": "user"}]}]),
     "{src} line 2: message 1 in 'messages' needs a text 'content'", sets=CHAT)  # fmt: skip
data("message-not-an-object", "d.jsonl", lines([CHAT_OK, {"messages": ["hi", "hello"]}]),
     "{src} line 2: message 1 in 'messages' should be an object", sets=CHAT)  # fmt: skip
data("no-assistant-message", "d.jsonl", lines([CHAT_OK, {"messages": [{"role": "user", "content": "hi"}]}]),
     "{src} line 2: the conversation has no assistant message", sets=CHAT)  # fmt: skip
data("chat-without-messages", "d.jsonl", lines([CHAT_OK, {"text": "x"}]), "{src} line 2: field 'messages' is missing",
     sets=CHAT)  # fmt: skip
data("text-not-text", "d.jsonl", lines([{"text": "hello"}, {"text": 3.5}]), "{src} line 2: field 'text' should be text",
     sets=("stage=pretrain", "data.format=text"))  # fmt: skip
data("csv-missing-column", "d.csv", "instruction,answer\na,b\n", "{src} line 2: field 'output' is missing")
data("csv-ragged-row", "d.csv", "instruction,output\na,b\nc,d,e\n", "{src} line 3: 3 fields, but the header has 2")
data("tsv-short-row", "d.tsv", "instruction\toutput\na\tb\nc\n", "{src} line 3: 1 fields, but the header has 2")
data("csv-unclosed-quote", "d.csv", 'instruction,output\na,b\n"c,d\n', "{src} line 3", "fields")
data("csv-header-only", "d.csv", "instruction,output\n", "{src}: no rows to train on")
data("csv-empty", "d.csv", "", "{src}: empty file; the first line must name the columns")
data("gz-truncated", "d.jsonl.gz", _gz[: len(_gz) // 2], "{src}: cannot read the file", "end-of-stream")
data("gz-not-gzip", "d.jsonl.gz", lines(GOOD), "{src}: cannot read the file", "Not a gzipped file")
data("deep-jsonl", "d.jsonl", "[" * 100_000 + "]" * 100_000 + "\n", "{src} line 1: nested too deeply")
data("deep-json", "d.json", "[" * 100_000 + "]" * 100_000, "{src}: nested too deeply")
data("latin-1-bytes", "d.jsonl", lines(GOOD).encode() + b'{"instruction": "caf\xe9", "output": "x"}\n',
     "{src}", "line 5", "not UTF-8")  # fmt: skip
data("utf-16-file", "d.json", json.dumps(GOOD).encode("utf-16"), "{src}", "not UTF-8")
data("random-bytes", "d.jsonl", bytes(range(256)) * 4, "{src}", "not UTF-8")
data("data-file-is-a-folder", "d.jsonl/inner.jsonl", lines(GOOD), "{d}/d.jsonl", "is a folder",
     sets=("data.train={d}/d.jsonl",))  # fmt: skip
data("data-file-missing", "other.jsonl", lines(GOOD), "{d}/nothere.jsonl: file not found",
     sets=("data.train={d}/nothere.jsonl",))  # fmt: skip
data("unsupported-extension", "d.txt", "hello\n", "{src}: unsupported file type '.txt'")
data("not-parquet", "d.parquet", "not parquet", "{src}: cannot read the file", "Parquet")
data("validation-file-bad", "d.jsonl", lines(GOOD), "{d}/v.jsonl line 1: not valid JSON",
     sets=("data.validation={d}/v.jsonl",), files={"v.jsonl": "{oops\n"})  # fmt: skip
data("preference-missing-chosen", "p.jsonl", lines([PREF, {"prompt": "hi", "rejected": "no"}]),
     "{src} line 2: field 'chosen' is missing", sets=DPO)  # fmt: skip
data("preference-missing-rejected", "p.jsonl", lines([PREF, {"prompt": "hi", "chosen": "yes"}]),
     "{src} line 2: field 'rejected' is missing", sets=REWARD)  # fmt: skip
data("preference-all-identical", "p.jsonl", lines([{"prompt": f"q{i}", "chosen": "same", "rejected": "same"} for i in range(4)]),
     "{src}: no preference pairs to use", "chosen and rejected are the same reply", sets=DPO)  # fmt: skip
data("preference-chosen-number", "p.jsonl", lines([PREF, {"prompt": "hi", "chosen": 5, "rejected": "no"}]),
     "{src} line 2: field 'chosen' should be text, a message or a list of messages, got int", sets=REWARD)  # fmt: skip
data("preference-prompt-number", "p.jsonl", lines([PREF, {"prompt": 7, "chosen": "a", "rejected": "b"}]),
     "{src} line 2: field 'prompt' should be text or a list of messages", sets=DPO)  # fmt: skip
data("preference-no-prompt", "p.jsonl", lines([PREF, {"chosen": "a", "rejected": "b"}]),
     "{src} line 2: field 'chosen' is text without a prompt column", sets=DPO)  # fmt: skip
data("preference-reply-by-user", "p.jsonl",
     lines([PREF, {"prompt": "hi", "chosen": [{"role": "user", "content": "x"}], "rejected": "no"}]),
     "{src} line 2: field 'chosen' must end with an assistant reply", sets=REWARD)  # fmt: skip
data("preference-conversations-diverge", "p.jsonl",
     lines([{"chosen": [{"role": "user", "content": f"a{i}"}, {"role": "assistant", "content": "x"}],
             "rejected": [{"role": "user", "content": f"b{i}"}, {"role": "assistant", "content": "y"}]} for i in range(3)]),
     "{src}: no preference pairs to use", "diverge", sets=DPO)  # fmt: skip
data("classification-label-not-in-set", "own.csv", "text,label\ngood film,pos\nbad film,neg\nmeh,meh\n",
     "{src} line 4", "'meh'", "0 (pos), 1 (neg)",
     sets=("stage=classification", "task.train_file={d}/own.csv", "task.labels=[pos, neg]"))  # fmt: skip
data("classification-label-id-out-of-range", "own.csv", "text,label\ngood film,1\nbad film,0\nmeh,7\n",
     "{src} line 4", "'7'", sets=("stage=classification", "task.name=sst2", "task.train_file={d}/own.csv"))  # fmt: skip
data("tagging-unknown-tag", "t.jsonl", lines([{"tokens": ["a", "b"], "tags": ["O", "O"]}, {"tokens": ["a"], "tags": ["X"]}]),
     "{src} line 2: tag 'X' is not in task.labels", sets=("stage=tagging", "task.labels=[O, B]"))  # fmt: skip
data("tagging-lengths-differ", "t.jsonl", lines([{"tokens": ["a", "b"], "tags": ["O"]}]),
     "{src} line 1: needs `tokens` and `tags`", sets=("stage=tagging", "task.labels=[O, B]"))  # fmt: skip


# ------------------------------------------------------- settings the model cannot take (it loads first)
def method(id, sets, *expected):
    argv = ["train", "--set", "model.name={model}", "--set", "data.train={good}", "--set", "training.max_steps=1",
            "--output-dir", "{d}/run"]  # fmt: skip
    case(id, [*argv, *(x for kv in sets for x in ("--set", kv))], *expected)


method("bitfit-without-biases", ["method.name=bitfit", "method.add_missing_biases=false"], "bitfit",
       "no bias terms to train", "method.add_missing_biases: true")  # fmt: skip
method("freeze-matches-nothing", ["method.name=freeze", "method.last_k=0", "method.patterns=[nomatch]"],
       "freeze: no parameter matched", "method.patterns=['nomatch']")  # fmt: skip
method("qat-group-size", ["method.name=qat", "method.group_size=48"], "method.group_size 48")
method("ppo-reward-not-a-reward-run", ["stage=ppo", "ppo.prompts={good}", "ppo.reward.path={lora}"],
       "{lora}: not a reward-model run (stage 'sft')")  # fmt: skip


# ------------------------------------------------------------------------------ output failures
def train_real(*extra):
    return ["train", "--set", "model.name={model}", "--set", "data.train={good}", "--set", "training.max_steps=3",
            "--output-dir", "{d}/run", *extra]  # fmt: skip


case("disk-full-at-a-checkpoint", train_real("--set", "training.save_every=1"),
     "cannot write the checkpoint {d}/run/checkpoints/step-00000002", "No space left on device",
     "the last complete checkpoint is {d}/run/checkpoints/step-00000001", fault="enospc-checkpoint")  # fmt: skip
case("read-only-at-the-result", train_real(), "cannot write the result {d}/run/final", "Read-only file system",
     "no complete checkpoint", fault="erofs-result")  # fmt: skip
case("disk-full-at-results-json", train_real(), "cannot write {d}/run/results.json", "No space left on device",
     fault="enospc-results")  # fmt: skip
case("read-only-output-dir", train_real(), "output_dir {d}/run", "cannot write the run folder", fault="read-only-dir")
case("disk-full-at-export", ["export", "{lora}", "--out", "{d}/hf"], "{d}/hf", "No space left on device",
     fault="enospc-export")  # fmt: skip


# ------------------------------------------------------------------------------------- the test
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny model, a good data file, a finished LoRA run and a finished full fine-tuning run."""
    from tunelab.testing import save_tiny_model_dir

    root = tmp_path_factory.mktemp("malformed")
    good = root / "good.jsonl"
    good.write_text(lines(GOOD * 2))
    (root / "afile").write_text("a regular file\n")
    paths = {"model": save_tiny_model_dir(root / "model"), "good": str(good), "file": str(root / "afile"),
             "nomodel": str(root / "no-such-model")}  # fmt: skip
    for method in ("lora", "full"):
        run = root / f"run-{method}"
        argv = ["train", "--set", f"model.name={paths['model']}", "--set", f"data.train={good}", "--set",
                "training.max_steps=1", "--set", "training.progress=false", "--set", "training.tensorboard=false",
                "--set", f"method.name={method}", "--output-dir", str(run)]  # fmt: skip
        assert main(argv) == 0
        paths[method] = str(run)
    return paths


def _inject(fault: str, run_dir: Path, monkeypatch):
    """Make the write that `fault` names fail as a full disk / read-only file system does; returns what
    undoes it beyond monkeypatch, if anything."""
    from tunelab import files
    from tunelab.training import checkpoint

    def fail(code, path):
        raise OSError(code, os.strerror(code), str(path))

    if fault == "enospc-checkpoint":  # the second checkpoint's weights do not fit
        real, calls = checkpoint.save_file, []

        def save_file(tensors, path, *a, **k):
            calls.append(path)
            if len(calls) > 1:
                fail(errno.ENOSPC, path)
            return real(tensors, path, *a, **k)

        monkeypatch.setattr(checkpoint, "save_file", save_file)
    elif fault == "erofs-result":
        monkeypatch.setattr(checkpoint, "replace_dir", lambda tmp, final: fail(errno.EROFS, final))
    elif fault == "enospc-results":
        real_json = files.write_json_atomic

        def write_json_atomic(path, obj):
            if Path(path).name == "results.json":
                fail(errno.ENOSPC, path)
            return real_json(path, obj)

        monkeypatch.setattr(files, "write_json_atomic", write_json_atomic)
    elif fault == "read-only-dir":
        if os.geteuid() != 0:  # a real read-only folder (root writes into one anyway)
            run_dir.parent.chmod(0o500)
            return lambda: run_dir.parent.chmod(0o700)
        real_write = Path.write_text

        def write_text(self, *a, **k):
            if str(self).startswith(str(run_dir)):
                fail(errno.EROFS, self)
            return real_write(self, *a, **k)

        monkeypatch.setattr(Path, "write_text", write_text)
    elif fault == "enospc-export":
        import tunelab.export.hf as hf

        monkeypatch.setattr(hf.os, "replace", lambda a, b: fail(errno.ENOSPC, b))
    else:
        raise AssertionError(fault)
    return None


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_a_malformed_input_is_one_named_error(c: Case, env, tmp_path, capsys, monkeypatch):
    import uvicorn

    def no_server(*a, **k):  # a serve call that got this far would have bound a port: the input was accepted
        raise AssertionError("serve accepted the input and would bind a port")

    monkeypatch.setattr(uvicorn, "run", no_server)
    monkeypatch.setattr(builtins, "input", lambda prompt="": (_ for _ in ()).throw(EOFError))  # chat: no user
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path / "home"))  # no cache of the user's, nothing fetched
    values = {**env, "d": str(tmp_path)}
    for name, content in c.files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    values["src"] = str(tmp_path / next(iter(c.files))) if c.files else ""
    undo = _inject(c.fault, tmp_path / "run", monkeypatch) if c.fault else None
    argv = [a.format(**values) for a in c.argv]
    try:
        code = main(argv + (["--set", "training.progress=false"] if argv[0] == "train" else []))
    finally:
        if undo is not None:
            undo()
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err, err
    assert code == 2, f"exit {code} (0: the input was accepted)\n{err}"
    assert err.count("tunelab: error:") == 1, err
    message = err[err.index("tunelab: error:") :]
    for want in c.expected:
        assert want.format(**values) in message, f"{want.format(**values)!r} not in:\n{message}"


def test_the_table_is_large_and_varied():
    assert len(CASES) >= 110
    assert len({c.id for c in CASES}) == len(CASES)
    commands = {c.argv[0] for c in CASES}
    assert {
        "train",
        "config",
        "generate",
        "chat",
        "eval",
        "export",
        "serve",
        "compare",
        "baseline",
        "methods",
    } <= commands


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["serve", "run", "--port", "eighty"], "argument --port: invalid int value: 'eighty'"),
        (["export", "run", "--format", "onnx"], "argument --format: invalid choice: 'onnx'"),
        (["train", "--nproc", "two"], "argument --nproc: invalid int value: 'two'"),
        (["baseline", "svm", "--task", "sst2"], "argument kind: invalid choice: 'svm'"),
        (["eval", "run"], "the following arguments are required: --task"),
        (["generate", "run", "hi", "--max-new-tokns", "5"], "unrecognized arguments: --max-new-tokns 5"),
    ],
    ids=["port-not-a-number", "unknown-format", "nproc-not-a-number", "unknown-baseline", "missing-task", "typo-flag"],
)
def test_flags_argparse_refuses_exit_2_naming_the_flag(argv, flag, capsys):
    """Values argparse itself refuses (not an int, not a choice, a missing or unknown flag): its usage line and
    one error line, exit 2, before tunelab runs anything."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert f"tunelab {argv[0]}: error: {flag}" in err or f"tunelab: error: {flag}" in err, err
