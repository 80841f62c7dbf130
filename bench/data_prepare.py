"""Data preparation at scale: tunelab's store (data.cache: on) against TRL's SFTTrainer dataset preparation.

    python bench/data_prepare.py --rows 1000 100000 [--trl-num-proc 1 2] [--out results.json]

Rows: alpaca-style {instruction, input, output} made by a seeded recombination of the fields of the alpaca-like
sets in ../shared/data (alpaca_tiny, the LLaMA-Factory alpaca demo, LIMA), written as JSONL. Both sides
prepare the same job: SmolLM2-135M-Instruct's tokenizer and chat template, loss on the reply, max length
512, packing (best fit decreasing). Each side runs in a fresh process, timed from its start (imports
included) to the data being ready for step 1, with the peak RSS of its process tree (worker processes
included, sampled every 50 ms; RSS summed, and PSS, which counts a page shared by several processes once) and
the CPU time of the whole tree (user + system, the processes it waited for included: a figure per row that a
loaded machine changes less than the wall time); then once more with its caches warm (second start).
`uptime`'s load averages are recorded before and after each size.

- tunelab: `tunelab data prepare` (check_rows + build_datasets, as `tunelab train` prepares its data), a fresh
  $TUNELAB_HOME; data.num_proc as given (0: tunelab's default).
- TRL: load_dataset("json") + a map to conversational prompt / completion + SFTTrainer(...) construction
  (a 2-layer model, so that no model load is timed), a fresh HF_DATASETS_CACHE; dataset_num_proc as given.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SHARED = Path(os.environ.get("TUNELAB_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
TOKENIZER = Path.home() / ".cache" / "tunelab" / "models" / "smollm2-135m-instruct"
MAX_LENGTH = 512


def make_rows(n: int, path: Path, seed: int = 0) -> None:
    pool = []
    for name in ("alpaca/alpaca_tiny.json", "llamafactory-demo/alpaca_en_demo.json", "lima/lima.json"):
        pool += json.loads((SHARED / name).read_text())
    instructions = [r["instruction"] for r in pool]
    inputs = [r.get("input", "") for r in pool]
    outputs = [r["output"] for r in pool]
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            row = {"instruction": rng.choice(instructions), "input": rng.choice(inputs) if rng.random() < 0.4 else "",
                   "output": rng.choice(outputs)}  # fmt: skip
            f.write(json.dumps(row) + "\n")


TUNELAB = """
import time; t0 = time.perf_counter()
from tunelab.cli import main
import contextlib, io
out = io.StringIO()
with contextlib.redirect_stdout(out):
    rc = main(["data", "prepare", {config!r}, "--set", "data.num_proc={num_proc}".replace("None", "null")])
text = out.getvalue()
packed = int(text.split("packed into ")[1].split()[0])
print("RESULT", {{"seconds": time.perf_counter() - t0, "rows": None, "packed": packed, "hit": "cache           hit" in text}})
"""

CONFIG = """model:
  name: {tokenizer}
data:
  train: {train}
  max_length: {max_length}
  packing: true
  cache: 'on'
"""

TRL = """
import time; t0 = time.perf_counter()
import datasets
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from trl import SFTConfig, SFTTrainer
tok = AutoTokenizer.from_pretrained({tokenizer!r})
ds = datasets.load_dataset("json", data_files={train!r}, split="train")
def to_pc(r):
    user = r["instruction"] + ("\\n\\n" + r["input"] if r["input"].strip() else "")
    return {{"prompt": [{{"role": "user", "content": user}}], "completion": [{{"role": "assistant", "content": r["output"]}}]}}
ds = ds.map(to_pc, remove_columns=ds.column_names, num_proc={num_proc})
model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=2))
args = SFTConfig(output_dir={out!r}, max_length={max_length}, packing=True, report_to=[], dataset_num_proc={num_proc}, bf16=False, use_cpu=True)
trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
print("RESULT", {{"seconds": time.perf_counter() - t0, "rows": len(ds), "packed": len(trainer.train_dataset), "hit": None}})
"""


def tree_memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) summed over the process and its children. Forked workers share the parent's pages (the
    imported libraries), which the RSS sum counts once per process and PSS splits between them."""
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    rss = pss = 0
    for q in procs:
        try:
            info = q.memory_full_info()
            rss, pss = rss + info.rss, pss + info.pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return rss, pss


def run(code: str, env: dict) -> dict:
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    peak = [0, 0]

    def sample():
        while proc.poll() is None:
            rss, pss = tree_memory(proc.pid)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)
            time.sleep(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, err = proc.communicate()
    t.join()
    line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"failed ({proc.returncode}):\n{err[-3000:]}")
    result = eval(line[7:])  # our own child's dict literal  # noqa: S307
    result["peak_rss_mb"], result["peak_pss_mb"] = round(peak[0] / 2**20), round(peak[1] / 2**20)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result["cpu_s"] = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return result


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def time_to_step1(config: Path, env: dict, out: Path) -> float:
    """Seconds from starting `tunelab train CONFIG` (LoRA, one step) to its first step in metrics.jsonl: with
    the data prepared before, the store's cache is hit, and what remains is imports and the model."""
    t0 = time.perf_counter()
    sets = ["method.name=lora", "training.max_steps=1", "training.batch_size=2", "training.eval_batches=4",
            "training.progress=false", "training.tensorboard=false"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", "train", str(config), "--output-dir", str(out),
                             *(x for kv in sets for x in ("--set", kv))],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    seen = None
    while proc.poll() is None and seen is None:
        metrics = out / "metrics.jsonl"
        if metrics.is_file() and '"step"' in metrics.read_text():
            seen = time.perf_counter() - t0
        time.sleep(0.1)
    err = proc.communicate()[1]
    if proc.returncode:
        raise RuntimeError(f"tunelab train failed ({proc.returncode}):\n{err[-3000:]}")
    return round(seen if seen is not None else time.perf_counter() - t0, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1000, 100_000], help="data set sizes to run")
    ap.add_argument("--trl-num-proc", type=int, nargs="+", default=[1], help="TRL dataset_num_proc values to run")
    ap.add_argument("--num-proc", type=int, nargs="+", default=[0], help="tunelab data.num_proc values (0: default)")
    ap.add_argument("--skip-trl", action="store_true", help="time tunelab only")
    ap.add_argument("--work", default=tempfile.gettempdir() + "/tunelab-bench-data", help="folder for data and caches")
    ap.add_argument("--out", help="also write the results as JSON here")
    ap.add_argument("--step1", action="store_true", help="then time `tunelab train` to its first step (a cache hit)")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    repo = str(Path(__file__).resolve().parents[1])
    for n in args.rows:
        train = work / f"alpaca-{n}.jsonl"
        if not train.exists():
            make_rows(n, train)
        sides = [(f"tunelab (num_proc={k or 'default'})", TUNELAB, k or None) for k in args.num_proc]
        if not args.skip_trl:
            sides += [(f"trl (dataset_num_proc={k})", TRL, k) for k in args.trl_num_proc]
        for name, code, num_proc in sides:
            home = Path(tempfile.mkdtemp(dir=work))
            env = {**os.environ, "PYTHONPATH": repo, "TUNELAB_HOME": str(home / "tunelab"),
                   "HF_DATASETS_CACHE": str(home / "hf"), "TRANSFORMERS_VERBOSITY": "error"}  # fmt: skip
            config = home / "config.yaml"
            config.write_text(CONFIG.format(tokenizer=TOKENIZER, train=train, max_length=MAX_LENGTH))
            src = code.format(train=str(train), tokenizer=str(TOKENIZER), max_length=MAX_LENGTH, num_proc=num_proc,
                              out=str(home / "out"), config=str(config))  # fmt: skip
            load_before = load()
            first = run(src, env)
            second = run(src, env)
            row = {"side": name, "rows": n, "seconds": round(first["seconds"], 1),
                   "rows_per_s": round(n / first["seconds"]), "peak_rss_mb": first["peak_rss_mb"],
                   "peak_pss_mb": first["peak_pss_mb"],
                   "cpu_ms_per_row": round(1000 * first["cpu_s"] / n, 3),
                   "second_start_s": round(second["seconds"], 1), "second_peak_rss_mb": second["peak_rss_mb"],
                   "second_peak_pss_mb": second["peak_pss_mb"], "second_hit": second["hit"],
                   "packed_rows": first["packed"], "load_before": load_before, "load_after": load()}  # fmt: skip
            if args.step1 and code is TUNELAB:
                row["train_step1_s"] = time_to_step1(config, env, home / "run")
                row["train_step1_load"] = load()
            results.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
