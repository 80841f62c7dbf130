"""Kept gradients and AdamW moments (tunelab/training/memory.py): the same updates as set_to_none."""

import copy

import torch
from torch import nn

from tunelab.training.memory import KeptGrads


def _model():
    torch.manual_seed(0)
    model = nn.ModuleDict({"used": nn.Linear(6, 4), "unused": nn.Linear(6, 4)})
    return model


def _loss(model, seed):
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(seed))
    return model["used"](x).pow(2).sum()


def test_updates_match_set_to_none_including_a_parameter_without_gradient():
    ref_model, model = _model(), _model()
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=0.1, weight_decay=0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
    before = copy.deepcopy(model.state_dict())
    kept = KeptGrads(opt, list(model.parameters()))
    # made up front: zero gradients, zero moments at step 0, and no parameter moved
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    assert all(float(s["step"]) == 0 and not s["exp_avg"].any() for s in opt.state.values())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    grads = [p.grad for p in model.parameters()]
    for step in range(4):
        for passes in range(2):  # two passes accumulate into one step
            _loss(ref_model, 10 * step + passes).backward()
            _loss(model, 10 * step + passes).backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        kept.step()
    for (name, p), ref in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.equal(p, ref), name
    # the unused layer got no gradient: AdamW skipped it, weight decay included
    assert torch.equal(model["unused"].weight, before["unused.weight"])
    # the same gradient tensors all along
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))
    kept.remove()


def test_applies_only_to_one_process_fixed_parameters_on_cpu():
    model = _model()
    opt = torch.optim.AdamW(model.parameters())
    assert KeptGrads.applies(opt, object(), multi_process=False)
    assert not KeptGrads.applies(opt, object(), multi_process=True)

    class Gradual:
        def on_step(self, *a, **k):
            pass

    assert not KeptGrads.applies(opt, Gradual(), multi_process=False)


def test_training_run_is_bitwise_the_same_with_kept_gradients(tmp_path, monkeypatch):
    import json

    from safetensors.torch import load_file

    import tunelab
    from tunelab.config import load_config
    from tunelab.testing import save_tiny_model_dir

    folder = save_tiny_model_dir(tmp_path / "model")
    rows = [{"instruction": f"Say {i}.", "input": "", "output": f"It is {i}."} for i in range(16)]
    (tmp_path / "train.json").write_text(json.dumps(rows))

    def run(name):
        cfg = load_config(
            {
                "output_dir": str(tmp_path / name),
                "model": {"name": folder, "dtype": "float32"},
                "data": {"train": str(tmp_path / "train.json"), "val_fraction": 0.0, "max_length": 64},
                "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
                "training": {
                    "max_steps": 3,
                    "batch_size": 4,
                    "rows_per_pass": 2,
                    "lr": 1e-2,
                    "weight_decay": 0.1,
                    "progress": False,
                    "tensorboard": False,
                    "device": "cpu",
                },
            }
        )
        result = tunelab.train(cfg)
        lines = [json.loads(ln) for ln in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in lines if "loss" in r], load_file(str(result.final_dir / "adapter_model.safetensors"))

    made = []
    original = KeptGrads.__init__

    def spy(self, *a, **k):
        made.append(self)
        original(self, *a, **k)

    monkeypatch.setattr(KeptGrads, "__init__", spy)
    kept_losses, kept_adapter = run("kept")
    assert len(made) == 1
    monkeypatch.setattr(KeptGrads, "applies", staticmethod(lambda *a: False))
    plain_losses, plain_adapter = run("plain")
    assert len(made) == 1 and len(plain_losses) == 3 and kept_losses == plain_losses
    for k in plain_adapter:
        assert torch.equal(kept_adapter[k], plain_adapter[k]), k
