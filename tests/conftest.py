import os
import sys
from pathlib import Path

import pytest
import torch

# Tiny models gain nothing from a second thread, and several test processes on a 2-core machine
# (or a busy CI box) slow down badly when each spins two OpenMP threads.
torch.set_num_threads(int(os.environ.get("TUNELAB_TEST_THREADS", "1")))
sys.path.insert(0, str(Path(__file__).parent))  # tests import method_harness


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
