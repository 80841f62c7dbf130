"""`tunelab methods`: every registered method counted on a model built from its config (meta device)."""

import pytest

from tunelab.cli import main as cli_main
from tunelab.methods import names
from tunelab.methods.summary import method_table
from tunelab.testing import save_tiny_model_dir, tiny_llama


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("model"))


def test_method_table_counts_each_method(tiny_dir):
    rows = {r["method"]: r for r in method_table(tiny_dir)}
    assert list(rows) == names()  # new methods appear automatically
    base_total = sum(p.numel() for p in tiny_llama().parameters())  # tied: counted once
    full = rows["full"]
    assert full["trainable"] == full["total"] == base_total and full["percent"] == 100.0
    block = sum(p.numel() for p in tiny_llama().model.layers[0].parameters())
    assert rows["freeze"]["trainable"] == 2 * block  # default last_k 2 = both tiny blocks
    assert rows["gradual"]["trainable"] == block + 32  # top block + final norm
    assert rows["head"]["trainable"] == 32  # tied LM head: the final norm only
    assert 0 < rows["lora"]["trainable"] < rows["lora"]["total"]
    for r in rows.values():
        assert isinstance(r["mergeable"], bool) and r["trains"] and r["inference_cost"]
        assert r["trainable"] is not None or r["note"].startswith("n/a")


def test_method_table_reports_a_failing_method_as_na(tiny_dir, monkeypatch):
    from tunelab.methods import registry

    def broken(model, cfg):
        raise RuntimeError("cannot do that here")

    monkeypatch.setattr(registry.get("gradual"), "apply", broken)
    row = {r["method"]: r for r in method_table(tiny_dir)}["gradual"]
    assert row["trainable"] is None and row["note"] == "n/a: RuntimeError: cannot do that here"


def test_cli_methods(tiny_dir, capsys):
    assert cli_main(["methods", "--model", tiny_dir]) == 0
    out = capsys.readouterr().out
    for name in names():
        assert f"\n{name} " in out
    assert "mergeable" in out and "inference cost" in out


def test_meta_model_keeps_the_callers_config(tiny_dir):
    from transformers import AutoConfig

    from tunelab.methods import get
    from tunelab.methods.summary import meta_model
    from tunelab.models.heads import with_task_head

    config = AutoConfig.from_pretrained(tiny_dir)
    model = get("head").apply(meta_model(config), get("head").Config(extra_blocks=1, untie_head=True))
    assert model.config.num_hidden_layers == 3 and config.num_hidden_layers == 2 and config.tie_word_embeddings
    clf = with_task_head(meta_model(config), "classification", num_labels=3)  # works on meta tensors too
    assert clf.score.weight.is_meta and clf.score.weight.shape == (3, 32)


@pytest.mark.slow
def test_readme_trainable_counts_are_the_computed_ones():
    """The README's methods table types its "trainable (default model)" figures; they must be what
    `tunelab methods` computes on the default model, to the precision written (a figure a change of
    defaults would make stale fails here)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    computed = {r["method"]: r["trainable"] for r in method_table("smollm2-135m-instruct")}
    scale = {"": 1, "K": 1e3, "M": 1e6}
    checked = 0
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or not re.fullmatch(r"`[a-z0-9]+`", cells[1]):
            continue
        name, figure = cells[1].strip("`"), re.match(r"([\d.]+)([KM]?)", cells[3])
        if name not in computed or figure is None:
            continue
        digits, unit = figure.groups()
        value = float(digits) * scale[unit]
        half_step = 0.5 * 10 ** -len(digits.partition(".")[2]) * scale[unit]
        assert abs(value - computed[name]) <= half_step, (
            f"README says {cells[3]!r} for {name}; computed {computed[name]:,}"
        )
        checked += 1
    assert checked == len(computed), (checked, sorted(computed))


def test_cli_methods_table_matches_each_method_applied_to_real_weights(tiny_dir, capsys):
    """The printed table, cell by cell: every registered method once, its trainable count and % as the
    method's default Config gives on the tiny model with real weights (summary.py counts on the meta device;
    qlora needs 4-bit weights and is counted as lora, as its note says), mergeable as declared."""
    from transformers import AutoModelForCausalLM

    from tunelab.methods import get

    assert cli_main(["methods", "--model", tiny_dir]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("method "))
    bounds, start = [], 0
    for dashes in lines[header + 1].split("  "):  # the dash row gives each column's width
        bounds.append((start, start + len(dashes)))
        start += len(dashes) + 2
    rows = {}
    for ln in lines[header + 2 :]:
        if not ln.strip():
            break
        cells = [ln[a:b].strip() for a, b in bounds[:-1]] + [ln[bounds[-1][0] :].strip()]
        rows[cells[0]] = cells
    assert list(rows) == names()
    base_total = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_dir).parameters())
    for name, (_, trains, trainable, percent, mergeable, cost) in rows.items():
        mod = get("lora" if name == "qlora" else name)
        model = mod.apply(AutoModelForCausalLM.from_pretrained(tiny_dir), mod.Config())
        expected = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert int(trainable.replace(",", "")) == expected, name
        assert float(percent) == pytest.approx(100 * expected / base_total, rel=1e-2), name
        assert mergeable == ("yes" if get(name).CAPABILITIES.mergeable else "no") and trains == get(name).DESCRIPTION
        assert cost == get(name).INFERENCE_COST
