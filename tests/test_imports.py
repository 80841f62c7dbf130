"""The package's import structure: no cycles, no private names imported across modules, and dependencies
that point one way through the layers of docs/architecture.md. Every import counts, at module level and
inside functions: a lazy import still ties two modules together.

The checks run on the source (ast), so they are fast and need no model; the planted-package tests show
that each check fails when it should.
"""

from __future__ import annotations

import ast
from pathlib import Path

import tunelab

# Layers, lowest first: a module may import its own layer and the layers below it, never above.
LAYERS = [
    (
        "tunelab.plugins",
        "tunelab.files",
        "tunelab.bf16_table",
        "tunelab.peer_keys",
        "tunelab.config",
        "tunelab.metrics",
        "tunelab.interop",
    ),  # plug-in, key and bf16 tables, whole-file writes, configs, pure metrics, other toolkits' configs
    ("tunelab.data",),  # reading, templating, tokenising, task presets
    ("tunelab.models",),  # loading, losses over model outputs, generation, numeric formats
    ("tunelab.methods",),  # what trains: LoRA, adapters, full ...
    ("tunelab.accel",),  # CPU speed code behind training.accelerate (it patches methods' layers)
    ("tunelab.stages",),  # what is trained on what rows with which loss
    ("tunelab.training",),  # the loops and their harness
    ("tunelab.evaluation", "tunelab.inference", "tunelab.export", "tunelab.serve"),  # users of trained runs
    (
        "tunelab.compare",
        "tunelab.cli",
        "tunelab.ui",
        "tunelab.errors",
        "tunelab.testing",
        "tunelab.__main__",
        "tunelab",
    ),
]
# The one import that points the other way: config validates the `method:` section with each method's
# own Config class and its declared capabilities (ppo refuses virtual-token methods), found through the
# methods' registry.
ALLOWED_UPWARD = {("tunelab.config", "tunelab.methods.registry")}


def module_files(root: Path) -> dict[str, Path]:
    mods = {}
    for f in root.rglob("*.py"):
        parts = list(f.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


def import_edges(root: Path) -> tuple[dict[str, set[str]], list[str]]:
    """({module: modules it imports}, ["a imports _name from b", ...]) for the package at `root`."""
    mods, pkg = module_files(root), root.name

    def known(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {m: set() for m in mods}
    private = []
    for mod, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = mod.split(".") if f.name == "__init__.py" else mod.split(".")[:-1]
                    here = here[: len(here) - (node.level - 1)]
                    base = ".".join(here + ([base] if base else []))
                targets = [(f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base, a.name) for a in node.names]
            for name, imported in targets:
                target = known(name) if name.split(".")[0] == pkg else None
                if target is None or target == mod:
                    continue
                if mod.startswith(target + "."):  # a child importing its own package's __init__
                    continue
                edges[mod].add(target)
                if imported and imported.startswith("_") and not imported.startswith("__"):
                    private.append(f"{mod} imports {imported} from {target}")
    return edges, private


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack, on, found = [], set(), []
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def layer_of(mod: str, layers) -> int | None:
    best = None
    for i, parts in enumerate(layers):
        for p in parts:
            if mod == p or mod.startswith(p + "."):
                if best is None or len(p) > best[1]:
                    best = (i, len(p))
    return None if best is None else best[0]


def upward_imports(edges: dict[str, set[str]], layers, allowed=frozenset()) -> list[str]:
    bad = []
    for mod, targets in edges.items():
        for t in targets:
            a, b = layer_of(mod, layers), layer_of(t, layers)
            if a is not None and b is not None and b > a and (mod, t) not in allowed:
                bad.append(f"{mod} (layer {a}) imports {t} (layer {b})")
    return sorted(bad)


PACKAGE = Path(tunelab.__file__).parent


def test_no_import_cycles():
    edges, _ = import_edges(PACKAGE)
    assert cycles(edges) == []


def test_no_private_names_imported_across_modules():
    _, private = import_edges(PACKAGE)
    assert private == []


def test_dependencies_point_down_the_layers():
    edges, _ = import_edges(PACKAGE)
    assert upward_imports(edges, LAYERS, ALLOWED_UPWARD) == []
    unplaced = [m for m in edges if layer_of(m, LAYERS) is None]
    assert unplaced == [], "place every new package in LAYERS"


# ----------------------------------------------------------------------- the checks catch planted faults
def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for name, text in {"__init__.py": "", **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_a_planted_cycle_through_a_lazy_import_is_found(tmp_path):
    root = _package(tmp_path, {
        "a.py": "from pkg.b import g\n\ndef f():\n    return g()\n",
        "b.py": "def g():\n    from pkg.c import h\n    return h()\n",
        "c.py": "def h():\n    import pkg.a\n    return 1\n",
        "d.py": "from pkg import a\n",
    })  # fmt: skip
    edges, _ = import_edges(root)
    assert cycles(edges) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_a_planted_private_import_and_an_upward_import_are_found(tmp_path):
    root = _package(tmp_path, {
        "low/__init__.py": "", "low/x.py": "from pkg.high.y import _helper\n",
        "high/__init__.py": "", "high/y.py": "def _helper():\n    return 1\n",
    })  # fmt: skip
    edges, private = import_edges(root)
    assert private == ["pkg.low.x imports _helper from pkg.high.y"]
    assert upward_imports(edges, [("pkg.low",), ("pkg.high",)]) == ["pkg.low.x (layer 0) imports pkg.high.y (layer 1)"]
    assert cycles(edges) == []
