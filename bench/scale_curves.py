"""Scale curves (issue 26, item 6): tokens/s and peak memory as the model, the sequence and the data grow.

Training points: model size (SmolLM2's published 135M, 360M and 1.7B configs, and Gemma 3's 270M, random weights saved once in bf16
safetensors as the published checkpoints are, under `$TUNELAB_HOME/bench/`) x sequence length (256, 1024, 4096)
x method (LoRA; QLoRA, NF4 double-quantised) x side: tunelab against the reference, TRL `SFTTrainer` + PEFT
(bitsandbytes 4-bit through transformers' `BitsAndBytesConfig` for QLoRA), each with its own defaults (TRL:
gradient checkpointing on; tunelab: `auto`), both at `--precision` (auto: bf16 where the CPU has native bf16, each
side's own bf16 setting, as bench/train_speed.py; the table and JSON say which each side ran). The job: r 16, alpha 32, no dropout, all linear layers, packed
alpaca demo rows, max(length, `--tokens-per-step`) tokens a step (1,024: four rows of 256, one of 1,024, one of
4,096), one warm-up step and `--steps` timed ones; tokens/s counts the timed steps only. Peak RSS is the child's
(ru_maxrss: loading included). Each side runs on its own default malloc (tunelab on tbbmalloc, as `tunelab train`
restarts itself; TRL on glibc's), or the reference on tbbmalloc too with `--ref-allocator tbbmalloc`: the
reference's peak depends on it (~17% lower at 135M); the table says which each side ran on.

Preparation points: data rows (1k, 100k, 1M) x side, bench/data_prepare.py's measurement (a fresh process each,
its peak PSS over its process tree, rows/s from its start to the data being ready for step 1).

Every point runs in its own child process, one at a time, under a memory guard: a point whose estimated peak
(weights + what a pass keeps + logits + ~1.5 GB of libraries) exceeds the memory available now is not started,
and a child whose RSS grows past the memory that was available at its start (less a margin) is stopped; both
are reported as "does not fit", a result like any other (on a shared machine a point first waits up to `--wait-s`
for memory other jobs hold, if the machine has that much at all). 1.7B points start only with
`--min-free-gb-big` (14) GB available.

    .venv/bin/python bench/scale_curves.py --points 'train:135m:*' 'data:1k:*' --out bench-results/scale
    .venv/bin/python bench/scale_curves.py --list                    # every point's name
    .venv/bin/python bench/scale_curves.py --plot bench-results/scale/scale.json   # redraw from a JSON

Point names: `train:SIZE:LENGTH:METHOD:SIDE` (side tunelab | ref) and `data:ROWS:SIDE` (tunelab | trl);
`--points` takes shell-style patterns. Writes `scale.json` (every point, appended as it finishes: an interrupted
sweep keeps what it measured), `scale.md` (the tables) and `scale.png` (the curves) under `--out`.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

from train_speed import (  # bench/ is the script's folder: on sys.path
    add_precision_option,
    auto_precision,
    reference_environment,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared/data/llamafactory-demo/alpaca_en_demo.json"
# the fields of HuggingFaceTB/SmolLM2-{135M,360M,1.7B}'s config.json that shape the model
_COMMON = {"vocab_size": 49152, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
           "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2}  # fmt: skip
SIZES = {
    "135m": {**_COMMON, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
             "num_attention_heads": 9, "num_key_value_heads": 3, "rope_theta": 100000},
    "360m": {**_COMMON, "hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32,
             "num_attention_heads": 15, "num_key_value_heads": 5, "rope_theta": 100000},
    "1.7b": {**_COMMON, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
             "num_attention_heads": 32, "num_key_value_heads": 32, "rope_theta": 130000},
    # google/gemma-3-270m's config.json (another family: (1 + w) norms, GeGLU MLPs, a 262k-word head, sliding-window
    # layers); its tokens come from SmolLM2's tokenizer, whose ids all lie inside its vocabulary
    "gemma3-270m": {"model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 640, "intermediate_size": 2048,
                    "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
                    "sliding_window": 512, "rope_theta": 1000000, "query_pre_attn_scalar": 256,
                    "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
                    "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2},
}  # fmt: skip
LENGTHS = (256, 1024, 4096)
METHODS = ("lora", "qlora")
ROWS = {"1k": 1_000, "100k": 100_000, "1m": 1_000_000}
GB = 2**30


def all_points() -> list[str]:
    train = [
        f"train:{s}:{n}:{m}:{side}" for s in SIZES for n in LENGTHS for m in METHODS for side in ("tunelab", "ref")
    ]
    return train + [f"data:{r}:{side}" for r in ROWS for side in ("tunelab", "trl")]


def model_dir(size: str) -> Path:
    from tunelab.models.sources import tunelab_home

    family = "smollm2-" if SIZES[size].get("model_type", "llama") == "llama" else ""
    return tunelab_home() / "bench" / f"{family}{size}-random"


def build_model(size: str) -> Path:
    """The random model of `size` in bf16 safetensors (once), with the default model's tokenizer (the same
    vocabulary); built in bf16, so the 1.7B never exists in fp32 here."""
    folder = model_dir(size)
    if (folder / "config.json").is_file():
        return folder
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from tunelab.models.sources import resolve

    tok = AutoTokenizer.from_pretrained(resolve("smollm2-135m-instruct"))
    torch.manual_seed(0)
    shape = dict(SIZES[size])
    config = AutoConfig.for_model(shape.pop("model_type", "llama"), **shape, pad_token_id=tok.pad_token_id)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="20GB")
    tok.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def parameters(size: str) -> tuple[int, int]:
    """(all parameters, the token table's) of a SIZES config, counted from its shapes."""
    c = SIZES[size]
    h, i, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    head_dim = c.get("head_dim", h // c["num_attention_heads"])
    q, kv = head_dim * c["num_attention_heads"], head_dim * c["num_key_value_heads"]
    # the norms: two a layer (Llama), or four and the q / k norms (Gemma 3)
    norms = 2 * h if c.get("model_type", "llama") == "llama" else 4 * h + 2 * head_dim
    body = layers * (2 * h * q + 2 * h * kv + 3 * h * i + norms)
    return body + c["vocab_size"] * h + h, c["vocab_size"] * h


def rows_per_step(length: int, tokens_per_step: int) -> int:
    return max(1, tokens_per_step // length)


def estimate_peak_gb(
    size: str, length: int, method: str, side: str, tokens_per_step: int, precision: str = "fp32"
) -> float:
    """A rough upper estimate of a training point's peak RSS, for the guard: it has to tell 5 GB from 25. In bf16
    the frozen weights and what a pass keeps take 2 bytes a value."""
    width = 2 if precision == "bf16" else 4
    c = SIZES[size]
    total, table = parameters(size)
    body = total - table
    h, i, layers, vocab = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    tokens = rows_per_step(length, tokens_per_step) * length
    if method == "qlora":  # 4-bit body (+ constants), fp32 token table; the reference loads through bf16
        weights = body * 0.55 + table * 4 + (body * 2 if side == "ref" else 0)
    else:  # fp32 while loading on both sides (tunelab compacts to bf16 afterwards), or bf16
        weights = total * width
    per_token_layer = (6 * h + 4 * i) * width  # what a pass keeps per token and layer without checkpointing
    acts = tokens * layers * per_token_layer
    if side == "ref":  # TRL checkpoints by default: one hidden state a layer + one layer's share
        acts = tokens * (layers * h * 4 + per_token_layer)
    logits = tokens * vocab * 4 * (3 if side == "ref" else 0.2)  # tunelab's fused head keeps no logits
    return (weights + acts + logits) / GB + 1.5


def available_gb() -> float:
    from tunelab.training.harness import available_memory

    return (available_memory() or 0) / GB


def wait_for_memory(need_gb: float, wait_s: float) -> float:
    """The GB available once `need_gb` are, or after `wait_s` seconds: on a shared machine other jobs' memory
    comes and goes, and a point that would fit the machine should not be called too big for a passing peak
    of theirs. A point larger than the machine's memory is not waited for."""
    import psutil

    deadline = time.monotonic() + (wait_s if need_gb < psutil.virtual_memory().total / GB else 0)
    while (free := available_gb()) < need_gb and time.monotonic() < deadline:
        time.sleep(10)
    return free


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# ------------------------------------------------------------------------------------------ training jobs
def job_rows(length: int, tokens_per_step: int, steps: int) -> list[dict]:
    """Enough alpaca demo rows to fill `steps` packed steps (at least ~10 tokens a row: the shortest rows
    are ~30 with the chat template), at most the whole file (~1,000 rows)."""
    need = rows_per_step(length, tokens_per_step) * length * steps // 10 + 16
    return json.loads(DATA.read_text())[:need]


def job_tunelab(size: str, length: int, method: str, steps: int, tokens_per_step: int, precision: str,
                settings: list[str] = ()) -> dict:  # fmt: skip
    import tunelab
    from tunelab.accel.memory import active_allocator, skip_unused_imports
    from tunelab.config import load_config

    times: list[tuple[float, float]] = []  # (time, cumulative tokens/s) at the end of every step
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "train.json").write_text(json.dumps(job_rows(length, tokens_per_step, steps + 1)))
        cfg = load_config({
            "output_dir": f"{tmp}/run",
            "model": {"name": str(model_dir(size)), "dtype": {"bf16": "bfloat16"}.get(precision, "float32")},
            "data": {"train": f"{tmp}/train.json", "val_fraction": 0.0, "max_length": length, "packing": True},
            "method": {"name": method, "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
            "training": {"max_steps": steps + 1, "batch_size": rows_per_step(length, tokens_per_step), "lr": 2e-4,
                         "warmup_steps": 0, "progress": False, "tensorboard": False, "device": "cpu", "seed": 0},
        }, overrides=list(settings))  # fmt: skip
        skip_unused_imports(cfg)
        result = tunelab.train(
            cfg, callbacks=[lambda step, rec: times.append((time.perf_counter(), rec["tokens_per_s"]))]
        )
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    m = result.metrics
    # tokens after the warm-up step: the loop reports cumulative tokens/s since its first step, and the total
    elapsed = m["tokens"] / times[-1][1]
    first = times[0][1] * (elapsed - (times[-1][0] - times[0][0]))
    timed = (m["tokens"] - first) / (times[-1][0] - times[0][0])
    return {"tokens_per_s": timed, "tokens": m["tokens"], "peak_rss_mb": peak, "precision": m["precision"],
            "allocator": active_allocator(), "train_loss": m["train_loss"]}  # fmt: skip


def job_reference(size: str, length: int, method: str, steps: int, tokens_per_step: int, precision: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from tunelab.accel.memory import active_allocator  # reads this process's malloc only: nothing of tunelab's runs

    folder = model_dir(size)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    bf16 = precision == "bf16"  # TRL's own bf16 setting (bf16=True on a bf16-loaded model), as bench/train_speed.py
    kw = {"dtype": torch.bfloat16 if bf16 else torch.float32}
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True,
                                                       bnb_4bit_compute_dtype=kw["dtype"])  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(folder, **kw)

    def as_messages(r):
        user = r["instruction"] + (("\n\n" + r["input"]) if r.get("input") else "")
        return {
            "prompt": [{"role": "user", "content": user}],
            "completion": [{"role": "assistant", "content": r["output"]}],
        }

    data = Dataset.from_list([as_messages(r) for r in job_rows(length, tokens_per_step, steps + 1)])
    marks: list[tuple[float, int]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks.append((time.perf_counter(), int(state.num_input_tokens_seen)))

    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(output_dir=tmp, per_device_train_batch_size=rows_per_step(length, tokens_per_step),
                         max_steps=steps + 1, learning_rate=2e-4, warmup_steps=0, max_length=length, packing=True,
                         logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, bf16=bf16,
                         include_num_input_tokens_seen="non_padding", disable_tqdm=True)  # fmt: skip
        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, peft_config=lora, processing_class=tokenizer,
                             callbacks=[Clock()])  # fmt: skip
        out = trainer.train()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    timed = (marks[-1][1] - marks[0][1]) / (marks[-1][0] - marks[0][0])
    return {"tokens_per_s": timed, "tokens": marks[-1][1], "peak_rss_mb": peak,
            "precision": ("bf16 autocast" if bf16 else "fp32") + (" (4-bit NF4 body)" if method == "qlora" else ""),
            "allocator": active_allocator(), "train_loss": out.training_loss}  # fmt: skip


# ------------------------------------------------------------------------------------------ the guard
def run_guarded(cmd: list[str], env: dict | None, limit_gb: float) -> tuple[dict | None, str | None]:
    """Run `cmd`, stopping it when its RSS passes `limit_gb`; (its last-line JSON, None) or (None, why)."""
    import psutil

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = []

    def watch():
        p = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                rss = sum(q.memory_info().rss for q in [p, *p.children(recursive=True)]) / GB
            except psutil.NoSuchProcess:
                break
            if rss > limit_gb:
                killed.append(rss)
                proc.kill()
                break
            time.sleep(0.2)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    out, err = proc.communicate()
    t.join()
    if killed:
        return None, f"does not fit: stopped at {killed[0]:.1f} GB RSS (limit {limit_gb:.1f} GB, what was available)"
    if proc.returncode:
        tail = err.strip().splitlines()[-1:] or ["?"]
        return None, f"failed (exit {proc.returncode}): {tail[0][:300]}"
    return json.loads(out.strip().splitlines()[-1]), None


def run_train_point(name: str, args) -> dict:
    from tunelab.accel.memory import allocator_environment

    _, size, length, method, side = name.split(":")
    length = int(length)
    row = {"point": name, "kind": "train", "size": size, "length": length, "method": method, "side": side,
           "job_precision": args.precision,
           "rows_per_step": rows_per_step(length, args.tokens_per_step), "load_before": load_average()}  # fmt: skip
    row["estimated_peak_gb"] = round(
        estimate_peak_gb(size, length, method, side, args.tokens_per_step, args.precision), 1
    )
    free = wait_for_memory(row["estimated_peak_gb"] + args.margin_gb, args.wait_s)
    row["available_gb"] = round(free, 1)
    if size == "1.7b" and free < args.min_free_gb_big:
        row["result"] = f"not run: {free:.1f} GB available, 1.7B points need {args.min_free_gb_big} (--min-free-gb-big)"
        return row
    if row["estimated_peak_gb"] > free - args.margin_gb:
        row["result"] = f"does not fit: estimated {row['estimated_peak_gb']} GB > {free:.1f} GB available"
        return row
    build_model(size)
    # the model's files, just written by the first point of a size, are not written back to disk while the child
    # times its steps (first points of a sweep read low on both sides; the cause is not established:
    # docs/performance.md, fifteenth session)
    os.sync()
    cmd = [sys.executable, __file__, "--job", name, "--steps", str(args.steps), "--tokens-per-step",
           str(args.tokens_per_step), "--precision", args.precision]  # fmt: skip
    if side == "tunelab" and args.tunelab_set:
        row["tunelab_set"] = args.tunelab_set
        cmd += [f"--tunelab-set={o}" for o in args.tunelab_set]
    # tunelab: what `tunelab train` restarts itself with; the reference: --ref-allocator
    env = allocator_environment() if side == "tunelab" else reference_environment(args.ref_allocator)
    t0 = time.perf_counter()
    out, why = run_guarded(cmd, env, free - args.margin_gb)
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    row["load_after"] = load_average()
    if out is None:
        row["result"] = why
        return row
    row.update(out, result="ok")
    return row


def run_data_point(name: str, args) -> dict:
    """bench/data_prepare.py's measurement of one side at one size (first run; the second start too)."""
    import data_prepare as dp  # bench/ is the script's folder: on sys.path

    _, rows, side = name.split(":")
    n = ROWS[rows]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    train = work / f"alpaca-{n}.jsonl"
    if not train.exists():
        dp.make_rows(n, train)
    home = Path(tempfile.mkdtemp(dir=work))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TUNELAB_HOME": str(home / "tunelab"),
           "HF_DATASETS_CACHE": str(home / "hf"), "TRANSFORMERS_VERBOSITY": "error"}  # fmt: skip
    config = home / "config.yaml"
    config.write_text(dp.CONFIG.format(tokenizer=dp.TOKENIZER, train=train, max_length=dp.MAX_LENGTH))
    code = dp.TUNELAB if side == "tunelab" else dp.TRL
    src = code.format(train=str(train), tokenizer=str(dp.TOKENIZER), max_length=dp.MAX_LENGTH,
                      num_proc=None if side == "tunelab" else 1, out=str(home / "out"), config=str(config))  # fmt: skip
    row = {"point": name, "kind": "data", "rows": n, "side": side, "load_before": load_average(),
           "available_gb": round(available_gb(), 1)}  # fmt: skip
    first = dp.run(src, env)
    row.update(seconds=round(first["seconds"], 1), rows_per_s=round(n / first["seconds"]),
               peak_pss_mb=first["peak_pss_mb"], peak_rss_mb=first["peak_rss_mb"],
               cpu_ms_per_row=round(1000 * first["cpu_s"] / n, 3), load_after=load_average(), result="ok")  # fmt: skip
    return row


# ------------------------------------------------------------------------------------------ the report
def markdown(results: list[dict]) -> str:
    """The training table (one line per size x length x method, both sides and the ratios) and the data table."""
    by = {r["point"]: r for r in results}
    lines = ["| size | length | method | rows x tokens | tunelab tokens/s | ref tokens/s | x tok/s | tunelab peak MB | "
             "ref peak MB | x peak | load | precision, allocator (tunelab; ref) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    seen = []
    for r in results:
        if r["kind"] == "train" and (key := (r["size"], r["length"], r["method"])) not in seen:
            seen.append(key)

    def ok(r) -> bool:
        return r is not None and r["result"] == "ok"

    def cell(r, key: str, digits: int) -> str:
        return f"{r[key]:,.{digits}f}" if ok(r) else (r["result"] if r else "not run")

    for size, length, method in seen:
        t, f = (by.get(f"train:{size}:{length}:{method}:{s}") for s in ("tunelab", "ref"))
        both = ok(t) and ok(f)
        rows = (t or f)["rows_per_step"]
        load = ", ".join(r["load_before"].split()[0] for r in (t, f) if r)
        lines.append(
            f"| {size} | {length} | {method} | {rows} x {length} | {cell(t, 'tokens_per_s', 1)} | "
            f"{cell(f, 'tokens_per_s', 1)} | {t['tokens_per_s'] / f['tokens_per_s']:.2f} |" if both else
            f"| {size} | {length} | {method} | {rows} x {length} | {cell(t, 'tokens_per_s', 1)} | "
            f"{cell(f, 'tokens_per_s', 1)} | — |"
        )  # fmt: skip
        lines[-1] += (f" {cell(t, 'peak_rss_mb', 0)} | {cell(f, 'peak_rss_mb', 0)} | "
                      + (f"{t['peak_rss_mb'] / f['peak_rss_mb']:.2f}" if both else "—") + f" | {load} | "
                      + "; ".join(r.get("precision", "?") + (f", {r['allocator']}" if r.get("allocator") else "")
                                  if ok(r) else "—" for r in (t, f))
                      + (f" (tunelab: {', '.join(t['tunelab_set'])})" if t and t.get("tunelab_set") else "") + " |")  # fmt: skip
    data = [r for r in results if r["kind"] == "data"]
    if data:
        lines += [
            "",
            "| rows | side | seconds | rows/s | CPU ms / row | peak PSS MB (tree) | load |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in data:
            lines.append(f"| {r['rows']:,} | {r['side']} | {r['seconds']} | {r['rows_per_s']:,} | {r['cpu_ms_per_row']} | "
                         f"{r['peak_pss_mb']:,} | {r['load_before'].split()[0]} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    """tokens/s and peak memory against the length, a line per size x method x side; rows/s and memory
    against the rows. Points that did not run or fit are left out (the table says why)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(10, 7), dpi=70)
    train = [r for r in results if r["kind"] == "train" and r["result"] == "ok"]
    colours = iter(plt.get_cmap("tab10").colors)
    for size in SIZES:
        for method in METHODS:
            if not any((r["size"], r["method"]) == (size, method) for r in train):
                continue
            colour = next(colours)  # one per size x method; the line style tells the sides apart
            for side, style in (("tunelab", "-o"), ("ref", "--x")):
                pts = sorted(
                    (r["length"], r) for r in train if (r["size"], r["method"], r["side"]) == (size, method, side)
                )
                if not pts:
                    continue
                label = f"{size} {method} {'tunelab' if side == 'tunelab' else 'TRL+PEFT'}"
                xs = [x for x, _ in pts]
                ax[0][0].plot(xs, [r["tokens_per_s"] for _, r in pts], style, color=colour, label=label)
                ax[0][1].plot(xs, [r["peak_rss_mb"] / 1024 for _, r in pts], style, color=colour, label=label)
    for a, title in ((ax[0][0], "training tokens/s"), (ax[0][1], "training peak RSS, GB")):
        a.set_xscale("log", base=2)
        a.set_xticks(list(LENGTHS), [str(n) for n in LENGTHS])
        a.set_xlabel("sequence length")
        a.set_title(title)
        a.grid(alpha=0.3)
    ax[0][0].legend(fontsize=7)
    data = [r for r in results if r["kind"] == "data" and r["result"] == "ok"]
    for side, style in (("tunelab", "-o"), ("trl", "--x")):
        pts = sorted((r["rows"], r) for r in data if r["side"] == side)
        if pts:
            xs = [x for x, _ in pts]
            ax[1][0].plot(xs, [r["rows_per_s"] for _, r in pts], style, label="tunelab" if side == "tunelab" else "TRL")
            ax[1][1].plot(xs, [r["peak_pss_mb"] / 1024 for _, r in pts], style, label=side)
    for a, title in ((ax[1][0], "preparation rows/s"), (ax[1][1], "preparation peak PSS, GB")):
        a.set_xscale("log")
        a.set_xlabel("data rows")
        a.set_title(title)
        a.grid(alpha=0.3)
    if data:
        ax[1][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", nargs="+", default=["*"], help="shell-style patterns over the point names")
    parser.add_argument("--list", action="store_true", help="print the point names and stop")
    parser.add_argument(
        "--steps",
        type=int,
        default=4,
        help="timed steps after the warm-up step (both sides speed up "
        "over their first steps, TRL more: at 1.7B, 2 timed steps flattered tunelab's ratio by ~15%%)",
    )
    parser.add_argument("--tokens-per-step", type=int, default=1024, help="rows per step: this / length, at least 1")
    parser.add_argument("--margin-gb", type=float, default=1.5, help="memory kept free beside a point")
    parser.add_argument("--min-free-gb-big", type=float, default=14.0, help="available GB a 1.7B point needs to start")
    parser.add_argument("--wait-s", type=float, default=600, help="how long a point waits for memory other jobs hold")
    parser.add_argument("--out", default="bench-results/scale", help="folder for scale.json, scale.md, scale.png")
    parser.add_argument("--work", default=tempfile.gettempdir() + "/tunelab-bench-data", help="data points' files")
    parser.add_argument("--plot", metavar="JSON", help="only redraw the table and plot from this JSON")
    parser.add_argument("--tunelab-set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for the tunelab points, e.g. training.gradient_checkpointing=true "
                        "(recorded in their rows; use another --out for a variant)")  # fmt: skip
    parser.add_argument("--ref-allocator", choices=["system", "tbbmalloc"], default="system",
                        help="the reference's malloc: glibc's, as TRL runs (the default), or tbbmalloc preloaded, "
                        "tunelab's own (the allocator's difference in peak memory taken out)")  # fmt: skip
    add_precision_option(parser)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.precision == "auto":
        args.precision = auto_precision()
    if args.job:  # child: one training point, its figures as the last line
        _, size, length, method, side = args.job.split(":")
        job = partial(job_tunelab, settings=args.tunelab_set) if side == "tunelab" else job_reference
        print(json.dumps(job(size, int(length), method, args.steps, args.tokens_per_step, args.precision)))
        return
    names = list(dict.fromkeys(p for pat in args.points for p in all_points() if fnmatch.fnmatch(p, pat)))  # in order
    if args.list:
        print("\n".join(names))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = json.loads(Path(args.plot).read_text()) if args.plot else []
    if not args.plot:
        store = out / "scale.json"
        results = [r for r in json.loads(store.read_text()) if r["point"] not in names] if store.is_file() else []
        for name in names:
            row = run_train_point(name, args) if name.startswith("train:") else run_data_point(name, args)
            results.append(row)
            print(json.dumps(row), flush=True)
            store.write_text(json.dumps(results, indent=1))
    (out / "scale.md").write_text(markdown(results))
    plot(results, out / "scale.png")
    print(markdown(results))


if __name__ == "__main__":
    main()
