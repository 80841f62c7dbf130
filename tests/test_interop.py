"""Other toolkits' configs: every LLaMA-Factory and Axolotl example in ../shared/peer-configs is translated
(its keys checked), and those whose stage tunelab has run 2 steps on a tiny model with local demo data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tunelab import peer_keys as keys
from tunelab.config import ConfigError, load_config
from tunelab.data.tasks import shared_data_dir
from tunelab.interop.convert import convert_file, detect, load_any, translate

PEERS = shared_data_dir().parent / "peer-configs"
DEMO = shared_data_dir() / "llamafactory-demo"
needs_peers = pytest.mark.skipif(not (PEERS.is_dir() and DEMO.is_dir()), reason="shared/peer-configs absent")
CONFIGS = sorted(p.name for p in PEERS.glob("*/*.y*ml")) if PEERS.is_dir() else []
REFUSED = {  # file -> the words of its named error
    "merge_lora__qwen3_lora_sft.yaml": "merge / export config",
}
EXPECTED = {  # file -> (stage, method)
    "extras__llama_pro__llama3_freeze_sft.yaml": ("sft", "freeze"),
    "extras__loraplus__llama3_lora_sft.yaml": ("sft", "lora"),
    "extras__pissa__llama3_lora_sft.yaml": ("sft", "lora"),
    "train_full__qwen3_full_sft.yaml": ("sft", "full"),
    "train_lora__qwen3_lora_dpo.yaml": ("dpo", "lora"),
    "train_lora__qwen3_lora_kto.yaml": ("kto", "lora"),
    "train_lora__qwen3_lora_pretrain.yaml": ("pretrain", "lora"),
    "train_lora__qwen3_lora_reward.yaml": ("reward", "lora"),
    "train_lora__qwen3_lora_sft.yaml": ("sft", "lora"),
    "train_qlora__qwen3_lora_sft_otfq.yaml": ("sft", "qlora"),
    "archived__tiny-llama__lora.yml": ("sft", "lora"),
    "archived__tiny-llama__pretrain.yml": ("pretrain", "full"),
    "gemma3__gemma-3-270m-qlora.yml": ("sft", "qlora"),
    "llama-3__3b-qat-fsdp2.yaml": ("sft", "qat"),
    "llama-3__fft-8b.yaml": ("sft", "full"),
    "llama-3__instruct-dpo-lora-8b.yml": ("dpo", "lora"),
    "llama-3__lora-1b.yml": ("sft", "lora"),
    "llama-3__qlora-1b.yml": ("sft", "qlora"),
    "llama-3__qlora-1b-kto.yaml": ("kto", "qlora"),
}


def _path(name: str) -> Path:
    return next(PEERS.glob(f"*/{name}"))


def _raw(name: str) -> dict:
    return yaml.safe_load(_path(name).read_text(encoding="utf-8"))


@needs_peers
def test_every_peer_config_is_covered():
    assert set(CONFIGS) == set(REFUSED) | set(EXPECTED)


@needs_peers
@pytest.mark.parametrize("name", CONFIGS)
def test_translation(name):
    raw = _raw(name)
    assert detect(raw) == ("llamafactory" if "model_name_or_path" in raw else "axolotl")
    if name in REFUSED:
        with pytest.raises(ConfigError, match=REFUSED[name]):
            convert_file(str(_path(name)))
        return
    t = convert_file(str(_path(name)))
    handled = {k for k, _, _ in t.mapped} | {k.split(".")[0].split("[")[0] for k, _ in t.ignored}
    assert set(raw) <= handled, set(raw) - handled  # every key is mapped or ignored with a reason
    cfg = load_config(t.config)
    assert (cfg.stage, cfg.method.name) == EXPECTED[name]
    c = t.config
    if "model_name_or_path" in raw:
        assert cfg.model.name == raw["model_name_or_path"]
        assert cfg.training.batch_size == raw["per_device_train_batch_size"]
        assert cfg.training.grad_accum == raw["gradient_accumulation_steps"]
        assert cfg.training.lr == raw["learning_rate"] and cfg.training.epochs == raw["num_train_epochs"]
        assert cfg.training.log_every == raw["logging_steps"] and cfg.training.save_every == raw["save_steps"]
        assert cfg.data.max_length == raw["cutoff_len"] and cfg.output_dir == raw["output_dir"]
        assert [s.path for s in cfg.data.train] == raw["dataset"].split(",")
        assert all(s.limit == raw["max_samples"] for s in cfg.data.train)
        assert cfg.model.trust_remote_code is True
        ignored = dict(t.ignored)
        assert "dtype" in ignored["bf16"] and "ddp_timeout" in ignored
        if cfg.method.name in ("lora", "qlora"):
            assert cfg.method.r == raw["lora_rank"] and cfg.method.alpha == 2 * raw["lora_rank"]
            assert cfg.method.target_modules == "all-linear"
        if name.startswith("extras__loraplus"):
            assert cfg.method.loraplus_lr_ratio == raw["loraplus_lr_ratio"] == 16.0
        if name.startswith("extras__pissa"):
            assert (cfg.method.init, cfg.method.pissa_niter) == ("pissa", raw["pissa_iter"])
            assert "converted to a plain LoRA" in ignored["pissa_convert"]
        if cfg.method.name == "freeze":
            assert cfg.method.last_k == raw["freeze_trainable_layers"] and cfg.method.modules == []
    else:
        assert cfg.model.name == raw["base_model"]
        assert cfg.training.batch_size == raw["micro_batch_size"]
        assert cfg.training.grad_accum == raw["gradient_accumulation_steps"]
        assert cfg.data.max_length == raw["sequence_len"] and cfg.data.packing == raw["sample_packing"]
        assert cfg.data.val_fraction == (raw.get("val_set_size") or 0.0)
        if cfg.method.name in ("lora", "qlora"):
            assert cfg.method.r == raw["lora_r"] and cfg.method.alpha == raw["lora_alpha"]
            want = "all-linear" if raw.get("lora_target_linear") else raw["lora_target_modules"]
            assert cfg.method.target_modules == want
        sets = raw.get("datasets") or raw.get("pretraining_dataset")
        assert [s.path for s in cfg.data.train] == [d["path"] for d in sets]
        if name.startswith("llama-3__3b-qat"):
            assert c["method"]["group_size"] == 32 and "fsdp" in dict(t.ignored)


def _local(name: str, tmp: Path, tiny: str) -> dict:
    """The config with a tiny model, local demo data, 2 steps and small batches swapped in."""
    raw = _raw(name)
    data = tmp / "data"
    data.mkdir(exist_ok=True)
    shutil.copy(PEERS / "llamafactory" / "data__dataset_info.json", data / "dataset_info.json")
    for f in ("alpaca_en_demo.json", "dpo_en_demo.json"):
        shutil.copy(DEMO / f, data / f)
    shutil.copy(DEMO / "alpaca_en_demo.json", data / "identity.json")  # not local: alpaca_en_demo stands in
    rows = json.loads((DEMO / "alpaca_en_demo.json").read_text(encoding="utf-8"))[:16]
    (data / "c4_demo.jsonl").write_text("".join(json.dumps({"text": r["output"]}) + "\n" for r in rows))
    pairs = json.loads((DEMO / "dpo_en_demo.json").read_text(encoding="utf-8"))[:8]  # kto_en_demo's shape, from them
    (data / "kto_en_demo.json").write_text(json.dumps([
        {"messages": [{"role": "user", "content": p["conversations"][0]["value"]},
                      {"role": "assistant", "content": p[side]["value"]}], "label": side == "chosen"}
        for p in pairs for side in ("chosen", "rejected")]))  # fmt: skip
    (data / "chat.json").write_text(json.dumps([{"conversations": [{"from": "human", "value": r["instruction"]},
                                                                    {"from": "gpt", "value": r["output"]}]}
                                                 for r in rows]))  # fmt: skip
    if "model_name_or_path" in raw:
        raw.update(
            model_name_or_path=tiny,
            dataset_dir=str(data),
            max_samples=8,
            max_steps=2,
            cutoff_len=128,
            gradient_accumulation_steps=1,
            output_dir=str(tmp / "run"),
            trust_remote_code=False,
        )
    else:
        for d in raw.get("datasets") or raw.get("pretraining_dataset"):
            kind = str(d.get("type"))
            if raw.get("rl"):
                d.update(path=str(data / "dpo_en_demo.json"), field_messages="conversations")
            elif raw.get("pretraining_dataset"):
                d["path"] = str(data / "c4_demo.jsonl")
            elif kind.startswith("chat_template"):
                d["path"] = str(data / "chat.json")
            else:
                d["path"] = str(data / "alpaca_en_demo.json")
            # a slice (train[:95%]) applies to the local file as datasets would slice the hub split
        raw.update(
            base_model=tiny,
            max_steps=2,
            sequence_len=128,
            micro_batch_size=1,
            gradient_accumulation_steps=1,
            output_dir=str(tmp / "run"),
            val_set_size=0.1,
        )
    return raw


@needs_peers
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_runs_two_steps(name, tmp_path):
    from tunelab.testing import save_tiny_model_dir
    from tunelab.training import train

    tiny = save_tiny_model_dir(tmp_path / "tiny")
    raw = _local(name, tmp_path, tiny)
    path = tmp_path / "their.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg, t = load_any(str(path), ["training.threads=1"], report=None)
    assert t is not None and (cfg.stage, cfg.method.name) == EXPECTED[name]
    result = train(cfg)
    assert result.metrics["steps"] == 2 if "steps" in result.metrics else (Path(result.final_dir)).is_dir()


def test_top_level_hints_name_our_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lora_target: all\nlogging_steps: 5\nadapter: lora\nmodel:\n  name: x\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    msg = str(e.value)
    assert "'lora_target' (line 1). Did you mean 'method.target_modules'?" in msg
    assert "Did you mean 'training.log_every'?" in msg and "Did you mean 'method.name'?" in msg
    assert "'stage'" not in msg


def test_a_tunelab_config_is_not_translated():
    assert translate({"model": {"name": "x"}, "method": {"name": "lora"}}) is None
    assert detect({"stage": "sft", "data": {"train": "a.json"}}) is None


def test_unsupported_values_are_named():
    base = {"model_name_or_path": "m", "stage": "sft", "dataset": "a"}
    for extra, words in (({"finetuning_type": "oft"}, "finetuning_type"), ({"quantization_bit": 8}, "4 bit"),
                         ({"stage": "ppo"}, "ppo"), ({"pref_loss": "hinge"}, "sigmoid")):  # fmt: skip
        with pytest.raises(ConfigError, match=words):
            translate({**base, **extra})
    with pytest.raises(ConfigError, match="rl: 'grpo'"):
        translate({"base_model": "m", "datasets": [{"path": "a", "type": "alpaca"}], "rl": "grpo"})


def test_simpo_and_orpo_translate_to_dpos_reference_free_losses():
    lf = {"model_name_or_path": "m", "stage": "dpo", "dataset": "a", "pref_beta": 2.0}
    d = load_config(translate({**lf, "pref_loss": "simpo", "simpo_gamma": 1.2}).config).dpo
    assert (d.loss_type, d.beta, d.simpo_gamma) == ("simpo", 2.0, 1.2)
    t = translate({**lf, "pref_loss": "orpo", "simpo_gamma": 1.2})
    assert load_config(t.config).dpo.loss_type == "orpo" and "pref_loss is not simpo" in dict(t.ignored)["simpo_gamma"]
    ax = {"base_model": "m", "adapter": "lora", "datasets": [{"path": "a.json", "type": "chat_template.default"}]}
    t = translate({**ax, "rl": "orpo", "orpo_alpha": 0.2, "rl_beta": 0.5})
    cfg = load_config(t.config)
    assert (cfg.stage, cfg.dpo.loss_type, cfg.dpo.beta) == ("dpo", "orpo", 0.2) and "orpo_alpha" in dict(t.ignored)[
        "rl_beta"
    ]
    cfg = load_config(translate({**ax, "rl": "simpo", "rl_beta": 2.5, "simpo_gamma": 1.0}).config)
    assert (cfg.dpo.loss_type, cfg.dpo.beta, cfg.dpo.simpo_gamma) == ("simpo", 2.5, 1.0)


def test_the_sft_term_of_preference_losses_translates():
    """LLaMA-Factory's pref_ftx, Axolotl's rpo_alpha (rl: dpo) and cpo_alpha (rl: simpo, whose unset value is TRL's
    CPOConfig default 1) -> dpo.sft_weight; where the stage has no such term they are ignored, with the reason."""
    lf = {"model_name_or_path": "m", "stage": "dpo", "dataset": "a"}
    assert load_config(translate({**lf, "pref_ftx": 0.5}).config).dpo.sft_weight == 0.5
    t = translate({**lf, "stage": "kto", "pref_ftx": 0.5})
    assert "kto" not in t.config.get("dpo", {}) and "no SFT term" in dict(t.ignored)["pref_ftx"]
    ax = {"base_model": "m", "adapter": "lora", "datasets": [{"path": "a.json", "type": "chat_template.default"}]}
    weight = lambda **k: load_config(translate({**ax, **k}).config).dpo.sft_weight  # noqa: E731
    assert (weight(rl="dpo", rpo_alpha=0.3), weight(rl="simpo", cpo_alpha=0.2), weight(rl="simpo")) == (0.3, 0.2, 1.0)
    assert (weight(rl="dpo"), weight(rl="orpo")) == (0.0, 0.0)
    assert "rl is not simpo" in dict(translate({**ax, "rl": "dpo", "cpo_alpha": 1.0}).ignored)["cpo_alpha"]


def test_cli_convert_prints_yaml_and_report(capsys):
    if not PEERS.is_dir():
        pytest.skip("shared/peer-configs absent")
    from tunelab.cli import main

    assert main(["convert", str(_path("train_lora__qwen3_lora_sft.yaml"))]) == 0
    out, err = capsys.readouterr()
    assert yaml.safe_load(out)["method"] == {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0,
                                             "target_modules": "all-linear"}  # fmt: skip
    assert "mapped:" in err and "ignored:" in err and "bf16" in err
    assert main(["convert", str(_path("merge_lora__qwen3_lora_sft.yaml"))]) == 2


@pytest.mark.parametrize("tool", ["llamafactory", "axolotl"])
def test_lora_variants_map_for_lora_and_are_ignored_with_the_reason_otherwise(tool):
    """DoRA, rsLoRA and LoRA+ keys become the lora method's fields; a config training no LoRA keeps them out of the
    method (where they would fail validation) and says why."""
    if tool == "llamafactory":
        base = {"model_name_or_path": "m", "stage": "sft", "dataset": "a"}
        keys = {"use_dora": True, "use_rslora": True, "loraplus_lr_ratio": 8.0}
        lora, other = {**base, "finetuning_type": "lora"}, {**base, "finetuning_type": "full"}
    else:
        base = {"base_model": "m", "datasets": [{"path": "a.jsonl", "type": "alpaca"}]}
        keys = {"peft_use_dora": True, "peft_use_rslora": True, "loraplus_lr_ratio": 8.0}
        lora, other = {**base, "adapter": "lora"}, base
    cfg = load_config(translate({**lora, **keys}).config)
    assert (cfg.method.name, cfg.method.use_dora, cfg.method.use_rslora, cfg.method.loraplus_lr_ratio) == (
        "lora",
        True,
        True,
        8.0,
    )
    t = translate({**other, **keys})
    assert load_config(t.config).method.name == "full"
    assert {k: "trains no LoRA" in why for k, why in t.ignored if k in keys} == dict.fromkeys(keys, True)


def test_the_dtype_note_says_what_auto_takes():
    """The note on LLaMA-Factory's / Axolotl's dtype keys lists the table `model.dtype: auto` reads (bf16_table)."""
    from tunelab.bf16_table import measured_text

    assert f"where measured faster: {measured_text()}; float32 otherwise" in keys.LLAMAFACTORY_IGNORED["bf16"]


def test_docs_mapping_table_matches_the_code():
    doc = (Path(__file__).parents[1] / "docs" / "interop.md").read_text(encoding="utf-8")
    assert keys.mapping_markdown() in doc


def test_trackers_are_translated():
    lf = {"model_name_or_path": "m", "stage": "sft", "dataset": "a"}
    assert translate({**lf, "report_to": "none"}).config["training"]["report_to"] == []
    t = translate({**lf, "report_to": ["wandb", "swanlab"], "run_name": "r1"})
    assert t.config["training"] == {"report_to": ["wandb"], "run_name": "r1"}
    assert any(k == "report_to" and "swanlab: not a tracker tunelab has" in to for k, _, to in t.mapped)
    assert "report_to" in dict(translate({**lf, "report_to": "all"}).ignored)

    ax = {"base_model": "m", "datasets": [{"path": "a", "type": "alpaca"}]}
    t = translate({**ax, "wandb_project": "p", "wandb_name": "r", "wandb_entity": "team", "use_tensorboard": True,
                   "mlflow_experiment_name": "q", "mlflow_tracking_uri": "http://h:5000", "mlflow_run_name": "z"})  # fmt: skip
    assert t.config["training"] == {
        "report_to": ["tensorboard", "wandb", "mlflow"],
        "tracker_project": "p",
        "run_name": "r",
    }
    ignored = dict(t.ignored)
    assert "WANDB_ENTITY" in ignored["wandb_entity"] and "already 'r'" in ignored["mlflow_run_name"]
    assert any("export MLFLOW_TRACKING_URI=http://h:5000" in to for k, _, to in t.mapped if k == "mlflow_tracking_uri")
    assert translate({**ax, "use_tensorboard": False}).config["training"]["report_to"] == []
    t = translate({**ax, "wandb_project": None, "use_trackio": True, "trackio_project_name": "tp"})
    assert t.config["training"] == {"report_to": ["trackio"], "tracker_project": "tp"} and "wandb_project" in dict(
        t.ignored
    )


def test_pissa_keys_map_for_lora_and_say_why_otherwise():
    base = {"model_name_or_path": "m", "stage": "sft", "dataset": "a", "finetuning_type": "lora"}
    exact = load_config(translate({**base, "pissa_init": True, "pissa_iter": -1}).config).method
    assert (exact.init, exact.pissa_niter) == ("pissa", None)  # -1: the exact SVD
    default = translate({**base, "pissa_init": True})
    assert load_config(default.config).method.pissa_niter == 16
    assert ("pissa_iter", 16, "method.pissa_niter (LLaMA-Factory's default)") in default.mapped
    off = translate({**base, "pissa_init": False, "pissa_iter": 4})
    assert load_config(off.config).method.init == "default" and "PiSSA is off" in dict(off.ignored)["pissa_iter"]
    full = translate({**base, "finetuning_type": "full", "pissa_init": True})
    assert load_config(full.config).method.name == "full" and "trains no LoRA" in dict(full.ignored)["pissa_init"]
    with pytest.raises(ConfigError, match="quantization_bit: 4 keeps in 4 bit"):
        translate({**base, "pissa_init": True, "quantization_bit": 4})


def test_peers_adapter_to_train_on_maps_to_start_from_with_the_adapters_own_shape():
    lf = {"model_name_or_path": "m", "stage": "sft", "dataset": "a", "finetuning_type": "lora", "lora_rank": 32,
          "lora_target": "q_proj,v_proj", "lora_dropout": 0.1}  # fmt: skip
    t = translate({**lf, "adapter_name_or_path": "saves/sft", "create_new_adapter": False})
    method = load_config(t.config).method
    assert (method.name, method.start_from, method.dropout) == ("lora", "saves/sft", 0.1)
    assert {"r", "alpha", "target_modules"}.isdisjoint(method.model_fields_set)  # the adapter's, at check_model
    assert "keeps its own" in dict(t.ignored)["lora_rank"] and "trains on" in dict(t.ignored)["create_new_adapter"]
    assert (
        load_config(translate({**lf, "quantization_bit": 4, "adapter_name_or_path": "s"}).config).method.name == "qlora"
    )
    with pytest.raises(ConfigError, match="several adapters"):
        translate({**lf, "adapter_name_or_path": "a,b"})
    with pytest.raises(ConfigError, match="create_new_adapter: True: a new adapter over the given one"):
        translate({**lf, "adapter_name_or_path": "a", "create_new_adapter": True})
    with pytest.raises(ConfigError, match="finetuning_type full over an adapter"):
        translate({**lf, "finetuning_type": "full", "adapter_name_or_path": "a"})
    with pytest.raises(ConfigError, match="merge / export config"):  # no stage: LLaMA-Factory's merge config
        translate({"model_name_or_path": "m", "adapter_name_or_path": "a", "template": "llama3"})

    ax = {"base_model": "m", "adapter": "lora", "datasets": [{"path": "a.jsonl", "type": "alpaca"}], "lora_r": 32,
          "lora_alpha": 16, "lora_dropout": 0.05, "lora_target_linear": True}  # fmt: skip
    t = translate({**ax, "lora_model_dir": "out/lora"})
    method = load_config(t.config).method
    assert (method.start_from, method.dropout) == ("out/lora", 0.05) and "r" not in method.model_fields_set
    assert all("keeps its own" in dict(t.ignored)[k] for k in ("lora_r", "lora_alpha", "lora_target_linear"))
    empty = translate({**ax, "lora_model_dir": None})  # the peers' examples leave it empty
    assert load_config(empty.config).method.start_from is None and load_config(empty.config).method.r == 32
    assert "a new adapter" in dict(empty.ignored)["lora_model_dir"]


def test_peers_new_tokens_map_to_new_special_tokens():
    """LLaMA-Factory's new_special_tokens (comma-separated, or a list) and Axolotl's tokens become
    model.new_special_tokens; LLaMA-Factory's resize_vocab is what tunelab does by itself."""
    lf = {"model_name_or_path": "m", "stage": "sft", "dataset": "a", "finetuning_type": "lora"}
    t = translate({**lf, "new_special_tokens": "<tool>, </tool>", "resize_vocab": True})
    assert load_config(t.config).model.new_special_tokens == ["<tool>", "</tool>"]
    assert "resize_vocab" in dict(t.ignored)
    assert translate({**lf, "new_special_tokens": ["<a>"]}).config["model"]["new_special_tokens"] == ["<a>"]
    ax = {"base_model": "m", "datasets": [{"path": "a", "type": "alpaca"}], "adapter": "lora"}
    t = translate({**ax, "tokens": ["<|tool|>", "<think>"]})
    assert load_config(t.config).model.new_special_tokens == ["<|tool|>", "<think>"]
    with pytest.raises(ConfigError, match="new_special_tokens with method adapter"):  # the config's own check
        load_config({**translate({**ax, "tokens": ["<x>"]}).config, "method": {"name": "adapter"}})


def test_axolotls_evaluations_and_saves_per_epoch_map_to_the_same_settings():
    ax = {"base_model": "m", "datasets": [{"path": "a", "type": "alpaca"}], "adapter": "lora"}
    cfg = load_config(translate({**ax, "evals_per_epoch": 4, "saves_per_epoch": 1}).config)
    assert (cfg.training.evals_per_epoch, cfg.training.saves_per_epoch) == (4, 1)
    with pytest.raises(ConfigError, match="evals_per_epoch with stage ppo: PPO counts iterations"):
        load_config({"stage": "ppo", "ppo": {"prompts": "p.jsonl", "reward": {"kind": "length"}},
                     "training": {"evals_per_epoch": 2}})  # fmt: skip
