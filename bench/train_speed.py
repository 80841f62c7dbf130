"""SFT speed on CPU: TRL SFTTrainer (+ PEFT, + bitsandbytes) (the reference) and tunelab, back to back.

The job (issue 6): SmolLM2-135M-Instruct in fp32, the first 64 rows of the LLaMA-Factory alpaca
demo set, max length 256, batch 4, packing, LoRA r=16 alpha=32 on all linear layers, 1 epoch,
the same optimiser settings on both sides. Each run is a fresh subprocess so that its peak RSS is
its own. Prints trained tokens/s, peak RSS and the loss after the epoch for both, and the ratios.

"Loss after the epoch" is measured the same way for both trained models, with one function: the
mean next-token cross-entropy over the response tokens of held-out rows 64..127 (the same rows,
rendered with the model's chat template). Tokens/s counts every non-pad token that went through
the model during training, divided by the training time (model loading and data preparation are
excluded on both sides).

Each tunelab run gets the process environment `tunelab train` would restart itself with: on Linux,
Intel's TBB allocator preloaded (training.allocator; tunelab/accel/memory.py). The TRL reference
runs as TRL does, on glibc's malloc; `--trl-allocator tbbmalloc` runs it preloaded too.

    .venv/bin/pip install -e '.[bench]'                        # TRL, for the reference
    .venv/bin/python bench/train_speed.py                      # TRL reference vs tunelab LoRA
    .venv/bin/python bench/train_speed.py --methods lora,full,qlora --skip-trl
    .venv/bin/python bench/train_speed.py --tunelab-set method.dropout=0.05   # an ablation
    .venv/bin/python bench/train_speed.py --variant training.rows_per_pass=1  # default and low-memory runs
    .venv/bin/python bench/train_speed.py --variant training.allocator=system # tunelab on glibc's malloc
    .venv/bin/python bench/train_speed.py --off        # and the job with training.accelerate: off (plain PyTorch)
    .venv/bin/python bench/train_speed.py --task lima-512 --dropout 0.05   # issue 26's job, LoRA dropout both sides
    .venv/bin/python bench/train_speed.py --lora-variant dora    # DoRA on both sides (also rslora, loraplus)
    .venv/bin/python bench/train_speed.py --precision bf16   # both sides in bf16 (a CPU with avx512_bf16)
    .venv/bin/python bench/train_speed.py --precision bf16 --variant model.dtype=float32   # and tunelab in fp32

Methods (`--methods`, issue 26 item 5): every one is measured against TRL's SFTTrainer on the same job, the
reference configured the way its own libraries do that method, with the same hyperparameters as tunelab:
  lora    PEFT LoraConfig (r, alpha, dropout, all linear layers)
  full    no PEFT: every weight trains, lr 2e-5 on both sides
  qlora   transformers' BitsAndBytesConfig (NF4, double quantisation, fp32 compute; lm_head and embeddings
          kept) + the LoRA above; tunelab `method: qlora` with the same settings
  prompt  PEFT PromptTuningConfig, 20 virtual tokens initialised from random vocabulary embeddings, lr 1e-2
  prefix  PEFT PrefixTuningConfig, 20 virtual tokens through the 512-wide reparameterisation MLP, lr 1e-3
Prompt and prefix tuning run without packing on both sides (the virtual tokens would sit before a packed row's
first example only; PEFT drops the position ids packing relies on): every batch is padded to its longest row.
Both sides use AdamW (betas 0.9/0.999, eps 1e-8, no weight decay), gradient clipping at 1.0, a linear
schedule without warm-up, batch 4; TRL keeps its own default of gradient checkpointing on (but for prefix
tuning, which fails under it on transformers 5.25: the causal mask is built without the prefix positions).
The held-out loss of a prompt- or prefix-tuned TRL model is measured after saving its adapter and loading it
with tunelab's loader for that method (the same PEFT files; the loader drops the virtual positions' logits).

`--task lima-512` (issue 26): the first 32 rows of LIMA at max length 512 (held out: rows 32..63), the rest
as above. `--dropout P` sets LoRA dropout on both sides (TRL's LoraConfig and tunelab's method.dropout).

Precision (`--precision`, default auto): auto is what `model.dtype: auto` picks on this host
(tunelab/models/precision.py); bf16 runs tunelab with `model.dtype: bfloat16` (bf16 frozen weights, fp32 LoRA
weights; its passes in bf16 without autocast where tunelab/accel covers them) and TRL with `bf16=True` on a
bf16-loaded model, each side's own bf16 setting; `--variant model.dtype=float32` adds tunelab in fp32 to the same
invocation. The table says which precision each run used, and scores each trained model twice: as it loads
(a bf16 run in bf16) and cast to fp32.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared/data/llamafactory-demo/alpaca_en_demo.json"
LIMA = ROOT.parent / "shared/data/lima/lima.json"  # instruction / input / output rows, as alpaca's
TRL_CHECKPOINTING = True
JOB = {"rows": 64, "held_out": 64, "max_length": 256, "batch_size": 4, "r": 16, "alpha": 32, "lr": 2e-4, "seed": 0,
       "dropout": 0.0, "data": str(DATA), "precision": "fp32", "lora_variant": "none"}  # fmt: skip
METHOD_LR = {"lora": 2e-4, "qlora": 2e-4, "full": 2e-5, "prompt": 1e-2, "prefix": 1e-3}
VIRTUAL_TOKENS, PREFIX_HIDDEN = 20, 512
# LoRA's variants (`--lora-variant`): each side's own switch for them, the same setting (docs/methods.md)
LORA_VARIANTS = {"none": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True},
                 "loraplus": {"loraplus_lr_ratio": 16.0}}  # fmt: skip
NO_PACKING = ("prompt", "prefix")  # the virtual tokens go before a row: one example a row on both sides
TASKS = {
    "alpaca-256": {"data": str(DATA), "rows": 64, "held_out": 64, "max_length": 256},
    "lima-512": {"data": str(LIMA), "rows": 32, "held_out": 32, "max_length": 512},
}


def rows(start: int, n: int) -> list[dict]:
    return json.loads(Path(JOB["data"]).read_text())[start : start + n]


def messages(row: dict) -> list[dict]:
    user = row["instruction"] + (("\n\n" + row["input"]) if row.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def cpu_seconds() -> float:
    """CPU time of this process so far, every thread, user + system: on a shared machine the work a job
    did, where its wall time also counts the other jobs it waited behind."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def held_out_loss(model, tokenizer) -> float:
    """Mean CE over response tokens of the held-out rows; one function for both trained models."""
    import torch

    from tunelab.data.templating import encode_messages
    from tunelab.models.loss import per_example_loss

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows(JOB["rows"], 8 if JOB.get("max_steps") else JOB["held_out"]):  # a smoke run scores 8
            enc = encode_messages(messages(row), tokenizer)
            ids, labels = enc["input_ids"][: JOB["max_length"]], enc["labels"][: JOB["max_length"]]
            batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
            batch["labels"] = torch.tensor([labels])
            total += float(per_example_loss(model, batch)[0])
            count += sum(1 for x in labels[1:] if x != -100)
    return total / count


# ------------------------------------------------------------------------------------------ jobs
def trl_model_and_peft(method: str, src: str, bf16: bool):
    """The reference's model and PEFT config for `method`, each set up the way its library does it."""
    import torch
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, PromptTuningInit
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = torch.bfloat16 if bf16 else torch.float32
    variant = LORA_VARIANTS[JOB["lora_variant"]]
    lora = LoraConfig(r=JOB["r"], lora_alpha=JOB["alpha"], lora_dropout=JOB["dropout"], target_modules="all-linear",
                      task_type="CAUSAL_LM", use_rslora=variant.get("use_rslora", False),
                      use_dora=variant.get("use_dora", False))  # fmt: skip
    if method == "qlora":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=dtype)  # fmt: skip
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, quantization_config=quant, device_map="cpu")
        return model, lora
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    peft = {
        "lora": lora,
        "full": None,
        "prompt": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS,
                                     prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB),
        "prefix": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS,
                                     prefix_projection=True, encoder_hidden_size=PREFIX_HIDDEN),
    }[method]  # fmt: skip
    return model, peft


def trl_scored_model(trainer, method: str, src: str, tmp: str):
    """The TRL-trained model to score: as trained, but prompt / prefix tuning saved and reloaded through
    tunelab's loader for the method (the same PEFT files), whose causal-LM logits skip the virtual positions."""
    if method not in NO_PACKING:
        return trainer.model
    from transformers import AutoModelForCausalLM

    from tunelab.methods.registry import get

    trainer.model.save_pretrained(f"{tmp}/adapter", safe_serialization=True)
    return get(method).load(AutoModelForCausalLM.from_pretrained(src), f"{tmp}/adapter")


def job_trl(method: str) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from tunelab.models.sources import resolve

    src = resolve("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(src)
    bf16 = JOB["precision"] == "bf16"
    model, peft = trl_model_and_peft(method, src, bf16)
    data = [{"prompt": m[:1], "completion": m[1:]} for m in map(messages, rows(0, JOB["rows"]))]
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(
            output_dir=tmp,
            per_device_train_batch_size=JOB["batch_size"],
            num_train_epochs=1,
            learning_rate=METHOD_LR[method],
            lr_scheduler_type="linear",
            warmup_steps=0,
            weight_decay=0.0,
            adam_beta1=0.9,
            adam_beta2=0.999,
            adam_epsilon=1e-8,
            max_grad_norm=1.0,
            max_length=JOB["max_length"],
            packing=method not in NO_PACKING,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            bf16=bf16,  # TRL's own bf16 setting (autocast) where the job is bf16; fp32 where bf16 is not native
            # TRL's default: on; but PEFT prefix tuning under it fails on transformers 5.25 (the causal mask is made
            # without the prefix: "size of tensor a (256) must match ... b (276)"), so the prefix reference runs without
            gradient_checkpointing=TRL_CHECKPOINTING and method != "prefix",
            seed=JOB["seed"],
            include_num_input_tokens_seen="non_padding",
            disable_tqdm=True,
            max_steps=JOB.get("max_steps") or -1,
        )
        optimizers = (None, None)
        ratio = LORA_VARIANTS[JOB["lora_variant"]].get("loraplus_lr_ratio")
        if ratio is not None:  # PEFT's LoRA+ optimizer over the PEFT model
            import torch
            from peft import get_peft_model
            from peft.optimizers import create_loraplus_optimizer

            model, peft = get_peft_model(model, peft), None
            optimizers = (create_loraplus_optimizer(model, torch.optim.AdamW, lr=METHOD_LR[method], betas=(0.9, 0.999),
                                                    eps=1e-8, weight_decay=0.0,
                                                    loraplus_lr_ratio=ratio),
                          None)  # fmt: skip
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(data),
            peft_config=peft,
            processing_class=tokenizer,
            optimizers=optimizers,
        )
        t0, c0 = time.perf_counter(), cpu_seconds()
        out = trainer.train()
        seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        peak = peak_rss_mb()  # loading + training; the held-out scoring below is not counted
        scored = trl_scored_model(trainer, method, src, tmp)
        loss_after = held_out_loss(scored, tokenizer)
        loss_fp32 = held_out_loss(scored.float(), tokenizer) if bf16 else loss_after
    tokens = int(trainer.state.num_input_tokens_seen)
    return {
        "tokens": tokens,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "train_loss": out.training_loss,
        "loss_after": loss_after,
        "loss_after_fp32": loss_fp32,
        "peak_rss_mb": peak,
        "precision": "bf16 autocast" if bf16 else "fp32",
    }


def tunelab_config(method: str, overrides: list[str], tmp: str):
    from tunelab.config import load_config

    method_cfg = {"name": method}
    if method in ("lora", "qlora"):
        method_cfg.update(r=JOB["r"], alpha=JOB["alpha"], dropout=JOB["dropout"], target_modules="all-linear")
        method_cfg.update(LORA_VARIANTS[JOB["lora_variant"]])
    if method == "qlora":
        method_cfg.update(quant_type="nf4", double_quant=True)
    if method in NO_PACKING:
        method_cfg.update(num_virtual_tokens=VIRTUAL_TOKENS)
    if method == "prefix":
        method_cfg.update(projection=True, projection_hidden=PREFIX_HIDDEN)
    return load_config(
        {
            "output_dir": f"{tmp}/run",
            "model": {"name": "smollm2-135m-instruct", "dtype": {"bf16": "bfloat16"}.get(JOB["precision"], "float32")},
            "data": {
                "train": f"{tmp}/train.json",
                "val_fraction": 0.0,
                "max_length": JOB["max_length"],
                "packing": method not in NO_PACKING,
            },
            "method": method_cfg,
            "training": {
                "epochs": 1,
                "batch_size": JOB["batch_size"],
                "lr": METHOD_LR[method],
                "weight_decay": 0.0,
                "betas": [0.9, 0.999],
                "max_grad_norm": 1.0,
                "scheduler": "linear",
                "warmup_ratio": 0.0,
                "seed": JOB["seed"],
                "progress": False,
                "tensorboard": False,
                "device": "cpu",
                "max_steps": JOB.get("max_steps"),
            },
        },
        overrides,
    )


@contextlib.contextmanager
def cpu_from_first_step():
    """{"seconds": CPU time from the training loop's start to the end of tunelab.train} (final save included;
    loading and data preparation not): the loop starts its clock right after making its progress bar, so
    the bench marks the CPU time there (a bench-only wrap; tunelab has no hook for it)."""
    import tunelab.training.loop as loop

    out, original = {}, loop.progress_bar

    def marked(*args, **kwargs):
        out["start"] = cpu_seconds()
        return original(*args, **kwargs)

    loop.progress_bar = marked
    try:
        yield out
    finally:
        loop.progress_bar = original
    out["seconds"] = cpu_seconds() - out.pop("start")


def job_tunelab(method: str, overrides: list[str]) -> dict:
    import tunelab
    from tunelab.accel.memory import skip_unused_imports
    from tunelab.stages.runs import load_run

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "train.json").write_text(json.dumps(rows(0, JOB["rows"])))
        cfg = tunelab_config(method, overrides, tmp)
        skip_unused_imports(cfg)  # as `tunelab train` does: this process runs this one training
        with cpu_from_first_step() as cpu:
            result = tunelab.train(cfg)
        peak = peak_rss_mb()  # loading + training; reloading the result for scoring is not counted
        model, tokenizer = load_run(result.final_dir)
        loss_after = held_out_loss(model, tokenizer)
        # a bf16 run is scored as it loads (in bf16) and again in fp32: training's precision apart from scoring's
        bf16 = result.metrics["precision"] != "float32"
        loss_fp32 = held_out_loss(model.float(), tokenizer) if bf16 else loss_after
    m = result.metrics
    seconds = m["tokens"] / m["tokens_per_s"]
    return {
        "tokens": m["tokens"],
        "seconds": seconds,
        "cpu_seconds": cpu["seconds"],
        "train_loss": m["train_loss"],
        "loss_after": loss_after,
        "loss_after_fp32": loss_fp32,
        "peak_rss_mb": peak,
        # fp32 weights whose gradients and AdamW moments are bf16 (training.optimizer_state) say so
        "precision": m["precision"]
        + (", bf16 state" if m.get("optimizer_state") == "bf16" and not bf16 else "")
        + (f", {m['saved_activations']} saved activations" if m.get("saved_activations") else ""),
    }


# ------------------------------------------------------------------------------------------ driver
def reference_environment(allocator: str) -> dict | None:
    """The reference child's environment: glibc's malloc, as TRL runs (a tbbmalloc this bench was started under is
    taken out), or tunelab's tbbmalloc preloaded ("tbbmalloc"). The reference's peak depends on it: TRL's 135M x 256
    LoRA point peaked at 2,817 MB on glibc and 2,353 on tbbmalloc (docs/performance.md)."""
    from tunelab.accel.memory import allocator_environment

    if allocator == "tbbmalloc":
        return allocator_environment()  # None where this process has it preloaded already: the child inherits it
    env = dict(os.environ)
    if "tbbmalloc" in env.get("LD_PRELOAD", ""):
        del env["LD_PRELOAD"]
    return env


def job_environment(side: str, method: str, overrides: list[str], trl_allocator: str) -> dict | None:
    """The process environment of a job: tunelab's runs get the allocator `tunelab train` would restart
    itself with (training.allocator, tunelab/accel/memory.py); TRL's runs as plain Python, unless asked."""
    from tunelab.accel.memory import allocator_environment, wants_tbbmalloc

    if side == "trl":
        return reference_environment(trl_allocator)
    return allocator_environment() if wants_tbbmalloc(tunelab_config(method, overrides, "/unused").training) else None


def run_child(cmd: list[str], env: dict | None, label: str, stderr: list | None = None) -> dict:
    """Run one bench job in a fresh process (so its peak RSS is its own) and return the JSON object it
    prints as its last line; a failing job stops the bench with the end of its stderr. `stderr`: a list
    that receives the job's stderr lines (for the caller's log excerpts)."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{label} failed (exit {proc.returncode})")
    if stderr is not None:
        stderr.extend(proc.stderr.splitlines())
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_job(side: str, method: str, overrides: list[str], trl_allocator: str = "system") -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--job",
        side,
        "--methods",
        method,
        "--task",
        JOB["task"],
        "--precision",
        JOB["precision"],
    ]
    cmd += ["--dropout", str(JOB["dropout"]), "--lora-variant", JOB["lora_variant"]]
    if JOB.get("max_steps"):
        cmd += ["--max-steps", str(JOB["max_steps"])]
    for o in overrides:
        cmd += ["--tunelab-set", o]
    env = job_environment(side, method, overrides, trl_allocator)
    result = run_child(cmd, env, f"{side} {method}")
    result["allocator"] = (env or {}).get("TUNELAB_ALLOCATOR", "system")
    result["tokens_per_s"] = result["tokens"] / result["seconds"]
    result["tokens_per_cpu_s"] = result["tokens"] / result["cpu_seconds"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="lora", help="tunelab methods to time (comma separated)")
    parser.add_argument("--skip-trl", action="store_true", help="do not run the TRL reference")
    parser.add_argument("--tunelab-set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="one more tunelab run of each method with these overrides, against the same reference (repeatable)",
    )
    parser.add_argument(
        "--off",
        action="store_true",
        help="one more tunelab run of each method with training.accelerate: off (plain PyTorch + PEFT, no tunelab/accel); "
        "the same as --variant training.accelerate=off",
    )
    parser.add_argument("--max-steps", type=int, help="stop both runs early (a smoke test, not the benchmark)")
    parser.add_argument(
        "--concurrent",
        action="store_true",
        help="run each method's reference and tunelab jobs at the same time (a shared, loaded machine: both meet "
        "the same load; compare tokens per CPU-second too)",
    )
    parser.add_argument("--task", choices=sorted(TASKS), default="alpaca-256", help="the data, rows and max length")
    parser.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout on both sides (default 0)")
    parser.add_argument(
        "--lora-variant",
        choices=sorted(LORA_VARIANTS),
        default="none",
        help="a LoRA variant on both sides (lora / qlora): rsLoRA, DoRA (PEFT's use_dora on both), LoRA+ (ratio 16; "
        "the reference through PEFT's create_loraplus_optimizer)",
    )
    parser.add_argument(
        "--trl-allocator",
        choices=["system", "tbbmalloc"],
        default="system",
        help="run the TRL reference on glibc's malloc (as TRL runs; the default) or preloaded with tbbmalloc",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, metavar="N", help="run every job N times, in rounds; report the medians"
    )
    add_precision_option(parser)
    parser.add_argument("--job", choices=["trl", "tunelab"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    JOB["max_steps"] = args.max_steps
    JOB.update(TASKS[args.task], task=args.task, dropout=args.dropout, lora_variant=args.lora_variant)
    JOB["precision"] = args.precision if args.precision != "auto" else auto_precision()
    if args.off:
        args.variant.append("training.accelerate=off")

    if args.job:  # child process: run one job, print its figures as the last line
        import torch

        torch.manual_seed(JOB["seed"])
        out = job_trl(args.methods) if args.job == "trl" else job_tunelab(args.methods, args.tunelab_set)
        print(json.dumps(out))
        return

    import torch

    from tunelab.models.precision import choose_precision

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; job: {JOB}; rounds: {args.repeat}")
    print(
        f"precision: {JOB['precision']} (--precision {args.precision}; this host: {choose_precision('auto', 'cpu', measured=True).reason})"
    )
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHOD_LR))
    if unknown:
        raise SystemExit(f"--methods: no bench job for {unknown}; choose among {sorted(METHOD_LR)}")
    # per method the reference then tunelab, so that each ratio is against a run minutes away
    jobs = []
    for method in methods:  # each method's variants beside its default run, against the same reference
        jobs += [] if args.skip_trl else [(TRL_NAMES[method], "trl", method, [])]
        jobs += [("tunelab", "tunelab", method, args.tunelab_set)]
        # KEY=VALUE pairs split at a comma followed by the next KEY=, so a value may be a list: k=[a,b]
        jobs += [(f"tunelab {v}", "tunelab", method, args.tunelab_set + re.split(r",(?=[\w.]+=)", v)) for v in args.variant]  # fmt: skip
    # rounds: every job once per round, in order, so that each round's ratios are against a reference run
    # minutes away (the machine drifts by more than the differences measured)
    results: list[list[dict]] = [[] for _ in jobs]
    # --concurrent: the jobs of one method (the reference and tunelab) run at the same time, so that on a
    # shared machine both meet the same load; else one after the other
    order = list(dict.fromkeys(method for _, _, method, _ in jobs))
    groups = [[i for i, j in enumerate(jobs) if j[2] == m] for m in order] if args.concurrent else [[i] for i in range(len(jobs))]  # fmt: skip
    for k in range(args.repeat):
        for group in groups:
            with ThreadPoolExecutor(len(group)) as pool:  # each job is a child process: threads only wait
                outs = list(pool.map(lambda i: run_job(*jobs[i][1:], args.trl_allocator), group))
            for i, out in zip(group, outs):
                results[i].append(out)
                print(f"round {k + 1}: {jobs[i][0]} {jobs[i][2]} done: {out}", flush=True)

    refs = {method: rs for (_, side, method, _), rs in zip(jobs, results) if side == "trl"}
    spread = args.repeat > 1
    header = (
        "| run | method | precision | allocator | tokens | tokens/s | tokens/CPU-s | peak RSS MB | train loss* | "
        "held-out loss after | scored in fp32** |"
    )
    print("\n" + header + ("  x tok/s | x tok/CPU-s | x RSS | loss diff |" if refs else ""))
    print("|" + "---|" * (header.count("|") - 1 + (4 if refs else 0)))
    for (name, _, method, _), rs in zip(jobs, results):
        r = rs[0]
        speed, rss = [x["tokens_per_s"] for x in rs], [x["peak_rss_mb"] for x in rs]
        per_cpu = [x["tokens_per_cpu_s"] for x in rs]
        line = (
            f"| {name} | {method} | {r['precision']} | {r['allocator']} | {r['tokens']} | {_cell(speed, 1, spread)} | "
            f"{_cell(per_cpu, 1, spread)} | {_cell(rss, 0, spread)} | "
            f"{r['train_loss']:.4f} | {r['loss_after']:.4f} | {r['loss_after_fp32']:.4f} |"
        )
        ref = refs.get(method)  # the reference run of the same method
        if ref:  # each round's ratio against that round's reference, then their median
            x_speed = [x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(rs, ref)]
            x_cpu = [x["tokens_per_cpu_s"] / y["tokens_per_cpu_s"] for x, y in zip(rs, ref)]
            x_rss = [x["peak_rss_mb"] / y["peak_rss_mb"] for x, y in zip(rs, ref)]
            line += (
                f" {_cell(x_speed, 2, spread)} | {_cell(x_cpu, 2, spread)} | {_cell(x_rss, 2, spread)} |"
                f" {100 * (r['loss_after'] - ref[0]['loss_after']) / ref[0]['loss_after']:+.2f}% |"
            )
        print(line)
    print("* TRL reports the epoch's mean training loss, tunelab its last step's; compare the held-out column.")
    print(
        "** the held-out loss of the trained model cast to fp32 (a bf16 run's base is the bf16 checkpoint's exact "
        "values): the training's precision without the scoring's"
    )
    if spread:
        print(f"Each cell: the median of {args.repeat} rounds (lowest-highest); ratios are per round, then the median.")


TRL_NAMES = {"lora": "TRL SFTTrainer + PEFT", "full": "TRL SFTTrainer (no PEFT)", "qlora": "TRL + PEFT + bnb NF4",
             "prompt": "TRL + PEFT prompt tuning", "prefix": "TRL + PEFT prefix tuning"}  # fmt: skip


def add_precision_option(parser) -> None:
    """--precision, as every bench that runs tunelab against TRL takes it."""
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="both sides' precision: bf16 = tunelab model.dtype bfloat16 and TRL bf16=True on a bf16-loaded model; "
        "auto = bf16 where the CPU has native bf16 (what model.dtype auto picks for LoRA), else fp32",
    )


def auto_precision() -> str:
    """What `model.dtype: auto` picks for LoRA training on this host's CPU: the job's precision under --precision
    auto."""
    import torch

    from tunelab.models.precision import choose_precision

    return "bf16" if choose_precision("auto", "cpu", measured=True).dtype != torch.float32 else "fp32"


def _cell(values: list[float], digits: int, spread: bool) -> str:
    """The median of `values`, with their range when there are several."""
    median = statistics.median(values)
    if not spread:
        return f"{median:.{digits}f}"
    return f"{median:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


if __name__ == "__main__":
    main()
