"""Data-parallel training (distributed.py): 2 CPU processes over gloo, launched with torchrun.

One torchrun launch runs every multi-process training of this file (a worker script calls
`tunelab.train` several times), so the imports are paid once. Tolerance for "2 processes x batch b
equals 1 process x batch 2b": 1e-4 relative per step (the sums are split differently over
processes, so float rounding differs; observed ~1e-7). A resume across 2 processes is exact.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_preference import synthetic_pairs

import tunelab
from tunelab.config import load_config
from tunelab.testing import save_tiny_model_dir
from tunelab.training import distributed

# 25 training rows with a global batch of 8: the epoch's last micro-batch has 1 row, so one process
# runs a weight-0 stand-in there (a synchronised step: grad_accum 2, micro-batch 3 is a step's last)
ROWS = [{"instruction": f"Say the number {i}.", "input": "", "output": f"The number is {i}."} for i in range(25)]
VAL = [{"instruction": f"Repeat {i} twice.", "input": "", "output": f"{i} {i}"} for i in range(6)]

# stage kto on test_preference's pairs split into replies (those with "Paris" desirable); z_ref (a mean over each
# micro-batch's mismatched rows) must be taken over both processes' shards for two processes to train as one
# (stages/kto.py kl_estimate)
KTO_ROWS = [
    {"prompt": p["prompt"], "completion": p[k], "label": k == "chosen"}
    for p in synthetic_pairs(16, 0)
    for k in ("chosen", "rejected")
]

WORKER = """
import json, sys
import tunelab
from tunelab.config import load_config

for run in json.load(open(sys.argv[1])):
    cfg = load_config(run["cfg"])
    stop = run.get("stop_after")

    def ctrl_c(step, record):
        if step == stop:
            raise KeyboardInterrupt

    result = tunelab.train(cfg, callbacks=[ctrl_c] if stop else [])
    if stop:
        assert result.metrics["interrupted"]
        tunelab.train(cfg, resume=True)
"""


def run_cfg(model_dir, data_dir, out, batch_size, **training):
    t = dict(max_steps=6, batch_size=batch_size, grad_accum=2, lr=5e-3, warmup_steps=1, seed=3)
    t.update(training, progress=False, tensorboard=False)
    return {
        "output_dir": str(out),
        "model": {"name": str(model_dir)},
        "data": {"train": str(data_dir / "train.jsonl"), "validation": str(data_dir / "val.jsonl"), "max_length": 64},
        # gradual unfreezing: the trainable set changes at steps 2 and 4, so DDP is rebuilt mid-run
        "method": {"name": "gradual", "every_steps": 2, "unfreeze_embeddings": True},
        "training": t,
    }


def kto_cfg(model_dir, data_dir, out, batch_size):
    return {
        "stage": "kto",
        "output_dir": str(out),
        "model": {"name": str(model_dir)},
        "data": {"train": str(data_dir / "kto.jsonl"), "val_fraction": 0.0, "max_length": 32},
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "training": {"max_steps": 4, "batch_size": batch_size, "lr": 2e-2, "warmup_steps": 0, "seed": 3,
                     "progress": False, "tensorboard": False},
    }  # fmt: skip


def pissa_cfg(model_dir, data_dir, out, batch_size):
    """LoRA started at PiSSA (method.init pissa): each process rewrites the frozen weights by its own randomized SVD."""
    cfg = run_cfg(model_dir, data_dir, out, batch_size, max_steps=4)
    cfg["method"] = {"name": "lora", "r": 4, "dropout": 0.0, "init": "pissa"}
    return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (root / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in VAL))
    (root / "kto.jsonl").write_text("".join(json.dumps(r) + "\n" for r in KTO_ROWS))
    plain = save_tiny_model_dir(root / "plain")
    # attention dropout: each process draws its own masks, so a resume must restore every process's RNG
    dropout = save_tiny_model_dir(root / "dropout", attention_dropout=0.2)
    spec = [
        {"cfg": run_cfg(plain, root, root / "two", 4, save_every=3)},
        {"cfg": run_cfg(dropout, root, root / "full", 4, save_every=3)},
        {"cfg": run_cfg(dropout, root, root / "resumed", 4, save_every=3), "stop_after": 3},
        {"cfg": kto_cfg(plain, root, root / "kto", 4)},
        {"cfg": pissa_cfg(plain, root, root / "pissa", 4)},
    ]
    (root / "spec.json").write_text(json.dumps(spec))
    (root / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run(
        [*cmd, str(root / "worker.py"), str(root / "spec.json")], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root, plain, proc.stderr


def records(run_dir):
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir):
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def weights(run_dir):
    return load_file(next((run_dir / "final").glob("*.safetensors")))


def test_two_processes_train_like_one_process_with_the_double_batch(runs, tmp_path):
    root, plain, log = runs
    one = tunelab.train(load_config(run_cfg(plain, root, tmp_path / "one", 8)))
    a, b = losses(tmp_path / "one"), losses(root / "two")
    assert sorted(b) == list(range(1, 7))  # rank 0 alone writes metrics: every step once
    assert b[6] < b[1] - 0.5  # it learns
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-4 * abs(a[step]), (step, a[step], b[step])
    # the gradient itself, not only its direction (AdamW would hide a wrong scale in the loss curve)
    norm_a, norm_b = (
        {r["step"]: r["grad_norm"] for r in records(d) if "grad_norm" in r} for d in (tmp_path / "one", root / "two")
    )
    assert sorted(norm_b) == list(range(1, 7))
    assert all(abs(norm_a[s] - norm_b[s]) <= 1e-4 * norm_a[s] for s in norm_a), (norm_a, norm_b)
    two = json.loads((root / "two" / "results.json").read_text())
    assert abs(two["eval_loss"] - one.metrics["eval_loss"]) <= 1e-4 * one.metrics["eval_loss"]
    assert two["processes"] == 2 and two["effective_batch_size"] == 16 == one.metrics["effective_batch_size"]
    assert two["tokens"] == one.metrics["tokens"]  # the same rows were seen, split over 2 processes
    w1, w2 = weights(tmp_path / "one"), weights(root / "two")
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-4
    assert "2 processes, DDP over gloo" in log and "unfroze block 0" in log


def test_kto_on_two_processes_takes_z_ref_over_both_shards(runs, tmp_path):
    root, plain, _ = runs
    tunelab.train(load_config(kto_cfg(plain, root, tmp_path / "kto", 8)))
    one, two = ([(r["loss"], r["kl"]) for r in records(d) if "loss" in r] for d in (tmp_path / "kto", root / "kto"))
    assert len(one) == len(two) == 4 and max(kl for _, kl in one) > 0.1  # z_ref not clamped to 0 throughout
    for (loss_a, kl_a), (loss_b, kl_b) in zip(one, two):
        assert abs(loss_a - loss_b) <= 1e-4 * loss_a and abs(kl_a - kl_b) <= 1e-4 * max(kl_a, 1e-3), (one, two)


def test_pissa_on_two_processes_trains_like_one_process(runs, tmp_path):
    """PiSSA rewrites each frozen weight as its residual after a randomized SVD, in every process: the processes'
    bases and adapters must agree (or DDP would average gradients of different models), so two processes train as
    one does with the double batch."""
    root, plain, _ = runs
    tunelab.train(load_config(pissa_cfg(plain, root, tmp_path / "pissa", 8)))
    a, b = losses(tmp_path / "pissa"), losses(root / "pissa")
    assert sorted(b) == [1, 2, 3, 4] and b[4] < b[1]
    assert all(abs(a[s] - b[s]) <= 1e-4 * a[s] for s in a), (a, b)
    w1, w2 = weights(tmp_path / "pissa"), weights(root / "pissa")
    assert w1.keys() == w2.keys() and max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-4


def test_resume_across_two_processes_is_exact(runs):
    root, _, _ = runs
    # the checkpoint holds each process's RNG state, and they differ (different dropout draws)
    rng = torch.load(root / "resumed" / "checkpoints" / "step-00000003" / "optimizer.pt", weights_only=True)["rng"]
    assert len(rng["ranks"]) == 2 and not torch.equal(rng["ranks"][0]["torch"], rng["ranks"][1]["torch"])
    full, resumed = losses(root / "full"), losses(root / "resumed")
    assert sorted(resumed) == list(range(1, 7))
    assert all(full[s] == resumed[s] for s in full), (full, resumed)
    w1, w2 = weights(root / "full"), weights(root / "resumed")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_a_two_process_checkpoint_resumes_in_one_process_with_the_same_global_batch(runs, tmp_path):
    import shutil

    root, plain, _ = runs
    shutil.copytree(root / "two" / "checkpoints", tmp_path / "one" / "checkpoints")
    shutil.copy(root / "two" / "metrics.jsonl", tmp_path / "one")
    with pytest.raises(ValueError, match="global batch of 8"):  # 1 x 4 would see other batches
        tunelab.train(load_config(run_cfg(plain, root, tmp_path / "one", 4, save_every=3)), resume=True)
    tunelab.train(load_config(run_cfg(plain, root, tmp_path / "one", 8, save_every=3)), resume=True)
    a, b = losses(root / "two"), losses(tmp_path / "one")
    assert sorted(b) == list(range(1, 7))  # 1-3 from the 2-process run, 4-6 from this one
    assert all(abs(a[s] - b[s]) <= 1e-4 * a[s] for s in (4, 5, 6)), (a, b)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_shards_cover_each_micro_batch_once(n):
    rows = list(range(100, 100 + n))
    parts = [distributed.shard(rows, r, 3) for r in range(3)]
    assert [i for part, w in parts if w for i in part] == rows  # in order, disjoint, complete
    assert all(len(part) == 1 for part, w in parts if not w)  # stand-ins: one row, weight 0
    assert sum(w == 0 for _, w in parts) == max(0, 3 - n)


def test_nproc_spawns_torchrun_with_the_same_command(tmp_path, monkeypatch):
    from tunelab.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"training": {"lr": 1e-4}}))
    seen = {}
    monkeypatch.setattr(subprocess, "call", lambda cmd, env: seen.update(cmd=cmd, env=env) or 0)
    assert main(["train", str(cfg), "--set", "training.seed=7", "--resume", "--nproc", "2"]) == 0
    assert seen["cmd"][1:] == [
        "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "tunelab.cli", "train", str(cfg), "--set", "training.seed=7", "--resume",
    ]  # fmt: skip
    assert "OMP_NUM_THREADS" in seen["env"]


@pytest.mark.parametrize("init", ["default", "pissa"])
def test_a_sharded_run_saves_a_model_rebuilt_from_the_gathered_state(tmp_path, init):
    """FSDP / DeepSpeed runs gather a full state dict and rebuild the model on rank 0 (not run here:
    no GPU); the rebuild is checked on its own: it gives the trained model's logits. PiSSA's rebuilt model saves
    the adapter plain PEFT loads onto the untouched base (its conversion needs the run's own A0, B0)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunelab.methods import get as get_method
    from tunelab.stages import get as stage_for

    base_dir = save_tiny_model_dir(tmp_path / "m")
    cfg = load_config({"model": {"name": base_dir}, "method": {"name": "lora", "r": 4, "init": init}})
    stage, method = stage_for(cfg.stage, cfg), get_method("lora")
    model, _ = stage.load_model(cfg, torch.device("cpu"))
    model = method.apply(model, cfg.method)
    with torch.no_grad():  # "trained": LoRA's B starts at zero, so move every trainable weight
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    gathered = distributed.LossModule(model, stage.loss_sum).state_dict()
    rebuilt = distributed.rebuild(cfg, stage, method, gathered)
    ids = torch.tensor([[1, 5, 9, 14, 30]])
    model.eval(), rebuilt.eval()
    assert torch.allclose(model(input_ids=ids).logits, rebuilt(input_ids=ids).logits, atol=1e-6)
    if init == "pissa":
        method.save(rebuilt, tmp_path / "adapter")
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter").eval()
        assert torch.allclose(model(input_ids=ids).logits, loaded(input_ids=ids).logits, atol=1e-5)
