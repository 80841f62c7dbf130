"""The suite's own summary lines (tests/conftest.py `pytest_terminal_summary`)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_summary_survives_a_module_skipped_whole():
    """`make test` before `make llama-cpp`: tests/test_llama_cpp.py skips as a whole module, and the report of a
    module skipped at collection has no keywords. The summary hook raised AttributeError on it, so the run ended
    in a traceback with exit status 1 after every test had passed (CI builds llama.cpp first and never saw it)."""
    code = (
        "import sys; sys.modules['llama_cpp'] = None; import pytest; "  # as if llama-cpp-python were not installed
        "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', 'tests/test_llama_cpp.py', "
        "'tests/test_stats.py::test_vectorised_mean_matches_generic_bootstrap']))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TUNELAB_REQUIRE_LLAMA_CPP", "TUNELAB_REQUIRE_BROWSER")}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "llama.cpp runtime tests (tests/test_llama_cpp.py): 0 passed, 0 failed, 1 skipped, 0 error" in done.stdout
    assert "1 passed, 1 skipped" in done.stdout
