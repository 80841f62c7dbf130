"""The CUDA paths, skipped on machines without a GPU (CI has none; run on one with `pytest tests/test_cuda.py`).

What differs on CUDA and nowhere else: every method's module on GPU tensors; QLoRA's NF4 base with bf16
compute and bitsandbytes' paged 8-bit AdamW; training under bf16 autocast; the folded LoRA path's custom
autograd on GPU matmuls; `torch.cuda.max_memory_allocated` in the compare cell's costs.
"""

import copy
import json

import pytest
import torch
from method_harness import check_method
from test_training import make_cfg as sft_cfg

import tunelab
from tunelab.config import load_config
from tunelab.models.loss import per_example_loss
from tunelab.models.sources import NO_HUB_KERNELS
from tunelab.testing import save_tiny_model_dir, tiny_batch, tiny_llama

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
# fixtures tiny_dir and data_file: conftest.py


def make_cfg(tiny_dir, data_file, out, method, **training):
    """test_training's SFT config (12 steps at lr 1e-2 unless told) with another method."""
    cfg = sft_cfg(tiny_dir, data_file, out, **{"max_steps": 12, "lr": 1e-2, **training})
    return load_config({**cfg.model_dump(), "method": method})


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("lora", {"r": 4, "alpha": 8, "dropout": 0.0}),
        # fp32 compute: the harness compares merged and unmerged logits to 1e-4 (bf16 compute: below)
        ("qlora", {"r": 4, "alpha": 8, "dropout": 0.0, "compute_dtype": "float32"}),
        ("adapter", {}),
        ("prefix", {}),
        ("prompt", {"min_drop": 0.15}),  # the CPU suite's settings (test_prefix_prompt.HARNESS)
        ("ia3", {}),
        ("bitfit", {}),
    ],
)
def test_methods_learn_save_and_reload_on_cuda(name, kwargs, tmp_path):
    lr = {"ia3": 1e-1, "bitfit": 3e-2, "prompt": 3e-2}.get(name, 1e-2)
    check_method(name, "llama", tmp_path, lr=lr, device="cuda", **kwargs)


def test_qlora_on_cuda_quantizes_to_nf4_with_bf16_compute():
    import bitsandbytes as bnb

    from tunelab.methods import get

    qlora = get("qlora")
    model = qlora.apply(tiny_llama(hidden_size=64, intermediate_size=128).cuda(), qlora.Config(r=4))
    lin = model.get_base_model().model.layers[0].self_attn.q_proj.get_base_layer()
    assert isinstance(lin, bnb.nn.Linear4bit) and lin.weight.device.type == "cuda"
    assert lin.weight.quant_state.quant_type == "nf4" and lin.compute_dtype == torch.bfloat16
    opt = qlora.optimizer([p for p in model.parameters() if p.requires_grad], _Adam())
    assert isinstance(opt, bnb.optim.PagedAdamW8bit)
    # merged: plain Linear layers in the base's own dtype (fp32 here), close to the bf16-compute QLoRA logits
    ids = tiny_batch("llama")["input_ids"].cuda()
    with torch.no_grad():
        before = model.eval()(input_ids=ids).logits.float()
        merged = qlora.merge(model)
        after = merged(input_ids=ids).logits
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    assert (after - before).abs().max() < 2e-2 * before.abs().max()


class _Adam:  # the two fields qlora.optimizer reads from a TrainingConfig
    lr, weight_decay, betas = 1e-3, 0.0, (0.9, 0.999)


def test_folded_lora_matches_peft_on_cuda():
    from test_fast_lora import _grads, _lora_model, _peft_only

    model = _lora_model(base=tiny_llama()).cuda()
    batch = {k: v.cuda() for k, v in tiny_batch("llama").items()}
    loss_fast, g_fast = _grads(model, batch)
    loss_peft, g_peft = _grads(_peft_only(model), batch)
    assert loss_fast == pytest.approx(loss_peft, rel=1e-4)
    with torch.no_grad():  # the fused head + cross-entropy against the full logits
        full = float(per_example_loss(_peft_only(model), batch).sum())
    assert loss_fast == pytest.approx(full, rel=1e-4)
    for k in g_fast:  # TF32 may be on for cuBLAS: tolerances of a reduced-precision matmul
        torch.testing.assert_close(g_fast[k], g_peft[k], rtol=2e-3, atol=1e-5, msg=k)


@pytest.mark.parametrize(
    "method",
    [
        {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        {"name": "qlora", "r": 4, "alpha": 8, "dropout": 0.0},
        {"name": "full"},
    ],
    ids=["lora", "qlora", "full"],
)
def test_training_on_cuda_learns_and_reloads(tiny_dir, data_file, tmp_path, method):
    from tunelab.stages.runs import load_run

    torch.cuda.reset_peak_memory_stats()
    lr = 1e-3 if method["name"] == "full" else 1e-2
    result = tunelab.train(make_cfg(tiny_dir, data_file, tmp_path / "run", method, lr=lr))
    m = result.metrics
    assert m["eval_loss"] < m["eval_loss_before"], m
    assert torch.cuda.max_memory_allocated() > 0
    model, tok = load_run(str(tmp_path / "run"), device="cuda")
    again, _ = load_run(str(tmp_path / "run"), device="cuda")
    ids = tok("The number is 7.", return_tensors="pt").input_ids.cuda()
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, again(input_ids=ids).logits
    assert a.device.type == "cuda" and torch.equal(a, b)


def test_lora_adapter_trained_on_cuda_loads_with_plain_peft(tiny_dir, data_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunelab.stages.runs import load_run

    method = {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0}
    result = tunelab.train(make_cfg(tiny_dir, data_file, tmp_path / "run", method))
    ours, tok = load_run(str(tmp_path / "run"), device="cuda")
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, **NO_HUB_KERNELS).cuda()
    theirs = PeftModel.from_pretrained(base, str(result.final_dir)).eval()
    ids = tok("The number is 7.", return_tensors="pt").input_ids.cuda()
    assert ours.dtype == torch.bfloat16  # model.dtype auto on CUDA; plain PEFT on an fp32 base:
    with torch.no_grad():
        a, b = ours.eval()(input_ids=ids).logits.float(), theirs(input_ids=ids).logits
    assert (a - b).abs().max() < 2e-2 * b.abs().max()  # bf16 rounding, not a different adapter
    theirs_bf16 = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16, **NO_HUB_KERNELS).cuda(),
                                            str(result.final_dir)).eval()  # fmt: skip
    with torch.no_grad():
        c = theirs_bf16(input_ids=ids).logits.float()
    assert (a - c).abs().max() < (a - b).abs().max() + 1e-6


def test_interrupted_run_on_cuda_resumes_to_the_same_losses(tiny_dir, data_file, tmp_path):
    method = {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1}
    tunelab.train(make_cfg(tiny_dir, data_file, tmp_path / "a", method, max_steps=8))

    def stop_after_3(step, record):
        if step == 3:
            raise KeyboardInterrupt

    cfg = make_cfg(tiny_dir, data_file, tmp_path / "b", method, max_steps=8)
    tunelab.train(cfg, callbacks=[stop_after_3])
    tunelab.train(copy.deepcopy(cfg), resume=True)

    def losses(d):
        lines = [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in lines if "loss" in r}

    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(b) == list(range(1, 9))
    for step in range(4, 9):  # dropout masks come from the restored CUDA RNG state
        assert a[step] == pytest.approx(b[step], rel=1e-4, abs=1e-5), step


def test_full_fine_tuning_on_cuda_keeps_fp32_master_weights(tiny_dir, data_file, tmp_path):
    """bf16 weights would round AdamW's small steps away: the loop upcasts what trains (loop.fp32_master_weights_)."""
    from transformers import AutoModelForCausalLM

    result = tunelab.train(make_cfg(tiny_dir, data_file, tmp_path / "run", {"name": "full"}, lr=1e-4, max_steps=4))
    plain = AutoModelForCausalLM.from_pretrained(result.final_dir, **NO_HUB_KERNELS)
    start = AutoModelForCausalLM.from_pretrained(tiny_dir, **NO_HUB_KERNELS)
    assert plain.dtype == torch.float32
    moved = [(a - b).abs().max() for a, b in zip(plain.parameters(), start.parameters()) if a.ndim == 2]
    assert all(0 < float(m) < 1e-2 for m in moved)  # each matrix moved by ~lr per step, not 0 and not bf16 noise


# ------------------------------------------------------------------------- alignment stages on CUDA
def test_reward_and_dpo_on_cuda(tiny_dir, tmp_path):
    import math

    from test_preference import make_cfg as pref_cfg
    from test_preference import synthetic_pairs, write_jsonl

    files = write_jsonl(tmp_path / "train.jsonl", synthetic_pairs(120, 0)), write_jsonl(tmp_path / "dev.jsonl",
                                                                                         synthetic_pairs(40, 1))  # fmt: skip
    rm = tunelab.train(pref_cfg("reward", tiny_dir, files, tmp_path / "rm")).metrics
    assert rm["pairwise_accuracy"] > 0.9 and rm["eval_loss"] < 0.5 * rm["eval_loss_before"], rm
    dpo = tunelab.train(pref_cfg("dpo", tiny_dir, files, tmp_path / "dpo")).metrics
    assert dpo["eval_loss_before"] == pytest.approx(math.log(2), abs=1e-3)  # policy = reference at step 0
    assert dpo["chosen_logratio"] - dpo["rejected_logratio"] > 2.0 and dpo["pairwise_accuracy"] > 0.9, dpo


def test_ppo_on_cuda_raises_the_reward(tmp_path):
    from test_ppo import INIT, REWARDED
    from test_ppo import make_cfg as ppo_cfg

    model_dir = save_tiny_model_dir(tmp_path / "model", initializer_range=INIT)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}: tell me about the number {i}."}) + "\n"
                               for i in range(96)))  # fmt: skip
    assert REWARDED
    m = tunelab.train(ppo_cfg(model_dir, str(prompts), tmp_path / "run")).metrics
    assert m["eval_score"] > m["eval_score_before"] + 0.05 and m["eval_kl"] < 6.0, m


# ------------------------------------------------------------------------------- compare on CUDA
def test_compare_cells_on_cuda_record_the_gpu_peak(tmp_path):
    from test_compare import QUIET, grid_for, toy_rows

    from tunelab.compare import run_grid

    save_tiny_model_dir(tmp_path / "llama", arch="llama")
    for split, n, seed in (("train", 24, 0), ("dev", 12, 1)):
        (tmp_path / f"reviews-{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy_rows(n, seed)))
    grid = grid_for(
        tmp_path,
        tmp_path / "out",
        models=[{"name": str(tmp_path / "llama"), "label": "llama", "data": {"max_length": 256}}],  # fmt: skip
        methods=[{"name": "lora", "r": 4, "dropout": 0.0}, {"name": "qlora", "r": 4, "dropout": 0.0}],
    )
    grid["tasks"] = grid["tasks"][:1]
    rows = [r for r in run_grid(grid, **QUIET).rows if r["kind"] != "baseline"]
    assert [r["method"] for r in rows] == ["zero-shot", "lora", "qlora"]  # the untrained model is a reference row
    rows = rows[1:]
    for r in rows:
        assert r["status"] == "done", r["error"]
        assert r["cuda_peak_mb"] and r["cuda_peak_mb"] > 0 and r["main_value"] is not None
