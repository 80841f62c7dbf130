"""training.pass_threads > 1 where thread shares cannot run is refused before the model loads: from the config
alone (an explicit non-CPU device; LoRA dropout with gradient_checkpointing: true), else from the device and the
process count, before the run folder. The model path below does not exist: had anything tried to load it, the
error would be about the model."""

import subprocess
import sys

import pytest
import torch

import tunelab
from tunelab.config import ConfigError, load_config

BOGUS_MODEL = "/nonexistent/tunelab-test-model"


def cfg_dict(data_file, out, method=None, **training):
    return {"output_dir": str(out), "model": {"name": BOGUS_MODEL}, "data": {"train": data_file},
            "method": method or {"name": "lora", "r": 4}, "training": {"max_steps": 2, **training}}  # fmt: skip


@pytest.mark.parametrize(
    "method, training, fragment",
    [
        (None, {"device": "cuda", "pass_threads": 2}, "on training.device cuda"),
        ({"name": "lora", "dropout": 0.1}, {"gradient_checkpointing": True, "pass_threads": 2}, "dropout masks"),
    ],
)
def test_the_config_refuses_what_the_loop_would_after_loading(data_file, tmp_path, method, training, fragment):
    with pytest.raises(ConfigError, match=f"training.pass_threads: 2 .*{fragment}"):
        load_config(cfg_dict(data_file, tmp_path / "run", method, **training))
    # what the loop takes passes: shares off, accelerate off (the setting is ignored)
    load_config(cfg_dict(data_file, tmp_path / "run", method, **{**training, "pass_threads": 1}))
    load_config(cfg_dict(data_file, tmp_path / "run", method, **{**training, "accelerate": "off"}))


def test_shares_with_checkpointing_pass_without_dropout_on_the_fast_path(data_file, tmp_path):
    training = {"gradient_checkpointing": True, "pass_threads": 2}
    load_config(cfg_dict(data_file, tmp_path / "run", {"name": "lora", "dropout": 0.0}, **training))
    # qlora: PEFT's own 4-bit LoRA layers, off the fast path
    load_config(cfg_dict(data_file, tmp_path / "run", {"name": "qlora", "dropout": 0.1}, **training))
    load_config(cfg_dict(data_file, tmp_path / "run", {"name": "full"}, **training))


def test_tunelab_train_exits_2_naming_pass_threads_not_the_model(data_file, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "tunelab", "train", "--set", f"model.name={BOGUS_MODEL}", "--set", f"data.train={data_file}",
         "--set", "training.device=cuda", "--set", "training.pass_threads=2", "--set", f"output_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "training.pass_threads: 2" in out.stderr and "nonexistent" not in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("device, processes, where", [("cuda", 1, "on cuda"), ("cpu", 2, "with several processes")])
def test_train_refuses_before_the_run_folder_and_the_load(data_file, tmp_path, monkeypatch, device, processes, where):
    """device: auto that resolves to a GPU, or torchrun's processes: known only when the run starts."""
    import tunelab.training.loop as loop

    monkeypatch.setattr(loop, "resolve_device", lambda spec: torch.device(device))
    monkeypatch.setattr(loop.distributed, "world_size", lambda: processes)
    loads = []
    monkeypatch.setattr(loop, "start_run", lambda *a, **k: loads.append("start_run"))
    cfg = load_config(cfg_dict(data_file, tmp_path / "run", pass_threads=2))
    with pytest.raises(ConfigError, match=f"pass_threads: 2 splits a pass .* {where} set it to null or 1"):
        tunelab.train(cfg)
    assert loads == [] and not (tmp_path / "run").exists()
