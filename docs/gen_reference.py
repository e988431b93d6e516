"""Write the catalogue pages of the documentation site from the registries (``make docs`` runs it
before ``mkdocs build``): one section per registered explanation method and per metric, each
rendered by mkdocstrings from the class's docstring (its formula and source paper), with what the
registry knows: family or category, role, direction, whether a layer is needed."""

from __future__ import annotations

import sys
from pathlib import Path

OUT = Path(__file__).parent / "reference"


def catalogue(registry, title: str, intro: str, columns: dict[str, object]) -> str:
    """A page: a table of every registered name with ``columns`` (header -> function of the
    class), then one section per name rendered by mkdocstrings from its class docstring."""
    names = registry.names()
    lines = [f"# {title}", "", intro, "",
             "| " + " | ".join(["name", *columns, "class"]) + " |",
             "|" + "---|" * (len(columns) + 2)]
    for name in names:
        cls = registry.get(name)
        cells = [str(f(cls)) for f in columns.values()]
        lines.append("| " + " | ".join([f"`{name}`", *cells, f"[`{cls.__name__}`](#{name})"]) + " |")
    for name in names:
        cls = registry.get(name)
        lines += ["", f"## {name}", "", f"::: {cls.__module__}.{cls.__qualname__}",
                  "    options:", "      show_root_heading: false", "      members: false",
                  "      show_bases: false", ""]
    return "\n".join(lines) + "\n"


def yes(flag: bool) -> str:
    return "yes" if flag else "no"


def methods() -> str:
    from pellucid.explainers.registry import REGISTRY

    return catalogue(REGISTRY, "Explanation methods",
                     "Every method registered in `pellucid.explainers` (generated from the registry "
                     "by `docs/gen_reference.py`). The peers each equals, and the measured "
                     "differences, are in [Measured against the peers](../measured.md).",
                     {"family": lambda c: c.family, "needs a layer": lambda c: yes(c.needs_layer)})


def metrics() -> str:
    from pellucid.metrics.base import REGISTRY

    return catalogue(REGISTRY, "Metrics",
                     "Every metric registered in `pellucid.metrics` (generated from the registry by "
                     "`docs/gen_reference.py`). Role: *quality* metrics rank methods and get "
                     "verdicts, *sanity* checks get a pass rate, *property* metrics are reported "
                     "only.",
                     {"category": lambda c: c.category, "role": lambda c: c.role,
                      "higher is better": lambda c: yes(c.higher_is_better)})


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import pellucid.explainers
    import pellucid.metrics  # noqa: F401 - registers the metrics

    OUT.mkdir(exist_ok=True)
    (OUT / "methods.md").write_text(methods())
    (OUT / "metrics.md").write_text(metrics())
    measured = (Path(__file__).resolve().parents[1] / "benchmarks" / "README.md").read_text()
    (Path(__file__).parent / "measured.md").write_text(
        measured.replace("# Benchmarks", "# Measured against the peers", 1)
        + "\n\n(This page is `benchmarks/README.md`, copied by `docs/gen_reference.py`.)\n")


if __name__ == "__main__":
    main()
