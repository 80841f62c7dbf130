"""Character n-gram language models: the reference a pre-trained model's per-character perplexity is
read against (docs/pretraining.md).

    char_ngram_baselines(["train text"], ["held-out text"])
    # {"unigram_ppl_per_char": ..., "bigram_ppl_per_char": ..., "characters": ..., "alphabet": ...}

Both are fitted on the training text with add-k (Laplace, k = 1) smoothing over the training alphabet plus
one unknown symbol that every character unseen in training maps to (V = |alphabet| + 1):

    unigram  P(c)     = (n(c) + k) / (N + k V)
    bigram   P(c | p) = (n(p c) + k) / (n(p .) + k V)

n(c) counts c in the training text (N characters), n(p c) the pair p c, n(p .) the pairs that start with p.
The first character of each held-out text is scored by the unigram. Perplexity per character is
exp(-sum log P / characters). Counting is all there is to it, so it is written here rather than taken
from a library (nltk's models are much slower on a million characters and count the same).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

UNK = "\x00unk"  # stands for every character the training text lacks; not a real character


def _alphabet(train: Sequence[str]) -> set[str]:
    return set().union(*map(set, train)) if train else set()


def unigram_nll(train: Sequence[str], heldout: Sequence[str], k: float = 1.0) -> float:
    """Summed negative log-likelihood (nats) of every character of `heldout` under the add-k unigram."""
    counts = Counter(c for t in train for c in t)
    n, v = sum(counts.values()), len(counts) + 1
    return -sum(math.log((counts.get(c, 0) + k) / (n + k * v)) for t in heldout for c in t)


def bigram_nll(train: Sequence[str], heldout: Sequence[str], k: float = 1.0) -> float:
    """Summed NLL (nats) of `heldout` under the add-k bigram; each text's first character by the unigram."""
    alphabet = _alphabet(train)
    unigram = Counter(c for t in train for c in t)
    n, v = sum(unigram.values()), len(alphabet) + 1
    pairs = Counter(p for t in train for p in zip(t, t[1:]))
    starts = Counter(t[i] for t in train for i in range(len(t) - 1))
    total = 0.0
    for t in heldout:
        if not t:
            continue
        total -= math.log((unigram.get(t[0], 0) + k) / (n + k * v))
        for p, c in zip(t, t[1:]):
            p = p if p in alphabet else UNK
            c = c if c in alphabet else UNK
            total -= math.log((pairs.get((p, c), 0) + k) / (starts.get(p, 0) + k * v))
    return total


def char_ngram_baselines(train: Sequence[str], heldout: Sequence[str], k: float = 1.0) -> dict:
    """Per-character perplexity (and bits per character) of the add-k unigram and bigram models fitted on
    `train`, on `heldout`."""
    chars = sum(len(t) for t in heldout)
    out = {"characters": chars, "alphabet": len(_alphabet(train))}
    for name, nll in (("unigram", unigram_nll(train, heldout, k)), ("bigram", bigram_nll(train, heldout, k))):
        out[f"{name}_ppl_per_char"] = math.exp(nll / max(chars, 1))
        out[f"{name}_bits_per_char"] = nll / max(chars, 1) / math.log(2)
    return out
