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

import torch
import torch.nn.functional as F


class Verbalizer:
    def __init__(
        self, label_words: dict[str, list[str]], tokenizer, leading_space: bool = True
    ):
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
                toks = tokenizer(
                    (" " + w) if leading_space else w, add_special_tokens=False
                )["input_ids"]
                if not toks:
                    raise ValueError(f"label word {w!r} has no tokens")
                t = toks[0]
                if owner.get(t, cls) != cls:
                    raise ValueError(
                        f"label words of {owner[t]!r} and {cls!r} start with the same token {t}"
                    )
                owner[t] = cls
                if t not in ids:
                    ids.append(t)
            self.token_ids.append(ids)

    def scores(self, next_token_logits: torch.Tensor) -> torch.Tensor:
        """[batch, vocab] logits -> [batch, n_classes] log-sum-exp of the class words' first-token log-probs."""
        logp = F.log_softmax(next_token_logits.float(), dim=-1)
        return torch.stack(
            [logp[:, ids].logsumexp(dim=-1) for ids in self.token_ids], dim=-1
        )

    def predict(self, next_token_logits: torch.Tensor) -> torch.Tensor:
        """Class indices, [batch]."""
        return self.scores(next_token_logits).argmax(dim=-1)

    def predict_labels(self, next_token_logits: torch.Tensor) -> list[str]:
        return [self.classes[i] for i in self.predict(next_token_logits).tolist()]

    def loss(
        self, next_token_logits: torch.Tensor, class_ids: torch.Tensor
    ) -> torch.Tensor:
        """Mean cross-entropy over the class scores."""
        return F.cross_entropy(self.scores(next_token_logits), class_ids)


def next_token_logits(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """[batch, vocab] logits at each row's last real token (right or left padding).

    Where the model splits into backbone and head (training/loss.py), the head runs on those positions
    only: the [batch, seq, vocab] logits (SmolLM2: 49k words, a fifth of the forward FLOPs) are never built.
    """
    from tunelab.training.loss import backbone_and_head

    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    pos = torch.arange(input_ids.shape[1], device=input_ids.device)
    last = (attention_mask * pos).argmax(dim=1)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    split = backbone_and_head(model)
    if split is not None:
        backbone, head = split
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return head(hidden[rows, last])
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    logits = logits[:, -input_ids.shape[1] :]  # a prompt-learning model may add virtual positions
    return logits[rows, last]
