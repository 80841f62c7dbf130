"""Methods by name: the plug-in table (tunelab/plugins.py) and the contract every method module meets.

A method is a module in `tunelab/methods/` with:
  Config        a pydantic model whose `name: Literal["<name>"]` is the tag in the YAML `method:` section
  CAPABILITIES  a `base.Capabilities`: how DPO / PPO get its reference policy, whether what trains changes
                during the run, virtual tokens, mergeable, a quantized base (see base.py); code outside the
                method reads these, never the method's name
  DESCRIPTION   one line: what trains
  INFERENCE_COST  one line: extra inference cost of the unmerged result ("none" if nothing extra)
  apply(model, cfg) -> model        make the model trainable the method's way (freeze the rest)
  save(model, out_dir) -> None      write the result in the ecosystem's format
  load(base_model, out_dir) -> model  rebuild the trained model from `save`'s output
  merge(model) -> model             (mergeable methods) a plain transformers model
Optional hooks (`get` fills in base.py's defaults for those a module does not define):
  on_step(model, cfg, step, steps_per_epoch=None) -> str | None   called before every optimizer step when
                                    CAPABILITIES.changes_trainables (gradual unfreezing); a returned string
                                    is logged. Default: nothing.
  optimizer_parameters(model, cfg) -> list  every parameter that may train during the run (default:
                                    those with requires_grad after apply)
  optimizer(params, tcfg, lr_scales=None) -> Optimizer | None  the optimizer for `params` (e.g. qlora's paged
                                    8-bit AdamW on CUDA; base.adamw_groups builds the loop's groups); None (the
                                    default): the loop's AdamW
  lr_scales(model, cfg) -> {param: factor}  parameters whose learning rate is a factor times training.lr
                                    (LoRA+'s B); default: none
  load_plan(cfg, device) -> plan | None  layers to convert while the base is read tensor by tensor
                                    (models/streaming.py; qlora: straight into 4-bit); None: the ordinary load
  check_model(cfg, model_cfg) -> note  before the model loads: refuse an architecture the method cannot take
                                    (ia3 without default modules, qlora on Conv1D layers), from
                                    models.loading.skeleton(model_cfg), the layers without weights

Adding a method: write its module, add one line to METHODS in tunelab/plugins.py, add its test and
docs section.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from tunelab.methods.base import DEFAULT_HOOKS, Capabilities
from tunelab.plugins import METHODS

_METHODS = METHODS  # the table lives in tunelab/plugins.py, beside the stages'


def names() -> list[str]:
    return list(_METHODS)


def get(name: str) -> ModuleType:
    if name not in _METHODS:
        raise KeyError(f"unknown method {name!r}; choose one of {names()}")
    module = importlib.import_module(_METHODS[name])
    if not isinstance(getattr(module, "CAPABILITIES", None), Capabilities):
        raise TypeError(f"method module {module.__name__} declares no CAPABILITIES = Capabilities(...)")
    for hook, default in DEFAULT_HOOKS.items():
        if not hasattr(module, hook):
            setattr(module, hook, default)
    return module


def check_model(cfg, log) -> None:
    """Before the model loads (the supervised loop and PPO): the method's `check_model` refuses a model it cannot
    take, and its note (what a setting was changed to, e.g. start_from's adapter settings) goes to `log`."""
    note = get(cfg.method.name).check_model(cfg.method, cfg.model)
    if note:
        log(note)


def capabilities(name: str) -> Capabilities:
    return get(name).CAPABILITIES


def config_classes() -> list[type]:
    return [get(n).Config for n in names()]
