"""stage distill: the loss against hand computations and torch's kl_div, the student moving toward the teacher
(faster than with hard labels alone), the teacher cache written once and reused on resume, the tokenizer check."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import tunelab
from tunelab.config import ConfigError, load_config
from tunelab.stages import distill as D
from tunelab.testing import save_tiny_model_dir

ROWS = [{"instruction": f"Count to {i}.", "input": "", "output": " ".join(str(j) for j in range(i % 7 + 2))}
        for i in range(40)]  # fmt: skip


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    # the teacher: wider and differently seeded; same tokenizer (tiny_tokenizer is deterministic)
    teacher = save_tiny_model_dir(root / "teacher", seed=7, hidden_size=64, intermediate_size=128)
    student = save_tiny_model_dir(root / "student", seed=0)
    other = save_tiny_model_dir(root / "other", vocab_size=300)  # another vocabulary
    for name, rows in (("train", ROWS[:32]), ("dev", ROWS[32:])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "teacher": teacher, "student": student, "other": other}


ROWS_EX = [{"input_ids": [5, 6], "labels": [-100, 6]}]


def make_cfg(dirs, out, method=None, teacher=None, lr=5e-3, **distill):
    d = {"teacher": teacher or dirs["teacher"], "temperature": 2.0, "alpha": 1.0, "top_k": 16}
    d.update(distill)
    root = dirs["root"]
    return load_config({
        "stage": "distill", "output_dir": str(out), "model": {"name": dirs["student"]},
        "data": {"train": str(root / "train.jsonl"), "validation": str(root / "dev.jsonl"), "max_length": 64},
        "method": method or {"name": "full"}, "distill": d,
        "training": {"max_steps": 25, "batch_size": 8, "lr": lr, "warmup_steps": 0, "progress": False,
                     "tensorboard": False, "seed": 3, "eval_every": 25},
    })  # fmt: skip


def evals(run_dir):
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "eval_kl" in r]


# ----------------------------------------------------------------------------------------------- the loss
def test_full_vocabulary_kl_equals_torch_kl_div():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 11, generator=g) * 3, torch.randn(6, 11, generator=g) * 3
    target = torch.randint(0, 11, (6,), generator=g)
    tau = 1.7
    t_lp = F.log_softmax(teacher / tau, -1)
    top = t_lp.topk(11, -1)
    kl, ce = D.distill_terms(student, target, top.indices, top.values, tau)
    ref = F.kl_div(F.log_softmax(student / tau, -1), t_lp, log_target=True, reduction="none").sum(-1)
    assert torch.allclose(kl, ref, atol=1e-5)
    assert torch.allclose(ce, F.cross_entropy(student, target, reduction="none"))


def test_top_k_kl_is_over_the_top_k_and_one_other_bucket():
    s, t, tau = torch.tensor([[2.0, 1.0, 0.0, -1.0]]), torch.tensor([[0.0, 3.0, 1.0, 0.5]]), 2.0
    t_lp = F.log_softmax(t / tau, -1)
    ids = torch.tensor([[1, 2]])  # the teacher's top 2
    kl, _ = D.distill_terms(s, torch.tensor([0]), ids, t_lp.gather(-1, ids), tau)

    # by hand: three outcomes, tokens 1, 2 and "other" (tokens 0 and 3), for both models at tau
    def probs(logits):
        e = [math.exp(x / tau) for x in logits]
        return [e[1] / sum(e), e[2] / sum(e), (e[0] + e[3]) / sum(e)]

    p, q = probs([0.0, 3.0, 1.0, 0.5]), probs([2.0, 1.0, 0.0, -1.0])
    hand = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert kl.item() == pytest.approx(hand, rel=1e-5)
    # a coarser view of the same two distributions: below the full KL (data processing), above 0
    full = F.kl_div(F.log_softmax(s / tau, -1), t_lp, log_target=True, reduction="sum").item()
    assert 0 < hand < full
    # a student equal to its teacher scores 0 at any k (a renormalised top-k target would not)
    same, _ = D.distill_terms(t, torch.tensor([0]), ids, t_lp.gather(-1, ids), tau)
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(torch.autograd.functional.jacobian(
        lambda x: D.distill_terms(x, torch.tensor([0]), torch.tensor([[1, 2, 0, 3]]), t_lp, tau)[0], s
    )).all()  # k = V: no bucket, a finite gradient  # fmt: skip


def test_loss_sum_mixes_kl_and_ce_by_alpha_and_tau_squared(dirs):
    from tunelab.data import collate
    from tunelab.models.loss import shift_labels

    model = D.load_teacher(dirs["student"], torch.device("cpu"))
    teacher = D.load_teacher(dirs["teacher"], torch.device("cpu"))
    ex = [{"input_ids": [5, 9, 12, 40, 41, 7], "labels": [-100, -100, 12, 40, 41, 7]},
          {"input_ids": [3, 8, 30, 31], "labels": [-100, 8, 30, 31]}]  # fmt: skip
    part = D.teacher_topk(teacher, ex, 320, 2.0, 0, 320, torch.device("cpu"))
    batch = D.collate_with_teacher(D.attach(ex, part), 0)
    loss, n, extras = D.distill_loss_fn(2.0, 0.3, {"vocab": 320})(model, batch)
    assert n == 7 == batch["teacher_ids"].shape[0]
    b = collate(ex, 0)
    with torch.no_grad():
        keep = shift_labels(b["labels"]) != -100
        s = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[keep]
        t = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[keep]
    kl = F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True, reduction="sum")
    ce = F.cross_entropy(s, shift_labels(b["labels"])[keep], reduction="sum")
    assert extras["kl"].item() == pytest.approx(kl.item(), rel=2e-3)  # float16 teacher log-probs
    assert extras["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert loss.item() == pytest.approx(0.3 * 4 * kl.item() + 0.7 * ce.item(), rel=2e-3)


# ----------------------------------------------------------------------------------------------- training
def test_student_moves_toward_the_teacher_faster_than_with_hard_labels(dirs, tmp_path):
    kd = tunelab.train(make_cfg(dirs, tmp_path / "kd"))
    ce_only = tunelab.train(make_cfg(dirs, tmp_path / "ce", alpha=0.0))
    before, after = evals(tmp_path / "kd")[0]["eval_kl"], evals(tmp_path / "kd")[-1]["eval_kl"]
    ce_after = evals(tmp_path / "ce")[-1]["eval_kl"]
    assert evals(tmp_path / "ce")[0]["eval_kl"] == pytest.approx(before)  # the same start, the same cache key
    assert after < 0.7 * before, (before, after)
    assert after < ce_after, (after, ce_after)
    assert kd.final_dir is not None and ce_only.final_dir is not None
    assert len(list((tmp_path / "kd" / "distill").glob("teacher-*.safetensors"))) == 1
    from tunelab.stages.runs import load_run

    reloaded, _ = load_run(str(tmp_path / "kd"), device="cpu")  # the distilled run loads back like an sft one
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    # a finished run as the teacher: its tokenizer passes the check, it loads frozen
    run_teacher = make_cfg(dirs, tmp_path / "next", teacher=str(tmp_path / "kd"))
    D.check_same_tokenizer(run_teacher)
    frozen = D.load_teacher(str(tmp_path / "kd"), torch.device("cpu"))
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())


def test_lora_student_learns_from_the_teacher(dirs, tmp_path):
    method = {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0}
    tunelab.train(make_cfg(dirs, tmp_path / "lora", method=method, lr=3e-2))
    e = evals(tmp_path / "lora")
    assert e[-1]["eval_kl"] < 0.95 * e[0]["eval_kl"], e  # measured 0.91 (a rank-8 adapter on a 37k model)


def test_cache_written_once_and_reused_on_resume(dirs, tmp_path, monkeypatch):
    cfg = make_cfg(dirs, tmp_path / "run")
    loads = []
    real = D.load_teacher
    monkeypatch.setattr(D, "load_teacher", lambda *a: loads.append(a) or real(*a))

    def stop(step, record):
        if step == 5:
            raise KeyboardInterrupt

    first = tunelab.train(cfg, callbacks=[stop])
    assert first.metrics.get("interrupted") and len(loads) == 1
    cached = list((tmp_path / "run" / "distill").glob("teacher-*.safetensors"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    monkeypatch.setattr(D, "load_teacher", lambda *a: pytest.fail("the teacher was loaded again on resume"))
    second = tunelab.train(cfg, resume=True)
    assert second.final_dir is not None and second.metrics["steps"] == 25
    assert cached[0].stat().st_mtime_ns == stamp
    # another temperature is another cache key
    assert D.cache_key(make_cfg(dirs, tmp_path / "run", temperature=1.0), ROWS_EX, []) != D.cache_key(cfg, ROWS_EX, [])


def test_mismatched_tokenizers_are_one_named_error_before_any_model_loads(dirs, tmp_path, monkeypatch):
    monkeypatch.setattr(D, "load_model", lambda *a, **k: pytest.fail("the student loaded before the check"))
    monkeypatch.setattr(D, "load_teacher", lambda *a, **k: pytest.fail("the teacher loaded before the check"))
    with pytest.raises(ConfigError, match="distill.teacher .*other.* and model.name .*student.*vocabularies differ"):
        tunelab.train(make_cfg(dirs, tmp_path / "bad", teacher=dirs["other"]))


def test_config_refuses_packing_and_a_missing_teacher(dirs, tmp_path):
    with pytest.raises(ConfigError, match="distill.teacher"):
        load_config({"stage": "distill", "data": {"train": "x.jsonl"}})
    with pytest.raises(ConfigError, match="data.packing: false"):
        load_config({"stage": "distill", "distill": {"teacher": "t"}, "data": {"train": "x.jsonl", "packing": True}})
