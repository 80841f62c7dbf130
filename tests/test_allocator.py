"""The allocator behind CPU tensors: `tunelab train` restarts itself once on tbbmalloc (accel/memory.py)."""

import json
import subprocess
import sys

import pytest
import yaml

from tunelab.accel import memory
from tunelab.config import load_config

needs_tbb = pytest.mark.skipif(memory.tbbmalloc_libraries() is None, reason="no tbb wheel (Linux x86-64 only)")


@needs_tbb
def test_the_environment_preloads_tbbmalloc_once_and_respects_the_users_preload():
    libs = memory.tbbmalloc_libraries()
    env = memory.allocator_environment({"PATH": "/usr/bin"})
    assert env["LD_PRELOAD"].split() == [str(p) for p in libs] and env["PATH"] == "/usr/bin"
    assert memory.allocator_environment(env) is None  # the restarted process does not restart again
    assert memory.allocator_environment({"LD_PRELOAD": "/opt/libjemalloc.so.2"}) is None
    # in this (glibc) process the run log says how to get tbbmalloc from Python; not for a GPU run
    training = load_config({}).training
    assert env["LD_PRELOAD"] in memory.allocator_note(training, on_cpu=True)
    assert memory.allocator_note(training, on_cpu=False) is None
    assert memory.allocator_note(load_config({"training": {"allocator": "system"}}).training, on_cpu=True) is None


def test_which_runs_want_tbbmalloc():
    def wants(**training) -> bool:
        return memory.wants_tbbmalloc(load_config({"training": training}).training)

    assert wants() and wants(rows_per_pass=2)
    # checkpointing runs on tbbmalloc too (glibc's return-at-once mode was ~5-8% lower and ~30% slower)
    assert wants(gradient_checkpointing=True) and wants(gradient_checkpointing=True, release_memory=False)
    assert not wants(gradient_checkpointing=True, release_memory=True)  # glibc's mode, asked for
    assert wants(gradient_checkpointing=True, allocator="tbbmalloc")
    assert not wants(allocator="system")


def test_freed_memory_is_returned_at_once_by_default_only_on_glibc_with_checkpointing(monkeypatch):
    def releases(allocator: str, **training) -> bool:
        monkeypatch.setattr(memory, "active_allocator", lambda: allocator)
        return memory.releases_memory(load_config({"training": training}).training)

    assert releases("system", gradient_checkpointing=True)  # the low-memory setting on glibc: its pinned mode
    assert not releases("tbbmalloc", gradient_checkpointing=True)  # nothing to pin: tbbmalloc hands blocks back
    assert not releases("system") and not releases("system", gradient_checkpointing="auto")
    assert releases("tbbmalloc", release_memory=True) and not releases("system", gradient_checkpointing=True,
                                                                       release_memory=False)  # fmt: skip


@needs_tbb
def test_train_command_runs_on_tbbmalloc_with_the_same_numbers(tiny_dir, data_file, tmp_path):
    import tunelab

    raw = {
        "model": {"name": tiny_dir},
        "data": {"train": data_file, "packing": True, "max_length": 64},
        "method": {"name": "lora", "r": 4},
        # one thread on both sides: the suite's process runs torch on one thread (conftest), a fresh one on all
        # cores, and a different number of thread shares rounds differently, which Adam's first step amplifies
        "training": {"max_steps": 2, "progress": False, "tensorboard": False, "threads": 1},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "tunelab", "train", str(tmp_path / "c.yaml"), "--output-dir", str(tmp_path / "cli")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "allocator: tbbmalloc" in proc.stderr
    on_tbb = json.loads((tmp_path / "cli" / "results.json").read_text())

    in_process = tunelab.train(load_config({**raw, "output_dir": str(tmp_path / "api")}))  # glibc's malloc
    assert memory.active_allocator() == "system"
    assert on_tbb["steps"] == in_process.metrics["steps"] == 2
    assert on_tbb["train_loss"] == pytest.approx(in_process.metrics["train_loss"], abs=1e-6)


@needs_tbb
def test_a_failed_restart_trains_on(monkeypatch, capsys):
    def refuse(*args):
        raise PermissionError("not executable")

    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("TUNELAB_ALLOCATOR", raising=False)
    monkeypatch.setattr(memory.os, "execve", refuse)
    assert memory.restart_with_tbbmalloc(["train", "c.yaml"]) is None
    assert "could not restart on tbbmalloc" in capsys.readouterr().err


def test_a_lora_process_imports_peft_without_bitsandbytes_and_a_qlora_one_keeps_it():
    code = """
import json, sys
from tunelab.config import load_config
from tunelab.accel.memory import skip_unused_imports
qlora = skip_unused_imports(load_config({"method": {"name": "qlora"}}))
lora = skip_unused_imports(load_config({"method": {"name": "lora"}}))
from peft import LoraConfig, get_peft_model  # peft itself still imports and works
from peft.import_utils import is_bnb_available
try:
    import bitsandbytes  # noqa: F401
    blocked = False
except ImportError:
    blocked = True
no_scipy = "scipy" not in sys.modules  # transformers' model code came in without scipy.optimize
import sklearn.metrics  # noqa: F401  # scipy itself still imports
print(json.dumps([qlora, lora, is_bnb_available(), blocked, skip_unused_imports(load_config({})), no_scipy,
                  "scipy" in sys.modules]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    # qlora: left alone; lora: done, so peft finds no bitsandbytes; once peft is in, nothing more is done
    assert json.loads(out.strip().splitlines()[-1]) == [False, True, False, True, False, True, True]


@needs_tbb
def test_the_cache_cleaner_runs_on_tbbmalloc_only():
    """After each step the loop hands tbbmalloc's cached blocks back once the resident set has grown past the
    slack since the last hand-back; on glibc there is nothing to call."""
    assert memory.active_allocator() == "system" and memory.cache_cleaner() is None
    code = ("import torch; from tunelab.accel import memory; clean = memory.cache_cleaner(); "
            "wide = memory.cache_cleaner(slack=2**40); tight = memory.cache_cleaner(slack=0); "
            "x = torch.ones(2**25); del x; out = [memory.active_allocator(), clean(), wide(), wide(), tight()]; "
            "kept = [torch.ones(2**24) for _ in range(4)]; out.append(tight()); print(*out)")  # fmt: skip
    env = memory.allocator_environment()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # TBBMALLOC_OK (0) when it cleans: always the first time, then only past the slack (256 MB were taken)
    assert proc.stdout.split() == ["tbbmalloc", "0", "0", "None", "0", "0"]


def test_hand_backs_in_the_backward_pass_fire_at_evenly_spaced_layers_and_leave_the_gradients():
    """Where most weights train the loop hands tbbmalloc's cache back three times a backward pass, as it reaches
    layers 1/4, 2/4 and 3/4 of the way down (hooks on their inputs): never in a pass without gradients, and the
    gradients are those without the hooks."""
    import copy

    import torch

    from tunelab.testing import tiny_causal

    torch.manual_seed(0)
    model = tiny_causal("llama", 64, num_hidden_layers=8)
    plain = copy.deepcopy(model)
    calls = []
    assert memory.hand_back_in_backward(model, lambda: calls.append(1)) == 3
    assert memory.hand_back_in_backward(tiny_causal("llama", 64, num_hidden_layers=2), calls.append) == 0
    x = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        model(input_ids=x)
    assert calls == []
    model(input_ids=x, labels=x).loss.backward()
    assert len(calls) == 3
    plain(input_ids=x, labels=x).loss.backward()
    for a, b in zip(model.parameters(), plain.parameters()):
        assert torch.equal(a.grad, b.grad)


@needs_tbb
def test_a_full_fine_tuning_run_on_tbbmalloc_hands_back_in_its_backward_passes(data_file, tmp_path):
    from tunelab.testing import save_tiny_model_dir

    tiny_dir = save_tiny_model_dir(tmp_path / "model", num_hidden_layers=8)
    code = ("import sys, tunelab; r = tunelab.train({'output_dir': sys.argv[1], 'model': {'name': sys.argv[2]}, "
            "'data': {'train': sys.argv[3], 'val_fraction': 0, 'max_length': 48}, 'method': {'name': 'full'}, "
            "'training': {'max_steps': 2, 'batch_size': 4, 'progress': False, 'tensorboard': False}}); "
            "print(r.metrics['steps'])")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run"), str(tiny_dir), data_file],
                          capture_output=True, text=True, env=memory.allocator_environment(), timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == "2"
    assert "cached blocks handed back 3 times in each backward pass" in proc.stderr


@pytest.mark.parametrize("training, restarts", [({}, True), ({"allocator": "system"}, False)])
def test_the_compare_command_restarts_on_tbbmalloc_as_train_does(tmp_path, monkeypatch, training, restarts):
    """`tunelab compare` restarts itself on tbbmalloc when the grid's base training settings want it, so the
    cells' processes (forked from its forkserver) run on it; not from Python, and not for --only-report."""
    import argparse

    from tunelab.compare import cli

    grid = {"models": [{"name": "m"}], "methods": [{"name": "lora"}], "tasks": [{"name": "sst2"}],
            "base": {"training": training}}  # fmt: skip
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    calls = []
    monkeypatch.setattr(memory, "restart_with_tbbmalloc", calls.append)

    def args(**kw):
        base = {"grid": str(tmp_path / "grid.yaml"), "only_report": False, "executor": "local",
                "program_argv": ["compare", "grid.yaml"]}  # fmt: skip
        return argparse.Namespace(**{**base, **kw})

    cli._restart_on_tbbmalloc(args())
    assert calls == ([["compare", "grid.yaml"]] if restarts else [])
    for other in (args(program_argv=None), args(only_report=True), args(executor="ray")):
        cli._restart_on_tbbmalloc(other)
    assert len(calls) == int(restarts)
