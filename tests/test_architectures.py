"""Every common method trains on the decoder families users fine-tune, not only on Llama: Qwen2 (biases on
q/k/v), GPT-2 (Conv1D projections, LayerNorm with biases, a class not named *ForCausalLM), Phi-3 (fused qkv_proj
and gate_up_proj) and GPT-NeoX (parallel residual, LayerNorm). Tiny random models, bf16 weights (the CPU
default where bf16 is native, and where mixed dtypes break first), a few steps each: the loss is finite and
goes down. A sweep of these against `training.accelerate: off` found GPT-2 prompt tuning, GPT-2 bitfit in bf16
and gradual unfreezing of GPT-NeoX in bf16 failing (fixed; their own tests are in the methods' files)."""

from __future__ import annotations

import json

import pytest
import torch

import tunelab
from tunelab.testing import tiny_causal, tiny_tokenizer

FAMILIES = {"qwen2": {}, "gpt2": {}, "phi3": {"pad_token_id": 0}, "gpt_neox": {}}  # tiny_causal's overrides
METHODS = {
    "lora": {"r": 4, "dropout": 0.05},
    "prompt": {},
    "prefix": {},
    "bitfit": {},
    "gradual": {"every_steps": 1},
}
ROWS = [
    {"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": f"{w} {w} {w} ok"}]}
    for w in ["red", "blue", "green", "pink"] * 2
]


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    tok = tiny_tokenizer()
    for name, overrides in FAMILIES.items():
        tiny_causal(name, len(tok), bos_token_id=1, eos_token_id=2, **overrides).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return root


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_method_trains_on_the_family_in_bf16(family_dirs, family, method):
    cfg = {
        "output_dir": str(family_dirs / f"run-{family}-{method}"),
        "model": {"name": str(family_dirs / family), "dtype": "bfloat16"},
        "data": {"train": str(family_dirs / "train.jsonl"), "max_length": 32, "val_fraction": 0},
        "method": {"name": method, **METHODS[method]},
        "training": {
            "max_steps": 4,
            "batch_size": 8,
            "lr": 3e-2 if method in ("prompt", "prefix") else 1e-2,
            "warmup_steps": 0,
            "progress": False,
            "tensorboard": False,
        },  # fmt: skip
    }
    result = tunelab.train(cfg)
    losses = [json.loads(line)["loss"] for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line and '"step"' in line]  # fmt: skip
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert min(losses[1:]) < losses[0], losses
