"""Generation: one `generate` for every caller (chat and `tunelab generate`, evaluation and PPO's
rollouts), its step-by-step form for the server (`DecodeBatch`: rows join and leave a running batch,
same sampling rules), and the generation tasks (translation, summarisation) scored against references.

    out = generate(llm, tok, [ids_a, ids_b], max_new_tokens=64)                # greedy, batched
    out = generate(llm, tok, [ids], temperature=0.7, top_p=0.95, streamer=s)   # sampled, streamed
    out.tokens, out.ids(), out.texts()                                         # new tokens / lists / text
    batch = DecodeBatch(llm); first = batch.add(ids, Sampler()); nxt = batch.step(); batch.keep([0])
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
from typing import TYPE_CHECKING

from tunelab import metrics as M
from tunelab.data import pad
from tunelab.models.loading import no_grad

if TYPE_CHECKING:  # torch is imported where a model runs: the config check reads this module without it
    import torch


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
        that ended on a stop string keeps its padding)."""
        rows = []
        for row in self.tokens.tolist():
            end = next((i + 1 for i, t in enumerate(row) if t in self.eos_token_id), len(row))
            rows.append(row[:end])
        return rows

    def texts(self, tokenizer=None, skip_special_tokens: bool = True) -> list[str]:
        """The new tokens of each row decoded (special tokens, hence end tokens and padding, skipped)."""
        tok = tokenizer or self.tokenizer
        return [tok.decode(row, skip_special_tokens=skip_special_tokens) for row in self.tokens]


@no_grad
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


@no_grad
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


@no_grad
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


@no_grad
def sentence_embeddings(texts: Sequence[str], model, tokenizer, batch_size: int = 64, max_length: int = 256):
    """Mean of the last hidden states over the attention mask, L2-normalised (numpy, one row per text)."""
    import torch

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


# ------------------------------------------------------------------------- continuous batching
@dataclass
class Sampler:
    """How one row picks its next token, as `generate` would: greedy at temperature 0, else temperature
    then top-p (nucleus) filtering then a draw. Each sampled row draws from its own generator, seeded
    from `seed` when given, so its output does not depend on the other rows of its batch."""

    temperature: float = 0.0
    top_p: float | None = None
    seed: int | None = None
    generator: torch.Generator | None = field(default=None, repr=False)

    def pick(self, logits: torch.Tensor) -> int:
        """The next token for one row's logits [V]."""
        import torch

        if self.temperature <= 0:
            return int(logits.argmax())
        scores = logits.float() / self.temperature
        if self.top_p is not None and self.top_p < 1:
            # As transformers' TopPLogitsWarper: drop the least likely tokens whose mass is <= 1 - top_p.
            low, order = scores.sort()
            drop = low.softmax(-1).cumsum(-1) <= 1 - self.top_p
            drop[-1] = False
            scores = scores.masked_fill(drop.scatter(0, order, drop), float("-inf"))
        if self.generator is None:
            self.generator = torch.Generator(device=logits.device)
            if self.seed is None:
                self.generator.seed()  # a fresh random seed
            else:
                self.generator.manual_seed(self.seed)
        return int(torch.multinomial(scores.softmax(-1), 1, generator=self.generator))


def _forward_kwargs(model) -> tuple[str, bool]:
    """(the name of the cache argument, whether `logits_to_keep` exists): transformers 5.25 renamed
    past_key_values to cache; checking the signature keeps both versions quiet."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params


def _pad_left(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    import torch

    missing = length - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


class DecodeBatch:
    """Rows of a decoder-only model that decode together: one forward pass per step for all of them
    (continuous batching; the server's scheduler adds and removes rows between steps).

    Design, the simplest that batches on CPU: one padded KV cache (a transformers DynamicCache, keys
    [B, heads, T, dim]). A row joins by a prefill of its prompt alone, exactly as `generate` would run
    it (positions 0..P-1, no padding); its cache is then left-padded to the batch's length T and
    concatenated on the batch axis. The attention mask hides the padding and each row's position ids are
    passed explicitly, so every row attends to exactly its own keys at its own positions: greedy output
    equals the row run alone (up to float rounding of the wider matmuls, which does not change an argmax
    short of an exact tie). Rows leave with `keep`; padding columns no row needs any more are trimmed.
    Models with sliding-window or other special cache layers are not supported (plain full attention:
    Llama, Qwen, Mistral without a window, ...)."""

    def __init__(self, model):
        self.model = model
        self.device = next(model.parameters()).device
        self.cache_arg, self.trim_logits = _forward_kwargs(model)
        self.cache = None
        self.mask = self.pos = self.last = None  # [B, T] real keys; [B] next positions; [B] next inputs
        self.samplers: list[Sampler] = []

    def __len__(self) -> int:
        return len(self.samplers)

    @no_grad
    def add(self, prompt_ids: Sequence[int], sampler: Sampler) -> int:
        """Prefill one prompt alone, join the batch; returns its first new token."""
        import torch
        from transformers import DynamicCache

        ids = torch.tensor([list(prompt_ids)], device=self.device)
        cache = DynamicCache()
        extra = {"logits_to_keep": 1} if self.trim_logits else {}
        out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True,
                         **{self.cache_arg: cache}, **extra)  # fmt: skip
        token = sampler.pick(out.logits[0, -1])
        self._join(cache, ids.shape[1], token)
        self.samplers.append(sampler)
        return token

    def _join(self, cache, length: int, token: int) -> None:
        import torch

        one = lambda v: torch.tensor([v], device=self.device)  # noqa: E731
        mask = torch.ones(1, length, dtype=torch.long, device=self.device)
        if self.cache is None:
            self.cache, self.mask, self.pos, self.last = cache, mask, one(length), one(token)
            return
        width = max(self.mask.shape[1], length)
        for mine, new in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, width, 2), _pad_left(new.keys, width, 2)])
            mine.values = torch.cat([_pad_left(mine.values, width, 2), _pad_left(new.values, width, 2)])
        self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)])
        self.pos, self.last = torch.cat([self.pos, one(length)]), torch.cat([self.last, one(token)])

    @no_grad
    def step(self) -> list[int]:
        """One forward pass for every row (its last token in); returns each row's next token."""
        import torch

        mask = torch.cat([self.mask, self.mask.new_ones(len(self), 1)], dim=1)
        out = self.model(input_ids=self.last[:, None], attention_mask=mask, position_ids=self.pos[:, None],
                         use_cache=True, **{self.cache_arg: self.cache})  # fmt: skip
        logits = out.logits[:, -1]
        greedy = logits.argmax(-1).tolist()  # one call for all greedy rows
        tokens = [t if s.temperature <= 0 else s.pick(logits[i]) for i, (t, s) in enumerate(zip(greedy, self.samplers))]
        self.mask, self.pos = mask, self.pos + 1
        self.last = torch.tensor(tokens, device=self.device)
        return tokens

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only these rows (indices into the batch), in this order."""
        import torch

        if not rows:
            self.cache = self.mask = self.pos = self.last = None
            self.samplers = []
            return
        index = torch.tensor(list(rows), device=self.device)
        self.mask, self.pos, self.last = self.mask[index], self.pos[index], self.last[index]
        self.samplers = [self.samplers[i] for i in rows]
        start = int(self.mask.any(0).long().argmax())  # columns before it are padding in every row
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index, :, start:], layer.values[index, :, start:]
