"""Generation: one `generate` for every caller (chat and `tunelab generate`, the server, evaluation and
PPO's rollouts), and the generation tasks (translation, summarisation) scored against references.

    out = generate(llm, tok, [ids_a, ids_b], max_new_tokens=64)                # greedy, batched
    out = generate(llm, tok, [ids], temperature=0.7, top_p=0.95, streamer=s)   # sampled, streamed
    out.tokens, out.ids(), out.texts()                                         # new tokens / lists / text
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
from dataclasses import dataclass, field

import torch

from tunelab import metrics as M
from tunelab.data import pad


# ---------------------------------------------------------------------------------- generate
@dataclass
class Generation:
    """What `generate` returns for a batch of prompts.

    prompt_ids / prompt_mask [B, P]: the prompts as the model saw them (left-padded for a decoder-only
    model, right-padded for an encoder-decoder); tokens [B, T]: the new tokens of each prompt (for an
    encoder-decoder, the decoder output without its start token). A row that ended before the others
    (on an end token or a stop string) is filled up with `pad_token_id`."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    tokens: torch.Tensor
    eos_token_id: list[int]
    pad_token_id: int
    tokenizer: object = field(default=None, repr=False)

    def ids(self) -> list[list[int]]:
        """The new tokens of each row as a list, up to and including its first end token (a row of a batch
        that ended on a stop string keeps its padding: the server generates one prompt at a time)."""
        rows = []
        for row in self.tokens.tolist():
            end = next((i + 1 for i, t in enumerate(row) if t in self.eos_token_id), len(row))
            rows.append(row[:end])
        return rows

    def texts(self, tokenizer=None, skip_special_tokens: bool = True) -> list[str]:
        """The new tokens of each row decoded (special tokens, hence end tokens and padding, skipped)."""
        tok = tokenizer or self.tokenizer
        return [tok.decode(row, skip_special_tokens=skip_special_tokens) for row in self.tokens]


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    num_beams: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    stop_strings: Sequence[str] | None = None,
    streamer=None,
    use_cache: bool | None = None,
    device=None,
) -> Generation:
    """Continue each token-id prompt with `model.generate`: the one generation call tunelab makes.

    The prompts are padded into one batch here: on the left for a decoder-only model (the attention mask
    marks the padding; generate derives the position ids from it, so a padded row gets the same positions
    as alone), on the right for an encoder-decoder. temperature 0 is greedy (beam search with
    `num_beams` > 1); above 0 it samples with `top_p` / `top_k` (None: off). The sampling settings are
    always passed explicitly, so a model's own generation_config defaults for them (top_k=50, ...) never
    apply; `num_beams` and `use_cache` None keep the model's setting. Generation ends at `eos_token_id`
    (one id or several stop tokens; default the tokenizer's eos), at one of `stop_strings`, or after
    `max_new_tokens`. `pad_token_id` defaults to the tokenizer's pad token, else its eos. A transformers
    `streamer` (TextStreamer, TextIteratorStreamer, ...) receives the tokens as they come; transformers
    streams one prompt at a time. Runs under no_grad and leaves the model's train/eval mode alone."""
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    if pad_token_id is None:
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    ids, mask = pad(prompts, pad_token_id, side="right" if encoder_decoder else "left")
    device = device or next(model.parameters()).device
    sample = temperature > 0
    kwargs = dict(
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature if sample else None,
        top_p=top_p if sample else None,
        top_k=top_k if sample else None,
        eos_token_id=eos,
        pad_token_id=pad_token_id,
    )
    if num_beams is not None:
        kwargs.update(num_beams=num_beams, early_stopping=num_beams > 1 or None)
    if use_cache is not None:
        kwargs["use_cache"] = use_cache
    if streamer is not None:
        kwargs["streamer"] = streamer
    if stop_strings:
        kwargs.update(stop_strings=list(stop_strings), tokenizer=tokenizer)
    ids, mask = ids.to(device), mask.to(device)
    if not len(prompts):
        return Generation(ids, mask, ids.clone(), eos_ids, pad_token_id, tokenizer)
    out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    tokens = out[:, 1:] if encoder_decoder else out[:, ids.shape[1] :]  # drop the decoder start / the prompt
    return Generation(ids, mask, tokens, eos_ids, pad_token_id, tokenizer)


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
    was_training = model.training
    model.eval()
    out: list[str] = []
    bar = _progress(len(sources), "generate", progress)
    for i in range(0, len(sources), batch_size):
        chunk = [prefix + s for s in sources[i : i + batch_size]]
        enc = tokenizer(chunk, truncation=True, max_length=max_length)
        gen = generate(model, tokenizer, enc["input_ids"], max_new_tokens=max_new_tokens, num_beams=num_beams,
                       pad_token_id=tokenizer.pad_token_id, device=device)  # fmt: skip
        out += [t.strip() for t in gen.texts()]
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

    Batched (`generate` left-pads); `first_line` keeps the reply's first non-empty line (a one-sentence
    translation; drops any commentary that follows it)."""
    from tunelab.data import build_prompt_ids

    was_training = model.training
    model.eval()
    out: list[str] = []
    bar = _progress(len(prompts), "generate", progress)
    for i in range(0, len(prompts), batch_size):
        chunk = [build_prompt_ids([{"role": "user", "content": p}], tokenizer) for p in prompts[i : i + batch_size]]
        gen = generate(model, tokenizer, chunk, max_new_tokens=max_new_tokens, device=device)
        for text in gen.texts():
            text = text.strip()
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
