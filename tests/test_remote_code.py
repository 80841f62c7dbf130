"""No code runs from a run folder or a model folder unless the user says so (issue 24, item 1).

The planted attack: a shared run whose final/tunelab.json sets `trust_remote_code: true`, next to a model
folder that ships its own Python file. Loading that run must not import the file, for every command that
loads runs (generate, chat, eval, export, serve), and the refusal must say how to allow it.
"""

import json

import pytest

from tunelab.cli import main
from tunelab.config import ModelConfig

EVIL = """
import pathlib
pathlib.Path(__file__).with_name("EXECUTED").write_text("the model folder's code ran")
from transformers import LlamaConfig, LlamaForCausalLM


class EvilConfig(LlamaConfig):
    model_type = "evil"


class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
"""


@pytest.fixture
def planted(tmp_path):
    from tunelab.testing import save_tiny_model_dir

    model = tmp_path / "model"
    save_tiny_model_dir(model, arch="llama")
    cfg = json.loads((model / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(cfg))
    (model / "evil.py").write_text(EVIL)
    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    base = ModelConfig(name=str(model), trust_remote_code=True).model_dump()
    (final / "tunelab.json").write_text(json.dumps({"method": "full", "base_model": base, "stage": "sft"}))
    return tmp_path / "run", model / "EXECUTED"


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "{run}", "hello"],
        ["chat", "{run}"],
        ["eval", "{run}", "--task", "sst2"],
        ["export", "{run}"],
        ["serve", "{run}", "--port", "1"],
    ],
    ids=["generate", "chat", "eval", "export", "serve"],
)
def test_a_run_folder_cannot_turn_on_remote_code(planted, argv, capsys, monkeypatch):
    from tunelab.data import tasks

    run, marker = planted
    monkeypatch.setattr(tasks, "load_split", lambda *a, **k: [{"text": "fine", "text_pair": None, "label": 1}])
    code = main([a.format(run=run) for a in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert "trust_remote_code: true" in err and "--trust-remote-code" in err, err
    assert "Traceback" not in err
    assert not marker.exists()


def test_the_users_flag_is_what_reaches_the_loader(planted, monkeypatch):
    """With --trust-remote-code the manifest's request is honoured: the loader is told so by the user."""
    from tunelab.stages import runs

    run, _ = planted
    seen = []

    def fake_load_model(cfg, device=None, **kw):
        seen.append(cfg.trust_remote_code)
        raise RuntimeError("stop here")

    monkeypatch.setattr(runs, "load_model", fake_load_model)
    with pytest.raises(RuntimeError, match="stop here"):
        runs.load_run(str(run), device="cpu", trust_remote_code=True)
    assert seen == [True]
    seen.clear()
    with pytest.raises(RuntimeError, match="stop here"):  # a plain spec: the caller's setting, default off
        runs.load_run(str(planted[0].parent / "model"), device="cpu")
    assert seen == [False]
