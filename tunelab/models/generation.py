"""Generation tasks (translation, summarisation): generate, then score against references.

    hyps = generate_seq2seq(t5, tok, sources, prefix="translate English to German: ")
    hyps = generate_chat(llm, tok, ["Translate to German: " + s for s in sources])   # a chat LM
    scores = generation_scores(hyps, refs, embedding_model="minilm-l6")             # bleu (+ cosine)

Metrics:
  - bleu: corpus BLEU from sacrebleu with its defaults (13a tokenisation, one reference), 0-100;
  - cosine: the mean, over rows, of the cosine similarity between the sentence embeddings of the output
    and of its reference. A sentence embedding is computed as sentence-transformers does for
    all-MiniLM-L6-v2: the encoder's last hidden states, mean-pooled over the attention mask, then
    L2-normalised. `embedding_model` is any encoder spec (default the named `minilm-l6`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tunelab import metrics as M


def _pad(seqs: list[list[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, sl], mask[i, sl] = torch.tensor(s, dtype=torch.long), 1
    return ids, mask


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, unit="row", dynamic_ncols=True)


@torch.no_grad()
def generate_seq2seq(
    model,
    tokenizer,
    sources: Sequence[str],
    prefix: str = "",
    max_length: int = 512,
    max_new_tokens: int = 128,
    num_beams: int = 1,
    batch_size: int = 16,
    device=None,
    progress: bool = False,
) -> list[str]:
    """Greedy (num_beams=1) or beam-search outputs of an encoder-decoder for prefix + source."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[str] = []
    bar = _progress(len(sources), "generate", progress)
    for i in range(0, len(sources), batch_size):
        chunk = [prefix + s for s in sources[i : i + batch_size]]
        enc = tokenizer(chunk, truncation=True, max_length=max_length)
        ids, mask = _pad(enc["input_ids"], tokenizer.pad_token_id)
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            do_sample=False,
            early_stopping=num_beams > 1 or None,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        out += [t.strip() for t in tokenizer.batch_decode(gen, skip_special_tokens=True)]
        bar.update(len(chunk))
    bar.close()
    model.train(was_training)
    return out


@torch.no_grad()
def generate_chat(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 128,
    batch_size: int = 8,
    device=None,
    first_line: bool = True,
    progress: bool = False,
) -> list[str]:
    """Greedy replies of a causal (chat) LM to one user message each, through its chat template.

    Batched with left padding; `first_line` keeps the reply's first non-empty line (a one-sentence
    translation; drops any commentary that follows it)."""
    from tunelab.data import build_prompt_ids

    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[str] = []
    bar = _progress(len(prompts), "generate", progress)
    for i in range(0, len(prompts), batch_size):
        chunk = [build_prompt_ids([{"role": "user", "content": p}], tokenizer) for p in prompts[i : i + batch_size]]
        ids, mask = _pad(chunk, pad_id, left=True)
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        for row in gen[:, ids.shape[1] :]:
            text = tokenizer.decode(row, skip_special_tokens=True).strip()
            if first_line:
                text = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
            out.append(text)
        bar.update(len(chunk))
    bar.close()
    model.train(was_training)
    return out


# ------------------------------------------------------------------------------ sentence embeddings
def load_embedder(spec: str, device="cpu"):
    """(encoder, tokenizer) for a sentence-embedding model spec (named default, folder, hub id)."""
    from transformers import AutoModel

    from tunelab.config import ModelConfig
    from tunelab.models import load_model

    model, tok = load_model(ModelConfig(name=spec, dtype="float32"), device=device, auto_class=AutoModel)
    return model.eval(), tok


@torch.no_grad()
def sentence_embeddings(texts: Sequence[str], model, tokenizer, batch_size: int = 64, max_length: int = 256):
    """Mean of the last hidden states over the attention mask, L2-normalised (numpy, one row per text)."""
    device = next(model.parameters()).device
    rows = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[i : i + batch_size]), padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt").to(device)  # fmt: skip
        hidden = model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).float()
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        rows.append(torch.nn.functional.normalize(mean, p=2, dim=1).cpu())
    if not rows:
        return torch.zeros((0, 0)).numpy()
    return torch.cat(rows).numpy()


def embedding_cosine(hypotheses: Sequence[str], references: Sequence[str], embedder) -> float:
    """Mean cosine of paired output/reference embeddings; `embedder` is a spec or an (encoder, tokenizer) pair."""
    model, tok = load_embedder(embedder) if isinstance(embedder, str) else embedder
    return M.mean_cosine(sentence_embeddings(hypotheses, model, tok), sentence_embeddings(references, model, tok))


def generation_scores(hypotheses: Sequence[str], references: Sequence[str], embedding_model=None) -> dict:
    """{"bleu"} and, with an embedding model, {"cosine"}."""
    out = {"bleu": M.corpus_bleu(list(hypotheses), list(references))}
    if embedding_model is not None:
        out["cosine"] = embedding_cosine(hypotheses, references, embedding_model)
    return out
