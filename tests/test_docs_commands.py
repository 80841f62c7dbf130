"""Every `tunelab ...` command shown in README.md and docs/*.md code blocks still parses: its subcommand, flags
and choices exist (the CLI's own parser), the example configs it names exist, and a `train` / `config` line's
config validates with its `--set` overrides. The quick ones — `--help`, `--version`, `config`, `models`,
`convert`: seconds, no model loaded — are also run as documented (from the repository root) and must exit 0;
running the rest is out of reach of a quick test (many train for minutes). What drifts silently when the code
changes — a renamed flag, a removed choice, an example that moved, a documented command that now fails — is
what this catches.

Only lines in shell code fences (``` with no language, bash, sh) count; redirections are cut off.
Placeholders stay as written (`RUN`, `GRID.yaml`: positional values argparse does not check); optional
groups in brackets (`[--limit N]`) are dropped.
"""

import re
import shlex
from pathlib import Path

import pytest

from tunelab.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_FENCES = ("```", "```bash", "```sh", "```shell", "```console")
REDIRECTS = {">", ">>", "<", "|", "2>", "2>&1", "&>", "&"}


def shell_lines(text: str):
    """(line number, line) of the lines inside shell code fences (``` with no language, or bash / sh)."""
    fence = None
    for n, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = None if fence is not None else stripped
            continue
        if fence in SHELL_FENCES:
            yield n, stripped


def documented_commands() -> list[tuple[str, list[str], dict[str, str]]]:
    """(where, argv, env) of every tunelab command line inside a shell code block of the docs; env: the line's
    leading VAR=value assignments."""
    out = []
    for doc in DOCS:
        for n, line in shell_lines(doc.read_text()):
            # optional groups of a synopsis, outside single quotes (a quoted --set value may be a YAML list)
            line = "'".join(p if i % 2 else re.sub(r"\[[^\]]*\]", "", p) for i, p in enumerate(line.split("'")))
            for part in line.split("&&"):
                try:
                    words = shlex.split(part, comments=True)
                except ValueError:
                    continue  # not shell
                env = {}
                while words and "=" in words[0] and not words[0].startswith("-"):
                    key, value = words.pop(0).split("=", 1)  # leading VAR=value assignments
                    env[key] = value
                cut = next((i for i, w in enumerate(words) if w in REDIRECTS), len(words))
                words = words[:cut]
                if len(words) > 1 and words[0] in ("tunelab", ".venv/bin/tunelab"):
                    out.append((f"{doc.relative_to(ROOT)}:{n}", words[1:], env))
    return out


COMMANDS = documented_commands()


def test_the_docs_show_commands():
    assert len(COMMANDS) > 30  # the scan finds them (README and the guides hold many)


@pytest.mark.parametrize("where, argv, env", COMMANDS, ids=[f"{w}: {' '.join(a)[:60]}" for w, a, _ in COMMANDS])
def test_documented_command_parses(where, argv, env, capsys, monkeypatch):
    if argv[0] in ("-h", "--help") or "--help" in argv or "-h" in argv:
        return  # prints help and exits 0 by design
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        pytest.fail(
            f"{where}: `tunelab {' '.join(argv)}` no longer parses: {capsys.readouterr().err.strip()} (exit {e.code})"
        )
    config = getattr(args, "config", None)
    if config and config.startswith("examples/"):
        path = ROOT / config
        assert path.is_file(), f"{where}: {config} does not exist"
        if args.fn.__name__ in ("cmd_train", "cmd_config") and not config.startswith("examples/compare-"):
            from tunelab.config import ConfigError, load_config

            for key, value in env.items():  # e.g. MLFLOW_TRACKING_URI, which the config check reads
                monkeypatch.setenv(key, value)
            try:
                load_config(path, list(getattr(args, "set", None) or []))  # raises ConfigError naming the problem
            except ConfigError as e:
                if "is not installed: pip install 'tunelab[" in str(e):  # a tracker of an extra this test lacks
                    pytest.skip(f"{where}: {e}")
                raise


# Run as documented: seconds each, no model weights. `methods` is parsed only: it builds every method on the
# default model's architecture (~20 s on a busy 2-core CPU), too slow for this file's budget.
QUICK = ("config", "models", "convert")


def _runnable(argv) -> bool:
    if argv in (["--help"], ["-h"], ["--version"]):
        return True
    if argv[0] not in QUICK or "--help" in argv:
        return False
    args = build_parser().parse_args(argv)
    path = getattr(args, "config", None)
    return path is None or (ROOT / path).is_file()  # a placeholder (GRID.yaml, their.yaml) is parsed only


RUNNABLE = [(w, a, env) for w, a, env in COMMANDS if _runnable(a)]


def test_quick_commands_are_found():
    kinds = {a[0] for _, a, _ in RUNNABLE}
    assert {"--help", "config", "models", "convert"} <= kinds, kinds


@pytest.mark.parametrize("where, argv, env", RUNNABLE, ids=[f"{w}: {' '.join(a)[:60]}" for w, a, _ in RUNNABLE])
def test_quick_documented_command_runs(where, argv, env, capsys, monkeypatch):
    from tunelab.cli import main

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(ROOT)  # as the docs run them: examples/ and ../shared/ relative to the repository
    try:
        rc = main(argv)
    except SystemExit as e:  # --help and --version exit through argparse
        rc = e.code
    out = capsys.readouterr()
    assert rc == 0, f"{where}: `tunelab {' '.join(argv)}` exited {rc}: {out.err.strip()[-600:]}"
    assert out.out.strip(), f"{where}: `tunelab {' '.join(argv)}` printed nothing"
