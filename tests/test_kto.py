"""Stage kto (Kahneman-Tversky Optimization): its data, its loss against the paper's formula, and training on a
tiny model."""

import json
import math

import pytest
import torch
from test_preference import record_reference_calls, synthetic_pairs, write_jsonl

import tunelab
from tunelab.config import ConfigError, load_config
from tunelab.data import DataError
from tunelab.data.preference import collate_unpaired, encode_unpaired, mismatched, read_unpaired
from tunelab.stages import dpo as P
from tunelab.stages import kto as K
from tunelab.testing import save_tiny_model_dir, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("model"))


def unpaired(n: int, seed: int) -> list[dict]:
    """TRL's unpaired rows: a reply with 'Paris' is desirable, one without is not (the pairs of test_preference,
    split, the two kinds interleaved)."""
    rows = []
    for p in synthetic_pairs(n, seed):
        rows += [{"prompt": p["prompt"], "completion": p["chosen"], "label": True},
                 {"prompt": p["prompt"], "completion": p["rejected"], "label": False}]  # fmt: skip
    return rows


def make_cfg(tiny_dir, train, val, out, **training):
    t = dict(max_steps=30, batch_size=8, lr=1e-2, warmup_steps=0, progress=False, tensorboard=False, seed=3)
    t.update(training)
    return load_config({"stage": "kto", "output_dir": str(out), "model": {"name": tiny_dir},
                        "data": {"train": train, "validation": val, "max_length": 64},
                        "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0}, "kto": {"beta": 0.5},
                        "training": t})  # fmt: skip


def test_kto_loss_is_the_papers():
    """Ethayarajh et al. 2024, eq. 8 (TRL's KTOTrainer alike): v = lambda_D sigmoid(beta (r - z)) for a desirable
    reply, lambda_U sigmoid(beta (z - r)) for an undesirable one, loss lambda_y - v."""
    g = torch.Generator().manual_seed(0)
    r, z = torch.randn(64, generator=g) * 3, torch.tensor(0.7)
    good = torch.rand(64, generator=g) > 0.4
    for beta, wd, wu in ((0.1, 1.0, 1.0), (0.5, 1.33, 1.0), (2.0, 1.0, 0.5)):
        expected = []
        for ri, gi in zip(r.tolist(), good.tolist()):
            lam, value = (
                (wd, wd / (1 + math.exp(-beta * (ri - 0.7)))) if gi else (wu, wu / (1 + math.exp(-beta * (0.7 - ri))))
            )
            expected.append(lam - value)
        torch.testing.assert_close(K.kto_loss(r, z, good, beta, wd, wu), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    # where the policy is the reference (r = z = 0) every reply's loss is half its weight
    assert K.kto_loss(torch.zeros(2), torch.tensor(0.0), torch.tensor([True, False]), 0.1, 2.0, 1.0).tolist() == [
        1.0,
        0.5,
    ]


def test_unpaired_rows_in_every_shape_and_their_errors(tmp_path):
    trl = write_jsonl(tmp_path / "trl.jsonl", [{"prompt": "Hi", "completion": "Hello!", "label": True},
                                               {"prompt": "Hi", "completion": "Go away.", "label": "false"}])  # fmt: skip
    ex, stats = read_unpaired(trl)
    assert [e["label"] for e in ex] == [True, False] and ex[0]["prompt"] == [{"role": "user", "content": "Hi"}]
    assert (stats["desirable"], stats["undesirable"]) == (1, 1)
    # LLaMA-Factory's kto_en_demo: a conversation ending with the reply, labelled by kto_tag (here 'label')
    lf = write_jsonl(tmp_path / "lf.jsonl", [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], "kto_tag": True},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "No."}], "kto_tag": False}])  # fmt: skip
    ex, _ = read_unpaired(lf)
    assert [(e["completion"], e["label"]) for e in ex] == [("Hello!", True), ("No.", False)]
    # preference pairs: each pair two examples (TRL's unpair_preference_dataset)
    ex, stats = read_unpaired(write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(3, 0)))
    assert [e["label"] for e in ex] == [True, False] * 3 and stats["pairs_unpaired"] == 3
    with pytest.raises(
        DataError, match=r"bad.jsonl line 2: field 'label' is missing: stage kto needs each reply labelled"
    ):
        read_unpaired(write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b", "label": True},
                                                           {"prompt": "a", "completion": "b"}]))  # fmt: skip
    with pytest.raises(DataError, match="every example is desirable: KTO needs both kinds"):
        read_unpaired(write_jsonl(tmp_path / "good.jsonl", [{"prompt": "a", "completion": "b", "label": True}]))


def test_kl_rows_pair_each_prompt_with_another_rows_reply_and_collate_after_the_examples():
    tok = tiny_tokenizer()
    ex = [{"prompt": [{"role": "user", "content": f"question {i // 2}"}], "completion": f"answer {i} " * (i + 1),
           "label": i % 2 == 0, "group": i // 2} for i in range(6)]  # three pairs, unpaired  # fmt: skip
    for seed in range(5):
        enc = mismatched([encode_unpaired(e, tok, 64) for e in ex], 64, seed)
        replies = {i: e["input_ids"][e["response_mask"].index(1) :] for i, e in enumerate(enc)}
        used = []
        for e in enc:
            start = e["response_mask"].index(1)
            assert e["kl_input_ids"][:start] == e["input_ids"][:start]  # its own prompt
            other = [j for j, r in replies.items() if e["kl_input_ids"][start:] == r]
            assert len(other) == 1 and enc[other[0]]["group"] != e["group"]  # another row's reply, not its pair's
            used.append(other[0])
        assert sorted(used) == list(range(6))  # each reply serves one KL row
    batch = collate_unpaired(enc, tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 12 and batch["label"].tolist() == [1, 0, 1, 0, 1, 0]
    assert batch["input_ids"][6, : len(enc[0]["kl_input_ids"])].tolist() == enc[0]["kl_input_ids"]
    short = mismatched([encode_unpaired(e, tok, 12) for e in ex], 12)  # long KL rows lose their prompt's start
    assert all(len(e["kl_input_ids"]) <= 12 and 1 in e["kl_response_mask"] for e in short)


def test_the_kl_rows_run_without_gradients_and_give_the_whole_batchs_log_ratios(tiny_dir, monkeypatch):
    """z is not differentiated: the policy runs the KL rows under no_grad (TRL's KTOTrainer too), so no backward
    work or activations are spent on half the rows; each half's log-probs are the whole batch's."""
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    ex = [{"prompt": [{"role": "user", "content": f"question {i}"}], "completion": f"answer {i} " * (i % 3 + 1),
           "label": i % 2 == 0, "group": i} for i in range(4)]  # fmt: skip
    batch = collate_unpaired(mismatched([encode_unpaired(e, tok, 64) for e in ex], 64, 0), tok.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).train()
    monkeypatch.setattr(K, "reference_logps", lambda m, b: torch.zeros(len(b["input_ids"])))
    r, kl = K._kto_parts(model, batch)
    assert r.requires_grad and not kl.requires_grad
    whole = P.sequence_logps(model, batch)
    torch.testing.assert_close(torch.cat([r, kl]).detach(), whole.detach(), atol=1e-5, rtol=1e-5)


def test_kto_learns_the_labels_against_an_unchanged_reference(tiny_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    calls = record_reference_calls(monkeypatch, K)
    train = write_jsonl(tmp_path / "train.jsonl", unpaired(120, 0))
    val = write_jsonl(tmp_path / "dev.jsonl", synthetic_pairs(20, 1))  # pairs: stage kto splits them
    result = tunelab.train(make_cfg(tiny_dir, train, val, tmp_path / "kto", max_steps=60))
    m = result.metrics
    assert m["eval_loss_before"] == pytest.approx(0.5, abs=1e-6)  # r = z = 0: each reply's loss is half its weight
    assert m["eval_loss"] < 0.2 and m["reward_accuracy"] > 0.9
    assert m["pairwise_accuracy"] > 0.9 and m["pairs"] == 20  # the dev rows are pairs, unpaired
    assert m["desirable_logratio"] > 0.5 > -0.5 > m["undesirable_logratio"]
    lines = [json.loads(x) for x in (tmp_path / "kto" / "metrics.jsonl").read_text().splitlines()]
    assert all("kl" in r and r["kl"] >= 0 for r in lines if "loss" in r)
    # the reference never moved: every reference pass gave the untrained model's log-probs
    base = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    with torch.no_grad():
        for batch, got in calls[:: max(1, len(calls) // 8)]:
            torch.testing.assert_close(got, P.sequence_logps(base, batch), atol=1e-4, rtol=1e-4)


def test_kto_weights_and_what_it_refuses(tiny_dir, tmp_path):
    rows = unpaired(40, 0)[:60]  # 30 of each kind
    train = write_jsonl(tmp_path / "t.jsonl", rows)
    cfg = make_cfg(tiny_dir, train, train, tmp_path / "w", max_steps=1)
    cfg.kto.desirable_weight, cfg.kto.undesirable_weight = 1.5, 0.5
    # step 0: (1.5 x 30 + 0.5 x 30) / 2 / 60 = 0.5 per reply on average, weighted
    assert tunelab.train(cfg).metrics["eval_loss_before"] == pytest.approx((1.5 * 30 + 0.5 * 30) / 2 / 60, abs=1e-6)
    with pytest.raises(ConfigError, match="stage: kto does not pack"):
        load_config({"stage": "kto", "model": {"name": "m"}, "data": {"train": "d.jsonl", "packing": True}})
    with pytest.raises(ConfigError, match="or replies labelled desirable or not"):
        load_config({"stage": "kto", "model": {"name": "m"}, "data": {"train": "d.jsonl", "format": "instruction"}})
    with pytest.raises(ConfigError, match="lower training.batch_size and raise training.grad_accum"):
        load_config({"stage": "kto", "model": {"name": "m"}, "data": {"train": "d.jsonl"},
                     "training": {"rows_per_pass": 2}})  # fmt: skip


@pytest.mark.parametrize("method", ["lora", "bitfit"])  # pi_ref: the model with its adapter off; a frozen copy
def test_z_ref_is_one_mean_over_each_micro_batch_whatever_the_threads(method, tiny_dir, tmp_path, capsys):
    """z_ref couples a micro-batch's rows: where the micro-batch runs as thread shares, the loop's thread first
    computes pi_ref of every row (with lora the model with its adapter off, which a share's pass beside it must not
    see) and z_ref over all of its KL rows (Stage.ahead), and the training is one pass's to rounding, z_ref
    included."""
    train = write_jsonl(tmp_path / "t.jsonl", unpaired(40, 0))
    runs, logs = {}, {}
    for threads in (2, 1):
        cfg = make_cfg(tiny_dir, train, train, tmp_path / f"p{threads}", max_steps=6, pass_threads=threads)
        raw = cfg.model_dump(mode="json")
        raw["method"] = raw["method"] if method == "lora" else {"name": method}
        tunelab.train(load_config(raw))
        runs[threads] = [json.loads(x) for x in (tmp_path / f"p{threads}" / "metrics.jsonl").read_text().splitlines()]
        logs[threads] = capsys.readouterr().err
    assert "up to 2 shares of its rows at once" in logs[2] and "thread shares:" not in logs[2]
    losses = [[(r["loss"], r["kl"]) for r in runs[t] if "loss" in r] for t in (2, 1)]
    assert len(losses[0]) == 6 and losses[0][-1][0] < losses[0][0][0]
    for (loss2, kl2), (loss1, kl1) in zip(*losses):
        assert loss2 == pytest.approx(loss1, rel=1e-4) and kl2 == pytest.approx(kl1, rel=1e-3, abs=1e-7)
    assert max(kl for _, kl in losses[0]) > 0.1  # z_ref not clamped to 0 throughout: the test can tell


def test_kto_with_lora_dropout_under_thread_shares_repeats_run_to_run(tiny_dir, tmp_path, capsys):
    """kto's KL rows pass the policy in training mode, so LoRA dropout draws there too: before the shares, each
    share's KL passes draw from a generator of its own (as the shares' passes do), whichever thread runs first."""
    train = write_jsonl(tmp_path / "t.jsonl", unpaired(24, 0))
    runs = []
    for k in range(2):
        raw = make_cfg(tiny_dir, train, train, tmp_path / f"r{k}", max_steps=3, pass_threads=2).model_dump(mode="json")
        raw["method"]["dropout"] = 0.2
        tunelab.train(load_config(raw))
        lines = (tmp_path / f"r{k}" / "metrics.jsonl").read_text().splitlines()
        runs.append([(r["loss"], r["kl"]) for r in map(json.loads, lines) if "loss" in r])
    assert "up to 2 shares of its rows at once" in capsys.readouterr().err
    assert len(runs[0]) == 3 and runs[0] == runs[1]


Z_REF_WORKER = r"""
import json, torch, torch.distributed as dist
from tunelab.stages.kto import kl_estimate
from tunelab.training.distributed import shard

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
values = torch.tensor([0.9, 0.1, 2.3, 0.4, 1.7])
got = {}
for n in range(1, len(values) + 1):  # micro-batches of 1 ... 5 rows over the processes: some shards empty
    rows, weight = shard(list(range(n)), rank, world)
    got[n] = float(kl_estimate(values[rows], training=True, stand_in=weight == 0))
if rank == 0:
    print(json.dumps(got))
dist.destroy_process_group()
"""


def test_z_ref_over_three_processes_leaves_out_a_stand_in_row(tmp_path):
    """With more processes than a micro-batch has rows, a process whose shard is empty runs the micro-batch's first row
    as a stand-in (weight 0): z_ref, one mean over every process's mismatched rows, must not count that row twice
    (with two processes a doubled single row changed no mean; with three, 2 rows over 3 processes did)."""
    import os
    import subprocess
    import sys

    (tmp_path / "worker.py").write_text(Z_REF_WORKER)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=3",
        str(tmp_path / "worker.py"),
    ]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    values = [0.9, 0.1, 2.3, 0.4, 1.7]
    assert got == {str(n): pytest.approx(sum(values[:n]) / n, rel=1e-6) for n in range(1, 6)}
