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
- ``against_baselines``: per task, metric and method, whether it beats the best trivial baseline
  (random map, centre prior, edges; explainers/baselines.py): a one-sided Wilcoxon signed-rank
  test over the paired (case, target) blocks, Holm-corrected over the methods of that task and
  metric. A method that does not beat it at 0.05 is no better than a map that knows nothing of
  the model, whatever its rank.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from scipy import stats as sps

TASK = ["dataset", "model"]


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
    """Rank of every method per task and metric, and the average rank per task and method."""
    out = []
    for key, group in summ.groupby([*TASK, "metric"], sort=True):
        higher = bool(group["higher_is_better"].iloc[0])
        r = group["mean"].rank(ascending=not higher, method="average")
        for method, rank in zip(group["method"], r, strict=True):
            out.append(dict(zip([*TASK, "metric"], key, strict=True), method=method, rank=float(rank)))
    frame = pd.DataFrame(out)
    if frame.empty:
        return frame
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
    for key, group in _valid(frame).groupby(keys, sort=True):
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
            raw.append(1.0 if np.allclose(d, 0) else float(sps.wilcoxon(wide[m], wide[control]).pvalue))
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
    """Per task: the best average rank overall and within each cost budget, from the numbers; a
    baseline is never recommended, and ``caveats`` lists the metrics on which the recommended
    method does not beat the best baseline (``versus``: ``against_baselines``)."""
    out = []
    for (dataset, model), group in costq.groupby(TASK, sort=True):
        group = group[~group["method"].isin(baselines)].dropna(subset=["average_rank"])
        if group.empty:
            continue
        best = group.sort_values(["average_rank", "seconds_per_case"]).iloc[0]
        rec = {"dataset": dataset, "model": model, "best": best["method"],
               "best_rank": float(best["average_rank"]),
               "best_seconds": float(best["seconds_per_case"]), "budgets": []}
        for budget in budgets:
            within = group[group["seconds_per_case"] <= budget]
            if within.empty:
                continue
            top = within.sort_values(["average_rank", "seconds_per_case"]).iloc[0]
            rec["budgets"].append({"budget": budget, "method": top["method"],
                                   "rank": float(top["average_rank"]),
                                   "seconds": float(top["seconds_per_case"])})
        rec["caveats"] = []
        if versus is not None and not versus.empty:
            mine = versus[(versus["dataset"] == dataset) & (versus["model"] == model)
                          & (versus["method"] == best["method"]) & ~versus["beats"]]
            rec["caveats"] = [f"{r.metric} (the {r.baseline} baseline scores {r.baseline_mean:.3g}, "
                              f"{best['method']} {r.mean:.3g}; Holm p {r.p_holm:.2g})"
                              for r in mine.itertuples()]
        out.append(rec)
    return out


def baseline_methods(frame: pd.DataFrame) -> set[str]:
    """The method labels of the table that are trivial baselines (family ``baseline``)."""
    if "family" in frame:
        return set(frame.loc[frame["family"] == "baseline", "method"])
    from pellucid.explainers.registry import REGISTRY

    return {m for m in frame["method"].unique()
            if m in REGISTRY.names() and REGISTRY.get(m).family == "baseline"}


def against_baselines(frame: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """One row per task, metric and (non-baseline) method: the best baseline on that metric (best
    mean over the blocks every compared method scored), both means, the one-sided Wilcoxon p-value
    of "the method is better", its Holm-adjusted value and ``beats`` (adjusted p < ``alpha``)."""
    baselines = baseline_methods(frame)
    rows = []
    if not baselines:
        return pd.DataFrame(rows)
    keys = [*TASK, "metric"]
    for key, group in _valid(frame).groupby(keys, sort=True):
        wide = group.pivot_table(index=["case_id", "target"], columns="method", values="value")
        present = [b for b in baselines if b in wide.columns]
        methods = [m for m in wide.columns if m not in baselines]
        if not present or not methods:
            continue
        higher = bool(group["higher_is_better"].iloc[0])
        sign = 1.0 if higher else -1.0
        base_means = {b: float(wide[b].dropna().mean()) for b in present}
        best = max(present, key=lambda b: sign * base_means[b])
        found = []
        for m in methods:
            pair = wide[[m, best]].dropna()
            d = sign * (pair[m] - pair[best]).to_numpy()
            if len(d) < 2 or np.allclose(d, 0):
                p = 1.0
            else:
                p = float(sps.wilcoxon(d, alternative="greater").pvalue)
            found.append(dict(zip(keys, key, strict=True), method=m, baseline=best,
                              mean=float(pair[m].mean()) if len(pair) else float("nan"),
                              baseline_mean=float(pair[best].mean()) if len(pair) else float("nan"),
                              blocks=len(pair), p_value=p))
        for row, adj in zip(found, holm([r["p_value"] for r in found]), strict=True):
            rows.append(row | {"p_holm": adj, "beats": bool(adj < alpha)})
    return pd.DataFrame(rows)


def baseline_verdicts(table: pd.DataFrame) -> list[str]:
    """Plain sentences from ``against_baselines`` for one task: per metric, which methods do not
    beat the best baseline."""
    out = []
    if table.empty:
        return out
    for metric, group in table.groupby("metric", sort=True):
        losers = list(group.loc[~group["beats"], "method"])
        baseline = group["baseline"].iloc[0]
        if len(losers) == len(group):
            out.append(f"No method beats the {baseline} baseline on {metric}.")
        elif losers:
            out.append(f"On {metric}, {', '.join(losers)} do{'es' if len(losers) == 1 else ''} not "
                       f"beat the {baseline} baseline.")
    return out


def family_winners(summ: pd.DataFrame, versus: pd.DataFrame,
                   baselines: set[str] | frozenset[str] = frozenset()) -> list[dict]:
    """Per task and metric family (faithfulness, localization, ...): the method (never a baseline)
    of best mean rank over the family's metrics, with its mean, 95 % interval and verdict against
    the best baseline on each of them."""
    out = []
    part = summ[~summ["method"].isin(baselines)]
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
            verdict = None
            if not versus.empty:
                v = versus[(versus["dataset"] == dataset) & (versus["model"] == model)
                           & (versus["metric"] == r.metric) & (versus["method"] == best)]
                verdict = bool(v["beats"].iloc[0]) if not v.empty else None
            rows.append({"metric": r.metric, "mean": r.mean, "ci_low": r.ci_low,
                         "ci_high": r.ci_high, "beats_baselines": verdict})
        out.append({"dataset": dataset, "model": model, "family": family, "method": best,
                    "metrics": rows})
    return out
