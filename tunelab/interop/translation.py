"""What a translation of another toolkit's config gives: the tunelab config dict and its report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import get_args

from tunelab.config import ConfigError, Tracker

TRACKERS = get_args(Tracker)


@dataclass
class Translation:
    tool: str  # "LLaMA-Factory" or "Axolotl"
    source: str  # the file (or "config")
    config: dict = field(default_factory=dict)
    mapped: list[tuple[str, object, str]] = field(default_factory=list)  # (their key, value, "tunelab key: note")
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (their key, why)
    notes: list[str] = field(default_factory=list)

    def set(self, dotted: str, value) -> None:
        cur = self.config
        keys = dotted.split(".")
        for k in keys[:-1]:
            cur = cur.setdefault(k, {})
        cur[keys[-1]] = value

    def map(self, key: str, value, dotted: str, converted=None, note: str = "") -> None:
        """Record `key: value` as `dotted` (set to `converted`, or the value itself)."""
        self.set(dotted, value if converted is None else converted)
        self.mapped.append((key, value, dotted + (f" ({note})" if note else "")))

    def map_rest(self, raw: dict, mapped: dict, ignored: dict, skip, floats=(), notes=None, unknown: str = "") -> None:
        """Every key of `raw` not in `skip` (those the translator handled itself): a one-to-one key of `mapped`
        (a null value keeps tunelab's default; `floats` are converted, `notes` annotate), a key of `ignored`
        with its reason, or a key nobody knows (`unknown` says so)."""
        for key, value in raw.items():
            if key in skip:
                continue
            if key in mapped:
                if value is None:
                    self.ignore(key, "null: tunelab's default")
                else:
                    self.map(
                        key, value, mapped[key], float(value) if key in floats else None, (notes or {}).get(key, "")
                    )
            elif key in ignored:
                self.ignore(key, ignored[key])
            else:
                self.ignore(key, unknown)

    def report_to(self, key: str, value) -> None:
        """Hugging Face TrainingArguments' `report_to` (none, all, a name or a list of names) -> training.report_to."""
        names = [value] if isinstance(value, str) else list(value or [])
        if "all" in names:  # every integration that happens to be installed: not a setting tunelab has
            self.ignore(key, "'all' (whatever trackers are installed): name them in training.report_to; tunelab's "
                        "default (tensorboard) stays")  # fmt: skip
            return
        names = [n for n in names if n != "none"]
        dropped = [n for n in names if n not in TRACKERS]
        note = f"{', '.join(map(str, dropped))}: not a tracker tunelab has, dropped" if dropped else ""
        self.map(key, value, "training.report_to", [n for n in names if n in TRACKERS], note)

    def map_lora_variants(self, raw: dict, keys: dict[str, str], lora: bool) -> None:
        """LoRA's variant keys (DoRA, rsLoRA, LoRA+; `keys`: theirs -> tunelab's), mapped where set; ignored, with
        the reason, where the config trains no LoRA."""
        self.map_where(raw, keys, lora, "a LoRA setting, and this config trains no LoRA")

    def map_where(self, raw: dict, keys: dict[str, str], applies: bool, why_not: str) -> None:
        """The keys of `keys` (theirs -> tunelab's) that `raw` sets: mapped where they apply to this config (a LoRA
        variant where it trains LoRA, a KTO weight where its stage is kto), else ignored, `why_not`."""
        for key, dotted in keys.items():
            if raw.get(key) is None:
                continue
            if applies:
                self.map(key, raw[key], dotted)
            else:
                self.ignore(key, why_not)

    def ignore(self, key: str, why: str) -> None:
        self.ignored.append((key, why))

    def refuse(self, key: str, value, why: str):
        raise ConfigError(f"{self.source}: {self.tool} {key}: {value!r}: {why}")

    def report(self) -> str:
        lines = [f"{self.source}: a {self.tool} config, translated to tunelab's"]
        if self.mapped:
            lines.append("mapped:")
            lines += [f"  {k}: {v!r} -> {to}" for k, v, to in self.mapped]
        if self.ignored:
            lines.append("ignored:")
            lines += [f"  {k}: {why}" for k, why in self.ignored]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)
