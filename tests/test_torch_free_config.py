"""Checking a config imports no torch: `tunelab config` and the validation `tunelab train` runs first read every
method's settings schema (methods/*.py `Config`) and, for `tunelab config`, the stage's data check, and torch
(seconds to import) is only imported where a model is built or run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# from-scratch configs are left out: transformers' config classes (model.architecture's check) import torch
RUN_EXAMPLES = sorted(
    p.name
    for p in (ROOT / "examples").glob("*.yaml")
    if "architecture:" not in p.read_text() and not p.name.startswith("compare-")
)


def run_python(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_every_method_schema_and_example_config_load_without_torch():
    code = (
        "import sys\n"
        "from tunelab.config import load_config\n"
        "from tunelab.methods.registry import capabilities, config_classes, names\n"
        f"for name in {RUN_EXAMPLES!r}:\n"
        "    load_config('examples/' + name)\n"
        "print(len(config_classes()), [capabilities(n).mergeable for n in names()].count(True))\n"
        "print('torch' in sys.modules)\n"
    )
    assert len(RUN_EXAMPLES) >= 10
    out = run_python(code, ROOT)
    assert out.returncode == 0, out.stderr
    counts, torch_loaded = out.stdout.split("\n")[:2]
    from tunelab.methods.registry import capabilities, names

    assert counts == f"{len(names())} {[capabilities(n).mergeable for n in names()].count(True)}"
    assert torch_loaded == "False"


def test_tunelab_config_checks_the_data_without_torch(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"say {i}", "output": f"{i}"}) + "\n" for i in range(4)))
    code = (
        "import sys\n"
        "from tunelab.cli import main\n"
        f"rc = main(['config', 'examples/sft-lora.yaml', '--set', 'data.train={data}'])\n"
        "print(rc, 'torch' in sys.modules)\n"
    )
    out = run_python(code, ROOT)
    assert out.returncode == 0, out.stderr
    assert "data read and checked for stage sft" in out.stderr
    assert out.stdout.strip().splitlines()[-1] == "0 False"


@pytest.mark.parametrize("setting", ["method.r=0", "training.bogus=1"])
def test_train_refuses_a_bad_config_before_importing_torch(setting):
    code = (
        "import sys\n"
        "from tunelab.cli import main\n"
        f"rc = main(['train', 'examples/sft-lora.yaml', '--set', {setting!r}])\n"
        "print(rc, 'torch' in sys.modules)\n"
    )
    out = run_python(code, ROOT)
    assert out.stdout.strip() == "2 False", out.stderr
    assert setting.split("=")[0].split(".")[-1] in out.stderr


def test_compare_fits_its_references_and_picks_its_executor_without_torch(tmp_path):
    """`tunelab compare`'s own process imports no torch (its cells' process server does): its references (majority,
    TF-IDF), their metrics and the executor's choice run beside the server's imports instead of before them, where
    they cost a tiny grid 16 s of its 38 on 2 cores."""
    rows = [
        {"text": f"{w} {w} the film", "label": int(w in ("good", "great"))}
        for w in ["good", "bad", "great", "awful"] * 4
    ]
    for split in ("train", "dev"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    grid = {"output_dir": str(tmp_path / "out"), "baselines": ["tfidf"], "models": [{"name": "unused/model"}],
            "methods": [{"name": "lora"}],
            "tasks": [{"name": "reviews", "labels": ["negative", "positive"], "train_file": str(tmp_path / "train.jsonl"),
                       "dev_file": str(tmp_path / "dev.jsonl")}]}  # fmt: skip
    code = (
        "import sys, os\n"
        "from pathlib import Path\n"
        "import tunelab.compare.run\n"
        "from tunelab.compare.executors import LocalExecutor, executor_for\n"
        "from tunelab.compare.grid import load_grid\n"
        "from tunelab.compare.references import references_for, run_reference\n"
        f"g = load_grid({grid!r})\n"
        "t = g.tasks[0]\n"
        "for kind in references_for(g):\n"
        "    print(kind, run_reference(kind, g, t, Path(g.output_dir) / kind)['metrics']['accuracy'])\n"
        "gpu = any(os.path.exists(d) for d in ('/dev/nvidiactl', '/dev/kfd', '/dev/dxg'))\n"
        "print(executor_for('local').start_method if not gpu else 'forkserver')\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    out = run_python(code, ROOT)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "False False", out.stdout
    assert lines[-2] == "forkserver" and len(lines) >= 4  # majority and the TF-IDF fits
    assert lines[0] == "majority 0.5"  # 8 of the 16 dev rows are positive
