"""CLI commands that are not training: help, models, config, chat."""

import builtins
import json
import subprocess
import sys

from tunelab.cli import main


def test_help_lists_commands_and_is_fast():
    out = subprocess.run([sys.executable, "-m", "tunelab", "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("train", "generate", "chat", "models", "config"):
        assert cmd in out
    code = "import sys, tunelab.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_models_lists_the_named_defaults(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path))
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert {"smollm2-135m-instruct", "minilm-l6"} <= set(rows)
    assert rows["smollm2-135m-instruct"]["cached"] is False
    assert main(["models"]) == 0
    assert "licence" in capsys.readouterr().out


def test_config_prints_every_default(capsys):
    assert main(["config", "--set", "method.r=4"]) == 0
    out = capsys.readouterr().out
    assert "r: 4" in out and "max_grad_norm: 1.0" in out


def test_chat_keeps_history_and_streams(tmp_path, monkeypatch, capsys):
    from tunelab.inference import chat
    from tunelab.testing import tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_llama(len(tok))
    seen = []
    import tunelab.inference as inf

    real_generate = inf.generate

    def spy(model, tokenizer, messages, *a, **kw):
        seen.append([m["content"] for m in messages])
        return real_generate(model, tokenizer, messages, *a, **kw)

    monkeypatch.setattr(inf, "generate", spy)
    answers = iter(["hello", "and again", ""])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(answers))
    chat(model, tok, max_new_tokens=3, temperature=0.0)
    assert len(seen) == 2 and seen[1][0] == "hello" and seen[1][-1] == "and again" and len(seen[1]) == 3


def test_an_internal_error_is_one_line_without_v_and_a_traceback_with_it(monkeypatch, capsys):
    import pytest

    from tunelab import cli

    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "cmd_models", broken)
    assert cli.main(["models"]) == 1
    err = capsys.readouterr().err
    assert "internal error: RuntimeError: a bug" in err and "-v" in err and "Traceback" not in err
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["-v", "models"])
