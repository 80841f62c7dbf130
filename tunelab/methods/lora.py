"""LoRA (Hu et al. 2021): W x + (alpha / r) * B A x, with A random and B zero, so step 0 is the base model.

Built on PEFT so the saved adapter is the ecosystem's format (`adapter_config.json` +
`adapter_model.safetensors`) and loads with plain `PeftModel.from_pretrained`.

Variants, each a field (the maths: docs/methods.md), all PEFT's own but LoRA+, which is only a learning rate:
  use_rslora        rank-stabilised LoRA (Kalajdzievski 2023): the update scaled by alpha / sqrt(r)
  use_dora          DoRA (Liu et al. 2024): W' = m * (W + s B A) / ||W + s B A|| per output row, m trained
  loraplus_lr_ratio LoRA+ (Hayou et al. 2024): B's learning rate is that many times A's (`lr_scales`)
  init: pissa       PiSSA (Meng et al. 2024): B A starts as W's top-r singular part, the frozen base keeps the rest;
                    saved converted to a plain rank-2r LoRA of the original base (`save`), as PEFT converts it

`start_from` continues training an existing PEFT LoRA adapter (a folder, a tunelab run, a hub id) instead of a new
one: what Axolotl's `lora_model_dir` and LLaMA-Factory's `adapter_name_or_path` do. Its shape (r, alpha, targets,
rsLoRA, DoRA) is the adapter's: `check_model` reads it before the model loads and writes it into this config.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from tunelab.methods.base import (
    STARTED_ADAPTER,
    Capabilities,
    MethodConfig,
    MethodError,
    load_peft,
    merge_peft,
    peft_task_type,
    save_peft,
    wrap_peft,
)

DESCRIPTION = "low-rank matrices A, B beside the chosen linear layers"
CAPABILITIES = Capabilities(reference="adapter_off", mergeable=True, new_tokens=True)
INFERENCE_COST = "two small matmuls per adapted layer; none once merged"


class Config(MethodConfig):
    name: Literal["lora"] = "lora"
    r: int = Field(16, ge=1, description="Rank of the update B A.")
    alpha: float = Field(32, gt=0, description="Scale; the update is multiplied by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | str = Field(
        "all-linear",
        description="'all-linear' (every linear layer but the output head) or module names like [q_proj, v_proj].",
    )
    use_rslora: bool = Field(
        False, description="Rank-stabilised LoRA: scale the update by alpha / sqrt(r) instead of alpha / r."
    )
    use_dora: bool = Field(
        False,
        description="DoRA: a trained magnitude per output row times the direction W + BA. With LoRA dropout each "
        "adapted layer multiplies W by the dropped input too (PEFT's DoRA), two big matmuls instead of one: "
        "dropout: 0 is faster. A GGUF LoRA export refuses it (export the merged model).",
    )
    loraplus_lr_ratio: float | None = Field(
        None,
        gt=0,
        description="LoRA+: B's learning rate is this many times training.lr (A's); the paper suggests 16. "
        "null: one learning rate.",
    )
    init: Literal["default", "pissa"] = Field(
        "default",
        description="How A and B start. default: A random, B = 0 (step 0 is the base model). pissa (PiSSA): B A "
        "starts as the top-r singular part of each adapted weight W and the frozen base keeps the rest, W - s B A, "
        "so the adapter trains W's principal directions (step 0 is the base model up to rounding). The result is "
        "saved as a plain LoRA of the original base, rank 2r (PEFT's conversion). Not with use_dora, qlora, dpo "
        "or ppo. See docs/methods.md.",
    )
    pissa_niter: int | None = Field(
        16,
        ge=0,
        description="init: pissa: subspace iterations of the fast randomized SVD (PEFT's pissa_niter_K; "
        "LLaMA-Factory's pissa_iter); null = the exact SVD (minutes for a 1B model's layers).",
    )

    start_from: str | None = Field(
        None,
        description="An existing LoRA adapter to continue training instead of a new one: a PEFT adapter folder, a "
        "tunelab run (its final/ adapter) or a hub id, trained over this model.name. Its r, alpha, target_modules, "
        "use_rslora and use_dora are the adapter's (a different value set here gives way, and the log says so); dropout and the "
        "training settings are this config's. With stage dpo or ppo the reference policy is the adapter as it "
        "starts. Not with init: pissa. See docs/methods.md.",
    )

    @property
    def rewrites_base(self) -> bool:
        return self.init == "pissa"

    @property
    def starts_from(self) -> str | None:
        if self.start_from is None:
            return None
        return f"the adapter {self.start_from} (r {self.r}, alpha {self.alpha:g})"

    def reference_refused(self, stage: str) -> str | None:
        if self.init == "pissa":
            return (
                "method.init: pissa: the reference policy is the model with its adapter switched off, and PiSSA's "
                "base is the residual W - s B A, not the model you start from; use method.init: default"
            )
        return None

    @model_validator(mode="after")
    def _pissa(self):
        if self.init == "pissa" and self.use_dora:
            raise ValueError(
                "method.init: pissa with use_dora: PEFT converts a PiSSA adapter to a plain LoRA on saving, and a "
                "DoRA magnitude has no such conversion; set one of them"
            )
        if self.init == "pissa" and self.start_from is not None:
            raise ValueError(
                "method.init: pissa with start_from: PiSSA initialises a new adapter from the base's singular "
                "vectors, and start_from continues an existing one; set one of them"
            )
        return self


def peft_config(cfg: Config, model):
    from peft import LoraConfig, TaskType

    from tunelab.models import new_tokens
    from tunelab.models.loading import unwrap

    task = peft_task_type(model)
    # A fresh head trains whole (PEFT's modules_to_save); 'all-linear' would also wrap it in LoRA, which
    # PEFT refuses for token-classification heads ("modules_to_save cannot be applied to ... lora Linear")
    heads = {TaskType.TOKEN_CLS: ["classifier", "score"], TaskType.QUESTION_ANS: ["qa_outputs"]}.get(task)
    exclude = heads if cfg.target_modules == "all-linear" and heads else None
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        exclude_modules=exclude,
        task_type=task,
        bias="none",
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        init_lora_weights=_init(cfg),
        # model.new_special_tokens: their rows of the token table (and a tied head) train beside the adapter
        trainable_token_indices=new_tokens.peft_indices(unwrap(model)),
    )


def _init(cfg: Config) -> bool | str:
    if cfg.init == "default":
        return True
    return "pissa" if cfg.pissa_niter is None else f"pissa_niter_{cfg.pissa_niter}"


def lr_scales(model, cfg: Config) -> dict:
    """LoRA+: {B matrix: loraplus_lr_ratio}; the rest at training.lr. A learning rate per parameter group is all
    LoRA+ is, so the loop's own optimizer takes it (PEFT's `create_loraplus_optimizer` builds an optimizer of its
    own, which would bypass the bf16 and fused AdamW the loop picks)."""
    if cfg.loraplus_lr_ratio is None:
        return {}
    return {p: cfg.loraplus_lr_ratio for n, p in model.named_parameters() if p.requires_grad and ".lora_B." in n}


def apply(model, cfg: Config):
    # plain PEFT; the training loop's accel.prepare routes the layers through tunelab/accel/fast_lora.py
    if cfg.init == "pissa":
        return pissa(model, cfg)
    if cfg.start_from is not None:
        return continued(model, cfg)
    model = wrap_peft(model, peft_config(cfg, model))
    if cfg.use_dora:
        dora_magnitudes_in_fp32(model)
    return model


def pissa(model, cfg: Config):
    """PEFT's PiSSA initialisation, seeded: the randomized SVD draws its test matrix from torch's generator, and a
    resumed run must rebuild the very same residual base (a checkpoint holds A and B only, not W - s B0 A0). The
    run's own random stream is left as it was. A0, B0 are kept on the model for `save`'s conversion."""
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = wrap_peft(model, peft_config(cfg, model))
    model.tunelab_pissa_initial = {
        name: p.detach().clone() for name, p in model.named_parameters() if ".lora_A." in name or ".lora_B." in name
    }
    return model


# ---- start_from: an existing adapter, trained further
# adapter_config.json's name: (this Config's, PEFT's default where the file leaves it out)
SHAPE_FIELDS = {"r": ("r", 8), "lora_alpha": ("alpha", 8), "target_modules": ("target_modules", None),
                "use_rslora": ("use_rslora", False), "use_dora": ("use_dora", False)}  # fmt: skip


def adapter_location(where: str) -> str:
    """The folder of the LoRA adapter `start_from` names: a tunelab run's final/, a PEFT adapter folder, or for a hub
    id the folder in the local hub cache it is fetched into (`hub_adapter`)."""
    from tunelab.models.sources import adapter_folder, looks_like_path

    path = Path(where).expanduser()
    if not path.exists():
        if looks_like_path(where):
            raise MethodError(f"method.start_from {where!r}: no such file or folder")
        return hub_adapter(where)
    folder = adapter_folder(path)
    if folder is not None:
        return str(folder)
    what = (
        "a tunelab bottleneck adapter (method: adapter), which has no PEFT LoRA to continue"
        if any((f / "tunelab_adapter_config.json").is_file() for f in (path, path / "final"))
        else "a whole model (set it as model.name to train from it)"
        if any((f / "config.json").is_file() for f in (path, path / "final"))
        else "not a PEFT adapter"
    )
    raise MethodError(f"method.start_from {where}: no adapter_config.json in it or in its final/: {what}")


@functools.cache  # asked by the check, the shapes and the load: one fetch (and one hub round trip) a process
def hub_adapter(repo: str) -> str:
    """A hub adapter's adapter_config.json and adapter_model.safetensors fetched into the local hub cache (once; the
    hub's own caching), and the folder they lie in: its shapes are then checked before the model loads and PEFT
    loads it from there, as a local adapter. A repo whose weights are a pickle only (adapter_model.bin) is refused
    before anything is downloaded from it but its config: PEFT would unpickle it."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    from tunelab.models.loading import hub_unreachable
    from tunelab.models.sources import pickle_refused

    offline = hub_unreachable()  # then only the hub cache, at once, instead of a minute of retries

    def fetch(name: str) -> Path:
        try:
            return Path(huggingface_hub.hf_hub_download(repo, name, local_files_only=offline is not None))
        except LocalEntryNotFoundError as e:  # offline, or no network, and not in the cache
            raise MethodError(f"method.start_from {repo}: no such folder here, and the Hugging Face Hub could not "
                              f"be reached for it (nor is it in the hub cache): {offline or e}") from None  # fmt: skip
        except EntryNotFoundError:
            if name == "adapter_config.json":
                raise MethodError(f"method.start_from {repo}: the hub repo has no adapter_config.json: not a PEFT "
                                  "adapter") from None  # fmt: skip
            raise MethodError(pickle_refused(f"method.start_from {repo}", "no adapter_model.safetensors "
                                             "in the hub repo", "use an adapter saved as safetensors")
                              ) from None  # fmt: skip
        except (OSError, ValueError) as e:  # no such repo, no access, a bad id
            raise MethodError(f"method.start_from {repo}: no such folder here, and fetching it from the Hugging "
                              f"Face Hub failed: {e}") from None  # fmt: skip

    folder = fetch("adapter_config.json").parent
    fetch("adapter_model.safetensors")
    return str(folder)


def adapter_settings(where: str) -> dict:
    """The adapter's adapter_config.json (fetched from the hub for a hub id), checked to be a LoRA's."""
    location = adapter_location(where)
    try:
        settings = json.loads((Path(location) / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise MethodError(f"method.start_from {where}: cannot read its adapter_config.json: {e}") from None
    kind = str(settings.get("peft_type", "")).upper().removeprefix("PEFTTYPE.")
    if kind != "LORA":
        raise MethodError(f"method.start_from {where}: a {kind or 'non-PEFT'} adapter, not a LoRA; "
                          "method lora / qlora continue LoRA adapters only")  # fmt: skip
    return settings


def check_model(cfg: Config, model_cfg) -> str | None:
    """Before the model loads: `start_from`'s adapter found and read, its shape fields written into `cfg` (so the run's
    config.yaml, model card and compare report say what trains) and its matrices checked against the model's linear
    layers where the model's skeleton can be built. A shape value the config set otherwise gives way, as in PEFT,
    Axolotl and LLaMA-Factory (an adapter keeps its shape): the note returned, for the run's log, names each."""
    if cfg.start_from is None:
        return None
    settings = adapter_settings(cfg.start_from)
    replaced = []
    for theirs, (ours, default) in SHAPE_FIELDS.items():
        value = settings.get(theirs, default)
        if theirs == "target_modules" and not isinstance(value, str):
            value = sorted(value or [])
        if ours in cfg.model_fields_set and _differs(getattr(cfg, ours), value):
            replaced.append(f"{ours} {_shown(value)} (the config's {_shown(getattr(cfg, ours))})")
        setattr(cfg, ours, value)
    _check_new_tokens(cfg.start_from, settings, model_cfg)
    _check_shapes(cfg.start_from, model_cfg)
    if replaced:
        return f"method.start_from: the adapter keeps its own {', '.join(replaced)}"
    return None


def _check_new_tokens(where: str, settings: dict, model_cfg) -> None:
    """An adapter that trained new tokens' rows (model.new_special_tokens) goes on over a base grown the same way, and
    new tokens train only in an adapter that holds their rows: said before the model loads."""
    theirs = settings.get("trainable_token_indices") or []
    ids = sorted({i for v in (theirs.values() if isinstance(theirs, dict) else [theirs]) for i in v})
    ours = list(model_cfg.new_special_tokens)
    manifest = Path(adapter_location(where)) / "tunelab.json"  # a tunelab run's: the tokens it added, by name
    try:
        listed = (
            json.loads(manifest.read_text())["base_model"].get("new_special_tokens") if manifest.is_file() else None
        )
    except (OSError, ValueError, KeyError, AttributeError):
        listed = None
    if ids and not ours:
        said = f": {listed}" if listed else " (the tokens its tokenizer added)"
        raise MethodError(f"method.start_from {where}: it trained the rows of {len(ids)} tokens added to the vocabulary "
                          f"(ids {ids[0]}-{ids[-1]}); the base grows for them as its run's did: set "
                          f"model.new_special_tokens as that run did{said}")  # fmt: skip
    if ours and not ids:
        raise MethodError(f"method.start_from {where}: the adapter trains no token rows, so the tokens "
                          f"model.new_special_tokens adds ({', '.join(ours)}) would stay at their starting values; "
                          "drop model.new_special_tokens, or train a new adapter with them")  # fmt: skip
    if listed is not None and ids and listed != ours:
        raise MethodError(f"method.start_from {where}: its run added the tokens {listed}, this config {ours}: the ids "
                          "would differ; set model.new_special_tokens to its list")  # fmt: skip


def _kinds(names: list[str]) -> set[str]:
    """Module names by their last part: [q_proj] and [model.layers.0.self_attn.q_proj] (as PEFT saves them) agree."""
    return {n.rsplit(".", 1)[-1] for n in names}


def _shown(value) -> str:
    if isinstance(value, list):
        return ", ".join(sorted(_kinds(value)))
    return f"{value:g}" if isinstance(value, float) else repr(value)


def _differs(ours, theirs) -> bool:
    if ours == "all-linear":  # PEFT saves it expanded, as layer names: not comparable without the model
        return False
    if isinstance(ours, list) and isinstance(theirs, list):
        return _kinds(ours) != _kinds(theirs)
    return ours != theirs


def _check_shapes(where: str, model_cfg) -> None:
    """Each adapted layer of the adapter (its safetensors header: no tensor read) against the model's linear layer of
    that name: a missing layer or other sizes (an adapter for another model) refused by name."""
    from safetensors import safe_open

    from tunelab.models.loading import skeleton
    from tunelab.models.sources import pickle_refused

    location = Path(adapter_location(where))
    weights = location / "adapter_model.safetensors"
    if not weights.is_file():
        if (location / "adapter_model.bin").is_file():
            raise MethodError(pickle_refused(f"method.start_from {where}", "adapter_model.bin",
                                             "save the adapter as safetensors"))  # fmt: skip
        raise MethodError(f"method.start_from {where}: no adapter_model.safetensors beside its adapter_config.json")
    model = skeleton(model_cfg)
    if model is None:
        return
    linear = {n: m for n, m in model.named_modules() if hasattr(m, "in_features") and hasattr(m, "out_features")}
    with safe_open(str(weights), framework="pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    for key, shape in sorted(shapes.items()):
        if ".lora_A." not in key and ".lora_B." not in key:
            continue
        path = key.split(".lora_A.")[0] if ".lora_A." in key else key.split(".lora_B.")[0]
        path = path.removeprefix("base_model.model.")
        # the skeleton is the bare transformer: its names lack the task model's prefix (model., transformer. ...)
        layer = linear.get(path) or linear.get(path.split(".", 1)[-1])
        if layer is None:
            raise MethodError(f"method.start_from {where}: it adapts {path}, which {model_cfg.name} has no linear "
                              "layer named: an adapter for another model architecture?")  # fmt: skip
        size, want = (shape[1], layer.in_features) if ".lora_A." in key else (shape[0], layer.out_features)
        if len(shape) == 2 and size != want:
            side = "inputs" if ".lora_A." in key else "outputs"
            raise MethodError(f"method.start_from {where}: its {path} has {size} {side}, {model_cfg.name}'s has {want}: "
                              "an adapter trained over another model (a different size?)")  # fmt: skip


def continued(model, cfg: Config):
    """`cfg.start_from`'s adapter loaded over `model` with its weights trainable (PEFT's own loading, so every
    setting of its adapter_config.json holds), dropout this config's."""
    from peft import LoraConfig, PeftModel

    location = adapter_location(cfg.start_from)
    peft_cfg = LoraConfig.from_pretrained(location)
    peft_cfg.lora_dropout, peft_cfg.inference_mode = cfg.dropout, False
    # the base as this run loaded it, as get_peft_model records it (the saved card names the hub id afterwards): the
    # adapter's own entry may be a hub id, which PEFT's save would look up online
    peft_cfg.base_model_name_or_path = getattr(model, "name_or_path", None) or peft_cfg.base_model_name_or_path
    try:
        peft_model = PeftModel.from_pretrained(model, location, config=peft_cfg, is_trainable=True)
    except (RuntimeError, ValueError, KeyError) as e:
        raise MethodError(
            f"method.start_from {cfg.start_from}: PEFT could not load it over {type(model).__name__} "
            f"({type(e).__name__}: {str(e).splitlines()[0][:300]})"
        ) from None
    setattr(peft_model, STARTED_ADAPTER, location)  # dpo's reference: this adapter as it starts (methods/reference.py)
    return peft_model


def save(model, out_dir) -> None:
    """The adapter in PEFT's format. A PiSSA adapter trained over the residual base W - s B0 A0; saved as the plain
    LoRA [B, -B0] [A; A0] (rank 2r, alpha doubled, PEFT's own conversion), it loads with `PeftModel.from_pretrained`
    over the original base and gives the trained model: W + s (B A - B0 A0) = (W - s B0 A0) + s B A."""
    initial = getattr(model, "tunelab_pissa_initial", None)
    if initial is None:
        return save_peft(model, out_dir)
    import warnings

    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # PEFT warns that PiSSA changes the base when the conversion loads the starting adapter beside the trained one
        warnings.filterwarnings("ignore", message="PiSSA changes the base weights")
        start = Path(tmp) / "pissa_init"  # PEFT writes its adapter_config (init_lora_weights: true) beside these
        start.mkdir()
        state = get_peft_model_state_dict(model, state_dict=initial)
        save_file({k: v.contiguous().cpu() for k, v in state.items()}, start / "adapter_model.safetensors")
        model.save_pretrained(out_dir, safe_serialization=True, path_initial_model_for_weight_conversion=str(start))


def dora_magnitudes_in_fp32(model) -> None:
    """Each new DoRA magnitude m = ||W + s B A|| per row (W as the layer computes with it: dequantized over a 4-bit
    base) taken in fp32 and kept in fp32. PEFT takes it in the weight's dtype: over a bf16 base m would be rounded
    to bf16 (2^-9), so step 0 would scale every adapted row by up to that much instead of being the base model
    (fast_lora computes the norm in fp32), and an adapter trained over bf16 would carry the rounding to a user's fp32
    base."""
    import torch
    from peft.utils.integrations import dequantize_module_weight

    zero_rows = {}  # layer -> its rows whose norm is 0
    for where, module in model.named_modules():
        magnitudes = getattr(module, "lora_magnitude_vector", None)
        if not magnitudes:
            continue
        weight = dequantize_module_weight(module.get_base_layer()).float()
        for name, magnitude in magnitudes.items():
            delta = module.lora_B[name].weight.float() @ module.lora_A[name].weight.float()
            norm = torch.linalg.vector_norm(weight + module.scaling[name] * delta, dim=1)
            magnitude.weight.data = norm.to(magnitude.weight.device)
            if n := int((norm == 0).sum()):
                zero_rows[where.removeprefix("base_model.model.")] = n
    if zero_rows:
        # DoRA scales each row by m / ||W + s B A||, which is 0 / 0 on a row of zeros (PEFT's forward gives NaN there)
        layers = ", ".join(f"{k} ({n} rows)" for k, n in list(zero_rows.items())[:3])
        more = f" and {len(zero_rows) - 3} more layers" if len(zero_rows) > 3 else ""
        raise MethodError(
            f"use_dora: {layers}{more} have output rows of zeros in the base weight, where DoRA's direction "
            "(W + s B A) / ||W + s B A|| is 0 / 0 (PEFT's forward gives NaN): leave those layers out of "
            "method.target_modules, or train them with plain LoRA (use_dora: false)"
        )


load, merge = load_peft, merge_peft
