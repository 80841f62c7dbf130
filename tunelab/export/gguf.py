"""Write a Llama-architecture model (SmolLM2, Llama, Mistral-style), a SmolLM3, Qwen2, Qwen3, Gemma 1 / 2 / 3, Phi-3, OLMo 2 or Granite one
as a GGUF file for llama.cpp.

Built on the `gguf` package (llama.cpp's own gguf-py): GGUFWriter for the file, its tensor-name map
for llama.cpp's names (`blk.N.attn_q.weight` ...), its quantisers for Q8_0 / Q4_0 / Q4_1 / Q5_0,
and SpecialVocab for merges, special-token ids and the chat template. What is ours follows
llama.cpp's convert_hf_to_gguf.py for the llama architecture:

  - Q and K projections are permuted from Hugging Face's rotary layout (first half / second half
    of each head) to llama.cpp's interleaved pairs: rows (head, 2, d/2) -> (head, d/2, 2);
  - 1-D tensors (norms, biases) are stored in F32; with a 4-bit type the embedding (and an untied
    output head) is stored in Q8_0, since it is used by every token and costs little;
  - a tensor whose row length is not a multiple of the type's block size falls back to a type
    that fits (q4_k -> q5_0 as llama-quantize does, else f16);
  - the vocabulary: export/gguf_vocab.py (byte-level BPE with llama.cpp's pre-tokenizer name, or SentencePiece
    pieces with scores).

Q4_K: gguf-py can only *de*quantise it, so `_quantize_q4_k` packs the 144-byte super-blocks itself
(min/max per 32-value sub-block, 6-bit sub-scales); llama.cpp's own Q4_K search (make_qkx2_quants)
finds slightly better scales, so our q4_k is valid but a little less accurate than llama-quantize's.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from tunelab.export import ExportError
from tunelab.export.gguf_vocab import add_tokenizer, file_name, vocabulary

QUANT_TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1", "q4_k")
_FILE_TYPE = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0",
              "q4_1": "MOSTLY_Q4_1", "q4_k": "MOSTLY_Q4_K_S"}  # fmt: skip
# transformers' class -> llama.cpp's architecture. Qwen2 is Llama with biases on q, k and v; llama.cpp runs its
# rotary embedding in Hugging Face's (NeoX) layout, so its q / k rows keep their order (convert_hf_to_gguf.py's
# Qwen2Model permutes nothing)
GGUF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",  # Qwen2's layout with per-head RMSNorms on q and k, and no biases
    # Llama's tensors (permuted as Llama's); every 4th layer without RoPE, which llama.cpp's smollm3 assumes
    "SmolLM3ForCausalLM": "smollm3",
    # Gemma: RMSNorms that scale by 1 + w, the embedding times sqrt(hidden size) (llama.cpp does it), GeGLU, a head
    # size of its own; Gemma 3 adds q / k norms, norms after attention and after the FFN, and sliding-window layers
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",  # Gemma 3 without q / k norms, with soft-capped attention and logits
    "Gemma3ForCausalLM": "gemma3",
    # Phi-3 / Phi-3.5 mini: Llama's layers with q, k, v in one matrix and gate, up in another, as llama.cpp keeps them
    "Phi3ForCausalLM": "phi3",
    # OLMo 2: norms after attention and the FFN (none before), q / k norms over the whole projection
    "Olmo2ForCausalLM": "olmo2",
    # Granite 3: Llama's layers (and permutation) with four multipliers: embedding, attention, residual, logits
    "GraniteForCausalLM": "granite",
}
OUTPUT_REQUIRED = ("olmo2",)  # llama.cpp's olmo2 reads `output` even where the head is tied to the embedding
NORM_PLUS_ONE = (
    "gemma",
    "gemma2",
    "gemma3",
)  # transformers' norm scales by (1 + w), llama.cpp's by w: w + 1 is written
PERMUTED_QK = (
    "llama",
    "smollm3",
    "granite",
)  # llama.cpp runs these with interleaved rotary pairs (convert_hf_to_gguf.py)
SUPPORTED_ARCHITECTURES = tuple(GGUF_ARCHITECTURES)


# ----------------------------------------------------------------------------------- tensors
def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face's rotary layout to llama.cpp's (see convert_hf_to_gguf.py, LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """Q4_K blocks (d, dmin: fp16; 12 bytes of 6-bit sub-scales and sub-mins; 128 bytes of 4-bit
    codes) for a float32 array whose last dimension is a multiple of 256. Decoded by ggml as
    w = d * sc[j] * q - dmin * m[j] for sub-block j."""
    rows = w.reshape(-1, 8, 32).astype(np.float32)  # one row per super-block of 256
    lo = np.minimum(rows.min(axis=-1), 0)  # ggml's Q4_K offsets are subtracted: the minimum must be <= 0
    scale = (rows.max(axis=-1) - lo) / 15
    d = scale.max(axis=-1, keepdims=True) / 63
    dmin = (-lo).max(axis=-1, keepdims=True) / 63
    d16, dmin16 = d.astype(np.float16), dmin.astype(np.float16)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d16 > 0, np.rint(scale / d16.astype(np.float32)), 0).clip(0, 63).astype(np.uint8)
        mn = np.where(dmin16 > 0, np.rint(-lo / dmin16.astype(np.float32)), 0).clip(0, 63).astype(np.uint8)
        step = (d16.astype(np.float32) * sc)[..., None]
        offset = (dmin16.astype(np.float32) * mn)[..., None]
        q = np.where(step > 0, np.rint((rows + offset) / step), 0).clip(0, 15).astype(np.uint8)
    scales = np.empty((rows.shape[0], 12), dtype=np.uint8)
    scales[:, 0:4] = (sc[:, 0:4] & 0x3F) | ((sc[:, 4:8] >> 4) << 6)
    scales[:, 4:8] = (mn[:, 0:4] & 0x3F) | ((mn[:, 4:8] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((mn[:, 4:8] & 0x0F) << 4)
    q = q.reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0, :] | (q[:, :, 1, :] << 4)).reshape(-1, 128)
    blocks = np.concatenate([d16.view(np.uint8), dmin16.view(np.uint8), scales, qs], axis=1)
    return blocks.reshape(*w.shape[:-1], w.shape[-1] // 256 * 144)


def encode_tensor(w: np.ndarray, qtype: str):
    """(data, gguf.GGMLQuantizationType, the type actually used) for a float32 array [.., row]."""
    import gguf

    T = gguf.GGMLQuantizationType
    if qtype == "f32" or w.ndim == 1:
        return w.astype(np.float32), T.F32, "f32"
    if qtype == "f16":
        return w.astype(np.float16), T.F16, "f16"
    row = w.shape[-1]
    if qtype == "q4_k":
        if row % 256 == 0:
            return _quantize_q4_k(w), T.Q4_K, "q4_k"
        qtype = "q5_0"  # llama-quantize's fallback for rows that are no multiple of 256
    gtype = getattr(T, qtype.upper())
    block = gguf.GGML_QUANT_SIZES[gtype][0]
    if row % block:
        return w.astype(np.float16), T.F16, "f16"
    return gguf.quants.quantize(w.astype(np.float32), gtype), gtype, qtype


# -------------------------------------------------------------------------------------- writer
def gguf_architecture(model) -> str:
    """llama.cpp's architecture name for `model` (GGUF_ARCHITECTURES); ExportError for one this exporter does not
    write."""
    for name in (type(model).__name__, *(getattr(model.config, "architectures", None) or [])):
        if name in GGUF_ARCHITECTURES:
            return GGUF_ARCHITECTURES[name]
    raise ExportError(
        "GGUF export writes the llama, qwen2, qwen3, smollm3, gemma, gemma2, gemma3, phi3, olmo2 and granite architectures "
        f"({', '.join(SUPPORTED_ARCHITECTURES)}); this model is {type(model).__name__}. Export with --format hf, "
        "then use llama.cpp's convert_hf_to_gguf.py."
    )


def check_model(model) -> list[str]:
    """ExportError for a model llama.cpp would run otherwise; notes for the differences it accepts (Mistral's
    window, LongRoPE's choice of factors)."""
    if gguf_architecture(model) == "smollm3":
        cfg = model.config
        step4 = [int((i + 1) % 4 != 0) for i in range(cfg.num_hidden_layers)]
        if list(getattr(cfg, "no_rope_layers", step4)) != step4:
            raise ExportError(
                f"llama.cpp's smollm3 leaves RoPE out of every 4th layer; this model's no_rope_layers are "
                f"{cfg.no_rope_layers}: export with --format hf"
            )
    rope = _rope_params(model.config) or getattr(model.config, "rope_scaling", None) or {}
    kind = rope.get("rope_type", "default")
    longrope = kind == "longrope" and gguf_architecture(model) == "phi3"  # Phi-3 128k, Phi-3.5, Phi-4 mini
    if kind not in (None, *GGUF_ROPE_TYPES) and not longrope:
        why = {"dynamic": "llama.cpp has no dynamic NTK scaling, so the file would run unscaled; "
                          "use linear or yarn (docs/long-context.md)"}.get(kind, "")  # fmt: skip
        raise ExportError(
            f"rope type {kind!r} cannot be written as GGUF ({why or 'only ' + ', '.join(GGUF_ROPE_TYPES)})"
        )
    if kind == "yarn" and rope.get("attention_factor") is not None:
        raise ExportError("yarn with an explicit attention_factor cannot be written as GGUF: llama.cpp derives the "
                          "attention temperature from the factor itself (0.1 ln F + 1); drop attention_factor")  # fmt: skip
    notes = []
    if longrope:
        native = (
            getattr(model.config, "original_max_position_embeddings", None) or rope["original_max_position_embeddings"]
        )
        notes.append(f"LongRoPE: llama.cpp rotates with the long factors at every position once its context (n_ctx) is "
                f"longer than {native} tokens, transformers only for sequences longer than that: run llama.cpp with "
                f"n_ctx <= {native} for transformers' answers to shorter texts")  # fmt: skip
    window = getattr(model.config, "sliding_window", None)
    if gguf_architecture(model) in ("gemma2", "gemma3"):
        _check_gemma(model.config, gguf_architecture(model))
    elif window and gguf_architecture(model) in ("llama", "phi3") and window < model.config.max_position_embeddings:
        # Mistral 7B v0.1: llama.cpp's llama has no window, and its convert_hf_to_gguf.py writes the model as Llama;
        # Phi-3 mini's window (2,047) llama.cpp reads and switches off
        notes.append(f"llama.cpp attends to every earlier token, where this model attends to the last {window}: its "
                f"answers differ from transformers' beyond {window} tokens (llama.cpp's own conversion does the same)")  # fmt: skip
    elif window and window < model.config.max_position_embeddings:
        raise ExportError("sliding-window attention is not supported by this exporter for this architecture")
    return notes


def _check_gemma(cfg, arch: str) -> None:
    """What llama.cpp's gemma2 / gemma3 derive rather than read: the attention scale 1/sqrt(head size) (their 27B,
    46 / 62 layers: the hidden size per head); gemma3: no attention soft-capping, the sliding layers' RoPE unscaled."""
    big = cfg.num_hidden_layers == {"gemma2": 46, "gemma3": 62}[arch]
    expected = cfg.hidden_size / cfg.num_attention_heads if big else cfg.head_dim
    if cfg.query_pre_attn_scalar != expected:
        raise ExportError(
            f"llama.cpp's {arch} scales attention by 1/sqrt({expected:g}); this model's query_pre_attn_scalar is "
            f"{cfg.query_pre_attn_scalar}: export with --format hf"
        )
    if arch == "gemma3" and getattr(cfg, "attn_logit_softcapping", None):
        raise ExportError("llama.cpp's gemma3 has no attention logit soft-capping: export with --format hf")
    local = (getattr(cfg, "rope_parameters", None) or {}).get("sliding_attention") or {}
    if local.get("rope_type", "default") != "default":
        raise ExportError("llama.cpp's gemma3 runs its sliding layers' RoPE unscaled: export with --format hf")


GGUF_ROPE_TYPES = ("default", "linear", "yarn", "llama3")


def _rope_params(config) -> dict:
    """The RoPE parameters of the model's (global) attention layers: Gemma 3 keeps one set per layer type."""
    rope = getattr(config, "rope_parameters", None) or {}
    return rope.get("full_attention", rope)


def _add_rope_scaling(writer, config) -> np.ndarray | None:
    """The RoPE scaling keys llama.cpp reads (as its convert_hf_to_gguf.py writes them); for llama3, which
    llama.cpp expresses as per-pair frequency divisors, the `rope_freqs` tensor to add instead."""
    import gguf

    rope = _rope_params(config)
    kind = rope.get("rope_type", "default")
    if kind in ("linear", "yarn"):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if kind == "linear" else gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        native = rope.get("original_max_position_embeddings") or round(config.max_position_embeddings / rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(int(native))
        if rope.get("beta_fast") is not None:
            writer.add_rope_scaling_yarn_beta_fast(float(rope["beta_fast"]))
        if rope.get("beta_slow") is not None:
            writer.add_rope_scaling_yarn_beta_slow(float(rope["beta_slow"]))
        return None
    if kind == "llama3":
        # llama.cpp divides each pair's frequency by rope_freqs[i]: the default frequencies over transformers' llama3
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
        base = _rope_theta(config)
        dim = scaled.shape[0] * 2
        default = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        return (default / scaled.double().numpy()).astype(np.float32)
    return None


def _rope_theta(config) -> float:
    return float(_rope_params(config).get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _longrope(writer, config, native: int) -> dict[str, np.ndarray]:
    """Phi-3's LongRoPE as llama.cpp reads it: the attention factor (transformers': the config's, else
    sqrt(1 + ln F / ln native), F the context's growth) and the long and short frequency factors as tensors."""
    import gguf

    rope = _rope_params(config)
    if rope.get("rope_type") != "longrope":
        return {}
    factor = rope.get("factor") or config.max_position_embeddings / native
    attention = rope.get("attention_factor")
    if attention is None:
        attention = math.sqrt(1 + math.log(factor) / math.log(native)) if factor > 1 else 1.0
    writer.add_rope_scaling_attn_factors(float(attention))
    name = {kind: gguf.TENSOR_NAMES[kind] + ".weight" for kind in (gguf.MODEL_TENSOR.ROPE_FACTORS_LONG,
                                                                 gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT)}  # fmt: skip
    return {name[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG]: np.asarray(rope["long_factor"], np.float32),
            name[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT]: np.asarray(rope["short_factor"], np.float32)}  # fmt: skip


def _add_sliding_window(writer, config) -> None:
    """Gemma 2 / 3's sliding-window layers: the window, which layers have it (llama.cpp takes the list) and their
    RoPE base (Gemma 3: 10,000 where the global layers' is 1,000,000; Gemma 2: one base)."""
    types = list(getattr(config, "layer_types", None) or [])
    if "sliding_attention" not in types:
        return
    writer.add_sliding_window(int(config.sliding_window))
    writer.add_sliding_window_pattern([t == "sliding_attention" for t in types])
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base_swa(float(rope.get("sliding_attention", _rope_params(config)).get("rope_theta", 10000.0)))


def write_gguf(
    model, tokenizer, path, quant: str = "f16", name: str | None = None, pre_tokenizer: str | None = None
) -> dict:
    """Write `model` (a plain transformers Llama-architecture model) and its tokenizer to `path`.

    `pre_tokenizer`: llama.cpp's name for the tokenizer's split (`tokenizer.ggml.pre`), when known from
    the model's GGUF source or given by the user; otherwise found as `pre_tokenizer_name` says, and an
    ExportError (before anything is written) when llama.cpp would not recognise it.
    Returns a report: the path, its size, the quant type, the tensors that fell back to another type
    and the pre-tokenizer written (with how it was found).
    """
    import gguf

    if quant not in QUANT_TYPES:
        raise ExportError(f"unknown GGUF quant type {quant!r}; choose one of {', '.join(QUANT_TYPES)}")
    notes = check_model(model)
    arch = gguf_architecture(model)
    cfg = model.config
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    n_vocab = state["model.embed_tokens.weight"].shape[0]
    vocab = vocabulary(tokenizer, n_vocab, pre_tokenizer)  # a tokenizer GGUF cannot hold is refused here
    notes += vocab.notes

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, arch=arch)
    writer.add_type("model")
    written_name, name_note = file_name(name or path.stem, tokenizer)
    notes += [name_note] if name_note else []
    writer.add_name(written_name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(_rope_theta(cfg))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    extra = {}  # tensors beside the model's own (Phi-3's LongRoPE factors, llama3's rope_freqs)
    # Phi-4 mini rotates part of each head (partial_rotary_factor)
    writer.add_rope_dimension_count(int(head_dim * _rope_params(cfg).get("partial_rotary_factor", 1.0)))
    if arch == "phi3":
        native = getattr(cfg, "original_max_position_embeddings", None) or cfg.max_position_embeddings
        writer.add_rope_scaling_orig_ctx_len(int(native))
        writer.add_sliding_window(int(getattr(cfg, "sliding_window", None) or 0))
        extra.update(_longrope(writer, cfg, native))
    rope_freqs = _add_rope_scaling(writer, cfg)
    if arch == "granite":  # transformers' multipliers, under llama.cpp's names for them
        writer.add_embedding_scale(float(cfg.embedding_multiplier))
        writer.add_attention_scale(float(cfg.attention_multiplier))
        writer.add_residual_scale(float(cfg.residual_multiplier))
        writer.add_logit_scale(float(cfg.logits_scaling))
    if arch in ("gemma2", "gemma3"):
        _add_sliding_window(writer, cfg)
        if getattr(cfg, "attn_logit_softcapping", None):
            writer.add_attn_logit_softcapping(float(cfg.attn_logit_softcapping))
        if getattr(cfg, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(float(cfg.final_logit_softcapping))
    if head_dim != cfg.hidden_size // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPE[quant]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(writer, tokenizer, vocab)

    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), cfg.num_hidden_layers)
    fallbacks, used = {}, {}
    if rope_freqs is not None:
        extra[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"] = rope_freqs
    for tensor_name, values in extra.items():
        writer.add_tensor(tensor_name, values)
        used["f32"] = used.get("f32", 0) + 1
    for hf_name, w in state.items():
        if tied and hf_name == "lm_head.weight" and arch not in OUTPUT_REQUIRED:
            continue  # llama.cpp uses token_embd for the output when there is no output.weight
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        gg_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gg_name is None:
            raise ExportError(f"no llama.cpp tensor name for {hf_name!r}; this model is not a plain {arch} model")
        arr = w.numpy()
        if arch in NORM_PLUS_ONE and hf_name.endswith("norm.weight"):
            arr = arr + 1
        if arch in PERMUTED_QK and hf_name.endswith("q_proj.weight"):
            arr = permute_qk(arr, n_head)
        elif arch in PERMUTED_QK and hf_name.endswith("k_proj.weight"):
            arr = permute_qk(arr, n_kv)
        want = quant
        if gg_name.startswith(("token_embd", "output.")) and quant.startswith("q4"):
            want = "q8_0"
        data, gtype, got = encode_tensor(arr, want)
        if arr.ndim > 1 and got != want:
            fallbacks[gg_name] = got
        used[got] = used.get(got, 0) + 1
        writer.add_tensor(gg_name, data, raw_dtype=gtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)
    return {"path": str(path), "bytes": path.stat().st_size, "quant": quant, "tensor_types": used,
            "fallbacks": fallbacks, "pre_tokenizer": vocab.pre, "pre_tokenizer_from": vocab.pre_from,
            "notes": notes}  # fmt: skip
