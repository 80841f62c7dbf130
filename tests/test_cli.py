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


def test_config_reads_and_checks_the_data_files(tmp_path, capsys):
    """`tunelab config` meets the data errors `tunelab train` would, before any model: a bad row is exit 2 with
    its file, line and field; good data passes and the config is printed."""
    import json

    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"instruction": f"hi {i}", "output": "yo"}) + "\n" for i in range(4)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text() + json.dumps({"instruction": "no answer"}) + "\n")
    assert main(["config", "--set", f"data.train={good}", "--set", "model.name=/nowhere/model"]) == 0
    io = capsys.readouterr()
    assert f"train: {good}" in io.out and "data read and checked" in io.err
    assert main(["config", "--set", f"data.train={bad}", "--set", "data.format=instruction"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "line 5" in err and "output" in err and "Traceback" not in err


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


# ------------------------------------------------------------------------------------ CLI manners
def test_every_option_of_every_command_has_help_and_shows_its_default():
    import argparse

    from tunelab.cli import all_parsers, build_parser

    parsers = list(all_parsers(build_parser()))
    assert len(parsers) >= 12  # tunelab and each of its 11 commands
    for parser in parsers:
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"{parser.prog} {'/'.join(action.option_strings) or action.dest}: no help text"
        for action in parser._actions:  # a value default is shown (argparse's own, or the help's words)
            if action.option_strings and action.default is not None and action.default is not False:
                if action.default == argparse.SUPPRESS:
                    continue
                formatter = parser._get_formatter()
                formatter.add_argument(action)
                assert "default" in formatter.format_help(), (parser.prog, action.dest)


def test_version_and_no_command():
    run = lambda *a: subprocess.run([sys.executable, "-m", "tunelab", *a], capture_output=True, text=True)  # noqa: E731
    from tunelab import __version__

    v = run("--version")
    assert v.returncode == 0 and v.stdout.strip() == f"tunelab {__version__}"
    bare = run()
    assert bare.returncode == 2 and "usage: tunelab" in bare.stderr and "generate" in bare.stderr and not bare.stdout


def test_one_generation_default_for_generate_chat_and_serve():
    """temperature, top_p and the answer length: the CLI flags, the Python functions and the server's request
    models all take tunelab.inference's defaults (a legacy /v1/completions request keeps OpenAI's 16 tokens)."""
    import inspect
    from types import SimpleNamespace

    from tunelab import inference
    from tunelab.cli import build_parser
    from tunelab.serve.app import budget
    from tunelab.serve.protocol import ChatRequest, CompletionRequest

    want = {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 256}
    assert {k: getattr(inference, f"DEFAULT_{k.upper()}") for k in want} == want
    parser = build_parser()
    for argv in (["generate", "r", "p"], ["chat", "r"]):
        assert {k: getattr(parser.parse_args(argv), k) for k in want} == want, argv
    for fn in (inference.generate, inference.chat):
        assert {k: inspect.signature(fn).parameters[k].default for k in want} == want, fn.__name__
    chat = ChatRequest(model="m", messages=[{"role": "user", "content": "x"}])
    completion = CompletionRequest(model="m", prompt="p")
    for req in (chat, completion):
        assert (req.temperature, req.top_p) == (want["temperature"], want["top_p"])
    # what the chat endpoint generates when max_tokens is left out (budget() as the endpoint calls it)
    from tunelab.serve.protocol import DEFAULT_CHAT_MAX_TOKENS

    assert chat.max_tokens is None and chat.max_completion_tokens is None
    unbounded, roomy = SimpleNamespace(context_length=None), SimpleNamespace(context_length=8192)
    for served in (unbounded, roomy):
        assert budget(served, [1, 2, 3], None, DEFAULT_CHAT_MAX_TOKENS) == want["max_new_tokens"]
    assert budget(SimpleNamespace(context_length=100), [1] * 90, None, DEFAULT_CHAT_MAX_TOKENS) == 10
    assert completion.max_tokens == 16


def test_generation_flags_refuse_bad_values(capsys):
    from tunelab.cli import main

    for flag in (["--top-p", "0"], ["--top-p", "1.5"], ["--top-p", "nan"], ["--temperature", "-1"]):
        assert main(["generate", "no-such-run", "hi", *flag]) == 2, flag
        assert f"error: {flag[0]} {float(flag[1])}: must be" in capsys.readouterr().err, flag


def test_generate_on_a_lora_run_prints_only_the_answer(tmp_path):
    """`tunelab generate RUN "hi"` as a user runs it: stdout is the answer alone; stderr holds tunelab's own
    lines only (no weight-loading bars, no FutureWarnings), and bitsandbytes is never imported."""
    import tunelab
    from tunelab.testing import save_tiny_model_dir

    base = save_tiny_model_dir(tmp_path / "model")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {i}.", "input": "", "output": f"It is {i}."}) + "\n"
                            for i in range(8)))  # fmt: skip
    cfg = tunelab.load_config({"output_dir": str(tmp_path / "run"), "model": {"name": base},
                               "data": {"train": str(data), "val_fraction": 0.25, "max_length": 32},
                               "method": {"name": "lora", "r": 2},
                               "training": {"max_steps": 1, "batch_size": 2, "progress": False, "tensorboard": False}})  # fmt: skip
    run = str(tunelab.train(cfg).run_dir)
    out = subprocess.run([sys.executable, "-m", "tunelab", "generate", run, "hi", "--max-new-tokens", "4"],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) <= 1  # the answer (a random tiny model's, possibly empty), nothing else
    noise = [ln for ln in out.stderr.splitlines() if not ln.startswith(("[tunelab]", "tunelab:"))]
    assert noise == []
    probe = (f"import sys; sys.argv = ['tunelab', 'generate', {run!r}, 'hi', '--max-new-tokens', '2']; "
             "from tunelab.cli import main; main(); print('bitsandbytes' in sys.modules and sys.modules['bitsandbytes'] is not None)")  # fmt: skip
    probe_out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert probe_out.stdout.splitlines()[-1] == "False", probe_out.stderr
    verbose = subprocess.run([sys.executable, "-m", "tunelab", "-v", "generate", run, "hi", "--max-new-tokens", "2"],
                             capture_output=True, text=True)  # fmt: skip
    assert "Loading weights" in verbose.stderr  # -v shows what the quiet default hides
