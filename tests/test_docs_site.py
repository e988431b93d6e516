"""The documentation site builds in MkDocs' strict mode (a broken link, a missing page or an
unresolved API reference fails), its catalogue lists every registered method and metric, and every
public symbol it documents has a docstring."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.docs

PUBLIC = ["pellucid", "pellucid.models", "pellucid.bench", "pellucid.explainers", "pellucid.data",
          "pellucid.metrics"]


def test_every_public_symbol_has_a_docstring():
    import importlib

    missing = []
    for name in PUBLIC:
        module = importlib.import_module(name)
        for symbol in getattr(module, "__all__", []):
            obj = getattr(module, symbol)
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and not inspect.getdoc(obj):
                missing.append(f"{name}.{symbol}")
    from pellucid.explainers.registry import REGISTRY as METHODS
    from pellucid.metrics.base import REGISTRY as METRICS

    for registry in (METHODS, METRICS):
        for key in registry.names():
            if not (registry.get(key).__doc__ or "").strip():
                missing.append(key)
    assert not missing, missing


def test_the_site_builds_strictly_with_the_catalogue_and_the_api(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "docs" / "gen_reference.py")], check=True, cwd=ROOT)
    site = tmp_path / "site"
    proc = subprocess.run([str(Path(sys.executable).parent / "mkdocs"), "build", "--strict",
                           "--site-dir", str(site)], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, NO_MKDOCS_2_WARNING="1"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    api = (site / "reference" / "api" / "index.html").read_text()
    for anchor in ("pellucid.explain", "pellucid.evaluate", "pellucid.io.reading.read",
                   "pellucid.bench.run_bench"):
        assert f'id="{anchor}"' in api, anchor
    # docstrings' Sphinx roles become code (linked where the name is documented), never raw text
    assert ":func:" not in api and ":class:" not in api
    assert 'class="autorefs autorefs-internal"' in api
    import pellucid.explainers
    import pellucid.metrics  # noqa: F401
    from pellucid.explainers.registry import REGISTRY as METHODS
    from pellucid.metrics.base import REGISTRY as METRICS

    methods = (site / "reference" / "methods" / "index.html").read_text()
    metrics = (site / "reference" / "metrics" / "index.html").read_text()
    assert all(f'id="{m}"' in methods for m in METHODS.names())
    assert all(f'id="{m}"' in metrics for m in METRICS.names())


def test_the_catalogue_states_each_peer_and_cost_from_the_measurements():
    """docs/catalogue.json (benchmarks/catalogue.py) covers every registered name, and the
    generated pages carry its peer, difference and cost class."""
    import json

    import pellucid.explainers
    import pellucid.metrics  # noqa: F401
    from pellucid.explainers.registry import REGISTRY as METHODS
    from pellucid.metrics.base import REGISTRY as METRICS

    subprocess.run([sys.executable, str(ROOT / "docs" / "gen_reference.py")], check=True, cwd=ROOT)
    measured = json.loads((ROOT / "docs" / "catalogue.json").read_text())
    for name in METHODS.names() + METRICS.names():
        assert name in measured["peers"] or name in measured["no_peer"], name
    for name in METHODS.names():
        assert measured["method_costs"][name]["class"] in ("none", "one pass", "a few", "tens",
                                                           "hundreds", "thousands"), name
    page = (ROOT / "docs" / "reference" / "methods.md").read_text()
    row = next(line for line in page.splitlines() if line.startswith("| `gradcam` |"))
    worst = max(p["value"] for p in measured["peers"]["gradcam"])
    assert "pytorch-grad-cam" in row and f"{worst:.1e}" in row and "| one pass |" in row
    assert worst <= 1e-4  # the oracle tests' tolerance
    assert "| thousands |" in next(line for line in page.splitlines() if line.startswith("| `rise` |"))
    metrics_page = (ROOT / "docs" / "reference" / "metrics.md").read_text()
    assert "quantus" in next(line for line in metrics_page.splitlines()
                             if line.startswith("| `pointing_game` |"))
