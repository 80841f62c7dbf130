"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020): a small residual MLP after a sublayer.

    Adapter(h) = h + s · (W_up · f(W_down · h + b_down) + b_up)

with W_down ∈ ℝ^{m×d}, W_up ∈ ℝ^{d×m}, m ≪ d, inserted on the output of the attention sublayer
and/or the feed-forward sublayer of every transformer block, before the block's residual add (and,
for BERT, before its LayerNorm) — the Houlsby position. W_up and b_up start at zero, so at step 0
the model is exactly the base model; W_down starts Kaiming-uniform (`nn.Linear`'s default, as LoRA's
A), so the first steps already see useful features. The bottleneck's non-linearity means the
adapter cannot be folded into the base weights: it is not mergeable.

Presets: `houlsby` = after attention and after FFN (Houlsby et al. also train the layer norms: set
`train_norms: true` for the paper's recipe); `pfeiffer` = after the FFN only (Pfeiffer et al.,
*AdapterFusion*, 2020: half the adapters, about the same quality).

We own this implementation: PEFT has no bottleneck adapters, and AdapterHub's `adapters` package is
pinned to specific transformers versions. Insertion is a forward hook on the sublayer module (the
adapter is registered as its child `adapter`), so the base model's own modules, classes and
parameter names stay untouched. Where the sublayers are is a per-architecture table keyed by
`model.config.model_type` (`SITES` below); an unknown model type is refused with the list of
supported ones. For T5 both encoder and decoder blocks are adapted (decoder cross-attention counts
as "attention").

Saved format (`save` / `load`), a folder with:
  tunelab_adapter.safetensors   the adapter parameters, named `<site>.adapter.down.weight`,
                                `.down.bias`, `.up.weight`, `.up.bias` (fp32), plus any other trained
                                parameter (a classification head, norms) under its model name
  tunelab_adapter_config.json   {"tunelab_method": "adapter", "format_version": 1,
                                 "config": {...the method config...}, "hidden_size": d,
                                 "bottleneck": m, "sites": [module paths carrying an adapter],
                                 "extra_params": [names of the other trained parameters]}
`load(base, dir)` re-inserts adapters at exactly those sites and loads the weights, refusing a file
whose keys differ from the expected ones.

The names are tunelab's own, not PEFT's (`adapter_config.json`, `adapter_model.safetensors`, which results
written before this change used and `load` still reads): a PEFT tool finding `adapter_config.json` takes
it for a PEFT adapter and fails on the missing `peft_type` with a TypeError. Under our names PEFT says
plainly that the folder holds no `adapter_config.json`, and `methods.base.load_peft` refuses the folder
naming this method. Nor is the format AdapterHub's (`adapters`): that library pins transformers 4.57 (not
the 5.x tunelab uses), and its sequential bottleneck on LLaMA-type models adapts the sublayer output
*plus* the residual stream, where ours adapts the sublayer output alone, so our weights written in its
layout would compute another function. See docs/methods.md, "Bottleneck adapters".
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from tunelab.methods.base import Capabilities, MethodConfig, MethodError, freeze_all
from tunelab.models.loading import TASK_HEADS

if TYPE_CHECKING:  # torch is imported where a model is changed: the config reads `Config` without it
    from torch import nn

DESCRIPTION = "small bottleneck MLPs (adapters) after the attention and/or FFN sublayers of every block"
# its own modules, not a PEFT adapter (no disable_adapter): DPO / PPO keep a frozen copy as reference
CAPABILITIES = Capabilities()
INFERENCE_COST = "two small matmuls per adapter site (~2·m·d FLOPs per token each)"

FORMAT_VERSION = 1
CONFIG_FILE = "tunelab_adapter_config.json"
WEIGHTS_FILE = "tunelab_adapter.safetensors"
# the names results written before the rename carry (PEFT's, though the files are not PEFT's): read, not written
OLD_FILES = ("adapter_config.json", "adapter_model.safetensors")
CHILD = "adapter"  # the adapter's attribute name on the sublayer module it follows

PRESETS = {"houlsby": ["attention", "ffn"], "pfeiffer": ["ffn"]}

_DECODER = {"attention": [r"\.layers\.\d+\.self_attn$"], "ffn": [r"\.layers\.\d+\.mlp$"]}
_BERT = {"attention": [r"\.layer\.\d+\.attention\.output\.dense$"], "ffn": [r"\.layer\.\d+\.output\.dense$"]}
_T5 = {
    "attention": [r"\.block\.\d+\.layer\.\d+\.(?:SelfAttention|EncDecAttention)$"],
    "ffn": [r"\.block\.\d+\.layer\.\d+\.DenseReluDense$"],
}
# model_type -> placement -> regexes (re.search on "." + module path) of the sublayers whose output
# the adapter follows. Each sublayer's output is a tensor or a tuple whose first item is the hidden states.
SITES: dict[str, dict[str, list[str]]] = {
    **{
        t: _DECODER
        for t in (
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "phi3",
            "olmo2",
            "smollm3",
            "granite",
            "starcoder2",
        )  # fmt: skip
    },
    **{t: _BERT for t in ("bert", "roberta", "xlm-roberta", "electra")},
    **{t: _T5 for t in ("t5", "mt5")},
    "gpt2": {"attention": [r"\.h\.\d+\.attn$", r"\.h\.\d+\.crossattention$"], "ffn": [r"\.h\.\d+\.mlp$"]},
    "gpt_neox": {"attention": [r"\.layers\.\d+\.attention$"], "ffn": [r"\.layers\.\d+\.mlp$"]},
    # BART's FFN is no module of its own: the adapter follows its second linear layer, before the residual
    **{
        t: {"attention": [r"\.layers\.\d+\.(?:self_attn|encoder_attn)$"], "ffn": [r"\.layers\.\d+\.fc2$"]}
        for t in ("bart", "mbart")
    },
}

# heads that a *For{SequenceClassification,...} model adds fresh (random) on top of the encoder
_HEAD_SUFFIXES = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering", "ForMultipleChoice")


class Config(MethodConfig):
    name: Literal["adapter"] = "adapter"
    preset: Literal["houlsby", "pfeiffer"] | None = Field(
        "pfeiffer",
        description="houlsby: adapters after attention and after the FFN; pfeiffer: after the FFN only. "
        "Ignored when `placement` is set.",
    )
    placement: list[Literal["attention", "ffn"]] | None = Field(
        None, description="Sublayers followed by an adapter, e.g. [attention, ffn]; overrides `preset`."
    )
    bottleneck: int | None = Field(
        64, ge=1, description="Bottleneck width m. Leave unset (null) when `reduction_factor` is given."
    )
    reduction_factor: float | None = Field(
        None, gt=0, description="Alternative to `bottleneck`: m = hidden_size / reduction_factor (e.g. 16)."
    )
    activation: Literal["relu", "gelu", "silu"] = Field("relu", description="Non-linearity f in the bottleneck.")
    scale: float = Field(1.0, description="Factor s on the adapter's output: h + s · adapter(h).")
    train_norms: bool = Field(
        False, description="Also train every LayerNorm/RMSNorm weight (Houlsby et al. do; set true for their recipe)."
    )
    train_head: bool | None = Field(
        None,
        description="Train the task head: null = only a freshly added classification head (classifier/score/"
        "qa_outputs of *ForSequenceClassification etc.); true = also an LM head (tied: the input embedding too).",
    )

    @model_validator(mode="before")
    @classmethod
    def _reduction_replaces_default_bottleneck(cls, data):
        # `reduction_factor: 16` alone means "no fixed bottleneck", not "both": drop the default 64.
        if isinstance(data, dict) and data.get("reduction_factor") is not None and "bottleneck" not in data:
            data = {**data, "bottleneck": None}
        return data

    @model_validator(mode="after")
    def _check(self):
        if (self.bottleneck is None) == (self.reduction_factor is None):
            raise ValueError("set exactly one of bottleneck and reduction_factor (the other to null)")
        if self.placement is not None:
            if not self.placement:
                raise ValueError("placement is empty: list at least one of attention, ffn")
            if len(set(self.placement)) != len(self.placement):
                raise ValueError(f"placement lists a sublayer twice: {self.placement}")
        elif self.preset is None:
            raise ValueError("set a preset (houlsby or pfeiffer) or a placement")
        return self

    def sublayers(self) -> list[str]:
        return list(self.placement) if self.placement is not None else list(PRESETS[self.preset])


def _adapter_hook(module: nn.Module, args, output):
    """Forward hook on a sublayer: add its adapter's branch to the sublayer's (first) output."""
    import torch

    adapter = getattr(module, CHILD)
    if isinstance(output, torch.Tensor):
        return output + adapter(output)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (output[0] + adapter(output[0]),) + tuple(output[1:])
    raise TypeError(f"adapter: {type(module).__name__} returned {type(output).__name__}; expected a tensor or tuple")


def hidden_size(model) -> int:
    cfg = model.config
    for key in ("hidden_size", "d_model", "n_embd"):
        value = getattr(cfg, key, None)
        if isinstance(value, int):
            return value
    raise MethodError(f"adapter: cannot read the hidden size from {type(cfg).__name__} (no hidden_size/d_model)")


def bottleneck_size(cfg: Config, hidden: int) -> int:
    if cfg.bottleneck is not None:
        return cfg.bottleneck
    return max(1, int(hidden / cfg.reduction_factor))


def find_sites(model, placement: list[str]) -> list[str]:
    """Module paths, in model order, of the sublayers an adapter follows."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SITES:
        raise MethodError(
            f"adapter: model type {model_type!r} is not supported; supported model types: {sorted(SITES)} "
            "(add its sublayer names to SITES in tunelab/methods/adapter.py)"
        )
    table = SITES[model_type]
    sites = []
    for where in placement:
        pats = [re.compile(p) for p in table[where]]
        found = [n for n, _ in model.named_modules() if n and any(p.search("." + n) for p in pats)]
        if not found:
            raise MethodError(f"adapter: no {where} sublayer found in this {model_type} model ({table[where]})")
        sites += found
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return sorted(set(sites), key=order.__getitem__)


def _insert(model, sites: list[str], hidden: int, bottleneck: int, activation: str, scale: float) -> None:
    from tunelab.methods import layers

    for site in sites:
        module = model.get_submodule(site)
        if hasattr(module, CHILD):
            raise ValueError(f"adapter: {site} already has an attribute {CHILD!r} (adapters applied twice?)")
        ref = next(module.parameters(), None)
        adapter = layers.BottleneckAdapter(hidden, bottleneck, activation, scale)
        if ref is not None:
            adapter.to(ref.device)  # fp32 even on a bf16 base: the branch is small and trains better in fp32
        module.add_module(CHILD, adapter)
        module.register_forward_hook(_adapter_hook)


def _head_params(model, train_head: bool | None) -> list[str]:
    from torch import nn

    if train_head is False:
        return []
    names = []
    if type(model).__name__.endswith(_HEAD_SUFFIXES):
        for attr in TASK_HEADS:
            head = getattr(model, attr, None)
            if isinstance(head, nn.Module):
                names += [f"{attr}.{n}" for n, _ in head.named_parameters()]
    if train_head and not names:
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if out is None:
            raise MethodError("adapter: train_head is true but the model has no classification head or LM head")
        ids = {id(p) for p in out.parameters()}
        names = [n for n, p in model.named_parameters() if id(p) in ids]
    return names


def _norm_params(model) -> list[str]:
    from torch import nn

    names = []
    for mname, module in model.named_modules():
        if isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(("Norm", "LayerNorm", "RMSNorm")):
            names += [f"{mname}.{n}" if mname else n for n, _ in module.named_parameters(recurse=False)]
    return names


def _set_trainable(model, sites: list[str], extra: list[str]) -> None:
    freeze_all(model)
    for site in sites:
        getattr(model.get_submodule(site), CHILD).requires_grad_(True)
    params = dict(model.named_parameters())
    for n in extra:
        params[n].requires_grad_(True)


def _state(model) -> dict:
    state = getattr(model, "_tunelab_adapter", None)
    if state is None:
        raise ValueError("adapter: this model has no adapters (call tunelab.methods.adapter.apply first)")
    return state


def adapter_names(sites: list[str]) -> list[str]:
    return [f"{s}.{CHILD}.{p}.{w}" for s in sites for p in ("down", "up") for w in ("weight", "bias")]


def _build(model, cfg: Config, sites: list[str], extra: list[str]):
    hidden = hidden_size(model)
    m = bottleneck_size(cfg, hidden)
    _insert(model, sites, hidden, m, cfg.activation, cfg.scale)
    _set_trainable(model, sites, extra)
    model._tunelab_adapter = {
        "config": cfg,
        "hidden_size": hidden,
        "bottleneck": m,
        "sites": sites,
        "extra_params": extra,
    }
    return model


def apply(model, cfg: Config):
    sites = find_sites(model, cfg.sublayers())
    extra = _head_params(model, cfg.train_head) + (_norm_params(model) if cfg.train_norms else [])
    extra = list(dict.fromkeys(n for n in extra if ".adapter." not in "." + n))
    return _build(model, cfg, sites, extra)


def save(model, out_dir) -> None:
    from safetensors.torch import save_file

    state = _state(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = dict(model.named_parameters())
    keys = adapter_names(state["sites"]) + state["extra_params"]
    save_file({k: params[k].detach().contiguous().cpu() for k in keys}, out / WEIGHTS_FILE)
    meta = {
        "tunelab_method": "adapter",
        "format_version": FORMAT_VERSION,
        "config": state["config"].model_dump(mode="json"),
        "hidden_size": state["hidden_size"],
        "bottleneck": state["bottleneck"],
        "sites": state["sites"],
        "extra_params": state["extra_params"],
    }
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def saved_files(out_dir) -> tuple[Path, Path] | None:
    """(config, weights) of a saved bottleneck adapter: tunelab's names, or the PEFT-like names of results
    written before the rename when their config says `tunelab_method: adapter`; None when there is none."""
    out = Path(out_dir)
    if (out / CONFIG_FILE).is_file():
        return out / CONFIG_FILE, out / WEIGHTS_FILE
    old_config, old_weights = (out / f for f in OLD_FILES)
    if old_config.is_file():
        try:
            ours = json.loads(old_config.read_text()).get("tunelab_method") == "adapter"
        except (ValueError, AttributeError):
            ours = False
        if ours:
            return old_config, old_weights
    return None


def load(base_model, out_dir):
    import torch
    from safetensors.torch import load_file

    out = Path(out_dir)
    files = saved_files(out)
    if files is None:
        hint = " (a PEFT adapter? load it with its own method, e.g. lora)" if (out / OLD_FILES[0]).is_file() else ""
        raise MethodError(f"{out}: no tunelab bottleneck adapter here (no {CONFIG_FILE}){hint}")
    config_file, weights_file = files
    meta = json.loads(config_file.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{config_file}: format_version {meta.get('format_version')} unsupported (want {FORMAT_VERSION})"
        )
    cfg = Config(**meta["config"])
    if hidden_size(base_model) != meta["hidden_size"]:
        raise MethodError(
            f"adapter: saved for hidden size {meta['hidden_size']}, base model has {hidden_size(base_model)}"
        )
    names = {n for n, _ in base_model.named_modules()}
    missing_sites = [s for s in meta["sites"] if s not in names]
    if missing_sites:
        raise MethodError(
            f"adapter: the base model lacks the saved sites {missing_sites[:3]} (a different base model?)"
        )
    model = _build(base_model, cfg, list(meta["sites"]), list(meta["extra_params"]))
    if model._tunelab_adapter["bottleneck"] != meta["bottleneck"]:
        raise ValueError(f"adapter: bottleneck {model._tunelab_adapter['bottleneck']} != saved {meta['bottleneck']}")

    weights = load_file(weights_file)
    expected = set(adapter_names(meta["sites"])) | set(meta["extra_params"])
    if set(weights) != expected:
        extra, lacking = sorted(set(weights) - expected), sorted(expected - set(weights))
        raise ValueError(
            f"{weights_file}: keys differ from {config_file.name}: unexpected {extra[:3]}, missing {lacking[:3]}"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in weights.items():
            if params[k].shape != v.shape:
                raise ValueError(f"{weights_file}: {k} has shape {tuple(v.shape)}, model {tuple(params[k].shape)}")
            params[k].copy_(v.to(params[k].device, params[k].dtype))
    return model


def merge(model):
    raise NotImplementedError(
        "adapter: bottleneck adapters cannot be merged into the base weights (the bottleneck is non-linear); "
        "use the model unmerged"
    )
