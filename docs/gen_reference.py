"""Write the catalogue pages of the documentation site from the registries (``make docs`` runs it
before ``mkdocs build``): one section per registered explanation method and per metric, each
rendered by mkdocstrings from the class's docstring (its formula and source paper), with what the
registry knows (family or category, role, direction, whether a layer is needed) and what
``benchmarks/catalogue.py`` measured (docs/catalogue.json): the peer each equals with the largest
measured difference, and the cost class. A registered name missing from the measurements stops
the build."""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).parent / "reference"
MEASURED = Path(__file__).parent / "catalogue.json"


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


def load_measured(names: list[str]) -> dict:
    measured = json.loads(MEASURED.read_text())
    missing = [n for n in names if n not in measured["peers"] and n not in measured["no_peer"]]
    if missing:
        raise SystemExit(f"{MEASURED.name} has no measurement for {', '.join(missing)}: run "
                         "benchmarks/catalogue.py")
    return measured


def equals(measured: dict, name: str) -> str:
    """The peers a name equals, each with its largest measured difference (or smallest
    correlation) and the number of cases; or how it is checked when no peer has it."""
    if name not in measured["peers"]:
        return f"no peer: {measured['no_peer'][name]}"
    cells = []
    for p in measured["peers"][name]:
        value = (f"max rel. difference {p['value']:.1e}" if p["measure"] == "difference"
                 else f"correlation {p['value']:.3f} (other random draws)")
        cases = f"{p['cases']} case{'s' if p['cases'] > 1 else ''}"
        cells.append(f"{p['peer']}: {value}, {cases}")
    return "<br>".join(cells)


def methods() -> str:
    from pellucid.explainers.registry import REGISTRY

    m = load_measured(REGISTRY.names())
    cost = m["method_costs"]
    return catalogue(REGISTRY, "Explanation methods",
                     "Every method registered in `pellucid.explainers` (generated from the registry "
                     "by `docs/gen_reference.py`). *Equals*: the peer each method equals and the "
                     "largest difference the oracle tests measured, max \\|ours - peer\\| / "
                     "max \\|peer\\| over every case (`benchmarks/catalogue.py` runs them; "
                     f"measured {m['measured']}, {m['machine']}). *Cost*: the model rows one "
                     "explanation evaluates per image at the method's defaults, and its time as a "
                     "multiple of one forward + backward, on a random-init ResNet-18 at 64 px "
                     "(attention methods: a 2-block ViT at 32 px); the class is the rows' order of "
                     "magnitude (one pass: at most 2, a few: at most 9, tens: at most 99). The "
                     "speed against each peer is in [Measured against the peers](../measured.md).",
                     {"family": lambda c: c.family, "needs a layer": lambda c: yes(c.needs_layer),
                      "equals": lambda c: equals(m, c.name),
                      "cost class": lambda c: cost[c.name]["class"],
                      "rows / image": lambda c: f"{cost[c.name]['rows']:.0f}",
                      "time (x fwd+bwd)": lambda c: f"{cost[c.name]['time']:.1f}"})


def metrics() -> str:
    from pellucid.metrics.base import REGISTRY

    m = load_measured(REGISTRY.names())
    cost = m["metric_costs"]
    return catalogue(REGISTRY, "Metrics",
                     "Every metric registered in `pellucid.metrics` (generated from the registry by "
                     "`docs/gen_reference.py`). Role: *quality* metrics rank methods and get "
                     "verdicts, *sanity* checks get a pass rate, *property* metrics are reported "
                     "only. *Equals*: the peer each metric equals and the largest relative "
                     "difference the oracle tests measured (`benchmarks/catalogue.py`; measured "
                     f"{m['measured']}, {m['machine']}). *Cost*: the time of one evaluation of a "
                     "Grad-CAM map of one 64 px image as a multiple of one forward of the "
                     "random-init ResNet-18 that made it (metrics that re-explain include the "
                     "Grad-CAM runs); the class reads that multiple as model passes.",
                     {"category": lambda c: c.category, "role": lambda c: c.role,
                      "higher is better": lambda c: yes(c.higher_is_better),
                      "equals": lambda c: equals(m, c.name),
                      "cost class": lambda c: cost[c.name]["class"],
                      "time (x fwd)": lambda c: f"{cost[c.name]['time']:.1f}"})


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
