import os
import sys
from pathlib import Path

import pytest
import torch

# Tiny models gain nothing from a second thread, and several test processes on a 2-core machine
# (or a busy CI box) slow down badly when each spins two OpenMP threads.
torch.set_num_threads(int(os.environ.get("TUNELAB_TEST_THREADS", "1")))
sys.path.insert(0, str(Path(__file__).parent))  # tests import method_harness
# `model.dtype: auto` trains LoRA in bf16 on a CPU with native bf16 (tunelab/models/precision.py). The suite's
# expectations are fp32's, as on the CI hosts without it, on every host and in subprocesses alike; the tests of
# bf16 ask for it (tests/test_bf16.py, tests/test_precision.py). Set before anything imports tunelab.
os.environ["TUNELAB_CPU_BF16_AUTO"] = "0"

from ui_browser import browser_page, chromium_browser  # noqa: E402, F401  (the web UI's browser tests: tests/ui_browser.py)

# `device: auto` means CPU in the suite, also on a GPU machine (subprocesses inherit it), so results and
# tolerances are the CPU's everywhere; tests/test_cuda.py (marker `cuda`) covers the CUDA paths. Set at
# import, not in a fixture, because module-scoped fixtures train before function-scoped ones run.
os.environ.setdefault("TUNELAB_DEVICE", "cpu")


@pytest.fixture(autouse=True)
def _auto_device_for_cuda_tests(request, monkeypatch):
    if request.node.get_closest_marker("cuda") is not None:
        monkeypatch.delenv("TUNELAB_DEVICE", raising=False)


# An instruction-tuning file and a tiny model folder for the tests that train end to end
# (test_training, test_cuda; modules with other needs define their own `tiny_dir`).
SFT_ROWS = [
    {"instruction": f"Say the number {i}.", "input": "", "output": f"The number is {i}."} for i in range(24)
] + [{"instruction": "Greet me.", "input": "in French", "output": "Bonjour!"} for _ in range(8)]


@pytest.fixture()
def empty_home(tmp_path, monkeypatch):
    """An empty TUNELAB_HOME for the test (the tokenizer and data caches), never the user's. A module whose
    every test needs it says `pytestmark = pytest.mark.usefixtures("empty_home")`."""
    home = tmp_path / "home"
    monkeypatch.setenv("TUNELAB_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tunelab.testing import save_tiny_model_dir

    return save_tiny_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture()
def data_file(tmp_path):
    import json

    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in SFT_ROWS))
    return str(path)


def pytest_collection_modifyitems(config, items):
    for item in items:  # the web UI's tests in a real browser (tests/ui_browser.py), counted in the summary
        if "chromium_browser" in getattr(item, "fixturenames", ()):
            item.add_marker("browser")


def pytest_terminal_summary(terminalreporter):
    """One line saying how the llama.cpp runtime tests went, one for the browser tests of the web UI (CI must
    show both run, not skipped)."""
    # a module skipped whole (test_llama_cpp.py without llama-cpp-python) reports as a CollectReport: no keywords
    browser = {k: sum("browser" in getattr(r, "keywords", ()) for r in terminalreporter.stats.get(k, []))
               for k in ("passed", "failed", "skipped", "error")}  # fmt: skip
    if any(browser.values()) or os.environ.get("TUNELAB_REQUIRE_BROWSER"):
        terminalreporter.write_line(
            "web UI browser tests (tests/ui_browser.py, Chromium): " + ", ".join(f"{n} {k}" for k, n in browser.items())
        )
    counts = {}
    for outcome in ("passed", "failed", "skipped", "error"):
        counts[outcome] = sum("test_llama_cpp.py" in r.nodeid for r in terminalreporter.stats.get(outcome, []))
    if any(counts.values()) or os.environ.get("TUNELAB_REQUIRE_LLAMA_CPP"):
        import importlib.util

        have = importlib.util.find_spec("llama_cpp") is not None
        terminalreporter.write_line(
            "llama.cpp runtime tests (tests/test_llama_cpp.py): "
            + ", ".join(f"{n} {k}" for k, n in counts.items())
            + ("" if have else "  (llama-cpp-python not installed: make llama-cpp)")
        )


def pytest_configure(config):
    # Started in the background of a non-interactive shell (`cmd &`, nohup, some CI runners), Python inherits
    # SIGINT as ignored and installs no KeyboardInterrupt handler, so the tests that send themselves Ctrl-C
    # would see nothing happen (found in a .ci/run started with `&`). They test what a terminal gives.
    import signal

    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
