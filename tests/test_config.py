"""Config validation: defaults, overrides, and errors that name the key, the line and the fix."""

from pathlib import Path

import pytest

from tunelab.config import ConfigError, load_config, reference_markdown


def test_defaults_are_complete_and_lora_is_the_default_method():
    cfg = load_config()
    assert cfg.model.name == "smollm2-135m-instruct"
    assert cfg.method.name == "lora" and cfg.method.r == 16 and cfg.method.target_modules == "all-linear"
    assert cfg.training.scheduler == "cosine"


def test_overrides_parse_yaml_values():
    cfg = load_config(
        {"method": {"name": "lora"}},
        ["training.lr=1e-4", "method.target_modules=[q_proj, v_proj]", "data.packing=true"],
    )
    assert cfg.training.lr == 1e-4
    assert cfg.method.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.packing is True


def test_method_section_switches_type():
    cfg = load_config({"method": {"name": "freeze", "last_k": 3}})
    assert cfg.method.last_k == 3
    with pytest.raises(ConfigError, match="unknown key 'method.r'"):
        load_config({"method": {"name": "freeze", "r": 3}})


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"traning": {}}, "unknown key 'traning'. Did you mean 'training'?"),
        ({"training": {"learning_rate": 1}}, "Did you mean 'lr'?"),
        ({"method": {"name": "lora", "rank": 4}}, "unknown key 'method.rank'. Did you mean 'r'?"),
        ({"method": {"name": "lorra"}}, "unknown method name 'lorra'"),
        ({"data": {"columns": {"outptu": "y"}}}, "Did you mean 'output'?"),
        ({"training": {"lr": -1}}, "training.lr: Input should be greater than 0"),
        ({"stage": "pretrain", "data": {"format": "instruction"}}, "stage: pretrain needs data.format: text"),
    ],
)
def test_bad_configs_are_named(raw, expected):
    with pytest.raises(ConfigError) as e:
        load_config(raw)
    assert expected in str(e.value)


def test_yaml_errors_point_at_the_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  name: x\nmethod:\n  name: lora\n  lora_alpha: 8\n")
    with pytest.raises(
        ConfigError,
        match=r"c.yaml: invalid config\n  - unknown key 'method.lora_alpha' \(line 5\). Did you mean 'alpha'",
    ):
        load_config(p)
    p.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="line 2"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["training.lr"])


def test_examples_validate():
    from tunelab.compare import load_grid

    for path in sorted(Path(__file__).resolve().parents[1].glob("examples/*.yaml")):
        load_grid(path) if path.name.startswith("compare-") else load_config(path)


def test_configuration_reference_is_up_to_date():
    doc = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    assert doc.read_text() == reference_markdown(), "regenerate: python -m tunelab.config > docs/configuration.md"


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_an_empty_config_file_is_refused_not_read_as_all_defaults(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"run.yaml: the config file is empty"):
        load_config(str(path))
    (tmp_path / "explicit.yaml").write_text("{}\n")  # an explicit empty mapping still means every default
    assert load_config(str(tmp_path / "explicit.yaml")).stage == "sft"


def test_nproc_below_one_is_a_named_error(capsys):
    from tunelab.cli import main

    assert main(["train", "--nproc", "0", "--set", "training.max_steps=1"]) == 2
    assert "--nproc 0: the number of processes must be 1 or more" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--set", "training.lr=[1,"], "the value is not valid YAML"),
        (
            ["--set", "training.device=bogus"],
            "training.device (--set training.device=bogus): String should match pattern",
        ),
        (["--set", "training.device=cuda:0"], "device 'cuda:0': this machine has no cuda device"),
        (["--set", "output_dir={tmp}/afile/run"], "cannot write the run folder (Not a directory)"),
        (["--set", "method.name=lora", "--set", "method.target_modules=[nothere]"], "its linear layers are named"),
    ],
    ids=["bad-set", "bogus-device", "absent-cuda", "output-under-a-file", "lora-targets"],
)
def test_malformed_train_calls_are_one_named_line(argv, message, tmp_path, capsys, monkeypatch):
    import json

    import torch

    from tunelab.cli import main
    from tunelab.testing import save_tiny_model_dir

    if "cuda:0" in argv[-1] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.delenv("TUNELAB_DEVICE", raising=False)
    (tmp_path / "afile").write_text("x")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"hi {i}", "output": "yo"}) + "\n" for i in range(8)))
    base = ["--set", f"model.name={save_tiny_model_dir(tmp_path / 'm')}", "--set", f"data.train={data}",
            "--set", "training.max_steps=1", "--set", "training.progress=false", "--output-dir", str(tmp_path / "run")]  # fmt: skip
    argv = [a.format(tmp=tmp_path) for a in argv]
    if "output_dir" in argv[-1]:
        base = base[:-2]
    assert main(["train", *base, *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err
    assert message.lower() in err.lower(), err


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_virtual_token_methods_refuse_packing(method):
    # PEFT ignores position_ids for these models: packed examples would attend to each other
    with pytest.raises(ConfigError, match=f"method {method} cannot pack.*data.packing: false"):
        load_config({"method": {"name": method}, "data": {"packing": True}})
    assert load_config({"method": {"name": method}, "data": {"packing": False}}).method.name == method
    assert load_config({"method": {"name": "lora"}, "data": {"packing": True}}).data.packing


def test_dpo_refuses_packing():
    with pytest.raises(ConfigError, match="stage: dpo does not pack.*data.packing: false"):
        load_config({"stage": "dpo", "data": {"packing": True}})
    assert not load_config({"stage": "dpo"}).data.packing


def test_prefix_tuning_refuses_gradient_checkpointing():
    # transformers' checkpointed layers set the KV cache that carries the prefix to None
    with pytest.raises(ConfigError, match="method prefix cannot train with gradient checkpointing"):
        load_config({"method": {"name": "prefix"}, "training": {"gradient_checkpointing": True}})
    for setting in ("auto", False):
        assert load_config({"method": {"name": "prefix"}, "training": {"gradient_checkpointing": setting}})
    assert load_config({"method": {"name": "prompt"}, "training": {"gradient_checkpointing": True}})
