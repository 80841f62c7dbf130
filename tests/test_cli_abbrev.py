"""No command takes a prefix of a flag for the flag: `tunelab train --res` is an error, not --resume."""

import pytest

from tunelab.cli import all_parsers, build_parser, main


@pytest.mark.parametrize(
    "argv, prefix",
    [
        (["train", "missing.yaml", "--res"], "--res"),  # --resume
        (["generate", "runs/x", "hi", "--max-new", "5"], "--max-new"),  # --max-new-tokens
        (["push", "runs/x", "me/x", "--priv"], "--priv"),  # --private
        (["compare", "grid.yaml", "--retry"], "--retry"),  # --retry-failed (compare's own parser module)
        (["--verb", "models"], "--verb"),  # the top parser's --verbose
    ],
)
def test_a_prefix_of_a_flag_is_refused(argv, prefix, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert f"unrecognized arguments: {prefix}" in capsys.readouterr().err


def test_every_parser_refuses_abbreviations():
    parsers = list(all_parsers(build_parser()))
    assert len(parsers) >= 12
    assert [p.prog for p in parsers if p.allow_abbrev] == []
