"""The two registries: one mechanism, normalised look-ups, declarations checked at registration,
the direction declared once; adding a method or a metric is one class (a throw-away explainer that
needs a background set and a throw-away curve metric run through a tiny benchmark and its report,
with no other file touched); the README's counts and the docs come from the registries."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from pellucid.errors import ConfigError
from pellucid.explainers.attribution import InputAttribution
from pellucid.explainers.registry import REGISTRY as METHODS
from pellucid.metrics.base import NEEDS, Context, Metric, MetricResult
from pellucid.metrics.base import REGISTRY as METRICS

ROOT = Path(__file__).resolve().parents[1]


def test_lookups_are_normalised_and_duplicates_refused():
    assert METHODS.get("Grad-CAM").name == "gradcam" and METHODS.get("grad_cam").name == "gradcam"
    assert METRICS.get("Pointing-Game").name == "pointing_game"
    with pytest.raises(ConfigError, match="unknown metric 'pointing'"):
        METRICS.get("pointing")

    @dataclass
    class Twin(Metric):
        name: ClassVar[str] = "pointinggame"  # differs from pointing_game only by an underscore
        category: ClassVar[str] = "localization"
        role: ClassVar[str] = "quality"
        higher_is_better: ClassVar[bool] = True

        def compute(self, ctx):
            raise AssertionError

    with pytest.raises(ValueError, match="registered twice"):
        METRICS.register(Twin)


def test_declarations_are_checked_at_registration():
    @dataclass
    class Vague(Metric):
        name: ClassVar[str] = "vague"
        category: ClassVar[str] = "localization"
        role: ClassVar[str] = "quality"
        higher_is_better: ClassVar[bool] = True
        needs: ClassVar[frozenset[str]] = frozenset({"masks"})  # the vocabulary says "mask"

        def compute(self, ctx):
            raise AssertionError

    with pytest.raises(ValueError, match=r"needs \['masks'\] is not in"):
        METRICS.register(Vague)
    Vague.needs = frozenset({"mask"})
    Vague.higher_is_better = None  # type: ignore[assignment]
    with pytest.raises(ValueError, match="declare higher_is_better"):
        METRICS.register(Vague)
    Vague.higher_is_better = True
    Vague.role = "property"  # a localisation metric is a quality metric: compared and ranked
    with pytest.raises(ValueError, match="a localization metric has role 'quality', not 'property'"):
        METRICS.register(Vague)
    del Vague.role
    with pytest.raises(ValueError, match="declare role, one of"):
        METRICS.register(Vague)
    assert "vague" not in METRICS.names()


def test_every_metric_declares_its_role():
    from pellucid.metrics.base import CATEGORY_ROLES, ROLES

    roles = {name: cls.role for name, cls in METRICS.items()}
    assert set(roles.values()) == set(ROLES)
    for _, cls in METRICS.items():
        assert cls.role == CATEGORY_ROLES[cls.category]
    assert roles["pointing_game"] == "quality" and roles["deletion"] == "quality"
    assert roles["model_randomization"] == "sanity" and roles["random_logit"] == "sanity"
    assert {roles[m] for m in ("sparseness", "complexity", "cost", "max_sensitivity",
                               "local_lipschitz")} == {"property"}


def test_direction_is_declared_once_and_follows_the_options():
    from pellucid.metrics import create

    for name, cls in METRICS.items():
        assert isinstance(cls.higher_is_better, bool), name
        assert set(cls.needs) <= set(NEEDS), name
    assert create("pixel_flipping").is_higher_better() is False
    assert create("pixel_flipping", order="lerf").is_higher_better() is True
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten())
    x = torch.rand(2, 1, 8, 8)
    import pellucid

    exp = pellucid.explain(model, x, "saliency")
    out = pellucid.evaluate(model, x, exp, metrics=[("pixel_flipping", {"order": "lerf",
                                                                         "features_in_step": 16})])
    assert out["pixel_flipping"].higher_is_better is True


# ---------------------------------------------------------------- one class, nothing else touched

@dataclass
class BackgroundDistance(InputAttribution):
    """Throw-away method: |x - mean(background)| (needs a background set, like GradientSHAP)."""

    background: torch.Tensor | None = None
    name: ClassVar[str] = "backgrounddistance"
    family: ClassVar[str] = "perturbation"
    requires: ClassVar[frozenset[str]] = frozenset({"background"})

    def attribute(self, runner, model, inputs, bound, output):
        assert self.background is not None, "the benchmark supplies the background"
        return (inputs - self.background.mean(0, keepdim=True).to(inputs)).abs(), {}


@dataclass
class MassCurve(Metric):
    """Throw-away curve metric: the cumulative share of attribution in the top k% of pixels."""

    points: int = 5
    name: ClassVar[str] = "mass_curve"
    category: ClassVar[str] = "complexity"
    role: ClassVar[str] = "property"
    higher_is_better: ClassVar[bool] = True
    report_curve: ClassVar[str | None] = "fraction of pixels (most relevant first)"
    gallery_rank: ClassVar[int | None] = 100

    def compute(self, ctx: Context) -> MetricResult:
        flat = ctx.attributions.flatten(1).clamp_min(0)
        ranked = flat.sort(1, descending=True).values.cumsum(1)
        share = ranked / ranked[:, -1:].clamp_min(1e-12)
        idx = torch.linspace(0, flat.shape[1] - 1, self.points).round().long()
        curves = share[:, idx]
        return MetricResult(self.name, curves.mean(1), curves=curves)


@pytest.fixture()
def throwaway():
    METHODS.register(BackgroundDistance)
    METRICS.register(MassCurve)
    try:
        yield
    finally:
        METHODS.unregister("backgrounddistance")
        METRICS.unregister("mass_curve")


def test_a_new_method_and_metric_are_one_class_each(throwaway, tmp_path):
    from pellucid.bench import parse_config, run_bench
    from tests.factories import tiny_bench

    raw = tiny_bench(tmp_path, "throwaway", ["backgrounddistance", "saliency"],
                     [{"name": "mass_curve", "options": {"points": 4}}, "sparseness"], cases=2,
                     size=48, n_train=32)
    with pytest.raises(ConfigError, match=r"metrics\[0\].options: metric 'mass_curve' has no option"):
        parse_config({**raw, "metrics": [{"name": "mass_curve", "options": {"pionts": 4}}]}, "t.yaml")
    table = run_bench(parse_config(raw), tmp_path / "run", progress=False)
    mine = table[(table["method"] == "backgrounddistance") & (table["metric"] == "mass_curve")]
    assert len(mine) and mine["value"].notna().all() and (mine["reason"] == "").all()
    assert mine["curve"].map(len).eq(4).all() and mine["higher_is_better"].all()
    html = (tmp_path / "run" / "report.html").read_text()
    assert "backgrounddistance" in html and "Mean curves (mass_curve)" in html


# ---------------------------------------------------------------- the registries drive the docs

def test_readme_counts_and_docs_come_from_the_registries():
    readme = (ROOT / "README.md").read_text()
    stated = re.search(r"Its (\d+) metrics", readme)
    assert stated and int(stated.group(1)) == len(METRICS.names()), "README metric count"
    baselines = [n for n in METHODS.names() if METHODS.get(n).family == "baseline"]
    stated = re.search(r"(\d+) explanation methods", readme)
    assert stated and int(stated.group(1)) == len(METHODS.names()) - len(baselines), \
        "README method count"
    stated = re.search(r"(\d+) trivial baselines", readme)
    assert stated and int(stated.group(1)) == len(baselines), "README baseline count"
    metrics_doc = (ROOT / "docs" / "metrics.md").read_text()
    assert [n for n in METRICS.names() if f"`{n}`" not in metrics_doc] == []
    methods_doc = ((ROOT / "docs" / "cams.md").read_text() + (ROOT / "docs" / "attribution.md")
                   .read_text()).lower()
    assert [n for n in METHODS.names() if n not in methods_doc] == []
    configs = sorted(p.stem for p in (ROOT / "src/pellucid/bench/configs").glob("*.yaml"))
    for name in configs:
        assert f"`{name}`" in readme, f"README does not mention the built-in config {name!r}"


def test_readme_layout_names_every_module_and_package():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    layout = layout[:layout.index("\n## ")] if "\n## " in layout else layout
    top = sorted(p.name for p in (ROOT / "src/pellucid").iterdir()
                 if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").is_file())))
    missing = [n for n in top if f"src/pellucid/{n}" not in layout]
    assert missing == [], f"README layout table misses {missing}"


def test_docs_models_names_every_card_field():
    from dataclasses import fields

    from pellucid.models.card import ModelCard

    doc = (ROOT / "docs" / "models.md").read_text()
    assert [f.name for f in fields(ModelCard) if f"| `{f.name}` |" not in doc] == []
