"""Statistics of a benchmark table: per task (dataset x model), method and metric.

- ``summary``: n, mean, median and a 95 % percentile-bootstrap interval of the mean (1000
  resamples, seeded) over the (case, target) rows with a value.
- ``ranks``: per task and metric, methods ranked by their mean (1 = best, the metric's direction;
  ties share the average rank); ``average_rank`` is the mean over metrics (Demsar 2006).
- ``friedman``: per task and metric, the Friedman test over the (case, target) blocks that every
  method scored, and the post-hoc Wilcoxon signed-rank tests of every method against the best
  (control) method with Holm's correction (Demsar 2006; Benavoli et al. 2016 advise such
  paired tests over mean-rank post-hocs).
- ``cost_quality``: per task and method, seconds per case against the average rank; the methods on
  the Pareto front (no other method is both cheaper and better ranked).
- ``against_baselines``: per task, quality metric and method, the verdict against the best trivial
  baseline (random map, centre prior, edges, training prior; explainers/baselines.py): ``better``,
  ``not_better`` or ``undetermined`` (``verdict`` below), from a one-sided Wilcoxon signed-rank
  test over the paired (case, target) blocks, Holm-corrected over the methods of that task and
  metric, and the 95 % bootstrap interval of the mean paired difference.

Only ``quality`` metrics (faithfulness, localisation; metrics/base.py ``ROLES``) are compared with
the baselines and ranked; ``sanity`` metrics pass or fail by their own criterion and ``property``
metrics (robustness, complexity, cost) are reported beside them, never "beaten": a constant map is
perfectly robust and costs nothing.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from scipy import stats as sps

TASK = ["dataset", "model"]
ALPHA = 0.05
VERDICTS = ("better", "not_better", "undetermined")


def metric_roles(frame: pd.DataFrame) -> dict[str, str]:
    """{metric label of the table: its role}. The registry's declaration for a known metric
    (``metric_name``), else the role of its category; a label of neither is a property (it is
    never compared)."""
    import pellucid.metrics  # noqa: F401 - registers the metrics
    from pellucid.metrics.base import CATEGORY_ROLES, REGISTRY

    names = set(REGISTRY.names())
    out: dict[str, str] = {}
    cols = [c for c in ("metric", "metric_name", "category") if c in frame]
    for row in frame[cols].drop_duplicates().itertuples(index=False):
        info = dict(zip(cols, row, strict=True))
        name = info.get("metric_name") or info["metric"]
        if name in names:
            out[info["metric"]] = REGISTRY.get(name).role
        else:
            out[info["metric"]] = CATEGORY_ROLES.get(info.get("category"), "property")
    return out


def with_role(frame: pd.DataFrame, role: str) -> pd.DataFrame:
    """The rows of ``frame`` whose metric has ``role``."""
    if frame.empty:
        return frame
    roles = metric_roles(frame)
    return frame[frame["metric"].map(roles) == role]


def case_counts(frame: pd.DataFrame) -> dict[tuple[str, str], dict[str, int]]:
    """Per task: the cases explained and the (case, target) pairs scored."""
    out = {}
    for key, part in frame.groupby(TASK, sort=True):
        out[key] = {"cases": int(part["case_id"].nunique()),
                    "pairs": int(part[["case_id", "target"]].drop_duplicates().shape[0])}
    return out


def _valid(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["value"].notna()]


def bootstrap_mean_ci(values: np.ndarray, resamples: int = 1000, seed: int = 0,
                      level: float = 0.95) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean (the one CheXlocalize's metric reports)."""
    from pellucid.bootstrap import bootstrap_ci

    return bootstrap_ci(torch.tensor(np.array(values, dtype=np.float64)), resamples, level, seed)


def summary(frame: pd.DataFrame, by: list[str] | None = None, seed: int = 0) -> pd.DataFrame:
    """One row per task x method x metric (x ``by`` extra keys such as ``target``)."""
    keys = TASK + (by or []) + ["method", "metric"]
    rows = []
    for key, group in _valid(frame).groupby(keys, sort=True):
        v = group["value"].to_numpy(dtype=float)
        lo, hi = bootstrap_mean_ci(v, seed=seed)
        rows.append(dict(zip(keys, key, strict=True), n=len(v), mean=float(v.mean()),
                         median=float(np.median(v)), ci_low=lo, ci_high=hi,
                         higher_is_better=bool(group["higher_is_better"].iloc[0]),
                         category=group["category"].iloc[0],
                         explain_seconds=float(group["explain_seconds"].mean())))
    return pd.DataFrame(rows)


def ranks(summ: pd.DataFrame) -> pd.DataFrame:
    """Rank of every method per task and quality metric, and the average rank per task and method
    (property and sanity metrics are no part of a quality ranking)."""
    out = []
    for key, group in with_role(summ, "quality").groupby([*TASK, "metric"], sort=True):
        higher = bool(group["higher_is_better"].iloc[0])
        r = group["mean"].rank(ascending=not higher, method="average")
        for method, rank in zip(group["method"], r, strict=True):
            out.append(dict(zip([*TASK, "metric"], key, strict=True), method=method, rank=float(rank)))
    frame = pd.DataFrame(out)
    if frame.empty:  # no quality metric: nothing is ranked
        return pd.DataFrame(columns=[*TASK, "method", "average_rank", "metrics"])
    avg = frame.groupby([*TASK, "method"], as_index=False).agg(average_rank=("rank", "mean"),
                                                              metrics=("rank", "size"))
    return avg.sort_values([*TASK, "average_rank"]).reset_index(drop=True)


def holm(pvalues: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone)."""
    p = np.asarray(pvalues, dtype=float)
    order = np.argsort(p)
    adjusted = np.empty_like(p)
    running = 0.0
    for i, idx in enumerate(order):
        running = max(running, min(1.0, (len(p) - i) * p[idx]))
        adjusted[idx] = running
    return adjusted.tolist()


def friedman(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(Friedman per task and metric, post-hoc per task, metric and method).

    The post-hoc compares every method with the control, the method of best mean rank on that
    metric, by the Wilcoxon signed-rank test with Holm's correction over the k - 1 comparisons
    (Demsar 2006, comparisons with a control)."""
    tests, pairs = [], []
    keys = [*TASK, "metric"]
    for key, group in with_role(_valid(frame), "quality").groupby(keys, sort=True):
        wide = group.pivot_table(index=["case_id", "target"], columns="method", values="value")
        wide = wide.dropna()
        methods = list(wide.columns)
        info = dict(zip(keys, key, strict=True), methods=len(methods), blocks=len(wide))
        if len(methods) < 3 or len(wide) < 2:
            tests.append(info | {"statistic": float("nan"), "p_value": float("nan"), "control": ""})
            continue
        values = wide.to_numpy()
        higher = bool(group["higher_is_better"].iloc[0])
        mean_rank = pd.DataFrame(values).rank(axis=1, ascending=not higher).mean(0).to_numpy()
        control = methods[int(np.argmin(mean_rank))]
        if np.allclose(np.ptp(values, axis=1), 0):
            tests.append(info | {"statistic": 0.0, "p_value": 1.0, "control": control})
            continue
        stat, p = sps.friedmanchisquare(*values.T)
        tests.append(info | {"statistic": float(stat), "p_value": float(p), "control": control})
        others = [m for m in methods if m != control]
        raw = []
        for m in others:
            d = wide[m] - wide[control]
            raw.append(1.0 if np.allclose(d, 0) else signed_rank_p(wide[m].to_numpy()
                                                                   - wide[control].to_numpy()))
        for m, pv, adj in zip(others, raw, holm(raw), strict=True):
            pairs.append(dict(zip(keys, key, strict=True), method=m, control=control,
                              median_difference=float((wide[m] - wide[control]).median()),
                              p_value=pv, p_holm=adj))
    return pd.DataFrame(tests), pd.DataFrame(pairs)


def cost_quality(frame: pd.DataFrame, avg_ranks: pd.DataFrame) -> pd.DataFrame:
    """Seconds per case and average rank per task and method, with the Pareto front marked."""
    cost = frame.groupby([*TASK, "method"], as_index=False).agg(
        seconds_per_case=("explain_seconds", "mean"), forwards_per_case=("forwards_per_case", "mean"))
    merged = cost.merge(avg_ranks, on=[*TASK, "method"], how="left")
    front = []
    for _, row in merged.iterrows():
        same = merged[(merged["dataset"] == row["dataset"]) & (merged["model"] == row["model"])]
        dominated = ((same["seconds_per_case"] <= row["seconds_per_case"])
                     & (same["average_rank"] <= row["average_rank"])
                     & ((same["seconds_per_case"] < row["seconds_per_case"])
                        | (same["average_rank"] < row["average_rank"]))).any()
        front.append(not dominated)
    merged["pareto"] = front
    return merged.sort_values([*TASK, "average_rank"]).reset_index(drop=True)


BUDGETS = (0.05, 0.5, 5.0)  # seconds per case


def recommendations(costq: pd.DataFrame, budgets: tuple[float, ...] = BUDGETS,
                    versus: pd.DataFrame | None = None, baselines: frozenset[str] | set[str] = frozenset()
                    ) -> list[dict]:
    """Per task: the method shown better than the best baseline on the most quality metrics, ties
    broken by the best average quality rank, overall and within each cost budget (cost is the
    budget, never part of the rank); a baseline is never recommended. ``verdicts`` counts the
    recommended method's verdicts against the best baseline over the quality metrics and
    ``caveats`` names the metrics on which it is not shown better (``versus``:
    ``against_baselines``)."""
    out = []
    for (dataset, model), group in costq.groupby(TASK, sort=True):
        group = group[~group["method"].isin(baselines)].dropna(subset=["average_rank"])
        if group.empty:
            continue
        group = group.assign(better=[_better_count(versus, dataset, model, m) for m in group["method"]])
        order = ["better", "average_rank", "seconds_per_case"]
        best = group.sort_values(order, ascending=[False, True, True]).iloc[0]
        rec = {"dataset": dataset, "model": model, "best": best["method"],
               "best_rank": float(best["average_rank"]),
               "best_seconds": float(best["seconds_per_case"]), "budgets": []}
        for budget in budgets:
            within = group[group["seconds_per_case"] <= budget]
            if within.empty:
                continue
            top = within.sort_values(order, ascending=[False, True, True]).iloc[0]
            rec["budgets"].append({"budget": budget, "method": top["method"],
                                   "rank": float(top["average_rank"]),
                                   "seconds": float(top["seconds_per_case"]),
                                   "better": int(top["better"])})
        rec["caveats"], rec["verdicts"] = [], {v: 0 for v in VERDICTS}
        if versus is not None and not versus.empty:
            mine = versus[(versus["dataset"] == dataset) & (versus["model"] == model)
                          & (versus["method"] == best["method"])]
            for r in mine.itertuples():
                rec["verdicts"][r.verdict] += 1
                if r.verdict != "better":
                    rec["caveats"].append(
                        f"{r.metric} ({r.verdict.replace('_', ' ')}: the {r.baseline} baseline "
                        f"scores {r.baseline_mean:.3g}, {best['method']} {r.mean:.3g}; Holm p "
                        f"{r.p_holm:.2g})")
        out.append(rec)
    return out


def _better_count(versus: pd.DataFrame | None, dataset: str, model: str, method: str) -> int:
    if versus is None or versus.empty:
        return 0
    mine = versus[(versus["dataset"] == dataset) & (versus["model"] == model)
                  & (versus["method"] == method)]
    return int((mine["verdict"] == "better").sum())


def baseline_methods(frame: pd.DataFrame) -> set[str]:
    """The method labels of the table that are trivial baselines (family ``baseline``)."""
    if "family" in frame:
        return set(frame.loc[frame["family"] == "baseline", "method"])
    from pellucid.explainers.registry import REGISTRY

    return {m for m in frame["method"].unique()
            if m in REGISTRY.names() and REGISTRY.get(m).family == "baseline"}


SIGN_FLIP_LIMIT = 13  # scipy enumerates every sign flip up to here when there are ties or zeros


def signed_rank_p(d: np.ndarray, alternative: str = "two-sided") -> float:
    """The p-value of ``scipy.stats.wilcoxon(d, alternative=alternative)`` (Wilcoxon 1945; zeros
    dropped, tied ranks averaged), computed faster where scipy is slow.

    With ties or zeros among at most 13 differences, scipy gives the exact p-value of
    ``R+ = sum(rank(|d_i|) for d_i > 0)`` over all 2^n sign flips of ``d``, by a generic permutation
    test that evaluates the statistic once per flip in Python (0.6 s a call; 28 of the seed-systems
    report's 51 s). Here the 2^n flips are one matrix product with the same counts:
    ``P(R+* >= R+ - g)`` (greater), ``P(R+* <= R+ + g)`` (less), twice the smaller of the two capped
    at 1 (two-sided), ``g = 100 eps |R+|`` as scipy's tolerance. Every other case is scipy's own.
    tests/test_stats.py checks equality with scipy on samples full of ties and zeros."""
    d = np.asarray(d, dtype=float)
    if d.ndim != 1 or d.size > SIGN_FLIP_LIMIT or not np.isfinite(d).all():
        return float(sps.wilcoxon(d, alternative=alternative).pvalue)
    nonzero = d[d != 0]
    ties = np.unique(np.abs(nonzero)).size < nonzero.size
    if nonzero.size == 0 or (nonzero.size == d.size and not ties):  # scipy's exact distribution
        return float(sps.wilcoxon(d, alternative=alternative).pvalue)
    ranks = sps.rankdata(np.abs(nonzero))
    observed = float(ranks[nonzero > 0].sum())
    # rows: every subset of the non-zero differences made positive (the zeros' flips repeat each
    # row 2^zeros times, which leaves every proportion as it is)
    m = nonzero.size
    positive = (np.arange(2**m)[:, None] >> np.arange(m)[None, :]) & 1
    null = positive @ ranks
    gamma = abs(np.finfo(float).eps * 100 * observed)
    greater = float(np.mean(null >= observed - gamma))
    less = float(np.mean(null <= observed + gamma))
    if alternative == "greater":
        return greater
    if alternative == "less":
        return less
    return min(2 * min(greater, less), 1.0)


def min_attainable_p(n: int) -> float:
    """The smallest p-value the one-sided Wilcoxon signed-rank test (scipy's, exact below 50
    pairs) can give on ``n`` pairs: every difference positive and distinct (2^-n when exact)."""
    if n < 1:
        return 1.0
    return float(sps.wilcoxon(np.arange(1.0, n + 1), alternative="greater").pvalue)


def cases_to_settle(diff: np.ndarray, comparisons: int, alpha: float = ALPHA,
                    power: float = 0.8) -> float:
    """About how many pairs would show the observed mean advantage at ``alpha`` (Holm's first
    step: alpha / comparisons) with ``power``: the normal approximation of the paired test,
    n = ((z_(1-alpha/m) + z_power) sd / mean)^2, divided by 0.864 (the lowest asymptotic relative
    efficiency of the signed-rank to the t test, Hodges and Lehmann 1956), and at least the n
    whose smallest attainable Holm-adjusted p is below ``alpha``. NaN when the observed
    difference does not favour the method (no number of cases would show an advantage then)."""
    d = np.asarray(diff, dtype=float)
    mean = float(d.mean()) if len(d) else float("nan")
    if not len(d) or not mean > 0:
        return float("nan")
    floor = 1
    while comparisons * min_attainable_p(floor) >= alpha and floor < 64:
        floor += 1
    sd = float(d.std(ddof=1)) if len(d) > 1 else 0.0
    if sd == 0:
        return float(floor)
    z = sps.norm.ppf(1 - alpha / comparisons) + sps.norm.ppf(power)
    return float(max(floor, math.ceil((z * sd / mean) ** 2 / 0.864)))


def verdict(p_holm: float, min_p_holm: float, ci: tuple[float, float], min_effect: float = 0.0,
            alpha: float = ALPHA) -> str:
    """``better``, ``not_better`` or ``undetermined`` from the Holm-adjusted one-sided p of "the
    method is better than the best baseline" and the 95 % interval of the mean paired advantage
    (the method's score minus the baseline's, signed so that positive is better):

    - ``undetermined`` whenever the cases could not have shown an advantage (``min_p_holm``, the
      smallest Holm-adjusted p attainable with this many pairs, is at or above ``alpha``);
    - ``better``: adjusted p below ``alpha`` and the interval above zero;
    - ``not_better``: the interval excludes an advantage of ``min_effect`` or more (its upper end
      at or below it: the data show no meaningful advantage);
    - ``undetermined`` otherwise (the interval spans zero and ``min_effect``, or the test and the
      interval disagree).
    """
    low, high = ci
    if not min_p_holm < alpha:
        return "undetermined"
    if p_holm < alpha and low > 0:
        return "better"
    if high <= min_effect:
        return "not_better"
    return "undetermined"


def _effect(min_effect: float | dict[str, float] | None, metric: str) -> float:
    if isinstance(min_effect, dict):
        return float(min_effect.get(metric, 0.0))
    return float(min_effect or 0.0)


def against_baselines(frame: pd.DataFrame, alpha: float = ALPHA,
                      min_effect: float | dict[str, float] | None = None, seed: int = 0
                      ) -> pd.DataFrame:
    """One row per task, quality metric and (non-baseline) method: the best baseline on that metric
    (best mean), both means over the pairs both scored, the one-sided Wilcoxon p-value of "the
    method is better", its Holm-adjusted value over the task's methods, the smallest adjusted
    value these pairs could give, the mean paired advantage ``diff`` (in the metric's units, signed
    so that positive is better) with its 95 % percentile-bootstrap interval, the ``verdict`` and,
    when undetermined, ``cases_to_settle`` (about how many cases would show the observed
    advantage). ``min_effect``: the smallest advantage that matters, one number or per metric."""
    baselines = baseline_methods(frame)
    rows: list[dict] = []
    if not baselines:
        return pd.DataFrame(rows)
    keys = [*TASK, "metric"]
    quality = with_role(_valid(frame), "quality")
    for key, group in quality.groupby(keys, sort=True):
        wide = group.pivot_table(index=["case_id", "target"], columns="method", values="value")
        present = [b for b in sorted(baselines) if b in wide.columns]
        methods = [m for m in wide.columns if m not in baselines]
        if not present or not methods:
            continue
        pairs_per_case = len(wide) / max(1, wide.index.get_level_values(0).nunique())
        higher = bool(group["higher_is_better"].iloc[0])
        sign = 1.0 if higher else -1.0
        base_means = {b: float(wide[b].dropna().mean()) for b in present}
        best = max(present, key=lambda b: sign * base_means[b])
        found = []
        for m in methods:
            pair = wide[[m, best]].dropna()
            d = sign * (pair[m] - pair[best]).to_numpy()
            p = 1.0 if len(d) < 1 or np.allclose(d, 0) else signed_rank_p(d, alternative="greater")
            if len(d):
                lo, hi = bootstrap_mean_ci(d, seed=seed)
            else:
                lo = hi = float("nan")
            found.append((dict(zip(keys, key, strict=True), method=m, baseline=best,
                               mean=float(pair[m].mean()) if len(pair) else float("nan"),
                               baseline_mean=float(pair[best].mean()) if len(pair) else float("nan"),
                               blocks=len(pair), p_value=p,
                               diff=float(d.mean()) if len(d) else float("nan"),
                               diff_ci_low=lo, diff_ci_high=hi), d))
        comparisons = len(found)
        adjusted = holm([r["p_value"] for r, _ in found])
        effect = _effect(min_effect, key[-1])
        for (row, d), adj in zip(found, adjusted, strict=True):
            floor = min(1.0, comparisons * min_attainable_p(len(d)))
            word = verdict(adj, floor, (row["diff_ci_low"], row["diff_ci_high"]), effect, alpha)
            settle = cases_to_settle(d, comparisons, alpha) if word == "undetermined" else math.nan
            if not math.isnan(settle):
                settle = math.ceil(settle / pairs_per_case)
            rows.append(row | {"p_holm": adj, "min_attainable_p_holm": floor, "min_effect": effect,
                               "verdict": word, "cases_to_settle": settle})
    return pd.DataFrame(rows)


def baseline_verdicts(table: pd.DataFrame) -> list[str]:
    """Plain sentences from ``against_baselines`` for one task: per quality metric, which methods
    are not shown better than the best baseline, kept apart by the reason (shown no better, or
    undetermined with these cases)."""
    out = []
    if table.empty:
        return out
    for metric, group in table.groupby("metric", sort=True):
        baseline = group["baseline"].iloc[0]
        worse = list(group.loc[group["verdict"] == "not_better", "method"])
        unknown = list(group.loc[group["verdict"] == "undetermined", "method"])
        if len(worse) == len(group):
            out.append(f"No method is better than the {baseline} baseline on {metric}.")
        elif worse:
            out.append(f"On {metric}, {', '.join(worse)} {'is' if len(worse) == 1 else 'are'} not "
                       f"better than the {baseline} baseline.")
        if unknown:
            out.append(f"On {metric}, these cases cannot tell whether {', '.join(unknown)} "
                       f"{'is' if len(unknown) == 1 else 'are'} better than the {baseline} "
                       f"baseline.")
    return out


def family_winners(summ: pd.DataFrame, versus: pd.DataFrame,
                   baselines: set[str] | frozenset[str] = frozenset()) -> list[dict]:
    """Per task and quality family (faithfulness, localisation): the method (never a baseline) of
    best mean rank over the family's metrics, with its mean, 95 % interval and verdict against the
    best baseline on each of them."""
    out = []
    part = with_role(summ[~summ["method"].isin(baselines)], "quality")
    for (dataset, model, family), group in part.groupby([*TASK, "category"], sort=True):
        ranked = []
        for _, g in group.groupby("metric"):
            higher = bool(g["higher_is_better"].iloc[0])
            ranked.append(g.set_index("method")["mean"].rank(ascending=not higher))
        mean_rank = pd.concat(ranked, axis=1).mean(axis=1).sort_values()
        if mean_rank.empty:
            continue
        best = str(mean_rank.index[0])
        rows = []
        for r in group[group["method"] == best].itertuples():
            word = None
            if not versus.empty:
                v = versus[(versus["dataset"] == dataset) & (versus["model"] == model)
                           & (versus["metric"] == r.metric) & (versus["method"] == best)]
                word = str(v["verdict"].iloc[0]) if not v.empty else None
            rows.append({"metric": r.metric, "mean": r.mean, "ci_low": r.ci_low,
                         "ci_high": r.ci_high, "verdict": word})
        out.append({"dataset": dataset, "model": model, "family": family, "method": best,
                    "metrics": rows})
    return out


def nemenyi_cd(k: int, n: int, alpha: float = ALPHA) -> float:
    """Nemenyi's critical difference of average ranks, q_alpha sqrt(k (k + 1) / (6 n)), q_alpha
    the studentized range quantile of k groups (infinite degrees of freedom) over sqrt(2)
    (Demsar 2006, eq. 5)."""
    if k < 2 or n < 1:
        return float("nan")
    q = float(sps.studentized_range.ppf(1 - alpha, k, np.inf)) / math.sqrt(2)
    return q * math.sqrt(k * (k + 1) / (6 * n))


def block_ranks(frame: pd.DataFrame) -> pd.DataFrame:
    """Per task and quality metric: each method's average rank over the (case, target) blocks
    every method scored (1 = best), the block count and Nemenyi's critical difference: what a
    critical-difference diagram draws (Demsar 2006)."""
    rows = []
    for key, group in with_role(_valid(frame), "quality").groupby([*TASK, "metric"], sort=True):
        wide = group.pivot_table(index=["case_id", "target"], columns="method", values="value")
        wide = wide.dropna()
        if wide.shape[1] < 2 or len(wide) < 2:
            continue
        higher = bool(group["higher_is_better"].iloc[0])
        avg = wide.rank(axis=1, ascending=not higher).mean(0)
        cd = nemenyi_cd(wide.shape[1], len(wide))
        for method, rank in avg.items():
            rows.append(dict(zip([*TASK, "metric"], key, strict=True), method=method,
                             average_rank=float(rank), blocks=len(wide), critical_difference=cd))
    return pd.DataFrame(rows)
