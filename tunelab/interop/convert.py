"""Detect another toolkit's config by its keys, translate it, and load it as a tunelab Config.

cfg, translation = load_any("qwen3_lora_sft.yaml")   # translation is None for a tunelab config
"""

from __future__ import annotations

import sys

from tunelab.config import ConfigError, apply_overrides, load_config, read_yaml_mapping
from tunelab.interop import axolotl, llamafactory
from tunelab.interop.translation import Translation

TOOLS = {"llamafactory": llamafactory, "axolotl": axolotl}
_OURS = ("model", "data", "method", "training", "task", "ppo", "dpo")


def detect(raw: dict) -> str | None:
    """'llamafactory', 'axolotl' or None (a tunelab config: its sections are mappings)."""
    if any(isinstance(raw.get(k), dict) for k in _OURS if k != "model"):
        return None
    for name, mod in TOOLS.items():
        if mod.detect(raw):
            return name
    return None


def translate(raw: dict, source: str = "config") -> Translation | None:
    tool = detect(raw)
    return None if tool is None else TOOLS[tool].translate(raw, source)


def convert_file(path: str) -> Translation:
    """The translation of a LLaMA-Factory or Axolotl file; ConfigError when it is neither."""
    raw, _ = read_yaml_mapping(path, "config", "keys")
    t = translate(raw, str(path))
    if t is None:
        raise ConfigError(
            f"{path}: neither a LLaMA-Factory config (model_name_or_path with stage / finetuning_type / dataset) "
            "nor an Axolotl config (base_model with datasets / adapter / micro_batch_size); a tunelab config "
            "needs no conversion"
        )
    return t


def load_any(source, overrides: list[str] | None = None, report=sys.stderr):
    """(Config, Translation or None): a tunelab config as `load_config` reads it, or a LLaMA-Factory / Axolotl
    file translated first (its report written to `report`); --set overrides apply to the translated config."""
    if source is None or isinstance(source, dict):
        return load_config(source, overrides), None
    raw, _ = read_yaml_mapping(source, "config", "sections (model, data, method, training)")
    t = translate(raw, str(source))
    if t is None:
        return load_config(source, overrides), None
    if report is not None:
        print(t.report(), file=report)
    raw = apply_overrides(_copy(t.config), overrides)
    try:
        return load_config(raw), t
    except ConfigError as e:
        raise ConfigError(f"{source} ({t.tool}, translated): {str(e).removeprefix('config: ')}") from None


def _copy(d):
    return {k: _copy(v) for k, v in d.items()} if isinstance(d, dict) else list(d) if isinstance(d, list) else d
