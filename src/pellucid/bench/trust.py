"""Which quality metrics can be trusted on a task: two criteria of MetaQuantus (Hedström et al.,
"The meta-evaluation problem in explainable AI", TMLR 2023), computed on the task's own model,
cases and methods.

For each quality metric and every compared method m, on the first ``cases`` (case, target) pairs:

- q[m]: the metric's scores of the trained model's maps;
- q_nr[m] (input resilience, a minor perturbation): the inputs plus Gaussian noise of ``noise``
  times their standard deviation, re-explained and re-scored; only the pairs whose prediction does
  not change count (classification: the arg-max class; segmentation and regression: every pair);
- q_ar[m] (model adversary, a disruptive perturbation): a copy of the model with every layer
  re-initialised (``reset_parameters`` after a seed), re-explained and re-scored with that copy;
  only the pairs whose prediction changes count (segmentation and regression: every pair).

From these, as MetaQuantus defines them:

- IAC_NR: the mean over methods of the two-sided Wilcoxon signed-rank p of q against q_nr (zero
  differences split, ``zsplit``): high when small noise leaves the scores alone;
- IAC_AR: the mean over methods of 1 - p of q against q_ar: high when randomising the model
  changes the scores;
- IEC_NR: the share of the methods' rank positions (the arg-sort over methods, per pair) that the
  noise leaves unchanged: does the metric rank the methods stably;
- IEC_AR: the share of (method, pair) whose trained-model map scores better than the randomised
  model's: does the metric tell the trained model's maps from the randomised model's;
- MC: the mean of the four (MetaQuantus' meta-consistency).

A metric ``separates`` when IEC_AR > 0.5 (better than a metric blind to the model, which scores
the two maps alike) and is ``stable`` when IEC_NR >= 0.5 (most rank positions survive noise that
leaves the prediction); ``trusted`` is True when both hold, False when either fails, and None
when a criterion had no pair to decide on (no prediction changed under randomisation, or a
black-box model that cannot be randomised): the check then cannot tell. A metric that fails is
marked on the report's first screen and its verdicts carry the mark. ``perturbations`` noise draws
and randomised copies are averaged, as MetaQuantus averages its K perturbations.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import numpy as np
import torch
from scipy import stats as sps

SEPARATES_ABOVE = 0.5  # IEC_AR
STABLE_FROM = 0.5  # IEC_NR


@dataclasses.dataclass
class TrustSettings:
    """How much work the check does: ``cases`` pairs, ``noise`` (a fraction of the inputs'
    standard deviation), ``perturbations`` draws of each perturbation, ``seed``."""

    cases: int = 8
    noise: float = 0.01
    perturbations: int = 1
    seed: int = 0


def iac(q: np.ndarray, q_hat: np.ndarray, keep: np.ndarray, adversary: bool) -> float:
    """The intra-consistency of one method: the two-sided Wilcoxon signed-rank p of q against
    q_hat over the kept pairs (zero differences split), or 1 - p for an adversary test; a test that
    cannot run (no pair, every difference zero under scipy's rules) counts p = 0, as MetaQuantus."""
    a, b = np.asarray(q, float)[keep], np.asarray(q_hat, float)[keep]
    try:
        p = float(sps.wilcoxon(a, b, alternative="two-sided", zero_method="zsplit")[1])
    except ValueError:
        p = 0.0
    return 1 - p if adversary else p


def iec_adversary(q_star: np.ndarray, q_hat: np.ndarray, keep: np.ndarray,
                  higher_is_better: bool) -> float:
    """Share of (method, kept pair) whose unperturbed score is better than the perturbed one."""
    a, b = q_star[:, keep], q_hat[:, keep]
    better = a > b if higher_is_better else a < b
    return float(better.mean()) if better.size else float("nan")


def iec_resilience(q_star: np.ndarray, q_hat: np.ndarray, keep: np.ndarray) -> float:
    """Share of the methods' rank positions (arg-sort over methods, per kept pair) unchanged."""
    r_star, r_hat = np.argsort(q_star, axis=0), np.argsort(q_hat, axis=0)
    same = (r_star == r_hat)[:, keep]
    return float(same.mean()) if same.size else float("nan")


def consistency(q: dict[str, np.ndarray], q_nr: list[dict[str, np.ndarray]], keep_nr: list[np.ndarray],
                q_ar: list[dict[str, np.ndarray]], keep_ar: list[np.ndarray],
                higher_is_better: bool) -> dict[str, Any]:
    """IAC_NR, IAC_AR, IEC_NR, IEC_AR, MC and the verdicts from the scores (per method, pairs) of
    the unperturbed maps and of each draw of the two perturbations (module docstring)."""
    methods = sorted(q)
    star = np.stack([q[m] for m in methods])
    out: dict[str, Any] = {"methods": methods}
    for name, draws, keeps, adversary in (("NR", q_nr, keep_nr, False), ("AR", q_ar, keep_ar, True)):
        if not draws:
            out[f"IAC_{name}"] = out[f"IEC_{name}"] = float("nan")
            continue
        intra = [np.mean([iac(q[m], d[m], k, adversary) for m in methods])
                 for d, k in zip(draws, keeps, strict=True) if k.any()]
        inter = []
        for d, k in zip(draws, keeps, strict=True):
            if not k.any():
                continue
            hat = np.stack([d[m] for m in methods])
            inter.append(iec_adversary(star, hat, k, higher_is_better) if adversary
                         else iec_resilience(star, hat, k))
        out[f"IAC_{name}"] = float(np.mean(intra)) if intra else float("nan")
        out[f"IEC_{name}"] = float(np.mean(inter)) if inter else float("nan")
        out[f"pairs_{name}"] = int(sum(int(k.sum()) for k in keeps))
    parts = [out[k] for k in ("IAC_NR", "IAC_AR", "IEC_NR", "IEC_AR")]
    out["MC"] = float(np.mean(parts)) if not any(np.isnan(parts)) else float("nan")
    out["separates"] = bool(out["IEC_AR"] > SEPARATES_ABOVE) if not np.isnan(out["IEC_AR"]) else None
    out["stable"] = bool(out["IEC_NR"] >= STABLE_FROM) if not np.isnan(out["IEC_NR"]) else None
    verdicts = (out["separates"], out["stable"])
    out["trusted"] = False if False in verdicts else None if None in verdicts else True
    return out


def randomised_copy(loaded, seed: int):
    """A copy of the loaded model whose every layer with ``reset_parameters`` is re-initialised
    (drawn on the CPU after ``seed``: the same weights on any device)."""
    from pellucid.metrics.randomization import reset_as_on_cpu

    other = copy.deepcopy(loaded)
    for i, module in enumerate(m for m in other.module.modules() if hasattr(m, "reset_parameters")):
        reset_as_on_cpu(module, seed + i)
    other.module.pellucid_throwaway = True  # a bench run pins it to torch (no export per copy)
    return other


def _predicted(loaded, x: torch.Tensor, classification: bool) -> np.ndarray | None:
    """The arg-max class of each input (None for segmentation and regression: every pair counts)."""
    if not classification:
        return None
    from pellucid.models.outputs import forward_tensor

    with torch.no_grad():
        out = forward_tensor(loaded.module, x)
    return out.reshape(out.shape[0], -1).argmax(1).cpu().numpy()


def metric_trust(units: list, loaded, metrics: list, settings: TrustSettings,
                 progress=None) -> dict[str, dict[str, Any]]:
    """{quality metric label: its consistency record} for the task whose ``units`` (one per
    compared method, all on the same first pairs) are given; ``metrics`` the task's quality metric
    entries. A metric that does not apply to these units, or fails on them, is left out."""
    import pellucid
    from pellucid.bench.units import _applicable, explain_unit
    from pellucid.errors import PellucidError
    from pellucid.metrics import create
    from pellucid.models.blackbox import is_forward_only

    if not units:
        return {}
    from pellucid.progress import quiet

    classification = loaded.card is not None and loaded.card.task == "classification"
    x = units[0].x
    generator = torch.Generator().manual_seed(settings.seed)
    sd = float(x.float().std())
    noisy = [x + settings.noise * sd * torch.randn(x.shape, generator=generator).to(x)
             for _ in range(settings.perturbations)]
    clean_pred = _predicted(loaded, x, classification)
    keep_nr = []
    for xn in noisy:
        pred = _predicted(loaded, xn, classification)
        keep_nr.append(np.ones(len(x), bool) if pred is None else pred == clean_pred)
    copies, keep_ar = [], []
    if not is_forward_only(loaded.module):
        for k in range(settings.perturbations):
            other = randomised_copy(loaded, settings.seed + 1000 * (k + 1))
            copies.append(other)
            pred = _predicted(other, x, classification)
            keep_ar.append(np.ones(len(x), bool) if pred is None else pred != clean_pred)
    scores: dict[str, dict[str, list]] = {}
    skipped: set[str] = set()
    for unit in units:
        # the clean maps may come from the benchmark's explanation cache; the perturbed ones never
        # (the cache's identity names the cases and the model, not the noise or the weights)
        fresh = dataclasses.replace(unit, cache_dir=None)
        runs = [("clean", unit, loaded)]
        runs += [("nr", dataclasses.replace(fresh, x=xn), loaded) for xn in noisy]
        runs += [("ar", fresh, other) for other in copies]
        for kind, run_unit, model in runs:
            try:
                with quiet(kind != "clean"):  # LRP's conservation of a randomised copy, etc.
                    explanation = explain_unit(run_unit, model)
            except PellucidError:
                skipped.add(unit.method.label)
                break
            for metric in metrics:
                if _applicable(unit, metric):
                    continue
                try:
                    result = pellucid.evaluate(model, run_unit.x, explanation,
                                               metrics=[(metric.name, metric.options)],
                                               masks=unit.masks, boxes=unit.boxes)[metric.name]
                except PellucidError:
                    scores.setdefault(metric.label, {}).setdefault("failed", []).append(1)
                    continue
                entry = scores.setdefault(metric.label, {}).setdefault(unit.method.label, {})
                entry.setdefault(kind, []).append(result.scores.detach().float().cpu().numpy())
            if progress is not None:
                progress()
    out = {}
    for metric in metrics:
        per = scores.get(metric.label, {})
        methods = [m for m in per if m != "failed" and m not in skipped and "clean" in per[m]
                   and len(per[m].get("nr", [])) == len(noisy)
                   and len(per[m].get("ar", [])) == len(copies)]
        if len(methods) < 2:
            continue
        q = {m: per[m]["clean"][0] for m in methods}
        valid = np.all([~np.isnan(v) for v in q.values()], axis=0)
        for m in methods:
            for kind in ("nr", "ar"):
                for v in per[m].get(kind, []):
                    valid &= ~np.isnan(v)
        if not valid.any():
            continue
        higher = create(metric.name, **metric.options).is_higher_better()
        record = consistency({m: q[m][valid] for m in methods},
                             [{m: per[m]["nr"][i][valid] for m in methods} for i in range(len(noisy))],
                             [k[valid] for k in keep_nr],
                             [{m: per[m]["ar"][i][valid] for m in methods} for i in range(len(copies))],
                             [k[valid] for k in keep_ar], higher)
        record["pairs"] = int(valid.sum())
        out[metric.label] = record
    return out
