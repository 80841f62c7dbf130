"""`tunelab` command line: each subcommand is a thin wrapper over a plain function.

Heavy libraries (torch, transformers) are imported inside the commands, so `tunelab --help`
answers instantly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from tunelab import __version__
from tunelab.inference import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TOP_P


def cmd_train(args) -> int:
    from tunelab.config import ConfigError
    from tunelab.interop.convert import load_any

    # validated here once, before any process starts and before torch is imported (a bad config fails in a
    # second, and the allocator restart below comes first); a LLaMA-Factory / Axolotl file is translated first
    cfg, _ = load_any(args.config, args.set)
    if args.output_dir:
        cfg.output_dir = args.output_dir
    if args.program_argv is not None:  # the command itself, not main([...]) called from Python
        from tunelab.accel.memory import restart_with_tbbmalloc, wants_tbbmalloc

        if wants_tbbmalloc(cfg.training):  # returns only when it cannot or need not restart
            restart_with_tbbmalloc(args.program_argv)
    if args.nproc < 1:
        raise ConfigError(f"--nproc {args.nproc}: the number of processes must be 1 or more")
    if args.nproc > 1:
        return _launch_train(args)
    if args.program_argv is not None:  # this process runs this one training
        from tunelab.accel.memory import skip_unused_imports

        skip_unused_imports(cfg)
    from tunelab.training import train

    result = train(cfg, resume=args.resume, force=args.force)
    from tunelab.training.distributed import rank

    if rank() == 0:  # a multi-process run prints its result once
        out = {"run_dir": str(result.run_dir), "final_dir": str(result.final_dir), **result.metrics}
        print(json.dumps(out, indent=2))
    return 130 if result.metrics.get("interrupted") else 0


def _launch_train(args) -> int:
    """`--nproc N`: the same command in N data-parallel processes (torchrun; see docs/scale.md)."""
    import os

    from tunelab.config import ConfigError
    from tunelab.training.distributed import launch

    if "WORLD_SIZE" in os.environ:
        raise ConfigError("--nproc: this command already runs under torchrun / accelerate launch; drop --nproc")
    argv = ["train", *([args.config] if args.config else [])]
    argv += [x for kv in args.set or [] for x in ("--set", kv)]
    argv += (
        (["--resume"] if args.resume else [])
        + (["--force"] if args.force else [])
        + (["--output-dir", args.output_dir] if args.output_dir else [])
    )
    return launch(args.nproc, argv)


def _at_least(low: int, **flags) -> None:
    """Refuse a count flag below `low` before anything loads (argparse's int takes any integer)."""
    from tunelab.config import ConfigError

    for name, value in flags.items():
        if value is not None and value < low:
            raise ConfigError(f"--{name.replace('_', '-')} {value}: must be {low} or more")


def _generation_flags(args) -> None:
    from tunelab.inference import check_generation_settings

    check_generation_settings(args.max_new_tokens, args.temperature, args.top_p)


def _without_bitsandbytes(args, *specs: str) -> None:
    """In a command's own process, keep bitsandbytes out when no model it loads has a 4-bit base: peft
    imports it whenever installed, and its import prints warnings (and costs ~50 MB) for nothing."""
    if getattr(args, "program_argv", None) is None:  # main([...]) from Python: not our process to change
        return
    if all(_plain_base(spec) for spec in specs if spec):
        from tunelab.accel.memory import keep_out_bitsandbytes

        keep_out_bitsandbytes()


def _plain_base(spec: str) -> bool:
    """True when loading `spec` (a run or a model spec) needs no bitsandbytes; False when it may."""
    from pathlib import Path

    from tunelab.methods.registry import capabilities
    from tunelab.models import NAMED
    from tunelab.stages.runs import run_manifest

    try:
        manifest = run_manifest(spec)
        if manifest is not None:
            if manifest.get("method") not in _method_names() or capabilities(manifest["method"]).quantized_base:
                return False
            if manifest.get("base_run"):
                return _plain_base(manifest["base_run"])
            if manifest["base_model"].get("architecture"):  # built from scratch: a plain model
                return True
            return _plain_base(manifest["base_model"]["name"])
        if spec in NAMED or str(spec).lower().endswith(".gguf"):
            return True
        config = Path(spec).expanduser() / "config.json"
        return config.is_file() and "quantization_config" not in json.loads(config.read_text())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False  # let the command itself report what is wrong


def _method_names() -> list[str]:
    from tunelab.methods.registry import names

    return names()


def cmd_generate(args) -> int:
    from tunelab.inference import generate, plain_prompt_reason
    from tunelab.stages.runs import load_run

    _generation_flags(args)
    _without_bitsandbytes(args, args.run)
    model, tokenizer = load_run(args.run, device=args.device, trust_remote_code=args.trust_remote_code)
    plain = plain_prompt_reason(args.run)
    if plain:  # said on stderr: stdout stays the answer alone
        print(f"tunelab: the prompt is continued as plain text, not in a chat template: {plain}", file=sys.stderr)
    print(generate(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, top_p=args.top_p,
                   chat_template=plain is None))  # fmt: skip
    return 0


def cmd_chat(args) -> int:
    from tunelab.inference import chat
    from tunelab.stages.runs import load_run

    _generation_flags(args)
    _without_bitsandbytes(args, args.run)
    model, tokenizer = load_run(args.run, device=args.device, trust_remote_code=args.trust_remote_code)
    chat(model, tokenizer, args.max_new_tokens, args.temperature, args.system, top_p=args.top_p)
    return 0


def cmd_models(args) -> int:
    from tunelab.models import named_models

    if args.sizes:
        return _model_sizes(args)
    rows = named_models()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ["name", "kind", "cached", "parameters", "licence", "source"]
    table = [
        [
            r["name"],
            r["kind"],
            "yes" if r["cached"] else "no",
            f"{r['parameters']:,}" if r["parameters"] else "?",
            r["licence"],
            r["source"],
        ]
        for r in rows
    ]
    print(_table(header, table))
    print("\nAlso accepted as model.name: a local Hugging Face folder, a .gguf file, or a hub id.")
    return 0


def _model_sizes(args) -> int:
    """`tunelab models --sizes CONFIG`: the parameters of the model a config builds from model.architecture,
    counted without building it."""
    from tunelab.config import ConfigError
    from tunelab.interop.convert import load_any

    cfg = load_any(args.sizes, args.set)[0]
    m = cfg.model
    if not m.architecture:
        raise ConfigError(f"{args.sizes}: --sizes counts a model built from model.architecture; this config loads "
                          f"{m.name!r} (its size: `tunelab methods --model {m.name}`)")  # fmt: skip
    import transformers

    from tunelab.models.scratch import parameter_counts

    if isinstance(m.tokenizer, str):
        vocab, where = len(transformers.AutoTokenizer.from_pretrained(m.tokenizer)), m.tokenizer
    else:
        vocab, where = m.tokenizer.train.vocab_size, "at most: model.tokenizer.train.vocab_size"
    auto = {"mlm": "AutoModelForMaskedLM", "seq2seq": "AutoModelForSeq2SeqLM"}.get(cfg.stage, "AutoModelForCausalLM")
    counts = parameter_counts(m, vocab, getattr(transformers, auto))
    if args.json:
        print(json.dumps(counts, indent=2))
        return 0
    shape = ", ".join(f"{k} {counts[k]}" for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                  "intermediate_size", "max_position_embeddings") if k in counts)  # fmt: skip
    print(f"{counts['class']} ({shape}), vocabulary {vocab:,} ({where}):\n")
    rows = [["total", f"{counts['total']:,}"], ["token embedding", f"{counts['embedding']:,}"],
            ["output head (untied)", f"{counts['head']:,}"], ["the rest (blocks, norms, positions)", f"{counts['body']:,}"]]  # fmt: skip
    print(_table(["parameters", "count"], rows))
    print(f"\nfp32 AdamW training holds ~{counts['total'] * 16 / 2**20:,.0f} MiB for weights, gradients and moments "
          f"(activations extra); a training token costs ~{6 * counts['total'] / 1e6:,.3g} MFLOP (6 N).")  # fmt: skip
    return 0


def cmd_tokenizer_train(args) -> int:
    from tunelab.config import ConfigError, check_output_path
    from tunelab.models.tokenizer_train import TokenizerSpec, train_from_files

    _at_least(1, min_frequency=args.min_frequency)
    if not 0 <= args.heldout_fraction < 1:
        raise ConfigError(f"--heldout-fraction {args.heldout_fraction}: must be at least 0 and under 1")
    check_output_path(args.out, "--out")
    spec = TokenizerSpec(type=args.type, vocab_size=args.vocab_size, min_frequency=args.min_frequency,
                         special_tokens=tuple(args.special_token or ()), chat_template=args.chat_template,
                         lowercase=args.lowercase)  # fmt: skip
    compare = [c for c in args.compare.split(",") if c] if args.compare != "none" else []
    report = train_from_files(args.corpus, spec, args.out, args.heldout_fraction, compare, args.text_column)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.type} tokenizer, {report['vocab_size']:,} tokens, trained on {report['train_characters']:,} characters: "
          f"{args.out} (AutoTokenizer.from_pretrained({args.out!r}))")  # fmt: skip
    if report["compression"]:
        print(f"\ncompression on the held-out text ({report['heldout_characters']:,} characters):\n")
        rows = [[name, f"{c['vocab_size']:,}", f"{c['tokens']:,}", f"{c['chars_per_token']:.3f}"]
                for name, c in report["compression"].items()]  # fmt: skip
        print(_table(["tokenizer", "vocabulary", "tokens", "characters / token"], rows))
        print(
            f"\nheld-out text decodes back exactly: {'yes' if report['round_trip'] else 'no (the tokenizer normalises)'}"
        )
    return 0


def cmd_methods(args) -> int:
    from tunelab.methods.summary import method_table

    rows = method_table(args.model)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ["method", "trains", "trainable", "%", "mergeable", "inference cost"]
    table = [
        [
            r["method"],
            r["trains"],
            f"{r['trainable']:,}" if r["trainable"] is not None else "n/a",
            (f"{r['percent']:.2f}" if r["percent"] >= 0.01 else f"{r['percent']:.2g}")
            if r["percent"] is not None
            else "n/a",
            {True: "yes", False: "no", None: "?"}[r["mergeable"]],
            r["inference_cost"],
        ]
        for r in rows
    ]
    print(f"methods on {args.model} (each method's default settings):\n")
    print(_table(header, table))
    notes = [f"{r['method']}: {r['note']}" for r in rows if r["note"]]
    if notes:
        print("\n" + "\n".join(notes))
    return 0


def cmd_config(args) -> int:
    from tunelab.config import ConfigError, dump_config

    if args.config and _is_grid(args.config):
        from tunelab.compare.run import describe_grid

        if args.set:
            raise ConfigError(f"{args.config}: --set applies to a run config, not to a compare grid; edit the grid")
        print(describe_grid(args.config))
        return 0
    from tunelab.interop.convert import load_any
    from tunelab.stages import get as get_stage

    cfg = load_any(args.config, args.set)[0]
    stage = get_stage(cfg.stage, cfg)
    if cfg.data.train and stage.check_data is not None:  # the data errors `train` would meet, before a model loads
        stage.check_data(cfg)
        print(f"tunelab: data read and checked for stage {cfg.stage}", file=sys.stderr)
    print(dump_config(cfg), end="")
    return 0


def cmd_data(args) -> int:
    from tunelab.data.build import build_datasets, check_rows, describe
    from tunelab.interop.convert import load_any
    from tunelab.models import load_tokenizer
    from tunelab.models.fingerprint import tokenizer_digest
    from tunelab.stages import distill

    cfg = load_any(args.config, args.set)[0]
    source = args.config or "the default config"
    # sft and pretrain rows (distill's too: the rows of one of those) go through data/build.py's cached pipeline;
    # every other stage reads and tokenises its own (stages/describe.py)
    data_stage = cfg.stage if cfg.stage != "distill" else distill.data_stage(cfg)
    if data_stage not in ("sft", "pretrain"):
        from tunelab.stages.describe import describe_data

        print(describe_data(cfg, lambda: load_tokenizer(cfg.model), source))
        return 0
    check_rows(cfg.data, cfg.training.seed, data_stage)  # every row, before the tokenizer loads
    # the tokenizer is loaded only if something is to be tokenised: a cache hit is known from its files' digest
    bundle = build_datasets(cfg.data, lambda: load_tokenizer(cfg.model), seed=cfg.training.seed, stage=data_stage,
                            fingerprint=tokenizer_digest(cfg.model))  # fmt: skip
    print(f"data of {source} (stage {cfg.stage}, seed {cfg.training.seed})")
    print(describe(bundle, cfg.data))
    if cfg.stage == "distill":
        print("the teacher's outputs on these rows are computed (and cached) by `tunelab train`")
    return 0


def cmd_convert(args) -> int:
    import yaml

    from tunelab.interop.convert import convert_file

    t = convert_file(args.config)
    print(t.report(), file=sys.stderr)
    print(yaml.safe_dump(t.config, sort_keys=False), end="")
    return 0


def _is_grid(path: str) -> bool:
    """A `tunelab compare` grid file (models / methods / tasks lists) rather than a run config."""
    import yaml

    try:
        raw = yaml.safe_load(open(path, encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False  # load_config gives the clear error
    return isinstance(raw, dict) and any(k in raw for k in ("models", "methods", "tasks"))


def cmd_baseline(args) -> int:
    from pathlib import Path

    from tunelab.config import check_output_path
    from tunelab.evaluation.baseline import tfidf_baseline
    from tunelab.evaluation.runner import write_result

    _at_least(1, limit=args.limit)
    if args.out:
        check_output_path(args.out, "--out")
    result = tfidf_baseline(args.task, train_limit=args.limit, seed=args.seed)
    if args.out:
        write_result(result, Path(args.out).expanduser())
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"{result['task']}  {result['model']}  train {result['n_train']:,}  dev {result['n_dev']:,}  {result['seconds']:.1f}s"
    )
    print(_table(["metric", "value"], [[k, f"{v:.4f}"] for k, v in result["metrics"].items()]))
    return 0


def cmd_eval(args) -> int:
    from tunelab.config import check_output_path
    from tunelab.evaluation.runner import evaluate, write_result

    _at_least(1, limit=args.limit, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
              num_beams=args.num_beams, context=args.context)  # fmt: skip
    if args.out:
        check_output_path(args.out, "--out")
    embedder = None if str(args.embedding_model).lower() in ("none", "null", "") else args.embedding_model
    _without_bitsandbytes(args, args.model)
    rope = _rope_flag(args.rope_scaling) if args.rope_scaling else None
    result = evaluate(
        args.model, args.task, limit=args.limit, device=args.device, batch_size=args.batch_size, seed=args.seed,
        embedding_model=embedder, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
        trust_remote_code=args.trust_remote_code, data=args.data, context=args.context, rope_scaling=rope,
    )  # fmt: skip
    if args.out:
        write_result(result, args.out)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['task']}  {result['model']}  ({result['method']}, {result['n']:,} rows, {result['seconds']:.0f}s)")
    print(
        _table(
            ["metric", "value"], [[k, f"{v:.4f}" if isinstance(v, float) else v] for k, v in result["metrics"].items()]
        )
    )
    return 0


def _rope_flag(text: str) -> dict:
    """--rope-scaling '{type: yarn, factor: 4}': the mapping, validated as model.rope_scaling is."""
    import yaml

    from tunelab.config import ConfigError, RopeScalingConfig

    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError:
        raw = None
    if not isinstance(raw, dict):
        raise ConfigError(f"--rope-scaling {text!r}: expected a mapping such as '{{type: linear, factor: 2}}'")
    try:
        return RopeScalingConfig(**raw).model_dump(exclude_none=True)
    except ValueError as e:  # pydantic's ValidationError: one line per problem
        problems = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'rope_scaling'}: {x['msg']}" for x in e.errors())
        raise ConfigError(f"--rope-scaling {text!r}: {problems}") from None


def cmd_export(args) -> int:
    from tunelab.export import ExportError
    from tunelab.export.hf import export

    given = {"--check-data": args.check_data, "--check-texts": args.check_texts, "--check-task": args.check_task,
             "--check-task-rows": args.check_task_rows}  # fmt: skip
    if not args.check and any(v is not None for v in given.values()):  # else they would be ignored
        flags = ", ".join(k for k, v in given.items() if v is not None)
        raise ExportError(f"{flags}: {'goes' if ',' not in flags else 'go'} with --check (--format gguf)")
    _at_least(1, check_texts=args.check_texts, check_task_rows=args.check_task_rows)
    counts = {k: v for k, v in (("check_texts", args.check_texts), ("check_task_rows", args.check_task_rows)) if v}
    _without_bitsandbytes(args, args.run)
    report = export(args.run, args.format, args.quant, args.out, device=args.device,
                    trust_remote_code=args.trust_remote_code, pre_tokenizer=args.pre_tokenizer,
                    modelfile=args.modelfile, check=args.check, check_data=args.check_data,
                    check_task=args.check_task, **counts)  # fmt: skip
    print(json.dumps(report, indent=2))
    return 0


def cmd_push(args) -> int:
    from tunelab.export.push import push

    if args.what == "merged":
        _without_bitsandbytes(args, args.run)
    timeout = {} if args.timeout is None else {"timeout": args.timeout}
    report = push(args.run, args.repo_id, what=args.what, private=args.private, revision=args.revision,
                  token=args.token, device=args.device, trust_remote_code=args.trust_remote_code, **timeout)  # fmt: skip
    print(json.dumps(report, indent=2))
    return 0


def cmd_serve(args) -> int:
    from tunelab.serve import parse_adapter, serve

    adapters = [parse_adapter(a) for a in args.adapter or []]
    _without_bitsandbytes(args, args.run, *(run for _, run in adapters))
    serve(args.run, adapters, host=args.host, port=args.port, name=args.name, device=args.device,
          trust_remote_code=args.trust_remote_code, max_body_bytes=args.max_body_bytes,
          max_queue=args.max_queue, max_batch=args.max_batch, api_docs=args.api_docs, dtype=args.dtype)  # fmt: skip
    return 0


def cmd_ui(args) -> int:
    import importlib.util

    from tunelab.config import ConfigError, check_output_path

    if importlib.util.find_spec("gradio") is None:
        raise ConfigError("tunelab ui needs Gradio: pip install 'tunelab[ui]' (or pip install 'gradio>=6,<7')")
    check_output_path(args.runs, "--runs")
    if args.share:
        print("tunelab ui: --share makes this UI reachable from the internet through Gradio's relay, and nothing "
              "here asks who is calling: anyone with the link can train and read your runs", file=sys.stderr)  # fmt: skip
    from tunelab.ui.app import launch

    launch(args.runs, host=args.host, port=args.port, share=args.share)
    return 0


def _trust_flag(parser) -> None:
    parser.add_argument(
        "--trust-remote-code", action="store_true",
        help="allow the model's own Python code to run (never taken from a run folder; only if you trust it)",
    )  # fmt: skip


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults in every option's help, except where there is nothing to show (no default, a
    flag that is off) or the help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        nothing = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if nothing or "%(default)" in text or "default" in text:
            return text
        return super()._get_help_string(action)


def all_parsers(parser: argparse.ArgumentParser):
    """The parser and every subcommand's parser below it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                yield from all_parsers(sub)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tunelab",
        description="Fine-tune, evaluate, compare and export language models, on CPU or GPU.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"tunelab {__version__}", help="print the version and exit")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also show third-party warnings and progress bars (transformers, PEFT, the Hub), and the "
                   "full traceback of an internal error")  # fmt: skip
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="fine-tune a model from a YAML config")
    t.add_argument("config", nargs="?", help="YAML config (see examples/); omitted = all defaults")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field, e.g. training.lr=1e-4")
    t.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    t.add_argument("--force", action="store_true",
                   help="with --resume: continue even though the seed, model, method, batch or data changed")  # fmt: skip
    t.add_argument("--output-dir", help="run folder (overrides output_dir)")
    t.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="data-parallel processes on this machine (one per GPU, or CPU processes); see docs/scale.md")  # fmt: skip
    t.set_defaults(fn=cmd_train)

    for name, fn, help_ in (
        ("generate", cmd_generate, "answer one prompt with a run's result (or any model)"),
        ("chat", cmd_chat, "chat interactively (streaming) with a run's result (or any model)"),
    ):
        g = sub.add_parser(name, help=help_, description=help_)
        g.add_argument("run", help="run folder, its final/ folder, or a model spec")
        if name == "generate":
            g.add_argument("prompt", help="the user message, answered with the model's chat template")
        else:
            g.add_argument("--system", help="system prompt")
        g.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="longest answer, in tokens")
        g.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                       help="0 = greedy (the same answer every time); above 0 samples")  # fmt: skip
        g.add_argument("--top-p", type=float, default=DEFAULT_TOP_P,
                       help="when sampling: keep the most likely tokens up to this mass (1 = all)")  # fmt: skip
        g.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:1 ...")
        _trust_flag(g)
        g.set_defaults(fn=fn)

    m = sub.add_parser(
        "models",
        help="list the named models, whether cached, size and licence; --sizes CONFIG: "
        "the parameters of a model a config builds from model.architecture",
    )
    m.add_argument("--json", action="store_true", help="print JSON instead of a table")
    m.add_argument(
        "--sizes",
        metavar="CONFIG",
        help="count the parameters of CONFIG's model.architecture model (no weights built, no tokenizer trained)",
    )
    m.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="with --sizes: override a config field, e.g. model.config.num_hidden_layers=6",
    )
    m.set_defaults(fn=cmd_models)

    tk = sub.add_parser("tokenizer", help="train a tokenizer for a corpus (tunelab tokenizer train --help)")
    tks = tk.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    tt = tks.add_parser(
        "train",
        help="train a BPE / WordPiece / unigram tokenizer on text files; report its "
        "compression on their held-out tail beside another model's tokenizer",
    )
    tt.add_argument("corpus", nargs="+", help="text files (.txt, read whole) or data files with a text column")
    tt.add_argument(
        "--type",
        choices=["bpe", "wordpiece", "unigram"],
        default="bpe",
        help="bpe: byte-level BPE (causal models); wordpiece: BERT's (masked LM); unigram: SentencePiece's",
    )
    tt.add_argument("--vocab-size", type=int, default=4096, help="tokens in the vocabulary, special tokens included")
    tt.add_argument("--out", required=True, help="folder to write (AutoTokenizer.from_pretrained loads it)")
    tt.add_argument(
        "--min-frequency", type=int, default=2, help="bpe / wordpiece: pairs seen fewer times are not merged"
    )
    tt.add_argument(
        "--special-token",
        action="append",
        metavar="TOKEN",
        help="another special token, never split (repeatable); each type has its own already",
    )
    tt.add_argument(
        "--chat-template",
        choices=["none", "chatml"],
        default="none",
        help="chatml: add <|im_start|> / <|im_end|> and the ChatML template (for stage sft later)",
    )
    tt.add_argument("--lowercase", action="store_true", help="lower-case the text first")
    tt.add_argument(
        "--heldout-fraction",
        type=float,
        default=0.1,
        help="the last part of each file left out of training and used to measure compression",
    )
    tt.add_argument(
        "--compare",
        default="smollm2-135m-instruct",
        help="model specs (comma-separated) whose tokenizers are measured on the same held-out text; none = skip",
    )
    tt.add_argument("--text-column", default="text", help="data files: the column holding the text")
    tt.add_argument("--json", action="store_true", help="print the report as JSON")
    tt.set_defaults(fn=cmd_tokenizer_train)

    me = sub.add_parser("methods", help="list the tuning methods: what trains, how many parameters, mergeable")
    me.add_argument("--model", default="smollm2-135m-instruct", help="model whose parameters are counted (config only)")
    me.add_argument("--json", action="store_true", help="print JSON instead of a table")
    me.set_defaults(fn=cmd_methods)

    c = sub.add_parser(
        "config",
        help="print a config with every default filled in (validates it and reads and "
        "checks its data files, as train would before loading a model); a compare grid: validate it "
        "and list its cells",
    )
    c.add_argument("config", nargs="?", help="YAML config or compare grid; omitted = all defaults")
    c.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field, e.g. training.lr=1e-4")
    c.set_defaults(fn=cmd_config)

    da = sub.add_parser(
        "data",
        help="prepare a config's training data without training: read, check, tokenise, "
        "pack and cache it, and print its statistics",
    )
    dsub = da.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    dp = dsub.add_parser(
        "prepare",
        help="read and check every row, tokenise (into the on-disk cache for large data) "
        "and print rows, tokens, truncated and dropped rows, a length histogram and the cache",
    )
    dp.add_argument("config", nargs="?", help="YAML config (any stage); omitted = all defaults")
    dp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field, e.g. data.num_proc=2")
    dp.set_defaults(fn=cmd_data)

    cv = sub.add_parser(
        "convert",
        help="translate a LLaMA-Factory or Axolotl YAML into a tunelab config (printed "
        "as YAML; mapped and ignored keys on stderr)",
    )
    cv.add_argument("config", help="their YAML file (see docs/interop.md)")
    cv.set_defaults(fn=cmd_convert)

    e = sub.add_parser("eval", help="score a model or a run on a task preset's dev split")
    e.add_argument("model", help="run folder, or a model spec (named default, folder, .gguf, hub id)")
    e.add_argument("--task", required=True, help="sst2, cola, mrpc, stsb, rte, wnli, qnli, squad, wmt14-en-de, lima, "
                   "alpaca ..., or perplexity (with --data and --context)")  # fmt: skip
    e.add_argument("--limit", type=int, help="score a seeded sample of at most N dev rows")
    e.add_argument("--seed", type=int, default=0, help="seed of the --limit sample")
    e.add_argument("--batch-size", type=int, default=16, help="dev rows scored together")
    e.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:1 ...")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.add_argument("--out", help="also write the result as JSON here")
    e.add_argument("--embedding-model", default="minilm-l6",
                   help="seq2seq tasks: sentence embedder for the cosine metric ('none' = BLEU only)")  # fmt: skip
    e.add_argument("--max-new-tokens", type=int, help="seq2seq tasks: generation length (default: the run's, or 128)")
    e.add_argument("--num-beams", type=int, help="seq2seq tasks: beam width (default: the run's, or 1 = greedy)")
    e.add_argument(
        "--data", help="--task perplexity: held-out text (.txt, or .jsonl/.json/.csv rows with a text column)"
    )
    e.add_argument("--context", type=int, help="--task perplexity: window length in tokens (docs/long-context.md)")
    e.add_argument("--rope-scaling", help="--task perplexity: RoPE scaling to load the model with, as YAML, "
                   "e.g. '{type: yarn, factor: 4}' (default: the run's own; docs/long-context.md)")  # fmt: skip
    _trust_flag(e)
    e.set_defaults(fn=cmd_eval)

    b = sub.add_parser("baseline", help="score a classical baseline (TF-IDF + linear model) on a task preset")
    b.add_argument("kind", choices=["tfidf"], help="baseline model")
    b.add_argument(
        "--task", required=True, help="task preset: sst2, cola, mrpc, stsb, rte, wnli (see tunelab.data.tasks)"
    )
    b.add_argument("--limit", type=int, help="train on a seeded random sample of this many rows")
    b.add_argument("--seed", type=int, default=0, help="seed of the --limit sample and of the model")
    b.add_argument("--json", action="store_true", help="print the result as JSON")
    b.add_argument("--out", help="also write the result as JSON to this file")
    b.set_defaults(fn=cmd_baseline)

    x = sub.add_parser("export", help="merge a run and write a Hugging Face folder or a GGUF file (llama.cpp)")
    x.add_argument("run", help="run folder, its final/ folder, or a model spec")
    x.add_argument(
        "--format",
        choices=["hf", "gguf", "gguf-lora"],
        default="hf",
        help="hf: merged Hugging Face folder; gguf: merged model for llama.cpp; gguf-lora: a LoRA run's "
        "adapter alone, applied by llama.cpp over the base model's GGUF (--lora)",
    )
    x.add_argument(
        "--quant",
        help="hf: f32 | f16 | bf16; gguf: f16 | f32 | q8_0 | q4_0 | q4_1 | q4_k; gguf-lora: f32 | f16 (first: default)",
    )
    x.add_argument("--out", help="output folder (hf) or .gguf file (default: beside the run)")
    x.add_argument("--device", default="cpu", help="where to merge (cpu is enough)")
    x.add_argument(
        "--pre-tokenizer",
        help="gguf: llama.cpp's name for the tokenizer's split (tokenizer.ggml.pre), "
        "when tunelab cannot tell it (default: from the GGUF source model or the tokenizer)",
    )
    x.add_argument(
        "--modelfile",
        action="store_true",
        help="gguf: also write an Ollama Modelfile beside the file "
        "(ChatML chat templates: template, default system message, stop tokens)",
    )
    x.add_argument(
        "--check",
        action="store_true",
        help="gguf: run the file in llama.cpp against the model it "
        "came from: perplexity, KL divergence and top-1 agreement on held-out texts (needs llama-cpp-python)",
    )
    x.add_argument(
        "--check-data", metavar="FILE", help="--check: held-out rows to score (default: the run's validation rows)"
    )
    x.add_argument("--check-texts", type=int, metavar="N", help="--check: held-out texts scored (default 64)")
    x.add_argument(
        "--check-task",
        metavar="TASK",
        help="--check: also score a classification preset (e.g. sst2) "
        "in both, accuracy with intervals and a paired test",
    )
    x.add_argument("--check-task-rows", type=int, metavar="N", help="--check-task: dev rows (default 200)")
    _trust_flag(x)
    x.set_defaults(fn=cmd_export)

    pu = sub.add_parser(
        "push", help="upload a finished run's result (final/, with its model card) to a Hugging Face Hub model repo"
    )
    pu.add_argument("run", help="run folder (or its final/)")
    pu.add_argument("repo_id", help="the Hub repo, e.g. your-name/smollm2-sft-lora (created if missing)")
    pu.add_argument(
        "--what",
        choices=["final", "adapter", "merged"],
        default="final",
        help="final: final/ as it is; adapter: the same, refused unless it is a PEFT adapter; merged: the "
        "method merged into the base weights (as `export --format hf`), a plain transformers model",
    )
    pu.add_argument(
        "--private", action="store_true", help="create the repo private (an existing repo keeps its setting)"
    )
    pu.add_argument("--revision", help="the branch to upload to (created from main if missing; default: main)")
    pu.add_argument(
        "--token", help="a Hub token with write access (default: HF_TOKEN, or the one `hf auth login` stored)"
    )
    pu.add_argument("--device", default="cpu", help="--what merged: where to merge (cpu is enough)")
    pu.add_argument("--timeout", type=float, metavar="SECONDS",
                    help="stop with an error when the Hub stays silent this long on one connect, read or write "
                    "(default 60; a large file uploads as long as bytes move)")  # fmt: skip
    _trust_flag(pu)
    pu.set_defaults(fn=cmd_push)

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat, completions, streaming, LoRA adapters)")
    sv.add_argument("run", help="run folder or model spec (the base when --adapter is given)")
    sv.add_argument("--adapter", action="append", metavar="NAME=RUN",
                    help="a LoRA run over the same base, served as model NAME (repeatable)")  # fmt: skip
    sv.add_argument("--name", help="model id of RUN in the API (default: its folder name or spec)")
    sv.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000, help="TCP port")
    sv.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:1 ...")
    sv.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="the weights' type while serving; auto: as loaded (a bf16 run with fp32 master weights loads "
                         "them in fp32: bfloat16 halves the memory)")  # fmt: skip
    sv.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024,
                    help="larger request bodies get 413 before they are read (default %(default)s = 4 MiB)")  # fmt: skip
    sv.add_argument("--max-queue", type=int, default=256, help="requests waiting to start; more get 503")
    sv.add_argument("--max-batch", type=int, default=32, help="requests generated together in one batch")
    sv.add_argument("--api-docs", action="store_true", help="publish /openapi.json, /docs and /redoc (off by default)")
    _trust_flag(sv)
    sv.set_defaults(fn=cmd_serve)

    ui = sub.add_parser("ui", help="the web UI (Gradio): configure, start, watch and compare runs in the browser")
    ui.add_argument("--runs", default="runs", help="folder the UI's runs are written to and listed from")
    ui.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    ui.add_argument("--port", type=int, default=7860, help="TCP port")
    ui.add_argument("--share", action="store_true",
                    help="also publish a public gradio.live link (off by default; the UI has no login)")  # fmt: skip
    ui.set_defaults(fn=cmd_ui)

    from tunelab.compare.cli import add_compare_parser  # argparse only; the work is imported when it runs

    add_compare_parser(sub)
    for parser in all_parsers(p):  # subcommands show their defaults too (add_parser does not pass it on)
        parser.formatter_class = HelpFormatter
        # a prefix is not a flag: `train --res` would silently mean --resume (and change meaning when a flag
        # sharing the prefix is added)
        parser.allow_abbrev = False
    return p


def quiet_third_parties() -> None:
    """For the command's own process without -v: no progress bars of transformers / the Hub (weights
    loading, shards written) and none of transformers' advisory logging below errors, and the
    FutureWarnings / DeprecationWarnings transformers and PEFT raise about their own API (not the user's
    doing). Set before they are imported; an environment variable the user set wins."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(transformers|peft|torch\.jit)(\.|$)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.program_argv = sys.argv[1:] if argv is None else None  # a restart re-runs the very same command
    if not getattr(args, "fn", None):  # no command: a usage error, as argparse's own
        parser.print_help(sys.stderr)
        return 2
    if args.program_argv is not None and not args.verbose:  # the command itself, not main([...]) from Python
        quiet_third_parties()
    from tunelab.errors import user_errors

    try:
        return args.fn(args)
    except user_errors() as e:  # a clear one-paragraph message, not a traceback from deep inside a library
        print(f"tunelab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tunelab: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug of ours (or an error we have not named yet): say so, keep the details
        if args.verbose:
            raise
        print(
            f"tunelab: internal error: {type(e).__name__}: {e}\n"
            "  This is not something your input should cause. Rerun with -v for the traceback, and please "
            "report it with that traceback.",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
