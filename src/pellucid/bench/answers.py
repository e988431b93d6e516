"""What a benchmark run answers, computed once for every place that states it: the report, the
explanation cards and the SR evidence (``pellucid explain --evidence``) read the same verdicts,
with the run's own verdict settings (run.json ``verdict``) and each verdict's metric check
(metric_trust.json), so that no two outputs of one run can say different things."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

import pellucid.bench.stats as stats
from pellucid.progress import warn


def trust_file(folder: Path) -> dict[str, Any]:
    """The per-task records of ``folder/metric_trust.json`` ({} when the run has none)."""
    tasks = side_file(folder / "metric_trust.json").get("tasks", {})
    return tasks if isinstance(tasks, dict) else {}


def side_file(path: Path) -> dict[str, Any]:
    """A JSON object beside the results ({} with a warning when it is missing parts or broken)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        warn(f"{path.name} unreadable ({type(exc).__name__}); its section is left out")
        return {}
    if not isinstance(data, dict):
        warn(f"{path.name} does not hold an object; its section is left out")
        return {}
    return data


def verdict_settings(run: dict[str, Any]) -> tuple[float, float | dict[str, float] | None]:
    """(alpha, min_effect) recorded in run.json; a value a configuration could not have given
    (the configuration is checked up front) is named in one warning and the default used."""
    given = run.get("verdict")
    if not isinstance(given, dict):
        return stats.ALPHA, None
    alpha, effect = given.get("alpha", stats.ALPHA), given.get("min_effect")

    def number(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0

    if not (number(alpha) and 0 < alpha <= 0.5):
        warn(f"run.json verdict.alpha {alpha!r} is not in (0, 0.5]; {stats.ALPHA} is used")
        alpha = stats.ALPHA
    if effect is not None and not number(effect) and not (
            isinstance(effect, dict) and all(number(v) for v in effect.values())):
        warn(f"run.json verdict.min_effect {effect!r} is not a number >= 0 or one per metric; "
             f"0 is used")
        effect = None
    return float(alpha), effect


def task_trust(trust: Any, key: str) -> dict[str, dict]:
    """{quality metric: its check record} of one "model|dataset" task ({} when not checked)."""
    part = trust.get(key) if isinstance(trust, dict) else None
    metrics = part.get("metrics") if isinstance(part, dict) else None
    if not isinstance(metrics, dict):
        return {}
    return {m: v for m, v in metrics.items() if isinstance(v, dict)}


def verdict_table(frame: pd.DataFrame, settings: tuple[float, Any], trust: dict[str, Any]
                  ) -> pd.DataFrame:
    """``stats.against_baselines`` with the run's ``verdict_settings``, each row carrying its
    metric's check (``metric_trusted``: True, False, or None when not checked or not decidable)."""
    alpha, effect = settings
    versus = stats.against_baselines(frame, alpha=alpha, min_effect=effect)
    if not versus.empty:
        versus["metric_trusted"] = [
            task_trust(trust, f"{r.model}|{r.dataset}").get(r.metric, {}).get("trusted")
            for r in versus.itertuples()]
    return versus


@dataclass
class Answers:
    """Every statistic the report, the cards and the evidence state, for one run."""

    summary: pd.DataFrame
    costq: pd.DataFrame
    versus: pd.DataFrame
    baselines: set[str]
    recommendations: list[dict]
    counts: dict[tuple[str, str], dict[str, int]]
    chance: dict[str, list[str]]
    trust: dict[str, Any]
    run: dict[str, Any]
    performance: dict[str, Any]
    settings: tuple[float, Any]  # (alpha, min_effect) of the verdicts

    def task(self, dataset: str, model: str) -> dict[str, Any]:
        """The parts of one task: its verdicts, recommendation, counts, checks and warnings."""
        key = f"{model}|{dataset}"
        versus = self.versus[(self.versus["dataset"] == dataset) & (self.versus["model"] == model)] \
            if not self.versus.empty else pd.DataFrame()
        checks = task_trust(self.trust, key)
        return {"versus": versus,
                "recommendation": next((r for r in self.recommendations
                                        if r["dataset"] == dataset and r["model"] == model), None),
                "counts": self.counts.get((dataset, model), {"cases": 0, "pairs": 0}),
                "checks": checks,
                "untrusted": {m: t for m, t in checks.items() if t.get("trusted") is False},
                "chance": self.chance.get(key, [])}


def answers(folder: Path, frame: pd.DataFrame) -> Answers:
    """The answers of the run in ``folder`` whose result table is ``frame``."""
    from pellucid.models.performance import chance_warnings_by_task

    run = side_file(folder / "run.json")
    perf = side_file(folder / "performance.json")
    trust = trust_file(folder)
    summ = stats.summary(frame)
    costq = stats.cost_quality(frame, stats.ranks(summ))
    settings = verdict_settings(run)
    versus = verdict_table(frame, settings, trust)
    baselines = stats.baseline_methods(frame)
    try:
        chance = chance_warnings_by_task(perf)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        warn(f"performance.json has unexpected content ({type(exc).__name__}); no near-chance check")
        chance = {}
    return Answers(summ, costq, versus, baselines,
                   stats.recommendations(costq, versus=versus, baselines=baselines),
                   stats.case_counts(frame), chance, trust, run, perf, settings)
