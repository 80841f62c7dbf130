"""Per-row predictions of every scoring path: the model side (verbalizer, classifier head, perplexity).

The rows' format, their file and the pure function that turns them into metrics are in prediction_rows.py, which
runs without torch (the compare process records its references and reports with it).
"""

from __future__ import annotations

from tunelab.accel import threads
from tunelab.config import DataConfig
from tunelab.data import build_prompt_ids, collate, pad, render_example
from tunelab.data.prompts import instruction, label_words
from tunelab.methods.verbalizer import SharedPrefix, Verbalizer, next_token_logits
from tunelab.models.loss import row_loss_sums, shift_labels
from tunelab.stages.classification import classification_collate, classification_logits, encode_pairs

# Score the prompts' common token prefix once and each row's rest against its cached keys and values (off:
# every row's whole prompt, the reference the shared path is tested against). SmolLM2 on SST-2: 39 of ~79
# prompt tokens are the same for every row (system prompt + question), so half the compute was repeated.
SHARE_PREFIX = True
MIN_SHARED_PREFIX = 8  # tokens: below this the prefix pass and the cache copies cost about what they save
# On a CPU, the verbalizer's batches run a thread each, on one core each (accel/threads.py), rather than
# one batch at a time with every op split over all cores: the same batches, so the same scores (a test
# compares them bit for bit), without the fork / join of every small op. Off: one batch at a time.
THREAD_BATCHES = True


# ------------------------------------------------------------------------------------ model side
def verbalizer_predictions(model, tokenizer, task, rows, device, batch_size=16, progress=True) -> list[dict]:
    """A causal LM on a classification task: the task as an instruction, the class read off the next-token
    distribution by a verbalizer (evaluation/runner.py's "verbalizer" method)."""
    import torch
    from tqdm.auto import tqdm

    verbalizer, prompts = verbalizer_prompts(task, rows, tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths batch together: less padding
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    out: list[dict | None] = [None] * len(prompts)
    with torch.no_grad():
        prefix = _shared_prefix(model, prompts, device, batch_size)
    start = prefix.length if prefix is not None else 0

    def score(idx: list[int]) -> None:
        with torch.no_grad():  # grad mode is per thread
            ids, mask = pad([prompts[k][start:] for k in idx], tokenizer.pad_token_id)
            logits = next_token_logits(model, ids.to(device), mask.to(device), prefix=prefix)
            scores = verbalizer.scores(logits.float())
        # float32 -> Python float is exact and order-preserving: the argmax of the stored list is this one
        for k, s, pred in zip(idx, scores.tolist(), scores.argmax(dim=-1).tolist()):
            out[k] = {"index": k, "label": int(rows[k]["label"]), "prediction": pred, "scores": s}

    at_once = torch.get_num_threads() if THREAD_BATCHES and torch.device(device).type == "cpu" else 1
    bar = tqdm(total=len(batches), desc=f"eval {task.name}", disable=not progress, unit="batch")
    for i in range(0, len(batches), at_once):
        group = batches[i : i + at_once]
        threads.run([lambda idx=idx: score(idx) for idx in group])
        bar.update(len(group))
    bar.close()
    return out


def verbalizer_prompts(task, rows, tokenizer) -> tuple[Verbalizer, list[list[int]]]:
    """The verbalizer of a classification task and each row's prompt ids (the task as a user turn); one
    place, so every runtime that scores a task this way (PyTorch here, llama.cpp in export/check.py)
    reads the same prompts with the same label words."""
    words = label_words(task)
    # the answer starts a new assistant turn, so the word is not preceded by a space
    verbalizer = Verbalizer({w: [w, w.capitalize()] for w in words}, tokenizer, leading_space=False)
    prompts = [build_prompt_ids([{"role": "user", "content": instruction(task, r)}], tokenizer) for r in rows]
    return verbalizer, prompts


def common_prefix_length(prompts: list[list[int]]) -> int:
    """Tokens at the start of every prompt, leaving at least one token of each outside (its last token is
    where the next-token logits are read)."""
    if not prompts:
        return 0
    first, cap = prompts[0], min(len(p) for p in prompts) - 1
    n = 0
    while n < cap and all(p[n] == first[n] for p in prompts):
        n += 1
    return n


def _shared_prefix(model, prompts: list[list[int]], device, batch_size: int):
    """The prompts' common prefix run once (methods/verbalizer.py's SharedPrefix), or None: switched off,
    a short prefix, inputs that fit in one batch (tiny inputs keep the plain path), or a model where a
    shared cache is wrong or unsupported (SharedPrefix.of)."""
    import torch

    n = common_prefix_length(prompts)
    if not SHARE_PREFIX or n < MIN_SHARED_PREFIX or len(prompts) <= batch_size:
        return None
    return SharedPrefix.of(model, torch.tensor(prompts[0][:n], device=device))


def classifier_predictions(model, tokenizer, task, rows, device, max_length=256, batch_size=32) -> list[dict]:
    """A sequence-classification head (a `stage: classification` run): the batches, inputs and logits of
    stages/classification.py's `predict`, so the predictions are the ones the run's own dev metrics use."""
    import torch

    regression = task.type == "regression"
    examples = encode_pairs(rows, tokenizer, max_length, regression)
    model.eval()
    out: list[dict] = []
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            batch = {k: v.to(device) for k, v in classification_collate(chunk, tokenizer.pad_token_id).items()}
            logits = classification_logits(model, batch)
            if logits.shape[-1] == 1:
                for j, (e, y) in enumerate(zip(chunk, logits.squeeze(-1).tolist())):
                    out.append({"index": i + j, "label": e["label"], "prediction": y})
                continue
            # log-softmax in float64: strictly monotonic for float32 logits, so the argmax of the stored
            # scores is the argmax of the logits (what `predict` takes)
            scores = logits.double().log_softmax(dim=-1)
            for j, (e, s, pred) in enumerate(zip(chunk, scores.tolist(), logits.argmax(dim=-1).tolist())):
                out.append({"index": i + j, "label": e["label"], "prediction": pred, "scores": s})
    return out


def perplexity_predictions(model, tokenizer, rows, device, batch_size=8, progress=True) -> list[dict]:
    """A causal LM on an instruction task: each reference response's summed token NLL and token count."""
    import torch
    from tqdm.auto import tqdm

    cfg = DataConfig(max_length=1024)
    examples = [render_example(r, cfg, tokenizer) for r in rows]
    out: list[dict] = []
    with torch.no_grad():
        for i in tqdm(range(0, len(examples), batch_size), desc="eval perplexity", disable=not progress, unit="batch"):
            batch = {k: v.to(device) for k, v in collate(examples[i : i + batch_size], tokenizer.pad_token_id).items()}
            # right padding carries label -100 and a causal model's real positions never attend to it, so
            # a row's sum is the one it has alone (the same label-only head as token_loss_sum, per row)
            sums = row_loss_sums(model, batch, fp32_logits=True).tolist()  # a 16-bit head: its CE off fp32 logits
            tokens = (shift_labels(batch["labels"]) != -100).sum(dim=1).tolist()
            out += [{"index": i + j, "loss_sum": s, "tokens": n} for j, (s, n) in enumerate(zip(sums, tokens))]
    return out
