"""The word memo (tunelab/data/bytebpe.py) gives encode_batch's ids and offsets, on every tokenizer shape it takes."""

import random
from unicodedata import is_normalized

import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

from tunelab.data.bytebpe import WordMemo, encode_texts

LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
CORPUS = [
    "The quick brown fox jumps over the lazy dog's back, isn't it? 12345 and 3.14159!",
    "Grüße aus Köln: naïve café — “quoted” text… ½ ٣ 你好，世界 😀👍🏽 ﬁne",
    "  indented\n\tcode(x) {\r\n    return x*2; }\n\n\n  trailing   spaces   ",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n",
    "SHOUTING'S FINE, WE'LL SEE. I'M HERE. They'd've gone.",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tokenizer(split: str = "bytelevel", nfc: bool = False, post: str | None = None) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None))
    if split == "bytelevel":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:  # Llama 3's, Qwen's: their own split, then ByteLevel without its regex
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )  # fmt: skip
    if nfc:
        tok.normalizer = normalizers.NFC()
    if post == "trim":
        tok.post_processor = processors.ByteLevel(trim_offsets=True)
    elif post == "template":
        tok.post_processor = processors.TemplateProcessing(
            single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)]
        )
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(CORPUS * 8, trainer=trainer)
    tok.add_tokens(["<think>", "</think>"])  # added tokens that are not special split the text too
    return tok


def texts(seed: int = 0, n: int = 300) -> list[str]:
    """The corpus, edge cases, and random strings drawn from letters, digits, spaces, line ends, punctuation,
    accents (composed and not), CJK, emoji, control characters and the added tokens."""
    pool = list("aZé'’ \t\n\r\x0b\x1c\u00a0\u3000.,!?-_1٣½") + ["e\u0301", "你", "😀", "👍🏽", "'s", "'S", "'ll", "  "]
    pool += SPECIALS + ["<think>", "</think>", "\r\n", "\n\n", "123456", "x" * 40]
    rng = random.Random(seed)
    extra = ["", " ", "\n", "  x", "x  ", "<|im_start|><|im_end|>", "<|im_start|>", "a<think>b</think>c", " <think> "]
    return CORPUS + extra + ["".join(rng.choice(pool) for _ in range(rng.randint(1, 60))) for _ in range(n)]


def reference(tok: Tokenizer, batch: list[str]):
    return [(e.ids, [a for a, _ in e.offsets]) for e in tok.encode_batch(batch, add_special_tokens=False)]


@pytest.mark.parametrize("split, nfc, post", [("bytelevel", False, None), ("bytelevel", False, "trim"),
                                              ("llama3", False, "template"), ("llama3", True, None),
                                              ("llama3", False, "trim")])  # fmt: skip
def test_the_memo_encodes_as_encode_batch(split, nfc, post):
    tok = tokenizer(split, nfc, post)
    memo = WordMemo.of(tok)
    assert memo is not None
    batch = texts()
    want = reference(tok, batch)
    for _ in range(2):  # words learnt on the first pass, looked up on the second
        got = [memo.encode(t) for t in batch]
        # every row taken, but those that NFC would change (their offsets map back through the normalizer)
        assert [t for g, t in zip(got, batch) if g is None] == [t for t in batch if nfc and not is_normalized("NFC", t)]
        for t, g, w in zip(batch, got, want):
            if g is not None:
                assert (g[0].tolist(), g[1].tolist()) == w, repr(t)
    assert [(a.tolist(), b.tolist()) for a, b in encode_texts(batch, tok, memo)] == want
    assert [(a.tolist(), b.tolist()) for a, b in encode_texts(batch, tok, None)] == want


def test_a_character_the_regex_engines_class_differently_goes_to_encode_batch():
    """U+0558 (Armenian, Unicode 16) is a letter to `regex`'s tables and not to the tokenizer's onig: splitting
    it here would give other ids. The check per character finds it, and the row goes to encode_batch."""
    tok = tokenizer()
    memo = WordMemo.of(tok)
    row = "abc\u0558def ghi"
    assert [m.group() for m in memo.split.finditer(row)] != [w for w, _ in tok.pre_tokenizer.pre_tokenize_str(row)]
    assert memo.encode(row) is None and "\u0558" in memo.bad
    assert memo.encode("abcdéf") is not None and "é" in memo.ok
    got = encode_texts([row, "abc def"], tok, memo)
    assert [(a.tolist(), b.tolist()) for a, b in got] == reference(tok, [row, "abc def"])


def test_tokenizers_of_other_shapes_get_no_memo():
    assert WordMemo.of(tokenizer()) is not None
    metaspace = tokenizer()
    metaspace.pre_tokenizer = pre_tokenizers.Metaspace()
    lowercase = tokenizer()
    lowercase.normalizer = normalizers.Lowercase()
    stripping = tokenizer()
    stripping.add_special_tokens([__import__("tokenizers").AddedToken("<mask>", lstrip=True)])
    prefixed = tokenizer()
    prefixed.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    for tok in (metaspace, lowercase, stripping, prefixed):
        assert WordMemo.of(tok) is None


def test_the_store_tokenises_with_the_memo_and_gets_the_same_examples(tmp_path, monkeypatch):
    """End to end: the store's examples with the memo equal those without it (encode_batch for every row)."""
    from tunelab.config import DataConfig
    from tunelab.data.build import build_datasets
    from tunelab.testing import tiny_tokenizer

    rows = [{"messages": [{"role": "user", "content": t}, {"role": "assistant", "content": t[::-1] + " ok"}]}
            for t in texts(seed=1, n=300) if t.strip() and "<|" not in t and "think>" not in t]  # fmt: skip
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(__import__("json").dumps(r) + "\n" for r in rows))
    tok = tiny_tokenizer()
    cfg = dict(train=str(path), val_fraction=0.0, max_length=1024, cache="on")
    calls = []
    real = WordMemo.encode
    monkeypatch.setattr(WordMemo, "encode", lambda self, t: calls.append(1) or real(self, t))
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path / "a"))
    with_memo = build_datasets(DataConfig(**cfg), tok, seed=0)
    assert len(calls) == len(rows)
    monkeypatch.setattr(WordMemo, "of", classmethod(lambda cls, backend: None))
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path / "b"))
    without = build_datasets(DataConfig(**cfg), tok, seed=0)
    a, b = with_memo.train, without.train
    assert len(a) == len(b) == len(rows)
    for i in range(len(a)):
        assert np.array_equal(a[i]["input_ids"], b[i]["input_ids"]) and np.array_equal(a[i]["labels"], b[i]["labels"])


def test_a_full_memo_forgets_its_words_and_encodes_the_same(monkeypatch):
    import tunelab.data.bytebpe as bytebpe

    monkeypatch.setattr(bytebpe, "MAX_WORDS", 20)
    tok = tokenizer()
    memo = WordMemo.of(tok)
    batch = texts(seed=3, n=100)
    got = [memo.encode(t) for t in batch]
    assert [(a.tolist(), b.tolist()) for a, b in got] == reference(tok, batch)
    assert len(memo.ids) < 20 + 60 + len(memo.added) and memo.ids["<think>"] == (tok.token_to_id("<think>"),)


def test_a_word_with_a_byte_the_vocabulary_lacks_goes_to_encode_batch():
    """A BPE trained without the 256-byte alphabet drops what it never saw (its model has no unk): the tokens no
    longer spell the word, so only encode_batch's alignment knows where the next ones start. Such rows go there."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(CORPUS[:1] * 8, trainer=trainers.BpeTrainer(vocab_size=300, show_progress=False))
    memo = WordMemo.of(tok)
    batch = ["the quick fox", "the quick Zebra fox", "quick Zebra", "the fox"]
    got = [memo.encode(t) for t in batch]
    assert got[0] is not None and got[1] is None and got[2] is None and got[3] is not None
    assert [(a.tolist(), b.tolist()) for a, b in encode_texts(batch, tok, memo)] == reference(tok, batch)
    assert len(reference(tok, ["Zebra"])[0][0]) < len("Zebra")  # the batch call dropped the unseen bytes


def test_text_whose_words_rarely_repeat_goes_back_to_encode_batch(monkeypatch):
    """Chinese-like rows (a phrase between punctuation is one word, rarely seen twice) cost the memo more than it
    saves: once more than half of a window's words were new, the rest of the rows go to the batch call. English-like
    rows, whose words repeat, stay with the memo."""
    import tunelab.data.bytebpe as bytebpe

    monkeypatch.setattr(bytebpe, "WINDOW", 200)
    tok = tokenizer()
    rng = random.Random(0)
    han = [chr(c) for c in range(0x4E00, 0x4E00 + 2000)]
    rows = ["".join(rng.choice(han) if rng.random() > 0.15 else "，" for _ in range(120)) for _ in range(60)]
    memo = WordMemo.of(tok)
    got = [memo.encode(t) for t in rows]
    assert memo.off and got[0] is not None and got[-1] is None
    assert [(a.tolist(), b.tolist()) for a, b in encode_texts(rows, tok, memo)] == reference(tok, rows)
    english = WordMemo.of(tok)
    for _ in range(40):
        assert all(english.encode(t) is not None for t in CORPUS)
    assert not english.off


def test_texts_with_the_special_tokens_the_post_processor_adds():
    """Text rows (continued pre-training) are encoded with the post-processor's special tokens (a bos in front):
    the memo's ids with them around equal encode_batch(add_special_tokens=True)'s."""
    tok = tokenizer("llama3", False, "template")
    memo = WordMemo.of(tok)
    assert memo.specials() == ([tok.token_to_id("<|im_start|>")], [])
    batch = texts(seed=5, n=100)
    want = [e.ids for e in tok.encode_batch(batch, add_special_tokens=True)]
    assert [a.tolist() for a, _ in encode_texts(batch, tok, memo, special=True)] == want
    assert [a.tolist() for a, _ in encode_texts(batch, tok, None, special=True)] == want
