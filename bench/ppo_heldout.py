"""A PPO run against its own SFT policy on prompts it never trained on (docs/alignment.md, PPO).

    python bench/ppo_heldout.py runs/ppo-hh --extra 64

Takes the run's held-out prompts plus `--extra` training prompts that no iteration sampled, answers each
with the PPO policy and with the SFT policy (the same model, adapter switched off), sampled like training
with the same seed, scores them with the run's reward and prints the means, the paired difference with
its standard error and the PPO policy's KL to the SFT policy.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch


def main() -> None:
    from tunelab.config import load_config
    from tunelab.methods import get as get_method
    from tunelab.methods import reference
    from tunelab.stages import ppo as S
    from tunelab.stages.runs import load_run
    from tunelab.training import harness as H
    from tunelab.training import ppo as P

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a finished stage-ppo run folder")
    ap.add_argument("--extra", type=int, default=64, help="never-sampled training prompts to add")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = load_config(f"{args.run}/config.yaml")
    pcfg, seed, cpu = cfg.ppo, cfg.training.seed, torch.device("cpu")
    model, tok = load_run(args.run)  # the PeftModel with the PPO adapter
    policy = S.PolicyWithValue(model, model.config.hidden_size).eval()
    reference.prepare(model, get_method(cfg.method.name))  # pi_ref: the adapter switched off (the SFT policy)
    reward = S.reward_function(pcfg.reward, tok, cpu)
    train, held, _ = S.load_prompts(pcfg, tok, seed)
    # the prompts the run sampled: iteration it used batch `it` of epoch it // per_epoch (train_ppo's prompts_for)
    per_epoch = -(-len(train) // pcfg.rollout_batch_size)
    seen = set()
    for it in range(cfg.training.max_steps):
        epoch, b = divmod(it, per_epoch)
        seen.update(H.batch_order(len(train), pcfg.rollout_batch_size, seed, epoch)[b])
    prompts = held + [p for i, p in enumerate(train) if i not in seen][: args.extra]
    print(f"{len(held)} held-out + {len(prompts) - len(held)} never-sampled prompts", flush=True)

    def answer(batch: list[dict]) -> dict:
        roll = P.sample_responses(model, [p["ids"] for p in batch], tok, pcfg.max_new_tokens, pcfg.temperature,
                                  pcfg.top_k, cpu)  # fmt: skip
        texts = [t.strip() for t in tok.batch_decode(roll["response"], skip_special_tokens=True)]
        ids = [[t for t, m in zip(r, k) if m and t != tok.eos_token_id]
               for r, k in zip(roll["response"].tolist(), roll["response_mask"].tolist())]  # fmt: skip
        roll["scores"] = reward([p["messages"] for p in batch], texts, ids)
        return roll

    scores, kls = {}, []
    # the SFT policy is the same model with its adapter switched off (not nested: PEFT re-enables on exit)
    for name, adapter in (("sft", model.disable_adapter), ("ppo", contextlib.nullcontext)):
        t0, scores[name] = time.time(), []
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            for i in range(0, len(prompts), pcfg.rollout_batch_size):
                with adapter():
                    roll = answer(prompts[i : i + pcfg.rollout_batch_size])
                scores[name] += roll["scores"].tolist()
                if name == "ppo":
                    kl = P.score_rollout(policy, roll, pcfg.temperature, pcfg.mini_batch_size,
                                         contextlib.nullcontext)["kl"]  # fmt: skip
                    kls += (kl * roll["response_mask"]).sum(1).tolist()
        print(f"{name}: mean reward {statistics.mean(scores[name]):.4f} (sd {statistics.stdev(scores[name]):.4f}), "
              f"{time.time() - t0:.0f} s", flush=True)  # fmt: skip
    d = [a - b for a, b in zip(scores["ppo"], scores["sft"])]
    print(f"paired difference ppo - sft: {statistics.mean(d):+.4f} +- {statistics.stdev(d) / len(d) ** 0.5:.4f} "
          f"(s.e., n={len(d)}); ppo higher on {sum(x > 0 for x in d)}/{len(d)}")  # fmt: skip
    print(f"KL(ppo || sft): {statistics.mean(kls):.3f} nats per response")


if __name__ == "__main__":
    main()
