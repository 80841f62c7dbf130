"""A byte-level BPE tokenizer's encode, with each distinct word's tokens remembered: the same ids and offsets as
`tokenizers.Tokenizer.encode_batch(texts, add_special_tokens=False)`, ~3x less CPU a row.

    memo = WordMemo.of(backend)          # None: a tokenizer of another shape (encode_batch handles it)
    ids, starts = memo.encode(text)      # or None: a character not checked yet failed its check (encode_batch)

Why by hand. `encode_batch` spends most of a chat row's CPU outside the BPE merges, which it caches per word:
on the aligned strings it keeps so that every token's offsets map back to the input. For the tokenizers of most
chat models (GPT-2's byte-level BPE: SmolLM, Llama 3, Qwen, Mistral Nemo ...) the pipeline is three steps whose
results this module can keep per word instead: split out the added tokens, cut the rest into words with the
pre-tokenizer's regular expression, BPE each word. Words repeat (Zipf), so after the first few hundred rows
nearly every word is a dict look-up. A word's tokens are made by the tokenizer's own model
(`model.tokenize`), never by code of ours, so what can differ is only the split into words. The regex
engines differ (onig there, `regex` here) in their Unicode tables, not in the patterns' meaning: every
character is checked once per process, by splitting probe strings around it both ways, before a row holding
it is encoded here (the ASCII range when the memo is made). Tokenizers of other shapes (a normalizer other than
NFC, Metaspace / SentencePiece, BPE dropout, added tokens that strip spaces) are not handled: `of` returns None.
"""

from __future__ import annotations

import json
import unicodedata
from itertools import chain

import numpy as np

MAX_WORDS = 300_000  # ~60 MB of words remembered, then forgotten at once
# text whose words rarely repeat (Chinese, Japanese: a phrase between punctuation is one word) costs the memo more
# than it saves: where more than half of a window's words were new, the batch call takes the rest of the rows
WINDOW, MOSTLY_NEW = 20_000, 0.5  # English: 22% of the first 20,000 words new, 12% by 100,000

# tokenizers' ByteLevel pre-tokenizer (use_regex: true): GPT-2's split, as its source has it
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _probe(c: str) -> str:
    """Text with `c` next to letters, digits, spaces, line ends, apostrophes and itself: a character the two
    regex engines class differently (letter, number, space) is split differently somewhere in it."""
    return f"{c}a{c} a{c}1 1{c}{c}{c}1  {c}\n{c}\r\n {c}'{c} '{c}s{c}\t{c}  {c}.{c}"


class WordMemo:
    def __init__(self, backend, split: str, nfc: bool, trim: bool, keep_prefix_space: bool, added: list[str]):
        import regex
        from tokenizers import pre_tokenizers

        self.backend, self.model, self.nfc = backend, backend.model, nfc
        self.trim, self.keep_prefix_space = trim, keep_prefix_space
        self.split = regex.compile(split)
        # leftmost-longest, as tokenizers matches its added tokens: longer alternatives first
        order = sorted(added, key=len, reverse=True)
        self.cut = regex.compile("(" + "|".join(regex.escape(a) for a in order) + ")") if added else None
        self.bytes_of = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        self.ascii_bytes = {b: self.bytes_of.pre_tokenize_str(chr(b))[0][0] for b in range(128)}
        self.added = {a: backend.token_to_id(a) for a in added}
        self.forget()
        self.ok: set[str] = set()
        self.bad: set[str] = set()
        self.check(set(map(chr, range(128))))
        self.seen = self.new = 0  # words in the current window, and how many of them were learnt
        self.off = False
        self._specials: tuple[list[int], list[int]] | None | bool = False  # not looked for yet

    @classmethod
    def of(cls, backend) -> WordMemo | None:
        """The memo for a `tokenizers.Tokenizer` of the shape above, else None."""
        spec = json.loads(backend.to_str())
        model, pre, norm, post = spec.get("model") or {}, spec.get("pre_tokenizer"), spec.get("normalizer"), spec.get("post_processor")  # fmt: skip
        if model.get("type") != "BPE" or model.get("dropout") or model.get("byte_fallback"):
            return None
        if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
            return None
        if norm is not None and norm.get("type") != "NFC":
            return None
        split = _split_of(pre)
        if split is None:
            return None
        trim, keep = _trimming(post)
        if trim is None:
            return None
        added = spec.get("added_tokens") or []
        if any(a.get("lstrip") or a.get("rstrip") or a.get("single_word") for a in added):
            return None
        try:
            return cls(backend, split, norm is not None, trim, keep, [a["content"] for a in added])
        except Exception:  # a pattern this regex engine does not take
            return None

    def forget(self) -> None:
        """Words' tokens (ids), where each starts in its word (starts), and the words whose first token has
        exactly one leading space (lead1, for keep_prefix_space): the added tokens' only."""
        self.ids = {a: (i,) for a, i in self.added.items()}
        self.starts = {a: (0,) for a in self.added}
        self.lead1 = set()
        self.hard: set[str] = set()  # words whose tokens do not spell them (a byte missing from the vocabulary)

    def specials(self) -> tuple[list[int], list[int]] | None:
        """The ids the post-processor puts before and after every text (TemplateProcessing's bos / eos), found by
        encoding one text both ways; None where the text's own ids are not found inside (then not reproduced)."""
        if self._specials is False:
            bare = self.backend.encode("a", add_special_tokens=False).ids
            full = self.backend.encode("a", add_special_tokens=True).ids
            at = next((i for i in range(len(full) - len(bare) + 1) if full[i : i + len(bare)] == bare), None)
            self._specials = None if at is None else (full[:at], full[at + len(bare) :])
        return self._specials

    def check(self, chars: set[str]) -> bool:
        """Check each character not checked yet (see the module's docstring); False if one of `chars` failed."""
        pre = self.backend.pre_tokenizer
        for c in chars - self.ok - self.bad:
            probe = _probe(c)
            theirs = [span for _, span in pre.pre_tokenize_str(probe)]
            ours = [m.span() for m in self.split.finditer(probe)]
            (self.ok if ours == theirs else self.bad).add(c)
        return not (chars & self.bad)

    def learn(self, words) -> None:
        """The tokens of each word by the tokenizer's model, and where each starts in the word (characters)."""
        for word in words:
            ascii_ = word.isascii()  # one character a byte: offsets in bytes are offsets in characters
            mapped = word.translate(self.ascii_bytes) if ascii_ else self.bytes_of.pre_tokenize_str(word)[0][0]
            char_of = None if ascii_ else [i for i, c in enumerate(word) for _ in c.encode()]
            tokens = self.model.tokenize(mapped)
            if "".join(t.value for t in tokens) != mapped:  # a byte the vocabulary lacks (dropped, or <unk>)
                self.hard.add(word)  # its offsets are the batch call's to align: rows holding it go there
                continue
            ids, starts, at = [], [], 0
            for i, t in enumerate(tokens):
                n = len(t.value)  # bytes, one character each in `mapped`
                start, end = (at, at + n) if ascii_ else (char_of[at], char_of[at + n - 1] + 1)
                if self.trim:  # ByteLevel's post-processor: leading spaces out of the offsets
                    lead = n - len(t.value.lstrip("Ġ"))
                    if self.keep_prefix_space and i == 0 and lead == 1:
                        self.lead1.add(word)
                    start = min(start + lead, end)
                ids.append(t.id)
                starts.append(start)
                at += n
            self.ids[word], self.starts[word] = tuple(ids), tuple(starts)

    def encode(self, text: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(ids int32, each token's start offset in `text` in characters), as encode_batch gives them."""
        if self.off:
            return None
        if not text.isascii():
            if not self.check(set(text)):
                return None
            if self.nfc and not unicodedata.is_normalized("NFC", text):
                return None  # the normalizer would change the text: its offsets map back
        parts = self.cut.split(text) if self.cut is not None else [text]
        words = []
        for i, part in enumerate(parts):
            if i % 2:
                words.append(part)
            elif part:
                words += self.split.findall(part)
        if not words:
            return np.zeros(0, np.int32), np.zeros(0, np.int64)
        lengths = list(map(len, words))
        if sum(lengths) != len(text):
            return None  # a pattern that leaves gaps (tokenizers keeps them as words)
        got = list(map(self.ids.get, words))
        if None in got:
            if len(self.ids) > MAX_WORDS:  # bounded memory whatever the data's size: the frequent words come back
                self.forget()
            new = {w for w in words if w not in self.ids and w not in self.hard}
            self.new += len(new)
            self.learn(new)
            if self.hard and not self.hard.isdisjoint(words):
                return None
            got = list(map(self.ids.get, words))
        self.seen += len(words)
        if self.seen >= WINDOW:
            self.off = self.new > MOSTLY_NEW * self.seen
            self.seen = self.new = 0
        ids = np.fromiter(chain.from_iterable(got), dtype=np.int32)
        starts = np.fromiter(chain.from_iterable(map(self.starts.__getitem__, words)), dtype=np.int64, count=len(ids))
        ends = np.cumsum(lengths, dtype=np.int64)
        starts += np.repeat(ends - lengths, list(map(len, got)))
        if self.keep_prefix_space and words and words[0] in self.lead1:
            starts[0] = 0  # tokenizers keeps the space it may have added itself at the very start
        return ids, starts


def _split_of(pre: dict | None) -> str | None:
    """The one regex that cuts text into words for this pre-tokenizer, or None for another pre-tokenizer."""
    if pre is None:
        return None
    if pre.get("type") == "ByteLevel":
        return GPT2_SPLIT if pre.get("use_regex", True) and not pre.get("add_prefix_space") else None
    if pre.get("type") != "Sequence":
        return None
    steps = pre.get("pretokenizers") or []
    if len(steps) != 2:
        return None
    split, level = steps
    if level.get("type") != "ByteLevel" or level.get("use_regex", True) or level.get("add_prefix_space"):
        return None
    if split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert"):
        return None
    return (split.get("pattern") or {}).get("Regex")


def _trimming(post: dict | None) -> tuple[bool | None, bool]:
    """(trim, keep_prefix_space) of the post-processor's offsets; trim None for a post-processor not known."""
    kind = post.get("type") if post else None
    if kind in (None, "TemplateProcessing", "BertProcessing"):  # they only add special tokens
        return False, False
    if kind == "ByteLevel":
        return bool(post.get("trim_offsets")), bool(post.get("add_prefix_space"))
    if kind == "Sequence":
        steps = [_trimming(p) for p in post.get("processors") or []]
        if any(trim is None for trim, _ in steps):
            return None, False
        return any(trim for trim, _ in steps), any(keep for trim, keep in steps if trim)
    return None, False


def encode_texts(
    texts: list[str], backend, memo: WordMemo | None, special: bool = False
) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(ids int32, each token's start in characters)] of `texts`: the memo's encoding where it takes the text,
    `backend.encode_batch`'s (one call for the rest) otherwise. `special`: with the special tokens the
    post-processor adds (a text row's bos), as encode_batch(add_special_tokens=True) gives them."""
    out = [memo.encode(t) for t in texts] if memo is not None else [None] * len(texts)
    around = memo.specials() if memo is not None and special else ([], [])
    if around is None:  # a post-processor the memo cannot reproduce: the batch call for every text
        out = [None] * len(texts)
    elif special and (around[0] or around[1]):  # the specials start where the text does, and where it ends
        head, tail = np.asarray(around[0], np.int32), np.asarray(around[1], np.int32)
        for i, (text, o) in enumerate(zip(texts, out)):
            if o is not None:
                starts = [np.zeros(len(head), np.int64), o[1], np.full(len(tail), len(text), np.int64)]
                out[i] = (np.concatenate([head, o[0], tail]), np.concatenate(starts))
    rest = [i for i, o in enumerate(out) if o is None]
    encoded = backend.encode_batch([texts[i] for i in rest], add_special_tokens=special) if rest else []
    for i, e in zip(rest, encoded):
        out[i] = (np.array(e.ids, np.int32), np.fromiter((a for a, _ in e.offsets), np.int64, count=len(e.ids)))
    return out


def ids_encoder(tokenizer):
    """A function text -> ids as `tokenizer(text, add_special_tokens=False)["input_ids"]` gives them, through the
    memo where it takes the tokenizer and the text (a pre-training corpus: one call per document)."""
    fast = getattr(tokenizer, "is_fast", False) and hasattr(tokenizer, "backend_tokenizer")
    memo = WordMemo.of(tokenizer.backend_tokenizer) if fast else None

    def encode(text: str) -> list[int]:
        got = memo.encode(text) if memo is not None else None
        if got is not None:
            return got[0].tolist()
        # verbose=False: a whole book may be one input here, cut into blocks afterwards; no length warning
        return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    return encode
