"""The package's import graph: no cycles, and the runtime does not depend on training.

The graph is read from the source with ``ast`` (nothing is imported), so it sees every ``import`` and
``from ... import`` of ``sparsebert`` wherever it is written: at module level, inside functions (a lazy
import still ties the two modules together, and a cycle through it only waits for the right call
order to fail), under ``if``/``try`` — but not under ``if TYPE_CHECKING:``, which never runs (an
annotation's name only). ``from sparsebert.x import y`` is an edge to ``sparsebert.x.y`` when ``y`` is a
submodule, else to ``sparsebert.x``. Parent packages are not edges: Python initialises
them before their submodules, whatever the order, so they close no cycle that can fail — and as
edges they would put every module on one cycle. This checks what each module imports itself; what a
process really loads, parent packages included (``sparsebert/__init__`` runs before any submodule, and
imports the public API only on first access), is checked by importing in a fresh interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import deque
from collections.abc import Iterable
from pathlib import Path

PACKAGE = "sparsebert"
SRC = Path(__file__).resolve().parents[1] / "src" / PACKAGE

# What serving a model must not pull in: the training loop (and accelerate with it), the pruner, and the
# report (matplotlib). A name covers its submodules: importing sparsebert.pruning.layers runs
# sparsebert/pruning/__init__, which imports the pruner.
TRAINING = ("sparsebert.train", "sparsebert.pruning", "sparsebert.report")
TRAINING_PACKAGES = ("accelerate",)

# The benchmark harness builds pruned models and plots them, and the CLI glue dispatches to it and to
# the exporter: both are tools around the runtime, not part of what serves a model.
RUNTIME_TOOLS = ("sparsebert.runtime.bench", "sparsebert.runtime.commands")

# Edges that still tie the runtime to training, each with the import that makes it: none. The test fails
# as soon as the set found differs from this one, either way, so a new leak is an error (or, if it must
# stay for a while, is named here with its import).
KNOWN_LEAKS: dict[tuple[str, str], str] = {}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _known(name: str, known: set[str]) -> str:
    """The longest prefix of the dotted ``name`` that is one of the package's modules."""
    while name not in known and "." in name:
        name = name.rpartition(".")[0]
    return name


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> the package's modules it imports, module -> the top-level outside packages it imports)."""
    files = modules()
    known = set(files)
    edges: dict[str, set[str]] = {name: set() for name in files}
    outside: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        typing_only = {id(n) for block in ast.walk(tree) if _type_checking(block) for n in ast.walk(block)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package, one level up per extra dot
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
            else:
                continue
            for target in targets:
                if target == PACKAGE or target.startswith(PACKAGE + "."):
                    edges[name].add(_known(target, known))
                else:
                    outside[name].add(target.partition(".")[0])
    for name in edges:
        edges[name].discard(name)
    return edges, outside


def _type_checking(node: ast.AST) -> bool:
    """An ``if TYPE_CHECKING:`` block (its imports serve annotations only)."""
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def import_groups(edges: dict[str, set[str]]) -> list[set[str]]:
    """The groups of two or more modules each of which imports all the others, directly or not (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return groups


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One concrete cycle ``[a, b, ..., a]`` per group of modules that import each other."""
    found = []
    for group in import_groups(edges):
        start = min(group)
        path = _path(edges, start, lambda m, s=start: s in edges[m], within=group)  # back to start
        found.append([*path, start])
    return sorted(found)


def _path(edges: dict[str, set[str]], start: str, goal, within: set[str] | None = None) -> list[str]:
    """The shortest import chain from ``start`` to a module satisfying ``goal`` (BFS), or []."""
    parent: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        if goal(v):
            chain = [v]
            while parent[chain[-1]] is not None:
                chain.append(parent[chain[-1]])
            return chain[::-1]
        for w in sorted(edges[v]):
            if w not in parent and (within is None or w in within):
                parent[w] = v
                queue.append(w)
    return []


def _training(module: str) -> bool:
    return any(module == t or module.startswith(t + ".") for t in TRAINING)


def runtime_modules(names: Iterable[str]) -> list[str]:
    """What serves a model: the runtime package but its tools, and ``predict``."""
    return sorted(
        n for n in names if (n.startswith("sparsebert.runtime") and n not in RUNTIME_TOOLS) or n == "sparsebert.predict"
    )


def test_the_graph_sees_module_and_function_level_imports():
    edges, outside = import_graph()
    assert "sparsebert.runtime.ops" in edges["sparsebert.runtime.engine"]  # module level
    assert "sparsebert.export" in edges["sparsebert.runtime.onnx_export"]  # inside export_onnx
    assert "sparsebert.config" in edges["sparsebert.cli"]  # `from sparsebert import config`: the submodule
    assert "accelerate" in outside["sparsebert.train"]
    assert "sparsebert.config" not in edges["sparsebert.data"]  # under `if TYPE_CHECKING:`: annotations only


def test_the_package_has_no_import_cycle():
    edges = import_graph()[0]
    groups = import_groups(edges)
    assert not groups, "import cycles:\n" + "\n".join(
        f"  {' -> '.join(cycle)}  (all of {', '.join(sorted(group))} import each other)"
        for cycle, group in zip(cycles(edges), sorted(groups, key=min), strict=True)
    )


def test_the_cycle_finder_finds_function_level_and_long_cycles():
    """The checks below are only as good as the graph and the cycle finder: a two-module cycle through a
    lazy import, and a three-module one, are both found and printed."""
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b", "a"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_runtime_and_predict_do_not_import_training():
    """Serving a model (``sparsebert.runtime``, ``sparsebert predict``) must not import the training loop,
    the pruner, the report or accelerate, directly or through another module. An edge that does must be
    named in ``KNOWN_LEAKS`` (empty); the failure message shows each chain."""
    edges, outside = import_graph()
    serving = runtime_modules(edges)
    reached, queue = set(serving), deque(serving)  # what serving imports, up to the first training module
    while queue:
        for w in edges[queue.popleft()] - reached:
            reached.add(w)
            if not _training(w):
                queue.append(w)
    crossing = {(a, b) for a in reached if not _training(a) for b in edges[a] if _training(b)}
    crossing |= {(a, p) for a in reached if not _training(a) for p in outside[a] & set(TRAINING_PACKAGES)}
    chains = {n: _path(edges, n, _training) for n in serving}
    report = "\n".join(f"  {n}: {' -> '.join(chain)}" for n, chain in chains.items() if chain)
    assert crossing == set(KNOWN_LEAKS), (
        f"runtime -> training edges found {sorted(crossing)}, KNOWN_LEAKS lists {sorted(KNOWN_LEAKS)}:\n{report}"
    )


def test_serving_loads_no_training_at_run_time():
    """What a fresh interpreter really loads, parent packages included: importing the errors, the runtime
    and ``predict`` runs ``sparsebert/__init__`` (lazy: it imports the public API on first access only) and
    must not load the training loop, the pruner, the report or accelerate."""
    unwanted = [*TRAINING, *TRAINING_PACKAGES]
    code = (
        "import sys, sparsebert.errors, sparsebert.runtime, sparsebert.predict\n"
        f"unwanted = {unwanted!r}\n"
        "print(sorted(m for m in sys.modules if any(m == u or m.startswith(u + '.') for u in unwanted)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", f"serving loaded {done.stdout.strip()}"


def test_the_public_api_is_imported_on_first_access():
    """``from sparsebert import ...`` and ``sparsebert.__all__`` work as if ``__init__`` imported them."""
    import sparsebert

    assert all(getattr(sparsebert, name).__name__ == name for name in sparsebert.__all__)
    from sparsebert import PruneConfig, config, find_prunable_linears  # a public name, then a submodule

    assert PruneConfig is config.PruneConfig and find_prunable_linears is sparsebert.find_prunable_linears
