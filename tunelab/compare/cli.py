"""`tunelab compare GRID.yaml`: the subcommand's arguments and body (tunelab/cli.py registers it)."""

from __future__ import annotations

import argparse


def add_compare_parser(sub) -> argparse.ArgumentParser:
    c = sub.add_parser(
        "compare",
        help="run a grid of models × methods × tasks; results table, SQLite, CSV/JSON/Markdown and an HTML report",
        description="Run every cell of GRID.yaml that has not finished yet (re-running continues an interrupted "
        "grid), then write results.db, results.csv/.json/.md and report.html in the grid's output_dir. "
        "See docs/compare.md.",
    )
    c.add_argument("grid", help="grid YAML (see examples/compare-sst2.yaml)")
    c.add_argument(
        "--executor",
        choices=["local", "ray"],
        default="local",
        help="local: one cell after another, each in its own process; ray: fan cells out over Ray",
    )
    c.add_argument("--address", help="Ray cluster address (ray.init(address=...)); default: a local Ray")
    c.add_argument(
        "--start-method",
        choices=["forkserver", "spawn"],
        help="local: how each cell's process starts (default forkserver on Linux: imports once)",
    )
    c.add_argument(
        "--only-report", action="store_true", help="run nothing; rewrite the tables and report from results.db"
    )
    c.add_argument("--retry-failed", action="store_true", help="also run again the cells that failed")
    c.add_argument(
        "--seeds",
        type=lambda v: [int(x) for x in v.split(",") if x.strip()],
        metavar="S1,S2",
        help="training seeds, replacing the grid's `seeds:` (each trained cell runs once per seed, same rows)",
    )
    c.set_defaults(fn=cmd_compare)
    return c


def _restart_on_tbbmalloc(args) -> None:
    """The command itself (not main([...]) from Python) restarts on tbbmalloc as `tunelab train` does, when the
    grid's base training settings want it (`training.allocator`): the cells' processes (forked from this one's
    forkserver) inherit it, and with it the caches handed back after each step and, in full fine-tuning, in the
    backward pass (accel/memory.py). Returns only when it cannot or need not restart."""
    if getattr(args, "program_argv", None) is None or args.only_report or args.executor != "local":
        return
    from tunelab.accel.memory import restart_with_tbbmalloc, wants_tbbmalloc
    from tunelab.compare.grid import load_grid
    from tunelab.config import TrainingConfig

    training = load_grid(args.grid).base.get("training") or {}
    if wants_tbbmalloc(TrainingConfig.model_validate(training)):
        restart_with_tbbmalloc(args.program_argv)


def cmd_compare(args) -> int:
    from tunelab.compare.run import run_grid

    _restart_on_tbbmalloc(args)

    result = run_grid(
        args.grid,
        executor=args.executor,
        address=args.address,
        only_report=args.only_report,
        retry_failed=args.retry_failed,
        start_method=args.start_method,
        seeds=args.seeds,
    )
    print()
    print(result.markdown)
    print()
    print(result.summary)
    print(
        f"\n{result.trained_now} cells run now, {result.skipped} reused, {result.failed} failed"
        + (f", {result.not_applicable} not applicable" if result.not_applicable else "")
        + (" — interrupted: run the same command again to continue" if result.interrupted else "")
    )
    print(f"report: {result.report}")
    return 130 if result.interrupted else 0
