"""stage ppo on tiny models: the maths against plain references, the adapter-off reference, learning,
exact resume, and a result that loads like every other run."""

import contextlib
import copy
import json
from types import SimpleNamespace

import pytest
import torch

import tunelab
from tunelab.config import ConfigError, load_config
from tunelab.data import build_prompt_ids
from tunelab.inference import generate
from tunelab.methods import get as get_method
from tunelab.methods import reference
from tunelab.stages import ppo as S
from tunelab.stages.runs import load_run, run_manifest
from tunelab.testing import save_tiny_model_dir, tiny_llama, tiny_tokenizer
from tunelab.training import ppo as P
from tunelab.training import ppo_math as PM
from tunelab.training.harness import optimizer_for, scheduler_for

# A random tiny Llama with the default init (0.02-0.1) has logits too flat for any adapter to move the
# response distribution far; 0.3 gives it enough range that PPO can show learning in a few iterations.
INIT = 0.3
# The toy reward: the fraction of response tokens in the lower half of the vocabulary (ids 3..159).
REWARDED = list(range(3, 160))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("model"), initializer_range=INIT)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    rows = [{"prompt": f"Question {i}: tell me about the number {i}."} for i in range(96)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def make_cfg(tiny_dir, prompt_file, out, ppo=None, **training):
    p = dict(prompts=prompt_file, reward={"kind": "tokens", "token_ids": REWARDED}, eval_prompts=32,
             rollout_batch_size=64, mini_batch_size=32, ppo_epochs=2, max_new_tokens=4, init_kl_coef=0.05)  # fmt: skip
    p.update(ppo or {})
    t = dict(max_steps=10, lr=1e-2, warmup_steps=0, scheduler="constant", progress=False, tensorboard=False, seed=1)
    t.update(training)
    return load_config(
        {
            "stage": "ppo",
            "output_dir": str(out),
            "model": {"name": tiny_dir},
            "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
            "ppo": p,
            "training": t,
        }
    )


def records(run_dir):
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------ maths
def reference_gae(rewards, values, lengths, gamma, lam):
    """GAE written out per sequence, straight from Schulman et al. 2016, eq. 16 (V = 0 after the end)."""
    adv = torch.zeros_like(rewards)
    for b, n in enumerate(lengths):
        v = values[b, :n].tolist() + [0.0]
        for t in range(n):
            adv[b, t] = sum((gamma * lam) ** (k - t) * (rewards[b, k] + gamma * v[k + 1] - v[k]) for k in range(t, n))
    return adv, (adv + values) * (torch.arange(rewards.shape[1]) < torch.tensor(lengths)[:, None])


def test_gae_matches_a_direct_implementation():
    rewards = torch.tensor([[0.1, -0.2, 0.3, 1.0], [0.5, 2.0, 9.0, 9.0]])  # row 2 ends after 2 tokens
    values = torch.tensor([[0.4, 0.1, -0.3, 0.2], [1.0, -1.0, 7.0, 7.0]])
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0]])
    adv, ret = PM.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    ref_adv, ref_ret = reference_gae(rewards, values, [4, 2], 0.9, 0.8)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)
    # by hand, row 2: delta_1 = 2 - (-1) = 3; delta_0 = 0.5 + 0.9 * (-1) - 1 = -1.4; A_0 = -1.4 + 0.72 * 3
    assert adv[1, 1].item() == pytest.approx(3.0)
    assert adv[1, 0].item() == pytest.approx(-1.4 + 0.72 * 3.0)
    assert adv[1, 2:].abs().sum() == 0  # nothing past the end


def test_kl_penalised_rewards_put_the_score_on_the_last_token():
    logp = torch.tensor([[-1.0, -2.0, -1.0], [-0.5, -0.5, -3.0]])
    ref = torch.tensor([[-1.5, -1.0, -1.0], [-1.0, -0.5, -3.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    rewards, log_ratio = PM.kl_penalised_rewards(torch.tensor([2.0, -1.0]), logp, ref, mask, kl_coef=0.1)
    expected = torch.tensor([[-0.05, 0.1, 2.0], [-0.05, -1.0, 0.0]])
    torch.testing.assert_close(rewards, expected)
    torch.testing.assert_close(log_ratio.sum(1), torch.tensor([-0.5, 0.5]))


def test_ppo_losses_clip_the_ratio_and_the_value_update():
    pcfg = SimpleNamespace(cliprange=0.2, cliprange_value=0.5, vf_coef=0.1, entropy_coef=0.0)
    old = torch.log(torch.tensor([[0.5, 0.5]]))
    new = torch.log(torch.tensor([[0.8, 0.3]]))  # ratios 1.6 (adv > 0: clipped to 1.2) and 0.6 (adv < 0: 0.8)
    batch = {"mask": torch.ones(1, 2), "advantages": torch.tensor([[1.0, -1.0]]), "logprobs": old,
             "values": torch.tensor([[0.0, 0.0]]), "returns": torch.tensor([[1.0, 1.0]])}  # fmt: skip
    loss, st = PM.ppo_losses(new, torch.tensor([[2.0, 0.2]]), torch.zeros(1, 2), batch, pcfg)
    assert st["policy_loss"] == pytest.approx((-1.2 + 0.8) / 2)  # the pessimistic (clipped) terms
    assert st["clip_frac"] == pytest.approx(1.0)
    # value 2.0: clipped to 0.5, max((2-1)^2, (0.5-1)^2) = 1; value 0.2 inside the range: (0.2-1)^2
    assert st["value_loss"] == pytest.approx(0.5 * (1.0 + 0.64) / 2)
    assert float(loss) == pytest.approx(st["policy_loss"] + 0.1 * st["value_loss"])


def test_adaptive_kl_coefficient_moves_towards_the_target():
    pcfg = SimpleNamespace(kl_control="adaptive", kl_target=6.0, kl_horizon=100)
    assert PM.update_kl_coef(0.1, 12.0, 10, pcfg) == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))  # error clipped
    assert PM.update_kl_coef(0.1, 5.4, 10, pcfg) == pytest.approx(0.1 * (1 - 0.1 * 10 / 100))
    assert PM.update_kl_coef(0.1, 6.0, 10, pcfg) == pytest.approx(0.1)
    coef = 0.1
    for _ in range(50):  # KL stuck above target: beta keeps rising
        coef = PM.update_kl_coef(coef, 9.0, 10, pcfg)
    assert coef > 0.25
    assert PM.update_kl_coef(0.1, 50.0, 10, SimpleNamespace(kl_control="fixed")) == 0.1


# --------------------------------------------------------------------------------- the reference
def tiny_prompts(tok, n: int) -> list[dict]:
    # different lengths, so the batch is left-padded
    return [{"messages": None, "ids": build_prompt_ids([{"role": "user", "content": "Hi " * (1 + i % 3)}], tok)}
            for i in range(n)]  # fmt: skip


def test_padded_rollout_log_probs_equal_each_row_alone():
    tok = tiny_tokenizer()
    lm = tiny_llama(len(tok), initializer_range=INIT)
    prompts = tiny_prompts(tok, 3)
    assert len({len(p["ids"]) for p in prompts}) == 3
    torch.manual_seed(0)
    roll = P.sample_responses(lm, [p["ids"] for p in prompts], tok, 6, 1.0, 0, torch.device("cpu"))
    logits, _ = P.response_forward(lm, roll["seq"], roll["mask"], roll["response"].shape[1], 1.0, False)
    batched = PM.token_logprobs(logits, roll["response"])
    for i, p in enumerate(prompts):
        n = int(roll["response_mask"][i].sum())
        ids = torch.tensor([p["ids"] + roll["response"][i, :n].tolist()])
        alone = torch.log_softmax(lm(input_ids=ids).logits[0, len(p["ids"]) - 1 : -1], -1)
        expected = alone.gather(-1, ids[0, len(p["ids"]) :, None]).squeeze(-1)
        torch.testing.assert_close(batched[i, :n], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_reference_is_the_starting_policy(method):
    """LoRA: the same model with the adapter switched off, no second copy; full: a frozen copy."""
    tok = tiny_tokenizer()
    base = tiny_llama(len(tok), initializer_range=INIT)
    untouched = copy.deepcopy(base)
    cfg = make_cfg("unused", "unused", "unused", ppo={"rollout_batch_size": 8, "mini_batch_size": 4}, lr=1e-3)
    lm = get_method(method).apply(base, get_method(method).Config() if method == "full" else cfg.method)
    reference.prepare(lm, get_method(method))  # lora: nothing to keep; full: a frozen copy of the start
    policy = S.PolicyWithValue(lm, 32).eval()
    reward = S.reward_function(cfg.ppo.reward, tok, "cpu")
    torch.manual_seed(0)
    roll = P.rollout(policy, tiny_prompts(tok, 8), tok, reward, cfg.ppo, 1.0, torch.device("cpu"),
                     contextlib.nullcontext)  # fmt: skip
    torch.testing.assert_close(roll["logprobs"], roll["ref_logprobs"])  # the same model at the start
    assert roll["kl"].abs().max() < 1e-6

    params = [p for p in policy.parameters() if p.requires_grad]
    opt = optimizer_for(params, cfg.training)
    sched = scheduler_for(opt, cfg.training, 100)
    P.ppo_update(policy, roll, 0.05, cfg.ppo, opt, sched, params, cfg.training, contextlib.nullcontext,
                 torch.Generator().manual_seed(0))  # fmt: skip
    again = P.score_rollout(policy, roll, 1.0, 4, contextlib.nullcontext)
    mask = roll["response_mask"].bool()
    assert (again["logprobs"] - roll["logprobs"])[mask].abs().max() > 1e-3  # the policy moved
    # ... and the reference is still exactly the original model
    logits, _ = P.response_forward(untouched, roll["seq"], roll["mask"], roll["response"].shape[1], 1.0, False)
    torch.testing.assert_close(again["ref_logprobs"], PM.token_logprobs(logits, roll["response"]))


# ------------------------------------------------------------------------------------ end to end
def _sft_run(tiny_dir, tmp_path, steps: int, lr: float):
    """A LoRA SFT run on eight tiny instruction rows: the policy PPO starts from."""
    sft_rows = tmp_path / "sft.jsonl"
    sft_rows.write_text(
        "".join(json.dumps({"instruction": f"Say {i}.", "input": "", "output": f"{i}."}) + "\n" for i in range(8))
    )
    return tunelab.train(
        load_config({"output_dir": str(tmp_path / "sft"), "model": {"name": tiny_dir},
                     "data": {"train": str(sft_rows), "val_fraction": 0.0},
                     "method": {"name": "lora", "r": 4, "alpha": 8},
                     "training": {"max_steps": steps, "lr": lr, "progress": False, "tensorboard": False}})
    )  # fmt: skip


def test_ppo_raises_the_reward_with_bounded_kl(tiny_dir, prompt_file, tmp_path):
    result = tunelab.train(make_cfg(tiny_dir, prompt_file, tmp_path / "run"))
    m = result.metrics
    iters = [r for r in records(tmp_path / "run") if "score" in r]
    assert [r["step"] for r in iters] == list(range(1, 11))
    first, last = iters[0], iters[-3:]
    assert first["kl"] == pytest.approx(0.0, abs=1e-5)  # iteration 1 samples from the SFT policy itself
    assert sum(r["score"] for r in last) / 3 > first["score"] + 0.05, [r["score"] for r in iters]
    # the held-out prompts (never trained on) score higher than before training
    assert m["eval_score"] > m["eval_score_before"] + 0.08, (m["eval_score_before"], m["eval_score"])
    assert 0.1 < m["eval_kl"] < 6.0 and all(r["kl"] < 6.0 for r in iters)  # moved, but stayed close
    assert all(r["approx_kl"] < 0.2 for r in iters)
    assert {"entropy", "clip_frac", "value_loss", "policy_loss", "kl_coef"} <= set(iters[0])

    # the result loads like any run and generates
    final = result.final_dir
    assert run_manifest(final)["stage"] == "ppo"
    assert (final / "adapter_model.safetensors").exists() and (final / "value_head.safetensors").exists()
    model, tok = load_run(str(tmp_path / "run"))
    assert isinstance(generate(model, tok, "Question 1: tell me", max_new_tokens=4), str)
    assert (tmp_path / "run" / "samples" / "step-00000010.jsonl").exists()


def test_resumed_run_repeats_the_same_next_iteration(tiny_dir, prompt_file, tmp_path):
    small = {"rollout_batch_size": 16, "mini_batch_size": 8, "eval_prompts": 8}
    full = tunelab.train(make_cfg(tiny_dir, prompt_file, tmp_path / "a", ppo=small, max_steps=3))

    def stop_after_2(step, record):
        if step == 2:
            raise KeyboardInterrupt

    cfg = make_cfg(tiny_dir, prompt_file, tmp_path / "b", ppo=small, max_steps=3)
    part = tunelab.train(cfg, callbacks=[stop_after_2])
    assert part.metrics["interrupted"] and part.final_dir is None
    state = json.loads((tmp_path / "b" / "checkpoints" / "step-00000002" / "tunelab_state.json").read_text())
    assert state["step"] == 2 and "kl_coef" in state
    with pytest.raises(FileExistsError):
        tunelab.train(cfg)
    resumed = tunelab.train(cfg, resume=True)
    a = {r["step"]: r for r in records(tmp_path / "a") if "score" in r}
    b = {r["step"]: r for r in records(tmp_path / "b") if "score" in r}
    assert sorted(b) == [1, 2, 3]
    for key in ("score", "kl", "kl_coef", "policy_loss", "value_loss", "entropy"):
        assert a[3][key] == pytest.approx(b[3][key], abs=1e-6), key
    assert full.metrics["eval_score"] == pytest.approx(resumed.metrics["eval_score"], abs=1e-6)


def test_a_second_signal_during_the_ppo_interrupt_checkpoint_waits_for_it(
    tiny_dir, prompt_file, tmp_path, monkeypatch, capsys
):
    import os
    import signal

    from tunelab.training import checkpoint

    real = checkpoint.save_file

    def save_file(weights, path):  # SIGTERM while the interrupt checkpoint is written: held until it is complete
        os.kill(os.getpid(), signal.SIGTERM)
        real(weights, path)

    def ctrl_c_after_2(step, record):  # a real Ctrl-C: ppo finishes the iteration, then checkpoints
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    small = {"rollout_batch_size": 16, "mini_batch_size": 8, "eval_prompts": 8}
    cfg = make_cfg(tiny_dir, prompt_file, tmp_path / "b", ppo=small, max_steps=3)
    monkeypatch.setattr(checkpoint, "save_file", save_file)
    part = tunelab.train(cfg, callbacks=[ctrl_c_after_2])
    assert part.metrics["interrupted"] and part.metrics["steps"] == 2
    assert "waiting for the checkpoint being written to complete" in capsys.readouterr().err
    root = tmp_path / "b" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002"]
    assert {p.name for p in (root / "step-00000002").iterdir()} == {
        "trainable.safetensors", "optimizer.pt", "tunelab_state.json"}  # fmt: skip
    monkeypatch.undo()
    assert tunelab.train(cfg, resume=True).metrics["steps"] == 3


def test_ppo_from_an_sft_run_loads_on_top_of_it(tiny_dir, prompt_file, tmp_path):
    sft = _sft_run(tiny_dir, tmp_path, steps=2, lr=1e-2)
    cfg = make_cfg(tiny_dir, prompt_file, tmp_path / "ppo", max_steps=1,
                   ppo={"policy": str(sft.run_dir), "rollout_batch_size": 8, "mini_batch_size": 8,
                        "eval_prompts": 0})  # fmt: skip
    result = tunelab.train(cfg)
    assert run_manifest(result.final_dir)["base_run"] == str(sft.run_dir.resolve())
    sft_model, _ = load_run(str(sft.run_dir), merge=True)
    ppo_model, tok = load_run(str(result.run_dir))
    ids = torch.tensor([build_prompt_ids([{"role": "user", "content": "Say 3."}], tok)])
    with torch.no_grad():
        sft_logits = sft_model(input_ids=ids).logits
        with ppo_model.disable_adapter():  # the PPO adapter sits on the SFT weights, not the bare base model
            torch.testing.assert_close(ppo_model(input_ids=ids).logits, sft_logits)
        assert (ppo_model(input_ids=ids).logits - sft_logits).abs().max() > 0


def test_ppo_trains_an_sft_runs_adapter_on_against_that_adapter(tiny_dir, prompt_file, tmp_path):
    """method.start_from: PPO over the adapter a LoRA SFT run trained, pi_ref that adapter as it starts (not the base
    with it off): the first iteration's KL is zero, and the result is one adapter over the base."""
    sft = _sft_run(tiny_dir, tmp_path, steps=4, lr=3e-2)
    cfg = make_cfg(tiny_dir, prompt_file, tmp_path / "ppo", max_steps=2,
                   ppo={"rollout_batch_size": 16, "mini_batch_size": 8, "eval_prompts": 0})  # fmt: skip
    cfg.method = get_method("lora").Config(dropout=0.0, start_from=str(sft.run_dir))
    result = tunelab.train(cfg)
    iters = [r for r in records(tmp_path / "ppo") if "score" in r]
    assert iters[0]["kl"] == pytest.approx(0.0, abs=1e-5) and iters[1]["kl"] != 0.0
    assert (cfg.method.r, cfg.method.alpha) == (4, 8.0)  # the adapter's shape
    sft_model, tok = load_run(str(sft.run_dir))
    ppo_model, _ = load_run(str(result.run_dir))
    ids = torch.tensor([build_prompt_ids([{"role": "user", "content": "Say 3."}], tok)])
    with torch.no_grad():
        with ppo_model.disable_adapter(), sft_model.disable_adapter():  # one adapter over the bare base
            torch.testing.assert_close(ppo_model(input_ids=ids).logits, sft_model(input_ids=ids).logits)
        assert (ppo_model(input_ids=ids).logits - sft_model(input_ids=ids).logits).abs().max() > 0


def test_ppo_against_a_reward_model_run_on_preference_prompts(tiny_dir, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"Question {i}: say something.", "chosen": "Paris is nice.", "rejected": "No."}
            for i in range(24)]  # fmt: skip
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rm_run = tunelab.train(
        load_config({"stage": "reward", "output_dir": str(tmp_path / "rm"), "model": {"name": tiny_dir},
                     "data": {"train": str(pairs), "format": "preference", "max_length": 64, "val_fraction": 0.0},
                     "method": {"name": "lora", "r": 4, "alpha": 8},
                     "training": {"max_steps": 2, "batch_size": 8, "progress": False, "tensorboard": False}})
    )  # fmt: skip
    cfg = make_cfg(tiny_dir, str(pairs), tmp_path / "ppo", max_steps=1,
                   ppo={"reward": {"kind": "model", "path": str(rm_run.run_dir)}, "rollout_batch_size": 8,
                        "mini_batch_size": 8, "eval_prompts": 4, "max_new_tokens": 6})  # fmt: skip
    result = tunelab.train(cfg)
    assert result.metrics["data_train_prompts"] == 20  # the pairs' prompts, 4 held out
    from tunelab.stages.reward import load_reward_model, score

    rm, rm_tok = load_reward_model(rm_run.run_dir)
    samples = [json.loads(ln) for ln in (tmp_path / "ppo" / "samples" / "step-00000000.jsonl").open()]
    expected = score(rm, rm_tok, [[{"role": "user", "content": s["prompt"]}] for s in samples],
                     [s["response"] for s in samples])  # fmt: skip
    torch.testing.assert_close(torch.tensor([s["score"] for s in samples]), expected, atol=1e-5, rtol=1e-5)
    assert result.metrics["eval_score_before"] == pytest.approx(float(expected.mean()), abs=1e-5)


def test_config_errors_name_the_missing_key():
    with pytest.raises(ConfigError, match="ppo.prompts"):
        load_config({"stage": "ppo"})
    with pytest.raises(ConfigError, match="ppo.reward.path"):
        load_config({"stage": "ppo", "ppo": {"prompts": "p.jsonl"}})
    with pytest.raises(ConfigError, match="does not support method prefix"):
        load_config(
            {"stage": "ppo", "method": {"name": "prefix"}, "ppo": {"prompts": "p", "reward": {"kind": "length"}}}
        )
    with pytest.raises(ConfigError, match="Did you mean 'cliprange'"):
        load_config({"stage": "ppo", "ppo": {"prompts": "p", "reward": {"kind": "length"}, "clip_range": 0.1}})
