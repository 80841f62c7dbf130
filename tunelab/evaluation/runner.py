"""`tunelab eval MODEL_OR_RUN --task T`: score a base model or any run on a task's dev split.

How a model is scored depends on what it is:
  - a sequence classifier (a `stage: classification` run): argmax of its head;
  - a causal LM on a classification task: the task phrased as an instruction (data/prompts.py),
    the class read off the next-token distribution with a verbalizer (one forward pass per row, no
    decoding, so zero-shot and tuned models are scored identically);
  - a causal LM on an instruction task (lima, alpaca): perplexity of the reference responses;
  - a span-QA model (a `stage: extractive_qa` run) on squad: SQuAD v2 exact match / F1 (stages/extractive_qa.py),
    with the run's own window and null-threshold settings;
  - an encoder-decoder (a `stage: seq2seq` run, or a T5/BART folder) on a seq2seq task: generated outputs
    scored by corpus BLEU and embedding cosine (models/generation.py);
  - a causal LM on a seq2seq task: the task as a chat instruction ("Translate to German: ..."), the
    reply's first line generated greedily, scored the same way.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tunelab.config import ModelConfig, OutputWriteError
from tunelab.data import DataError, tasks
from tunelab.evaluation.context import context_perplexity, read_texts
from tunelab.evaluation.prediction_rows import perplexity_metrics, prediction_metrics
from tunelab.evaluation.predictions import classifier_predictions, perplexity_predictions, verbalizer_predictions
from tunelab.models import generation, load_config, load_model, resolve_device
from tunelab.models.loading import unwrap
from tunelab.models.rope import native_context
from tunelab.stages.extractive_qa import evaluate_qa
from tunelab.stages.runs import load_run, run_manifest
from tunelab.stages.seq2seq import T5_PREFIXES


def evaluate(
    model_or_run: str,
    task_name: str,
    limit: int | None = None,
    device: str = "auto",
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
    embedding_model: str | None = "minilm-l6",
    max_new_tokens: int | None = None,
    num_beams: int | None = None,
    return_predictions: bool = False,
    trust_remote_code: bool = False,
    data: str | None = None,
    context: int | None = None,
    rope_scaling: dict | None = None,
) -> dict:
    """Score `model_or_run` on the dev split of `task_name`. For generation tasks, `embedding_model` (a spec,
    or None to skip) gives the cosine metric; `max_new_tokens` / `num_beams` default to the run's settings.
    `return_predictions` adds the per-row "predictions" (evaluation/predictions.py) of the classifier,
    verbalizer and perplexity paths, whose `prediction_metrics` are the result's "metrics"."""
    if task_name == "perplexity":
        return _context_perplexity(model_or_run, data, context, limit, device, trust_remote_code, rope_scaling)
    if data is not None or context is not None or rope_scaling is not None:
        raise DataError("--data, --context and --rope-scaling go with --task perplexity (held-out text at a "
                        f"given length), not with the task preset {task_name!r}")  # fmt: skip
    task = tasks.get_task(task_name)
    if task.type not in SCORED:  # no model could score it: say so before one loads
        raise DataError(
            f"tunelab eval does not score {task.type} tasks such as {task.name!r}; it scores {', '.join(SCORED)} tasks"
        )
    rows = tasks.load_split(task, "dev", limit=limit, seed=seed)
    dev = resolve_device(device)
    manifest = run_manifest(model_or_run) or {}
    run_task = manifest.get("task") or {}
    model, tokenizer = _load(model_or_run, device, manifest, trust_remote_code)
    model.eval()
    t0 = time.time()
    preds = None  # per-row predictions, where the path has them
    if _is_span_qa(model):
        if task.type != "extractive_qa":
            raise DataError(f"{model_or_run} is a span-QA model: it scores extractive_qa tasks (squad), not {task.type} "
                            f"tasks such as {task.name!r}")  # fmt: skip

        kw = {
            k: run_task[k] for k in ("max_length", "doc_stride", "max_answer_tokens", "null_threshold") if k in run_task
        }
        scores, _ = evaluate_qa(model, tokenizer, rows, dev, batch_size=batch_size, **kw)
        how = "span extraction"
    elif task.type == "seq2seq" and _is_encoder_decoder(model):
        prefix = run_task.get("prefix")
        if prefix is None:
            t5 = unwrap(model).config.model_type in ("t5", "mt5", "umt5")
            prefix = T5_PREFIXES.get(task.name, "") if t5 else ""
        beams = num_beams or run_task.get("num_beams", 1)
        hyps = generation.generate_seq2seq(
            model, tokenizer, [r["source"] for r in rows], prefix, run_task.get("max_length", 512),
            max_new_tokens or run_task.get("max_new_tokens", 128), beams, batch_size, dev, progress,
        )  # fmt: skip
        scores = generation.generation_scores(hyps, [r["target"] for r in rows], embedding_model)
        how = f"generation (beam {beams})" if beams > 1 else "generation (greedy)"
    elif task.type == "seq2seq":
        instruction = CHAT_INSTRUCTIONS.get(task.name, "")
        hyps = generation.generate_chat(
            model, tokenizer, [instruction + r["source"] for r in rows], max_new_tokens or 128, batch_size, dev,
            progress=progress,
        )  # fmt: skip
        scores = generation.generation_scores(hyps, [r["target"] for r in rows], embedding_model)
        how = "chat generation (greedy)"
    elif _is_classifier(model):
        preds = classifier_predictions(model, tokenizer, task, rows, dev, 256, batch_size)
        how = "classification head"
    elif task.type == "classification":
        preds, how = verbalizer_predictions(model, tokenizer, task, rows, dev, batch_size, progress), "verbalizer"
    elif task.type in ("instruction",):
        preds, how = perplexity_predictions(model, tokenizer, rows, dev, batch_size, progress), "perplexity"
    else:
        raise DataError(
            f"tunelab eval does not score {task.type} tasks such as {task.name!r} with {model_or_run} "
            f"({type(unwrap(model)).__name__}) yet; "
            "classification (head or verbalizer), instruction perplexity, extractive QA (span-QA runs) and "
            "seq2seq generation are supported"
        )
    if preds is not None:
        scores = prediction_metrics(task, preds)
    result = {
        "model": str(model_or_run),
        "task": task.name,
        "method": how,
        "n": len(rows),
        "metrics": scores,
        "seconds": round(time.time() - t0, 1),
    }
    if return_predictions and preds is not None:
        result["predictions"] = preds
    return result


def _context_perplexity(model_or_run, data, context, limit, device, trust_remote_code, rope_scaling) -> dict:
    """--task perplexity: the texts of `data` in windows of `context` tokens (evaluation/context.py)."""
    if not data or not context:
        raise DataError("--task perplexity needs --data FILE (held-out text: .txt, or rows with a text column) "
                        "and --context N (the window length in tokens)")  # fmt: skip
    if context < 2:
        raise DataError(f"--context {context}: a window needs at least 2 tokens")
    texts = read_texts(data)  # a bad file is named before the model loads
    model, tokenizer = load_run(model_or_run, device=device, trust_remote_code=trust_remote_code,
                                rope_scaling=rope_scaling)  # fmt: skip
    model.eval()
    t0 = time.time()
    scores = context_perplexity(model, tokenizer, texts, context, resolve_device(device), limit, source=data)
    scores.pop("window_nll")  # the report keeps the totals
    rope = dict(getattr(unwrap(model).config, "rope_parameters", None) or {})
    return {"model": str(model_or_run), "task": "perplexity", "data": str(data),
            "method": f"perplexity at context {context} (rope {rope.get('rope_type', 'none')})",
            "n": scores["windows"], "metrics": scores, "rope_parameters": rope,
            "native_context": native_context(unwrap(model).config), "seconds": round(time.time() - t0, 1)}  # fmt: skip


CHAT_INSTRUCTIONS = {"wmt14-en-de": "Translate to German: "}
SCORED = ("classification", "regression", "extractive_qa", "seq2seq", "instruction")  # task types some model scores


def _load(model_or_run: str, device: str, manifest: dict, trust_remote_code: bool = False):
    """A run through load_run; a plain encoder-decoder folder / hub id as a seq2seq LM (load_run would
    take it for a causal LM)."""
    if not manifest and _plain_encoder_decoder(model_or_run):
        from transformers import AutoModelForSeq2SeqLM

        spec = ModelConfig(name=str(model_or_run), trust_remote_code=trust_remote_code)
        return load_model(spec, device=device, auto_class=AutoModelForSeq2SeqLM)
    return load_run(model_or_run, device=device, trust_remote_code=trust_remote_code)


def _plain_encoder_decoder(spec: str) -> bool:
    if str(spec).endswith(".gguf"):
        return False
    try:
        config = load_config(ModelConfig(name=str(spec)))
        return bool(getattr(config, "is_encoder_decoder", False))
    except Exception:  # unknown spec: let load_run give its own clear error
        return False


def _is_span_qa(model) -> bool:
    return type(unwrap(model)).__name__.endswith("ForQuestionAnswering")


def _is_encoder_decoder(model) -> bool:
    return bool(getattr(unwrap(model).config, "is_encoder_decoder", False))


def _is_classifier(model) -> bool:
    return type(unwrap(model)).__name__.endswith("ForSequenceClassification")


def verbalizer_scores(model, tokenizer, task, rows, device, batch_size=16, progress=True) -> dict:
    return prediction_metrics(task, verbalizer_predictions(model, tokenizer, task, rows, device, batch_size, progress))


def response_perplexity(model, tokenizer, rows, device, batch_size=8, progress=True) -> dict:
    return perplexity_metrics(perplexity_predictions(model, tokenizer, rows, device, batch_size, progress))


def write_result(result: dict, out: str | Path) -> None:
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    except OSError as e:  # disk full, read-only, a file where a folder should be
        raise OutputWriteError(f"cannot write the result {out}: {e.strerror or e}; choose another --out") from None
