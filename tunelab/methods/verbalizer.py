"""A verbalizer: classification with a causal LM by reading the next-token distribution.

Each class c has label words V_c (e.g. positive: [great, good, positive]). With next-token
log-probabilities log p(w | x) at the last input position, the class score is

    s_c(x) = log Σ_{w ∈ V_c} p(first token of w | x)       (log-sum-exp of the words' log-probs)

the log of the probability mass the model puts on the class's words; only each word's first token
counts (the usual choice: one forward pass, no decoding). Prediction is argmax_c s_c; the training
loss is cross-entropy over the class scores, −log softmax_c(s)[y] (a softmax over the classes only, so
mass on unrelated words does not count against a class).

Pure: it takes logits, so it works with any model (prompt tuning, LoRA, full ...).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from tunelab.methods._prompt_learning import accepts
from tunelab.models.loss import backbone_and_head
from tunelab.models.precision import fp32_head


class Verbalizer:
    def __init__(self, label_words: dict[str, list[str]], tokenizer, leading_space: bool = True):
        """`leading_space`: tokenize " word" (a word following other text, as in "Sentiment: great"),
        else "word"."""
        if not label_words:
            raise ValueError("label_words is empty")
        self.classes = list(label_words)
        self.token_ids: list[list[int]] = []
        owner: dict[int, str] = {}
        for cls, words in label_words.items():
            if not words:
                raise ValueError(f"class {cls!r} has no label words")
            ids: list[int] = []
            for w in words:
                toks = tokenizer((" " + w) if leading_space else w, add_special_tokens=False)["input_ids"]
                if not toks:
                    raise ValueError(f"label word {w!r} has no tokens")
                t = toks[0]
                if owner.get(t, cls) != cls:
                    raise ValueError(f"label words of {owner[t]!r} and {cls!r} start with the same token {t}")
                owner[t] = cls
                if t not in ids:
                    ids.append(t)
            self.token_ids.append(ids)

    def scores(self, next_token_logits: torch.Tensor) -> torch.Tensor:
        """[batch, vocab] logits -> [batch, n_classes] log-sum-exp of the class words' first-token log-probs."""
        logp = F.log_softmax(next_token_logits.float(), dim=-1)
        return torch.stack([logp[:, ids].logsumexp(dim=-1) for ids in self.token_ids], dim=-1)

    def predict(self, next_token_logits: torch.Tensor) -> torch.Tensor:
        """Class indices, [batch]."""
        return self.scores(next_token_logits).argmax(dim=-1)

    def predict_labels(self, next_token_logits: torch.Tensor) -> list[str]:
        return [self.classes[i] for i in self.predict(next_token_logits).tolist()]

    def loss(self, next_token_logits: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the class scores."""
        return F.cross_entropy(self.scores(next_token_logits), class_ids)


def next_token_logits(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, prefix: SharedPrefix | None = None
) -> torch.Tensor:
    """[batch, vocab] logits at each row's last real token (right or left padding).

    Where the model splits into backbone and head (models/loss.py), the head runs on those positions
    only: the [batch, seq, vocab] logits (SmolLM2: 49k words, a fifth of the forward FLOPs) are never built.

    With `prefix`, every row continues that prefix: input_ids and attention_mask hold only the rest of each
    row, right-padded, and the prefix's cached keys and values stand in for its tokens.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    pos = torch.arange(input_ids.shape[1], device=input_ids.device)
    last = (attention_mask * pos).argmax(dim=1)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    if prefix is not None:
        hidden = prefix.backbone(input_ids=input_ids, **prefix.inputs(attention_mask)).last_hidden_state
        return fp32_head(prefix.head, hidden[rows, last])
    split = backbone_and_head(model)
    if split is not None:
        backbone, head = split
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return fp32_head(head, hidden[rows, last])
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    logits = logits[:, -input_ids.shape[1] :]  # a prompt-learning model may add virtual positions
    return logits[rows, last]


class SharedPrefix:
    """The keys and values of a token prefix that every row of a batch starts with, computed once
    (`of`), and the backbone inputs that continue it (`inputs`)."""

    def __init__(self, backbone, head, cache_arg: str, cache, length: int):
        self.backbone, self.head, self.cache_arg, self.cache, self.length = backbone, head, cache_arg, cache, length

    @classmethod
    def of(cls, model, ids: torch.Tensor) -> SharedPrefix | None:
        """Run the prefix `ids` ([length]) once; None where a shared cache would be wrong or unsupported."""
        from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

        # No split (models/loss.py) for prompt-learning PEFT models (their forward puts virtual tokens or a prefix cache in
        # front of every row, which the backbone alone would leave out), encoder-decoders (no causal LM
        # head: their prompt is the encoder's input, not a cacheable prefix) and soft-capped heads.
        split = backbone_and_head(model)
        if split is None or getattr(split[0].config, "is_encoder_decoder", False):
            return None
        backbone, head = split
        # transformers 5 names the argument `cache` (`past_key_values` is a deprecated alias until 5.40)
        cache_arg = next((a for a in ("cache", "past_key_values") if accepts(backbone.forward, a)), None)
        if cache_arg is None:
            return None
        cache = DynamicCache(config=backbone.config)
        backbone(input_ids=ids[None], **{cache_arg: cache}, use_cache=True)
        # keys and values only: a recurrent state (linear attention, Mamba layers) has consumed the prefix
        # and would need its own copy semantics; anything else scores whole prompts
        if not cache.layers or any(type(la) not in (DynamicLayer, DynamicSlidingWindowLayer) for la in cache.layers):
            return None
        if cache.get_seq_length() != len(ids):  # a backbone that took the cache but did not fill it
            return None
        return cls(backbone, head, cache_arg, cache, len(ids))

    def inputs(self, attention_mask: torch.Tensor) -> dict:
        """Backbone keyword arguments for a right-padded batch of continuations ([batch, width] mask):
        a copy of the cache per batch (a forward pass appends the batch's keys and values to it), the mask
        over prefix + continuation, and the positions after the prefix (the same for every row, as the
        real tokens of right-padded rows start at column 0)."""
        n, width = attention_mask.shape
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(n)
        mask = torch.cat([attention_mask.new_ones(n, self.length), attention_mask], dim=1)
        positions = torch.arange(self.length, self.length + width, device=attention_mask.device).expand(n, -1)
        return {"attention_mask": mask, "position_ids": positions, self.cache_arg: cache, "use_cache": True}
