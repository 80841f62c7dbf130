"""`tunelab compare GRID.yaml`: models × methods × tasks, each cell a tunelab run, in one table and report.

    from tunelab.compare import run_grid
    result = run_grid("examples/compare-sst2.yaml")     # GridResult: rows, trained_now, skipped, report ...
    print(result.markdown)

See docs/compare.md for the grid format, the cell mapping, the outputs and the recommendation rule.
"""

from __future__ import annotations


def run_grid(grid, **kwargs):
    from tunelab.compare.run import run_grid as _run

    return _run(grid, **kwargs)


def load_grid(source):
    from tunelab.compare.grid import load_grid as _load

    return _load(source)


def __getattr__(name):
    if name == "GridResult":
        from tunelab.compare.run import GridResult

        return GridResult
    raise AttributeError(name)


__all__ = ["GridResult", "load_grid", "run_grid"]
