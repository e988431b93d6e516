"""The import graph of ``src/pellucid`` (every import, function-local ones included, parsed with
``ast``): each package imports only its own layer and the layers below it, and no module takes part
in an import cycle."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# bottom to top; a module may import its own layer and those below it, never above
LAYERS: list[set[str]] = [
    {"errors", "version"},
    {"registry", "guards", "privacy", "paths", "progress", "runtime", "bootstrap", "signing"},
    {"targets", "io"},
    {"data"},
    {"models", "inference"},
    {"explainers"},
    {"metrics"},
    {"viz", "(root)"},  # pellucid.explain / pellucid.evaluate: the API over explainers and metrics
    {"pipeline", "bench"},
    {"service", "pacs", "review"},
    {"node"},  # pellucid node: the PACS path's pipeline behind a DICOM listener
    {"demo", "cli"},
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / "pellucid").rglob("*.py"):
        if "migrations" in path.parts:  # Alembic's scripts, loaded by Alembic
            continue
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def _edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    def resolve(target: str) -> str | None:
        parts = target.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in modules:
                return ".".join(parts[:i])
        return None

    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets: list[str] = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([node.module] if node.module else []))
                targets += [base] + [f"{base}.{a.name}" for a in node.names]
        edges[name] = {r for t in targets if t.startswith("pellucid")
                       if (r := resolve(t)) is not None and r != name}
    return edges


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "(root)"
    for i, layer in enumerate(LAYERS):
        if top in layer:
            return i
    raise AssertionError(f"{module}: its package {top!r} is in no layer of tests/test_layers.py")


def test_every_import_points_down_or_sideways():
    edges = _edges(_modules())
    upward = sorted(f"{a} -> {b}" for a, targets in edges.items() for b in targets
                    if _layer(b) > _layer(a))
    assert upward == [], "imports that point upward:\n" + "\n".join(upward)


def test_no_import_cycles():
    edges = _edges(_modules())
    # the package root re-exports its API lazily; an import of the package itself is not a use of
    # every module below it, so package __init__ files count only for what they import
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert cycles == [], "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_layers_name_every_package():
    for module in _modules():
        _layer(module)
