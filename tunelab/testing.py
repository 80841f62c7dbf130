"""Tiny, randomly initialised models and tokenizers built from configs, for tests and examples.

Nothing here touches the network: the tokenizer is trained in memory on a few sentences and the
models are built from small configs, so the whole test suite runs offline in seconds.
"""

from __future__ import annotations

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Give three tips for staying healthy. Eat well, sleep enough and exercise.",
    "What is the capital of France? The capital of France is Paris.",
    "Translate to German: good morning. Guten Morgen.",
    "system user assistant instruction input output response answer question",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"()-",
]


def tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer with ChatML special tokens and chat template (like SmolLM2's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


LLAMA2_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)


def tiny_spm_tokenizer(vocab_size: int = 400, gemma: bool = False):
    """A SentencePiece-style BPE tokenizer laid out as Llama 2's, Mistral 7B's and TinyLlama's tokenizer.json: <unk>
    <s> </s>, then the 256 byte tokens <0x00> ... <0xFF> (byte fallback), then pieces with ▁ for a space (one
    prepended to the text), and merges for every split of a piece into two pieces, ordered by the piece (as
    transformers' SentencePiece converter writes them); adds <s>. `gemma`: laid out as transformers' Gemma
    tokenizer instead (no ▁ prepended; a split at spaces, which finds none once they are ▁)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    learn = Tokenizer(models.BPE(unk_token="<unk>"))
    learn.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    specials = ["<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    learn.train_from_iterator(_CORPUS * 4, trainer=trainer)
    learnt = sorted(((i, t) for t, i in learn.get_vocab().items() if t not in specials))
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)] + [t for _, t in learnt])}
    merges = [(t[:k], t[k:]) for t in vocab for k in range(1, len(t)) if t[:k] in vocab and t[k:] in vocab]
    merges = [m for m in merges if not m[0].startswith("<0x")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    if gemma:
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])  # fmt: skip
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])  # fmt: skip
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>")  # fmt: skip
    fast.chat_template = LLAMA2_TEMPLATE
    return fast


def tiny_llama(vocab_size: int = 320, seed: int = 0, **overrides):
    """A 2-layer Llama (the default model's architecture) with hidden size 32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        # Larger than the usual 0.02: with tied 32-dim embeddings that small, logits barely move
        # and adapter methods cannot show learning on a random model within a few steps.
        initializer_range=0.1,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def save_tiny_model_dir(path, vocab_size: int = 320, seed: int = 0, arch: str = "llama", **overrides) -> str:
    """Write a tiny model (llama, bert or t5) and the tiny tokenizer as a local Hugging Face folder
    (what users point `model.name` at)."""
    tok = tiny_tokenizer(vocab_size)
    model = TINY_MODELS[arch](len(tok), seed=seed, **overrides)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def save_bf16_valued_tiny_model_dir(path) -> str:
    """The tiny Llama saved with fp32 weights that hold bf16 values, as a bf16 checkpoint read in fp32 does: LoRA's
    frozen linears then load compact, exactly (tunelab/accel/compact.py)."""
    import torch

    tok = tiny_tokenizer()
    model = tiny_llama(len(tok))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def tiny_bert(vocab_size: int = 320, seed: int = 0, num_labels: int = 2, **overrides):
    """A 2-layer BERT encoder with a sequence-classification head (MiniLM's architecture, tiny)."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        num_labels=num_labels,
        initializer_range=0.1,
        pad_token_id=0,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(**cfg)).eval()


def tiny_t5(vocab_size: int = 320, seed: int = 0, **overrides):
    """A 2+2-layer T5 encoder-decoder (no pre-trained seq2seq model can be downloaded offline)."""
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = dict(
        vocab_size=vocab_size,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=2,
        initializer_factor=1.0,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(T5Config(**cfg)).eval()


# other families' tiny dimensions, where their config names them otherwise than Llama's (tiny_causal)
_TINY_DIMS = {
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "gpt_neox": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    ),  # fmt: skip
}


def tiny_causal(model_type: str, vocab_size: int = 320, seed: int = 0, **overrides):
    """A 2-layer causal LM of another family (qwen2, phi3, olmo2, gpt2, gpt_neox ...: any transformers model_type),
    hidden size 32, random weights, in train mode as built (its dropout is 0)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dims = _TINY_DIMS.get(model_type) or dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=64)  # fmt: skip
    cfg = AutoConfig.for_model(model_type, vocab_size=vocab_size, initializer_range=0.1, **{**dims, **overrides})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg)


def tiny_batch(arch: str, seed: int = 0) -> dict:
    """A fixed batch for `arch` in ("llama", "bert", "t5") whose loss the model's forward returns."""
    g = torch.Generator().manual_seed(seed)
    # Each row repeats a random 4-token motif: structure that every method can pick up within 20
    # steps (pure noise leaves the smallest methods, e.g. a soft prompt, almost nothing to learn).
    motif = torch.randint(3, 320, (2, 4), generator=g)
    ids = motif.repeat(1, 3)
    mask = torch.ones_like(ids)
    if arch == "llama":
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}
    if arch == "bert":
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1])}
    if arch == "t5":
        return {"input_ids": ids, "attention_mask": mask, "labels": motif[:, :3].repeat(1, 2)}
    raise ValueError(arch)


TINY_MODELS = {"llama": tiny_llama, "bert": tiny_bert, "t5": tiny_t5}
