"""GGUF files written by tunelab, loaded and run by llama.cpp itself (through llama-cpp-python).

Greedy generation in llama.cpp is compared with tunelab's own (tunelab.models.generation.generate on the
merged model): the same token ids for f32 and f16, the same first tokens for q8_0; 4-bit files load and
answer. The tokenizer (ids of the same texts, special tokens, bos / eos) and the chat template are
compared too. Tiny random models are compared by token ids (their text is noise); the default model,
marked slow, also by text. Without llama-cpp-python the module is skipped with the install command;
with TUNELAB_REQUIRE_LLAMA_CPP=1 (set by .ci/run) a missing install is a failure instead.
"""

import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from test_export import ROWS, train_run

from tunelab.config import load_config
from tunelab.data import build_prompt_ids
from tunelab.export.gguf import ExportError, write_gguf
from tunelab.export.gguf_lora import write_gguf_lora
from tunelab.export.hf import export
from tunelab.models.generation import generate
from tunelab.stages.runs import load_run, run_manifest
from tunelab.testing import save_tiny_model_dir, tiny_llama, tiny_tokenizer

INSTALL = "llama-cpp-python is not installed: make llama-cpp  (tools/install-llama-cpp.sh compiles llama.cpp's library, a few minutes)"
try:
    import llama_cpp
except ImportError:
    if os.environ.get("TUNELAB_REQUIRE_LLAMA_CPP"):
        raise
    pytest.skip(INSTALL, allow_module_level=True)

PROMPTS = ["Say the number 3.", "What is the capital of France?"]
TEXTS = [
    "What is the capital of France? <|im_start|>user\nThe quick brown fox 0123<|im_end|>",
    " leading space and   runs\n\n\ttabs 3.14 ... !!",
    "Translate to German: good morning. Guten Morgen. 12345 x1y22z333",
    "Ünïcödé ✅ 🦙 我想在 нещо",
]
N_NEW = 16
STEPS = 16  # fixture runs: the seeds below were chosen for 16 steps (no near-ties on the greedy paths)
F32 = 0  # GGML_TYPE_F32: the KV cache in f32, so an f32 file is computed in f32 throughout


def _llama(path, n_ctx: int = 256, lora=None):
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=1, seed=0, verbose=False,
                           type_k=F32, type_v=F32, logits_all=True, lora_path=lora and str(lora))  # fmt: skip


def _llama_greedy(llm, prompt: list[int], n: int, eos: int) -> tuple[list[int], np.ndarray]:
    """Greedy continuation in llama.cpp (argmax of its logits, token by token) and the first step's logits."""
    llm.reset()
    llm.eval(prompt)
    first = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
    out: list[int] = []
    for _ in range(n):
        logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        tok = int(np.argmax(logits))
        out.append(tok)
        if tok == eos:
            break
        llm.eval([tok])
    return out, first


def _tunelab_greedy(model, tok, prompt: list[int], n: int) -> tuple[list[int], np.ndarray, list[float]]:
    """tunelab's greedy continuation, its first step's logits and the gap between the best two logits at
    each step (a near-tie there would make any comparison a test of rounding, not of the file)."""
    out = generate(model, tok, [prompt], max_new_tokens=n).ids()[0]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + out])).logits[0, len(prompt) - 1 :].float().numpy()
    top2 = np.sort(logits, axis=-1)[:, -2:]
    return out, logits[0], list(top2[:, 1] - top2[:, 0])[: len(out)]


LORA = {"name": "lora", "r": 4, "alpha": 16, "dropout": 0.12}
QLORA = {"name": "qlora", "r": 4, "alpha": 16, "dropout": 0.12, "compute_dtype": "float32"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llama_cpp")
    base = save_tiny_model_dir(tmp / "model", seed=11)  # with 16 steps: no near-ties on the greedy paths
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return {
        # LoRA dropout's masks are drawn by the fast path (accel/fast_lora.py, on a CPU by accel/masks.py's compiled
        # loop); alpha and dropout chosen with them so that no greedy path has a near-tie: the smallest top-2 gap
        # over both prompts is 0.35 merged, 0.10 with test_gguf_lora_folds_per_layer_scales's tripled scale (chosen
        # again when the compiled masks came in: alpha 20 / dropout 0.08 then had a 0.01 gap; before, when unpadded
        # rows came in: alpha 28 / dropout 0.06 had a 0.006 gap)
        "lora": train_run(tmp, base, str(data), LORA, "lora", STEPS),
        "full": train_run(tmp, base, str(data), {"name": "full"}, "full", STEPS),
        "qat": train_run(tmp, base, str(data), {"name": "qat", "symmetric": True}, "qat", STEPS),
        # merged QLoRA: the NF4 base dequantised, the LoRA folded in, then written at each GGUF type (dropout chosen
        # as above: the smallest gap 0.19; the default 0.05 had 0.037)
        "qlora": train_run(tmp, base, str(data), QLORA, "qlora", STEPS),
    }


# tokens compared, and the smallest top-2 logit gap those steps must have in tunelab's own generation
# (well above the format's rounding: the fixtures below are seeded so that their greedy paths have none)
SAME_TOKENS = {"f32": (N_NEW, 0.01), "f16": (N_NEW, 0.05), "q8_0": (4, 0.1)}
MIN_SAME = 4  # tokens that must agree before a near-tie
MAX_LOGIT_DIFF = {"f32": 1e-4, "f16": 1e-2, "q8_0": 0.15}


def _compare(model, tok, path, quant: str, lora=None, max_diff: float | None = None, gap: float | None = None,
             n_ctx: int = 256) -> None:  # fmt: skip
    path = Path(path)
    llm = _llama(path, n_ctx=n_ctx, lora=lora)
    try:
        for text in PROMPTS:
            prompt = build_prompt_ids([{"role": "user", "content": text}], tok)
            ours, our_logits, gaps = _tunelab_greedy(model, tok, prompt, N_NEW)
            theirs, their_logits = _llama_greedy(llm, prompt, N_NEW, tok.eos_token_id)
            diff = float(np.abs(our_logits - their_logits).max())
            print(f"{path.name} {text!r}: max |logit diff| {diff:.2e}, min gap {min(gaps):.3f}, same: {theirs == ours}")
            if quant in SAME_TOKENS:
                n, least = SAME_TOKENS[quant]
                least = gap or least
                # a near-tie makes the tokens from it on a test of rounding, not of the file: compare those before it.
                # The fixtures are seeded to have none, but the trained weights differ with the host's kernels (an
                # AVX2 host's qlora run had a 0.005 gap at the tenth token)
                n = next((i for i, g in enumerate(gaps[:n]) if g <= least), n)
                assert n >= MIN_SAME, f"fixture has a near-tie: {text!r} gaps {np.round(gaps, 4)}"
                assert theirs[:n] == ours[:n] and diff < (max_diff or MAX_LOGIT_DIFF[quant]), (text, theirs, ours, diff)
            else:  # 4-bit: loads and answers with real tokens; the logits are still those of the same model
                stopped = len(theirs) == N_NEW or theirs[-1] == tok.eos_token_id  # it may end its answer early
                assert theirs and stopped and all(0 <= t < llm.n_vocab() for t in theirs), theirs
                assert diff < 2.0 and np.corrcoef(our_logits, their_logits)[0, 1] > 0.9, diff
    finally:
        llm.close()


@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0", "q4_0", "q4_1", "q4_k"])
@pytest.mark.parametrize("method", ["lora", "full", "qat", "qlora"])
def test_exported_runs_answer_in_llama_cpp_as_in_tunelab(runs, tmp_path, method, quant):
    path = tmp_path / f"{method}-{quant}.gguf"
    report = export(runs[method], "gguf", quant, str(path))
    assert report["pre_tokenizer"] == "gpt-2"
    model, tok = load_run(runs[method], device="cpu", merge=True)
    _compare(model, tok, path, quant)


def _decisive_head(model, seed: int):
    """An untied output head that is not random noise: 1.5 x the embedding plus a little noise. Its
    logits are as peaked as a tied model's (a random head's top two are often within rounding of each
    other), and a runtime that used token_embd instead of `output` would be off by half."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        model.lm_head.weight.copy_(1.5 * emb + 0.02 * torch.randn(emb.shape, generator=g))
    return model


def _tiny_mistral(vocab_size: int, seed: int = 0):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    cfg = MistralConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        sliding_window=None, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                        pad_token_id=0, initializer_range=0.1)  # fmt: skip
    return _decisive_head(MistralForCausalLM(cfg).eval(), seed)


def _tiny_qwen2(vocab_size: int, seed: int = 0):
    """Qwen2: Llama with biases on q, k and v (given values here: transformers starts them at zero, which would not
    show whether they are written), its rotary layout Hugging Face's own (no q / k permutation)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, initializer_range=0.1)  # fmt: skip
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_proj.bias"):
                p.normal_(0, 0.5)
    return model


def _tiny_qwen3(vocab_size: int, seed: int = 0):
    """Qwen3: per-head RMSNorms on q and k (given weights here, not transformers' ones), no biases."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, initializer_range=0.1)  # fmt: skip
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.uniform_(0.5, 1.5)
    return model


def _tiny_smollm3(vocab_size: int, seed: int = 0):
    """SmolLM3: Llama's layers, the 4th without RoPE (NoPE), which llama.cpp's smollm3 assumes."""
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    torch.manual_seed(seed)
    cfg = SmolLM3Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                        initializer_range=0.1)  # fmt: skip
    return SmolLM3ForCausalLM(cfg).eval()


@pytest.mark.parametrize("arch", ["llama", "llama-untied", "mistral", "qwen2", "qwen3", "smollm3"])
@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0"])
def test_each_exportable_architecture_runs_in_llama_cpp(tmp_path, arch, quant):
    tok = tiny_tokenizer()
    model = {
        # seeds whose greedy paths have no near-ties (see SAME_TOKENS)
        "llama": lambda: tiny_llama(len(tok), seed=11),
        "llama-untied": lambda: _decisive_head(tiny_llama(len(tok), seed=11, tie_word_embeddings=False), 11),
        "mistral": lambda: _tiny_mistral(len(tok), seed=25),
        "qwen2": lambda: _tiny_qwen2(len(tok), seed=3),
        "qwen3": lambda: _tiny_qwen3(len(tok), seed=21),
        "smollm3": lambda: _tiny_smollm3(len(tok), seed=13),
    }[arch]()
    write_gguf(model, tok, tmp_path / "m.gguf", quant)
    _compare(model, tok, tmp_path / "m.gguf", quant)


def test_tokenizer_and_special_tokens_agree_with_llama_cpp(tmp_path):
    tok = tiny_tokenizer()
    write_gguf(tiny_llama(len(tok)), tok, tmp_path / "t.gguf", "f32")
    llm = _llama(tmp_path / "t.gguf")
    assert llm.metadata["tokenizer.ggml.pre"] == "gpt-2"
    for text in TEXTS:
        ours = tok(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ours, text
        assert llm.detokenize(ours, special=True).decode() == tok.decode(ours), text
    assert llm.token_bos() == tok.bos_token_id and llm.token_eos() == tok.eos_token_id
    assert tok("a")["input_ids"][0] != tok.bos_token_id  # this tokenizer adds no bos ...
    assert llm.tokenize(b"a", add_bos=True) == tok("a")["input_ids"]  # ... and llama.cpp adds none either


def test_chat_template_formats_the_prompt_as_tunelab(tmp_path):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    tok = tiny_tokenizer()
    write_gguf(tiny_llama(len(tok)), tok, tmp_path / "c.gguf", "f32")
    llm = _llama(tmp_path / "c.gguf")
    assert llm.metadata["tokenizer.chat_template"] == tok.chat_template
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[0]}]
    eos = llm.detokenize([llm.token_eos()], special=True).decode()
    bos = llm.detokenize([llm.token_bos()], special=True).decode()
    formatted = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token=eos, bos_token=bos)(
        messages=messages
    )
    assert formatted.prompt == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert eos == "<|im_end|>" and eos in formatted.stop


@pytest.fixture(scope="module")
def default_model():
    from tunelab.models import load_model

    model, tok = load_model(load_config({}).model, device="cpu")
    return load_config({}).model.name, model, tok


# prompts whose greedy answers from the default model have no near-ties (top-2 gaps >= 0.11 over 24 tokens)
DEFAULT_PROMPTS = [
    "What is the capital of Germany?",
    "List the numbers from 1 to 5.",
    "Give three tips for staying healthy.",
]
DEFAULT_SAME = {"f16": (24, 0.08), "q8_0": (4, 0.1)}


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_default_model_exported_runs_in_llama_cpp_as_in_tunelab(default_model, tmp_path, quant):
    """The issue's case: the default model's export loads (pre-tokenizer `smollm`, as in its own GGUF),
    tokenizes as tunelab does and answers as tunelab does: token for token (f16) or in its first tokens
    (q8_0), through llama-cpp-python's chat completion (the file's chat template), stopping at <|im_end|>."""
    from tunelab.inference import generate as tunelab_generate

    spec, model, tok = default_model
    path = tmp_path / f"smollm2-{quant}.gguf"
    report = export(spec, "gguf", quant, str(path))
    assert (report["pre_tokenizer"], report["pre_tokenizer_from"]) == ("smollm", "given")
    llm = _llama(path, n_ctx=512)
    try:
        assert llm.metadata["tokenizer.ggml.pre"] == "smollm"
        for text in TEXTS:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, text
        assert llm.token_eos() == tok.eos_token_id and tok.eos_token == "<|im_end|>"
        assert llm.token_bos() == tok.bos_token_id and llm.tokenize(b"Hi", add_bos=True) == tok("Hi")["input_ids"]
        n, gap = DEFAULT_SAME[quant]
        for text in DEFAULT_PROMPTS:
            prompt = build_prompt_ids([{"role": "user", "content": text}], tok)
            ours, our_logits, gaps = _tunelab_greedy(model, tok, prompt, n)
            theirs, their_logits = _llama_greedy(llm, prompt, n, tok.eos_token_id)
            diff = float(np.abs(our_logits - their_logits).max())
            print(f"{path.name} {text!r}: max |logit diff| {diff:.2e}, min gap {min(gaps):.3f}, {tok.decode(theirs)!r}")
            assert min(gaps) > gap, f"near-tie in the default model's answer to {text!r}: {np.round(gaps, 3)}"
            assert theirs == ours, (text, tok.decode(theirs), tok.decode(ours))
            if quant == "f16":  # the same through the chat API: the file's template, eos as the stop token
                reply = llm.create_chat_completion([{"role": "user", "content": text}], temperature=0.0, max_tokens=n)
                expected = tunelab_generate(model, tok, text, max_new_tokens=n)
                assert reply["choices"][0]["message"]["content"].strip() == expected
                assert reply["choices"][0]["finish_reason"] == ("stop" if ours[-1] == tok.eos_token_id else "length")
    finally:
        llm.close()


# --------------------------------------------------------------------------- export --check, in llama.cpp
def test_export_check_measures_the_file_in_llama_cpp(runs, tmp_path):
    """An f32 file is the model (KL ~ 0, the same perplexity, every top-1 the same, the same task answers);
    a 4-bit file loses measurably more than q8_0, which loses more than f32."""
    reports = {}
    for quant in ("f32", "q8_0", "q4_0"):
        out = export(runs["lora"], "gguf", quant, str(tmp_path / f"{quant}.gguf"), check=True, check_texts=4,
                     check_task="sst2", check_task_rows=12)["check"]  # fmt: skip
        reports[quant] = out
        assert out["texts"] == 4 and out["tokens"] > 40 and "held out" in out["texts_from"]
        assert out["task"]["rows"] == 12 and out["task"]["verdict"] in (
            "tied within noise",
            "file worse",
            "file better",
        )
    f32, q8, q4 = (reports[q] for q in ("f32", "q8_0", "q4_0"))
    assert f32["kl_mean"]["value"] < 1e-6 and f32["top1_agreement"]["value"] == 1.0
    assert f32["perplexity_file"]["value"] == pytest.approx(f32["perplexity_model"]["value"], rel=1e-4)
    assert f32["task"]["same_prediction"] == 12 and f32["task"]["mcnemar_p"] == 1.0
    assert f32["kl_mean"]["value"] < q8["kl_mean"]["value"] < q4["kl_mean"]["value"]
    # the model's side is the same PyTorch computation in every report
    assert (
        f32["perplexity_model"] == q4["perplexity_model"]
        and f32["task"]["accuracy_model"] == q4["task"]["accuracy_model"]
    )


# ----------------------------------------------------------------------- LoRA adapters applied by llama.cpp
def test_gguf_lora_adapter_over_the_base_answers_as_the_run(runs, tmp_path):
    """`--format gguf-lora` over the base model's f32 GGUF: llama.cpp adds the adapter at load and answers
    as tunelab's unmerged LoRA model does (the same greedy tokens, logits within f32 rounding)."""
    report = export(runs["lora"], "gguf-lora", out=str(tmp_path / "adapter.gguf"))
    assert report["layers"] > 0 and report["alpha"] == LORA["alpha"] and report["rank"] == [LORA["r"]]
    base = export(report["base_model"], "gguf", "f32", str(tmp_path / "base.gguf"))["path"]
    model, tok = load_run(runs["lora"], device="cpu")
    assert hasattr(model, "peft_config")  # the adapter, not merged
    _compare(model, tok, base, "f32", lora=report["path"])
    # and the adapter is what makes the difference: the base alone answers otherwise
    prompt = build_prompt_ids([{"role": "user", "content": PROMPTS[0]}], tok)
    with_lora, plain = _llama(base, lora=report["path"]), _llama(base)
    try:
        a, b = (_llama_greedy(llm, prompt, 1, tok.eos_token_id)[1] for llm in (with_lora, plain))
    finally:
        with_lora.close(), plain.close()
    assert np.abs(a - b).max() > 0.1
    # f16 pairs: the same first tokens
    half = export(runs["lora"], "gguf-lora", "f16", str(tmp_path / "adapter-f16.gguf"))["path"]
    _compare(model, tok, base, "q8_0", lora=half)


def test_gguf_lora_folds_per_layer_scales(runs, tmp_path):
    """Layers whose scales differ (rsLoRA, per-layer alphas) cannot share one alpha: each scale is folded
    into its B and llama.cpp still computes the run's model."""
    model, tok = load_run(runs["lora"], device="cpu")
    layer = next(m for n, m in model.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
    layer.scaling["default"] *= 3.0
    report = write_gguf_lora(model, tmp_path / "adapter.gguf")
    assert report["alpha"] == 0.0
    base = export(run_manifest(runs["lora"])["base_model"]["name"], "gguf", "f32", str(tmp_path / "base.gguf"))["path"]
    _compare(model, tok, base, "f32", lora=report["path"])


def test_gguf_lora_refuses_what_llama_cpp_cannot_apply(runs, tmp_path):
    with pytest.raises(ExportError, match="no LoRA layers"):
        export(runs["full"], "gguf-lora", out=str(tmp_path / "a.gguf"))
    model, _ = load_run(runs["lora"], device="cpu")
    next(m for m in model.modules() if hasattr(m, "use_dora")).use_dora["default"] = True
    with pytest.raises(ExportError, match="DoRA"):
        write_gguf_lora(model, tmp_path / "b.gguf")
    with pytest.raises(ExportError, match="goes with --format gguf|go with --format gguf"):
        export(runs["lora"], "gguf-lora", check=True)


ROPE = {  # model.rope_scaling settings llama.cpp can run (dynamic it cannot: export refuses it)
    "linear": {"type": "linear", "factor": 2.0},
    "yarn": {"type": "yarn", "factor": 4.0},
    "llama3": {"type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
}


@pytest.mark.parametrize("kind", list(ROPE))
def test_rope_scaled_model_runs_in_llama_cpp_as_in_tunelab(tmp_path, kind):
    from tunelab.config import ModelConfig
    from tunelab.models import load_model

    folder = save_tiny_model_dir(tmp_path / "m", seed=11)
    model, tok = load_model(ModelConfig(name=folder, rope_scaling=ROPE[kind]))
    write_gguf(model, tok, tmp_path / "r.gguf", "f32")
    llm = _llama(tmp_path / "r.gguf")
    meta = llm.metadata
    llm.close()
    assert int(meta["llama.context_length"]) == 256 * ROPE[kind]["factor"]
    if kind != "llama3":  # llama3 travels as the rope_freqs tensor, checked by the logits below
        assert meta["llama.rope.scaling.type"] == kind
        assert float(meta["llama.rope.scaling.factor"]) == ROPE[kind]["factor"]
        assert int(meta["llama.rope.scaling.original_context_length"]) == 256
    _compare(model, tok, tmp_path / "r.gguf", "f32")  # the same logits: llama.cpp applied the same scaling
    plain, _ = load_model(ModelConfig(name=folder))  # ... which does change them, beyond the tolerance
    prompt = build_prompt_ids([{"role": "user", "content": PROMPTS[1]}], tok)
    scaled_logits, plain_logits = (_tunelab_greedy(m, tok, prompt, 1)[1] for m in (model, plain))
    assert float(np.abs(scaled_logits - plain_logits).max()) > 100 * MAX_LOGIT_DIFF["f32"]


@pytest.mark.slow
def test_default_model_run_with_yarn_keeps_it_in_hf_and_gguf_and_answers_in_llama_cpp(tmp_path):
    """Issue 27 on the default model (8,192 native): a LoRA run with rope_scaling yarn x4 keeps the scaling in its
    merged export's config (read by plain transformers), its GGUF carries it (gguf's own reader: type, factor,
    the 8,192 original length, 32,768 context), and that file answers in llama.cpp as the run does in tunelab."""
    import gguf
    from transformers import AutoConfig

    import tunelab

    rows = [{"instruction": f"Say the number {i}.", "output": f"The number is {i}."} for i in range(8)]
    data = tmp_path / "numbers.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config({
        "output_dir": str(tmp_path / "run"),
        "model": {"name": load_config({}).model.name, "rope_scaling": {"type": "yarn", "factor": 4.0}},
        "data": {"train": str(data), "val_fraction": 0.25, "max_length": 64}, "method": {"name": "lora", "r": 4},
        "training": {"max_steps": 2, "batch_size": 2, "lr": 1e-4, "progress": False, "tensorboard": False},
    })  # fmt: skip
    run = str(tunelab.train(cfg).run_dir)
    export(run, "hf", None, str(tmp_path / "merged"))
    rope = AutoConfig.from_pretrained(tmp_path / "merged").rope_parameters
    assert (rope["rope_type"], rope["factor"], rope["original_max_position_embeddings"]) == ("yarn", 4.0, 8192)
    path = tmp_path / "yarn.gguf"
    export(run, "gguf", "f16", str(path))
    fields = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if ".rope." in k or "context" in k}
    assert fields["llama.rope.scaling.type"] == "yarn" and fields["llama.rope.scaling.factor"] == pytest.approx(4.0)
    assert fields["llama.rope.scaling.original_context_length"] == 8192 and fields["llama.context_length"] == 32768
    model, tok = load_run(run, device="cpu", merge=True)
    llm = _llama(path, n_ctx=512)
    try:
        prompt = build_prompt_ids([{"role": "user", "content": DEFAULT_PROMPTS[0]}], tok)
        ours, our_logits, gaps = _tunelab_greedy(model, tok, prompt, 12)
        theirs, their_logits = _llama_greedy(llm, prompt, 12, tok.eos_token_id)
    finally:
        llm.close()
    # the tokens up to the first near-tie (f16 rounding may decide one), at least the first three
    n, gap = next((i for i, g in enumerate(gaps) if g <= DEFAULT_SAME["f16"][1]), len(gaps)), DEFAULT_SAME["f16"][1]
    print(f"yarn x4: {tok.decode(ours)!r} / llama.cpp {tok.decode(theirs)!r}; min gap {min(gaps):.3f}")
    assert n >= 3, f"near-tie in the first tokens: {np.round(gaps, 3)} (> {gap} wanted)"
    assert theirs[:n] == ours[:n] and tok.decode(ours[:n]).strip()
    assert np.corrcoef(our_logits, their_logits)[0, 1] > 0.999


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "smollm3"])
def test_a_qwen_or_smollm3_lora_run_runs_in_llama_cpp_merged_and_as_an_adapter(tmp_path, arch):
    """Qwen2, Qwen3 and SmolLM3 (llama.cpp's qwen2 / qwen3 / smollm3): a LoRA run exported merged and as a GGUF
    adapter over the base's GGUF answers in llama.cpp as in tunelab (q / k rows permuted for SmolLM3 as for
    Llama, in the base and in the adapter's B; not for Qwen)."""
    tok = tiny_tokenizer()
    seed = {"qwen2": 3, "qwen3": 7, "smollm3": 3}[arch]  # no near-ties on the trained run's greedy paths (SAME_TOKENS)
    tiny = {"qwen2": _tiny_qwen2, "qwen3": _tiny_qwen3, "smollm3": _tiny_smollm3}[arch]
    tiny(len(tok), seed=seed).save_pretrained(tmp_path / arch)
    tok.save_pretrained(tmp_path / arch)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    run = train_run(tmp_path, str(tmp_path / arch), str(tmp_path / "train.jsonl"),
                    {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0}, f"{arch}-lora", 8)  # fmt: skip
    merged = export(run, "gguf", "f32", str(tmp_path / "merged.gguf"))
    model, tok = load_run(run, device="cpu", merge=True)
    # transformers 5 loads the tiny tokenizer of a qwen2 model as its Qwen2Tokenizer (Qwen2's split), of the others
    # as it was saved (GPT-2's split)
    want = {"qwen2": ("Qwen2Tokenizer", "qwen2")}.get(arch, ("TokenizersBackend", "gpt-2"))
    assert (type(tok).__name__, merged["pre_tokenizer"]) == want
    llm = _llama(merged["path"])
    try:
        for text in TEXTS:  # llama.cpp's pre-tokenizer splits as the tokenizer does
            assert (
                llm.tokenize(text.encode(), add_bos=False, special=True)
                == tok(text, add_special_tokens=False)["input_ids"]
            )
    finally:
        llm.close()
    _compare(model, tok, merged["path"], "f32")
    adapter = export(run, "gguf-lora", out=str(tmp_path / "adapter.gguf"))
    base = export(str(tmp_path / arch), "gguf", "f32", str(tmp_path / "base.gguf"))["path"]
    unmerged, _ = load_run(run, device="cpu")
    _compare(unmerged, tok, base, "f32", lora=adapter["path"])


SPM_TEXTS = TEXTS + ["[INST] Say the number 3. [/INST] 3</s>[INST]  two  spaces [/INST]", "x", " ", "</s>a</s> b"]


@pytest.mark.parametrize("spaces", ["llama2", "never", "always", "first"])
def test_a_sentencepiece_style_tokenizer_tokenizes_and_answers_in_llama_cpp(tmp_path, spaces):
    """Llama 2 / Mistral 7B / TinyLlama's tokenizer layout (SentencePiece-style BPE: ▁ for spaces, byte fallback,
    <s> added) written as llama.cpp's `llama` tokenizer with scores: llama.cpp gives transformers' ids for text with
    spaces, line ends, characters only bytes can hold and special tokens inside; the model answers as in tunelab.
    With a Metaspace pre-tokenizer (transformers 5's LlamaTokenizer builds one), llama.cpp puts ▁ where `always`
    and `first` put none (a text starting with a space; with `first`, text after a special token): the same ids
    elsewhere, and the report's note says where."""
    from tokenizers import pre_tokenizers

    from tunelab.testing import tiny_spm_tokenizer

    tok = tiny_spm_tokenizer()
    if spaces != "llama2":
        tok._tokenizer.normalizer = None
        tok._tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=spaces, split=False)
    model = tiny_llama(len(tok), seed=11)
    report = write_gguf(model, tok, tmp_path / "spm.gguf", "f32")
    assert report["pre_tokenizer"] is None and bool(report["notes"]) == (spaces in ("always", "first"))
    llm = _llama(tmp_path / "spm.gguf")
    assert llm.metadata["tokenizer.ggml.model"] == "llama"
    for text in SPM_TEXTS:
        ours = tok(text)["input_ids"]
        assert ours[0] == tok.bos_token_id and any(t > 258 for t in ours)  # <s>, and pieces, not only bytes
        theirs = llm.tokenize(text.encode(), add_bos=True, special=True)
        noted = {"always": text.startswith(" ") or "</s> " in text, "first": text.startswith(" ") or "</s>" in text}
        if noted.get(spaces):  # llama.cpp's ids differ, by spaces only
            assert theirs != ours, text
            strip = llm.detokenize(theirs, special=True).decode().replace(" ", "")
            assert strip == tok.decode(ours).replace(" ", ""), text
        else:
            assert theirs == ours, text
            assert llm.detokenize(ours).decode() == tok.decode(ours, skip_special_tokens=True), text
    assert any(3 <= t < 259 for t in tok(TEXTS[-1])["input_ids"])  # bytes for what the pieces lack
    llm.close()
    _compare(model, tok, tmp_path / "spm.gguf", "f32")


LLAMA2_VOCAB = Path(llama_cpp.__file__).parent / "lib" / "ggml-vocab-llama-spm.gguf"


@pytest.mark.skipif(
    not LLAMA2_VOCAB.exists(), reason="run make llama-cpp again: it copies llama.cpp's Llama 2 vocabulary"
)
def test_llama_2s_own_tokenizer_exports_to_llama_cpps_own_vocabulary_and_ids(tmp_path):
    """llama.cpp's Llama 2 vocabulary (32,000 SentencePiece pieces, the runs of ▁ tied at the lowest score), read by
    transformers as its tokenizer (merges made from the scores), exported: the same pieces and types as llama.cpp's
    file, and llama.cpp's own test texts tokenize to llama.cpp's reference ids (all 47). transformers' ids differ
    exactly where the note says: text that starts with a space (its Metaspace adds no second ▁)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(LLAMA2_VOCAB.parent, gguf_file=LLAMA2_VOCAB.name)
    report = write_gguf(tiny_llama(len(tok)), tok, tmp_path / "llama2.gguf", "f32")
    assert "one ▁ more where a text begins with a space" in report["notes"][0]
    theirs, ours = gguf.GGUFReader(LLAMA2_VOCAB), gguf.GGUFReader(tmp_path / "llama2.gguf")
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):
        assert ours.fields[key].contents() == theirs.fields[key].contents(), key
    texts = LLAMA2_VOCAB.with_name(LLAMA2_VOCAB.name + ".inp").read_text().split("\n__ggml_vocab_test__\n")
    ids = [
        [int(i) for i in line.split()]
        for line in LLAMA2_VOCAB.with_name(LLAMA2_VOCAB.name + ".out").read_text().split("\n")
    ]
    llm = _llama(tmp_path / "llama2.gguf", n_ctx=64)
    assert len(texts) == 47 and [llm.tokenize(t.encode(), add_bos=False) for t in texts] == ids[: len(texts)]
    differ = [t for t, want in zip(texts, ids) if tok(t, add_special_tokens=False)["input_ids"] != want]
    assert differ and all(t.startswith(" ") for t in differ)
    llm.close()


def _tiny_gemma3(vocab_size: int, seed: int, final_norm: float | None = None, model_type="gemma3_text", **overrides):
    """Six layers, the 6th global (Gemma 3's pattern; Gemma 2's alternate; `layer_types` may say otherwise), a
    sliding window of 8 tokens (shorter than the prompts: it decides what the later tokens see), norms not at zero
    (Gemma's 1 + w)."""
    from tunelab.testing import tiny_causal

    model = tiny_causal(model_type, vocab_size, seed=seed, num_hidden_layers=6, head_dim=8, sliding_window=8,
                        query_pre_attn_scalar=8, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                        max_position_embeddings=256, **overrides).eval()  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
        if final_norm is not None:  # logits (1 + final_norm) times larger: top-2 gaps well above llama.cpp's GELU error
            model.model.norm.weight.fill_(final_norm)
    return model


@pytest.mark.parametrize("arch", ["gemma3", "gemma3-pattern", "gemma", "gemma2"])
def test_a_gemma_model_with_its_tokenizer_runs_in_llama_cpp(tmp_path, arch):
    """Gemma 3 (q / k norms, norms after attention and the FFN, sliding-window layers with their own RoPE base,
    written as llama.cpp's per-layer list) and Gemma (1 + w norms, a head size of its own), with a tokenizer of
    Gemma's layout (SentencePiece-style, no ▁ before the text): llama.cpp's ids and greedy answers are tunelab's."""
    from tunelab.testing import tiny_causal, tiny_spm_tokenizer

    tok = tiny_spm_tokenizer(gemma=True)
    if arch == "gemma":
        model = tiny_causal("gemma", len(tok), seed=5, head_dim=16, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                            max_position_embeddings=256).eval()  # fmt: skip
    elif arch == "gemma2":  # soft caps small enough to bend these logits (3x larger) and attention scores
        model = _tiny_gemma3(len(tok), GEMMA2_SEED, final_norm=2.0, model_type="gemma2", attn_logit_softcapping=2.0,
                             final_logit_softcapping=10.0, attn_implementation="eager")  # fmt: skip
    else:
        types = ["full_attention", "sliding_attention"] * 3 if arch == "gemma3-pattern" else None
        # seeds whose greedy paths have no near-tie (top-2 gaps over 0.05)
        model = _tiny_gemma3(len(tok), 59 if types else 1, **({"layer_types": types} if types else {}))
    write_gguf(model, tok, tmp_path / "g.gguf", "f32")
    llm = _llama(tmp_path / "g.gguf")
    assert llm.metadata["general.architecture"] == arch.split("-")[0]
    for text in SPM_TEXTS:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok(text)["input_ids"], text
    llm.close()
    # ggml's GELU reads a table of fp16 values: ~1e-3 off in the logits of a GELU model at f32 (llama.cpp's, not the file's)
    _compare(model, tok, tmp_path / "g.gguf", "f32", max_diff=5e-3, gap=0.05)


@pytest.mark.parametrize("arch", ["gemma3", "phi3", "olmo2", "granite"])
def test_a_lora_run_of_another_family_runs_in_llama_cpp_merged_and_as_an_adapter(tmp_path, arch):
    """A LoRA run on a tiny Gemma 3 (a tokenizer of Gemma's layout), Phi-3 (LoRA on its fused qkv and gate-up
    matrices; Llama 2's layout), OLMo 2 or Granite (its q / k rows permuted in the adapter's B as in the base),
    exported merged and as a GGUF adapter over the base's GGUF: both answer in llama.cpp as the run does in
    tunelab."""
    from tunelab.testing import tiny_causal, tiny_spm_tokenizer

    seed = RUN_SEEDS[arch]
    tok = tiny_spm_tokenizer(gemma=arch == "gemma3") if arch in ("gemma3", "phi3") else tiny_tokenizer()
    if arch == "gemma3":
        model = _tiny_gemma3(len(tok), seed, final_norm=2.0)
    else:
        model = _decisive_head(tiny_causal(arch, len(tok), seed=seed, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                           max_position_embeddings=256, tie_word_embeddings=False), seed)  # fmt: skip
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    run = train_run(tmp_path, str(tmp_path / "base"), str(tmp_path / "train.jsonl"),
                    {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0}, "run", 8)  # fmt: skip
    # (folders not named "phi3": llama.cpp sets Phi-3's special-token attributes for any file whose general.name,
    # the folder's name, holds "phi3", and then needs Phi-3's <|endoftext|>, which this tiny tokenizer lacks)
    merged = export(run, "gguf", "f32", str(tmp_path / "merged.gguf"))
    model, tok = load_run(run, device="cpu", merge=True)
    # Gemma's GELU: see the test above (logits 3x larger here: their error too)
    loose = {"max_diff": 1e-2, "gap": 0.05} if arch == "gemma3" else {}
    _compare(model, tok, merged["path"], "f32", **loose)
    adapter = export(run, "gguf-lora", out=str(tmp_path / "adapter.gguf"))
    base = export(str(tmp_path / "base"), "gguf", "f32", str(tmp_path / "base.gguf"))["path"]
    unmerged, _ = load_run(run, device="cpu")
    _compare(unmerged, tok, base, "f32", lora=adapter["path"], **loose)


# no near-ties on the trained runs' greedy paths, merged and not (seeds searched under pytest): smallest top-2 gaps
# gemma3 0.08 (seeds 0-29), phi3 0.60 (0-24), olmo2 0.04 (0-11), granite 0.09 (0-11)
RUN_SEEDS = {"gemma3": 7, "phi3": 2, "olmo2": 6, "granite": 8}
GEMMA2_SEED = 18  # smallest top-2 gap on its greedy paths 0.40 (seeds 0-39 searched under pytest)


@pytest.mark.parametrize("rotary", [1.0, 0.5])
def test_a_phi3_model_runs_in_llama_cpp(tmp_path, rotary):
    """Phi-3 mini (q, k, v in one matrix, gate and up in another, a SentencePiece tokenizer of Llama 2's kind) and
    Phi-4 mini's partial rotary embedding (half of each head rotated): llama.cpp's ids and answers are tunelab's.
    Phi-3's sliding window (2,047 of 4,096) llama.cpp switches off: the export says so."""
    from tunelab.testing import tiny_causal, tiny_spm_tokenizer

    tok = tiny_spm_tokenizer()
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": rotary}
    model = _decisive_head(tiny_causal("phi3", len(tok), seed=PHI3_SEED[rotary], pad_token_id=0, bos_token_id=1,
                                       eos_token_id=2, max_position_embeddings=256, tie_word_embeddings=False,
                                       rope_parameters=rope).eval(), PHI3_SEED[rotary])  # fmt: skip
    report = write_gguf(model, tok, tmp_path / "p.gguf", "f32")
    assert report["notes"] == []
    llm = _llama(tmp_path / "p.gguf")
    assert llm.metadata["general.architecture"] == "phi3"
    for text in SPM_TEXTS:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok(text)["input_ids"], text
    llm.close()
    _compare(model, tok, tmp_path / "p.gguf", "f32")
    model.config.sliding_window = 128
    assert "the last 128" in write_gguf(model, tok, tmp_path / "w.gguf", "f32")["notes"][0]


PHI3_SEED = {1.0: 0, 0.5: 0}


def test_a_phi3_longrope_model_runs_in_llama_cpp_within_its_original_context(tmp_path):
    """Phi-3.5 / Phi-4 mini's LongRoPE (per-frequency long and short factors, an attention factor from the context's
    growth): written as llama.cpp's rope_factors_long / _short tensors and attention factor. Within the original
    context (llama.cpp's n_ctx at most that, as the export's note says) both use the short factors: the same
    answers; the long factors are in the file as given."""
    from tunelab.testing import tiny_causal, tiny_spm_tokenizer

    tok = tiny_spm_tokenizer()
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "long_factor": [1.0, 2.0, 4.0, 8.0],
            "short_factor": [1.0, 1.3, 1.9, 3.1], "original_max_position_embeddings": 256}  # fmt: skip
    model = _decisive_head(tiny_causal("phi3", len(tok), seed=0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                       max_position_embeddings=1024, original_max_position_embeddings=256,
                                       tie_word_embeddings=False, rope_parameters=rope).eval(), 0)  # fmt: skip
    report = write_gguf(model, tok, tmp_path / "p.gguf", "f32")
    assert any("n_ctx <= 256" in n for n in report["notes"])
    reader = gguf.GGUFReader(tmp_path / "p.gguf")
    assert (
        list(reader.get_tensor(0).data) == [1.0, 2.0, 4.0, 8.0] and reader.tensors[0].name == "rope_factors_long.weight"
    )
    assert abs(reader.fields["phi3.rope.scaling.attn_factor"].contents() - (1 + np.log(4) / np.log(256)) ** 0.5) < 1e-6
    # (llama.cpp rounds its context up to a multiple of 256: an original context of 256, not less, shows the short
    # factors at work)
    _compare(model, tok, tmp_path / "p.gguf", "f32", n_ctx=256)


def test_special_tokens_strip_the_spaces_after_them_in_llama_cpp_as_in_transformers(tmp_path):
    """Phi-3's chat tokens and </s> strip the spaces after them (rstrip), and llama.cpp does so only for a file
    whose general.name holds "phi3": a run named otherwise gets it added, and its prompts split as in
    transformers. A model whose tokens strip nothing never carries it (a run folder called phi3-... of a Llama)."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    from tunelab.testing import tiny_causal, tiny_spm_tokenizer

    tok = tiny_spm_tokenizer()
    chat = [
        AddedToken(t, rstrip=True, special=True, normalized=False) for t in ("<|user|>", "<|end|>", "<|assistant|>")
    ]
    tok.add_special_tokens({"additional_special_tokens": [*chat, AddedToken("<|endoftext|>", special=True)]})
    tok.save_pretrained(tmp_path / "tok")
    spec = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())  # </s> strips too, as Phi-3's
    next(a for a in spec["added_tokens"] if a["content"] == "</s>")["rstrip"] = True
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(spec))
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert tok.added_tokens_decoder[2].rstrip
    model = tiny_causal("phi3", len(tok), pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=256)
    text = "<|user|>\n  Hi there<|end|>\n<|assistant|>\nok</s> y<|endoftext|> x"
    report = write_gguf(model, tok, tmp_path / "p.gguf", "f32", name="my-run")
    llm = _llama(tmp_path / "p.gguf")
    assert llm.metadata["general.name"] == "my-run (phi3)" and report["notes"] == []
    assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok(text)["input_ids"]
    llm.close()
    plain = tiny_tokenizer()
    write_gguf(tiny_llama(len(plain)), plain, tmp_path / "l.gguf", "f32", name="phi3-test")
    llm = _llama(tmp_path / "l.gguf")  # with "phi3" in its name llama.cpp would look for <|endoftext|>'s attributes
    assert llm.metadata["general.name"] == "phi_3-test"
    for text in TEXTS:
        assert (
            llm.tokenize(text.encode(), add_bos=False, special=True)
            == plain(text, add_special_tokens=False)["input_ids"]
        )
    llm.close()


def test_pieces_of_equal_score_runs_of_two_characters_tokenize_as_in_transformers(tmp_path):
    """Runs of ▁ and of = at one score (as Llama 2's and Gemma's whitespace runs are), their merges ordered by
    transformers' converter (generate_merges: by score, then the parts' lengths, so the two kinds interleave at
    the list's end): written with one score, llama.cpp's ties give transformers' ids for every run length."""
    from tokenizers import Tokenizer
    from transformers.tokenization_utils_base import generate_merges

    from tunelab.export.gguf_vocab import spm_scores
    from tunelab.testing import tiny_spm_tokenizer

    tok = tiny_spm_tokenizer()
    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    scores = {t: -float(i) for t, i in vocab.items()}  # a piece's score: minus its id, as SentencePiece's
    for piece in ["=", *("▁" * n for n in (2, 3, 4, 6, 8)), *("=" * n for n in (2, 3, 5))]:
        vocab[piece] = len(vocab)
        scores[piece] = -1e9 if len(piece) > 1 else -float(vocab[piece])  # the runs tied, at the lowest score
    skip = [t for t in vocab if t.startswith("<")]
    spec["model"]["merges"] = [list(m) for m in generate_merges(vocab, scores, skip_tokens=skip)]
    tok._tokenizer = Tokenizer.from_str(json.dumps(spec))
    tied = [m for m in spec["model"]["merges"] if set("".join(m)) <= {"▁", "="}]
    assert {"".join(m)[0] for m in tied[:6]} == {"▁", "="}  # interleaved
    assert spm_scores(tok)[0]["▁▁"] == spm_scores(tok)[0]["=="]
    write_gguf(tiny_llama(len(tok)), tok, tmp_path / "t.gguf", "f32")
    llm = _llama(tmp_path / "t.gguf")
    for n in range(1, 20):
        for text in (f"a{' ' * n}b", f"x{'=' * n}y {'=' * n}", f"{' ' * n}={' ' * (n % 3)}=="):
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok(text)["input_ids"], repr(text)
    llm.close()


@pytest.mark.parametrize("arch", ["olmo2", "olmo2-tied", "granite"])
def test_olmo2_and_granite_run_in_llama_cpp(tmp_path, arch):
    """OLMo 2 (norms after attention and after the FFN, none before; q / k norms over the whole projection;
    llama.cpp reads `output` even for a tied head) and Granite (Llama's layers with embedding, attention, residual
    and logit multipliers, set away from 1 so that each shows): llama.cpp's answers are tunelab's. Norms not at one,
    so that a norm written under another's name shows."""
    from tunelab.testing import tiny_causal

    tok = tiny_tokenizer()
    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0, max_position_embeddings=256)
    seed = OTHER_SEEDS[arch]
    if arch.startswith("olmo2"):
        model = tiny_causal("olmo2", len(tok), seed=seed, tie_word_embeddings=arch == "olmo2-tied", **ids).eval()
    else:
        model = tiny_causal("granite", len(tok), seed=seed, tie_word_embeddings=False, embedding_multiplier=3.0,
                            attention_multiplier=0.2, residual_multiplier=0.5, logits_scaling=0.5, **ids).eval()  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    if not model.config.tie_word_embeddings:
        model = _decisive_head(model, seed)
    write_gguf(model, tok, tmp_path / "m.gguf", "f32")
    _compare(model, tok, tmp_path / "m.gguf", "f32")


OTHER_SEEDS = {"olmo2": 8, "olmo2-tied": 0, "granite": 0}  # no near-ties on their greedy paths (top-2 gaps > 0.01)


def test_a_run_that_added_tokens_tokenizes_and_answers_in_llama_cpp(tmp_path):
    """model.new_special_tokens: llama.cpp loads the merged GGUF with the grown vocabulary, splits text holding the
    new tokens into transformers' ids (each new token one id), and gives the run's logits where they are read."""
    import tunelab

    base = save_tiny_model_dir(tmp_path / "model", seed=11)
    rows = [{"instruction": f"Call tool {i}.", "input": "", "output": f"<tool> run {i} </tool>"} for i in range(24)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config({
        "output_dir": str(tmp_path / "run"), "model": {"name": base, "new_special_tokens": ["<tool>", "</tool>"]},
        "data": {"train": str(data), "val_fraction": 0.0, "max_length": 48}, "method": LORA,
        "training": {"max_steps": 8, "batch_size": 4, "lr": 1e-2, "progress": False, "tensorboard": False},
    })  # fmt: skip
    run = str(tunelab.train(cfg).run_dir)
    path = export(run, "gguf", "f32", str(tmp_path / "m.gguf"))["path"]
    model, tok = load_run(run, device="cpu", merge=True)
    new = tok.convert_tokens_to_ids(["<tool>", "</tool>"])
    llm = _llama(path)
    try:
        assert llm.n_vocab() == len(tok)
        text = "Call tool 7. <tool> run 7 </tool>"
        ours = tok(text, add_special_tokens=False)["input_ids"]
        assert set(new) <= set(ours) and llm.tokenize(text.encode(), add_bos=False, special=True) == ours
        assert llm.detokenize(ours, special=True).decode() == tok.decode(ours)
        llm.reset()
        llm.eval(ours)
        theirs = np.array(llm.scores[: len(ours)], dtype=np.float32)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ours])).logits[0].float().numpy()
        assert float(np.abs(theirs - logits).max()) < 1e-4
    finally:
        llm.close()
