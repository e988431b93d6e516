"""The report's first screen, per task: how many cases were explained, one figure of the verdicts
(methods x quality metrics, baselines included, each cell coloured by its verdict against the best
baseline and labelled with its mean), the sanity checks, and at most three sentences (what to use
within which budget, how sure that is, what this run cannot tell). Also the critical-difference
diagram of the ranking (Demsar 2006). Everything is computed from ``bench/stats.py``'s tables."""

from __future__ import annotations

import base64
import io
import json
import math
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

import pellucid.bench.stats as stats

COLOURS = {"better": "#59a14f", "not_better": "#e15759", "undetermined": "#f2c14e",
           "baseline": "#d9d9d9", "best baseline": "#a0a0a0", "missing": "#ffffff"}
LABELS = {"better": "better than the best baseline", "not_better": "not better",
          "undetermined": "undetermined with these cases", "best baseline": "best baseline"}


def png(fig) -> str:
    """The figure as a PNG data URI (80 dpi, tight), closed afterwards."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def verdict_figure(summ: pd.DataFrame, versus: pd.DataFrame, baselines: set[str],
                   order: list[str], untrusted: set[str] = frozenset()) -> str | None:
    """Methods (rows: ``order``, then the baselines) x quality metrics (columns), each cell
    coloured by the method's verdict against the best baseline of that metric and labelled with
    its mean; a metric in ``untrusted`` carries a dagger."""
    quality = stats.with_role(summ, "quality")
    if quality.empty:
        return None
    metrics = list(dict.fromkeys(quality["metric"]))
    methods = [m for m in order if m in set(quality["method"])]
    methods += sorted(m for m in set(quality["method"]) - set(methods) if m not in baselines)
    methods += sorted(m for m in set(quality["method"]) if m in baselines)
    means = quality.pivot_table(index="method", columns="metric", values="mean")
    fig, ax = plt.subplots(figsize=(2.2 + 1.45 * len(metrics), 1.2 + 0.3 * len(methods)))
    for r, method in enumerate(methods):
        for c, metric in enumerate(metrics):
            value = means.at[method, metric] if method in means.index and metric in means else np.nan
            kind = "missing"
            if method in baselines:
                best = versus[(versus["metric"] == metric)]["baseline"] if not versus.empty else []
                kind = "best baseline" if len(best) and best.iloc[0] == method else "baseline"
            elif not versus.empty:
                v = versus[(versus["metric"] == metric) & (versus["method"] == method)]
                kind = str(v["verdict"].iloc[0]) if not v.empty else "missing"
            if np.isnan(value):
                kind = "missing"
            ax.add_patch(plt.Rectangle((c, r), 1, 1, facecolor=COLOURS[kind], edgecolor="white",
                                       lw=1.5))
            ax.text(c + 0.5, r + 0.5, "" if np.isnan(value) else f"{value:.3g}", ha="center",
                    va="center", fontsize=9)
    ax.set_xlim(0, len(metrics))
    ax.set_ylim(len(methods), 0)
    heads = []
    for metric in metrics:
        higher = bool(quality[quality["metric"] == metric]["higher_is_better"].iloc[0])
        heads.append(f"{metric}{' †' if metric in untrusted else ''}\n({'↑' if higher else '↓'})")
    ax.set_xticks(np.arange(len(metrics)) + 0.5, heads, fontsize=9, rotation=25, ha="left")
    ax.xaxis.tick_top()
    ax.set_yticks(np.arange(len(methods)) + 0.5,
                  [f"{m} (baseline)" if m in baselines else m for m in methods], fontsize=9)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLOURS[k]) for k in LABELS]
    ax.legend(handles, list(LABELS.values()), fontsize=8, ncol=2, loc="upper center",
              bbox_to_anchor=(0.5, -0.01), frameon=False)
    fig.tight_layout()
    return png(fig)


def sanity_rows(part: pd.DataFrame, baselines: set[str]) -> list[dict[str, Any]]:
    """Per sanity metric and method (never a baseline): the pass rate where the metric decides
    pass or fail per case (randomisation: the map changed more than the similarity of unrelated
    maps), else the mean."""
    out = []
    sanity = stats.with_role(part, "sanity")
    sanity = sanity[~sanity["method"].isin(baselines)]
    for (metric, method), group in sanity.groupby(["metric", "method"], sort=True):
        passed = []
        for extra in group.get("extra", pd.Series(dtype=object)):
            if isinstance(extra, str) and extra:
                try:
                    info = json.loads(extra)
                except ValueError:
                    continue
                if isinstance(info, dict) and "passed" in info:
                    passed.append(bool(info["passed"]))
        values = group["value"].dropna()
        if not len(values):  # not run for this method (skipped by the configuration)
            continue
        out.append({"metric": metric, "method": method, "cases": len(values),
                    "pass_rate": float(np.mean(passed)) if passed else float("nan"),
                    "mean": float(values.mean()) if len(values) else float("nan")})
    return out


def _fmt_ci(low: float, high: float) -> str:
    return f"[{low:+.2g}, {high:+.2g}]"


def failed_checks(record: dict[str, Any]) -> str:
    """What a metric that failed the metric checks (bench/trust.py) did, in words."""
    parts = []
    if record.get("separates") is False:
        parts.append("did not tell the trained model's maps from a randomised model's")
    if record.get("stable") is False:
        parts.append("ranked the methods unstably under small input noise")
    return " and ".join(parts)


def sentences(rec: dict | None, versus: pd.DataFrame, counts: dict[str, int],
              untrusted: dict[str, dict] | None = None, warnings: list[str] | None = None
              ) -> list[str]:
    """At most three sentences for one task: what to use within which budget, how sure that is,
    what this run cannot tell. ``untrusted``: {metric: its check record} of the metrics that
    failed the metric checks; ``warnings``: the task's near-chance warnings."""
    cases = counts.get("cases", 0)
    untrusted = untrusted or {}
    if warnings:
        use = ("The model performs near chance on this task, so no method's maps can be "
               "recommended as evidence of a finding")
    elif rec is None or versus.empty:
        use = "No method was compared with the trivial baselines on a quality metric"
    elif rec["verdicts"].get("better", 0) == 0:
        use = (f"No method is shown better than the trivial baselines on any quality metric; "
               f"{rec['best']} ranks first on quality but cannot be recommended from this run")
    else:
        shown = list(versus.loc[(versus["method"] == rec["best"]) & (versus["verdict"] == "better"),
                                "metric"])
        use = (f"Use {rec['best']} ({rec['best_seconds']:.2g} s per case) where it is shown "
               f"better than the baselines: {', '.join(shown)}")
        cheaper = [b for b in rec["budgets"] if b["method"] != rec["best"]
                   and b["seconds"] < rec["best_seconds"]]
        if cheaper:
            b = cheaper[0]
            if b.get("better", 0):
                use += (f"; within {b['budget']:g} s per case, {b['method']} ({b['seconds']:.2g} s, "
                        f"better on {b['better']})")
            else:
                use += f"; nothing within {b['budget']:g} s per case is shown better"
    out = [use + "."]
    if rec is not None and not versus.empty:
        mine = versus[versus["method"] == rec["best"]]
        better = mine[mine["verdict"] == "better"]
        total = len(mine)
        if len(better):
            shown = "; ".join(f"{r.metric} {r.diff:+.3g} {_fmt_ci(r.diff_ci_low, r.diff_ci_high)}"
                              for r in better.head(3).itertuples())
            rest = ""
            for word in ("not_better", "undetermined"):
                names = list(mine.loc[mine["verdict"] == word, "metric"])
                if names:
                    rest += f"; {word.replace('_', ' ')} on {', '.join(names)}"
            out.append(f"{rec['best']} is better than the best baseline on {len(better)} of "
                       f"{total} quality metrics (mean advantage, 95% interval: {shown}){rest}.")
        elif total:
            worse = int((mine["verdict"] == "not_better").sum())
            out.append(f"{rec['best']} is not better than the best baseline on {worse} and "
                       f"undetermined on {total - worse} of {total} quality metrics.")
    if not versus.empty:
        unknown = versus[versus["verdict"] == "undetermined"]
        tail = ""
        for metric, record in sorted(untrusted.items()):
            tail += f"; {metric} (†) {failed_checks(record)}, so its verdicts carry little weight"
        if len(unknown):
            settle = unknown["cases_to_settle"].dropna()
            need = (f"; where the observed difference favours the method, about "
                    f"{int(settle.median())} cases (median) would show it" if len(settle) else "")
            out.append(f"With {cases} cases, {len(unknown)} of {len(versus)} verdicts are "
                       f"undetermined{need}{tail}.")
        else:
            out.append(f"Every verdict is settled with these {cases} cases{tail}.")
    return out[:3]


def cd_diagram(ranks: pd.DataFrame, baselines: set[str]) -> str | None:
    """Critical-difference diagrams (Demsar 2006), one per quality metric of one task: methods
    at their average rank over the blocks; a bar joins methods whose average ranks differ by less
    than Nemenyi's critical difference (no difference shown at 0.05)."""
    if ranks.empty:
        return None
    metrics = list(dict.fromkeys(ranks["metric"]))
    cols = min(2, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    k_max = int(ranks.groupby("metric")["method"].size().max())
    height = 0.9 + 0.16 * k_max
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, height * rows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics, strict=False):
        part = ranks[ranks["metric"] == metric].sort_values("average_rank")
        k, cd, n = len(part), float(part["critical_difference"].iloc[0]), int(part["blocks"].iloc[0])
        ax.set_xlim(0.5, k + 0.5)
        ax.set_ylim(-(k // 2 + 2.5), 1.6)
        ax.hlines(0, 1, k, color="k", lw=1)
        for r in range(1, k + 1):
            ax.vlines(r, 0, 0.15, color="k", lw=1)
            ax.text(r, 0.3, str(r), ha="center", fontsize=6)
        half = (k + 1) // 2
        for i, row in enumerate(part.itertuples()):
            left = i < half
            level = -(i + 1) if left else -(k - i)
            end = 0.5 if left else k + 0.5
            ax.plot([row.average_rank, row.average_rank, end], [0, level * 0.5, level * 0.5],
                    color="#555" if row.method in baselines else "k", lw=0.7)
            label = f"{row.method}{' (baseline)' if row.method in baselines else ''} " \
                    f"{row.average_rank:.2f}"
            ax.text(end, level * 0.5 + 0.1, label, ha="left" if left else "right", fontsize=6)
        rank = part["average_rank"].to_numpy()
        bars, y = [], -0.2
        for i in range(k):
            j = max(j for j in range(i, k) if rank[j] - rank[i] < cd)
            if j > i and not any(a <= i and j <= b for a, b in bars):
                bars.append((i, j))
        for i, j in bars:
            ax.hlines(y, rank[i] - 0.03, rank[j] + 0.03, color="#c00", lw=2)
            y -= 0.18
        if not math.isnan(cd) and cd < k:
            ax.hlines(1.2, 1, 1 + cd, color="k", lw=1)
            ax.text(1 + cd / 2, 1.3, f"CD {cd:.2f}", ha="center", fontsize=6)
        ax.set_title(f"{metric}: average rank over {n} blocks (1 = best)", fontsize=8)
        ax.axis("off")
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.tight_layout()
    return png(fig)
