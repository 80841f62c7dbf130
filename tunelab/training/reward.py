"""Using a trained reward model (a `stage: reward` run): load it, score replies.

    rm, tok = load_reward_model("runs/reward-hh")
    r = score(rm, tok, [[{"role": "user", "content": "Hi"}]], ["Hello! How can I help?"])  # tensor [1]

A reward model is a causal LM with a scalar head (`AutoModelForSequenceClassification`, num_labels=1):
its score is the head applied to the hidden state of the last non-pad token of prompt + reply, rendered
with the chat template exactly as in training (tunelab/data/preference.py).
"""

from __future__ import annotations

import torch

from tunelab.data.preference import encode_response, truncate_left


def load_reward_model(run_dir, device="auto"):
    """(model, tokenizer) of a finished `stage: reward` run, in eval mode (a LoRA adapter merged in)."""
    from tunelab.inference import load_run, run_manifest

    manifest = run_manifest(run_dir)
    if manifest is None or manifest.get("stage") != "reward":
        stage = None if manifest is None else manifest.get("stage")
        raise ValueError(f"{run_dir}: not a reward-model run (stage {stage!r}); train one with stage: reward")
    return load_run(str(run_dir), device=device, merge=True)


def reward_logits(model, batch: dict) -> torch.Tensor:
    """One score per row of a padded batch (input_ids, attention_mask): the head at the last non-pad token.

    transformers' *ForSequenceClassification picks the rightmost token that is not the pad id, so the
    batch must be right-padded with model.config.pad_token_id (collate_pairs and score do that)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].float()


@torch.no_grad()
def score(model, tokenizer, prompts_messages, responses, max_length: int = 1024, batch_size: int = 8) -> torch.Tensor:
    """Rewards (float32, on the model's device) for each (prompt, reply); a prompt is a message list
    (or a string: one user message). A prompt longer than max_length loses its start, as in training."""
    if len(prompts_messages) != len(responses):
        raise ValueError(f"score: {len(prompts_messages)} prompts but {len(responses)} responses")
    device = next(model.parameters()).device
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else tokenizer.pad_token_id
    encoded = []
    for prompt, reply in zip(prompts_messages, responses):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        encoded.append(truncate_left(encode_response(messages, reply, tokenizer), max_length)["input_ids"])
    out = []
    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i : i + batch_size]
        width = max(len(x) for x in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, x in enumerate(chunk):
            ids[j, : len(x)], mask[j, : len(x)] = torch.tensor(x), 1
        out.append(reward_logits(model, {"input_ids": ids.to(device), "attention_mask": mask.to(device)}))
    return torch.cat(out) if out else torch.zeros(0, device=device)
