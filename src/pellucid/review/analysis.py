"""Analysis of a review study.

- Ratings per method (agreement 0-10, spatial correctness, usefulness, trust 1-5): mean with a 95 %
  percentile-bootstrap interval (1000 resamples of the ratings, seeded).
- Decision accuracy at each stage (own read, after the AI's prediction, after the explanations)
  against the truth, with exact McNemar tests of the paired changes (two-sided binomial test of
  the discordant pairs, McNemar 1947); by arm when the study has no-explanation controls.
- Inter-rater agreement: Krippendorff's alpha for ordinal data (Krippendorff 2011, "Computing
  Krippendorff's alpha-reliability": coincidence matrix, ordinal metric
  delta^2_ck = (sum_{g=c..k} n_g - (n_c + n_k)/2)^2, alpha = 1 - D_o / D_e) on each rating, with
  units = (case, method) and coders = raters; Fleiss' kappa (Fleiss 1971) on the yes/no decisions.
- Spearman correlation between each rating and each benchmark metric over (case, method) pairs,
  joined through the study's salted case keys.
- Trust and willingness before and after the session: mean change, Wilcoxon signed-rank test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sqlalchemy import select
from sqlalchemy.engine import Engine

from pellucid.errors import ConfigError, DataError
from pellucid.review.db import Assignment, Case, Explanation, Rater, Rating, Read, Study, make_engine, migrate
from pellucid.review.security import neutralised

RATINGS = ("agreement", "spatial", "usefulness", "trust")


def krippendorff_alpha_ordinal(data: np.ndarray) -> float:
    """Krippendorff's alpha (ordinal) of a coders x units matrix (NaN = missing)."""
    data = np.asarray(data, dtype=float)
    values = np.unique(data[~np.isnan(data)])
    if len(values) < 2:
        return float("nan")
    index = {v: i for i, v in enumerate(values)}
    o = np.zeros((len(values), len(values)))
    for unit in data.T:
        vals = unit[~np.isnan(unit)]
        m = len(vals)
        if m < 2:
            continue
        counts = np.zeros(len(values))
        for v in vals:
            counts[index[v]] += 1
        o += (np.outer(counts, counts) - np.diag(counts)) / (m - 1)
    n_c = o.sum(1)
    n = n_c.sum()
    if n <= 1:
        return float("nan")
    cum = np.cumsum(n_c)
    delta = np.zeros_like(o)
    for c in range(len(values)):
        for k in range(c, len(values)):
            between = cum[k] - (cum[c - 1] if c > 0 else 0.0)
            delta[c, k] = delta[k, c] = (between - (n_c[c] + n_c[k]) / 2) ** 2
    d_o = (o * delta).sum()
    d_e = (np.outer(n_c, n_c) * delta).sum() / (n - 1)
    return float(1 - d_o / d_e) if d_e > 0 else float("nan")


def fleiss_kappa(counts: np.ndarray) -> float:
    """Fleiss' kappa of a subjects x categories count matrix (every subject rated by the same
    number of raters)."""
    counts = np.asarray(counts, dtype=float)
    n = counts.sum(1)
    if len(counts) == 0 or not np.allclose(n, n[0]) or n[0] < 2:
        return float("nan")
    n = n[0]
    p_j = counts.sum(0) / counts.sum()
    p_i = ((counts ** 2).sum(1) - n) / (n * (n - 1))
    p_e = (p_j ** 2).sum()
    return float((p_i.mean() - p_e) / (1 - p_e)) if p_e < 1 else float("nan")


def mcnemar_exact(first: np.ndarray, second: np.ndarray) -> dict[str, float]:
    """Exact McNemar test of paired booleans (correct at the first / second stage)."""
    from scipy.stats import binomtest

    first, second = np.asarray(first, bool), np.asarray(second, bool)
    b = int((first & ~second).sum())
    c = int((~first & second).sum())
    p = binomtest(min(b, c), b + c, 0.5).pvalue if b + c else 1.0
    return {"n": len(first), "worse": b, "better": c, "p_value": float(p)}


def _ci(values: np.ndarray, seed: int = 0) -> tuple[float, float]:
    from pellucid.bootstrap import bootstrap_ci

    return bootstrap_ci(torch.as_tensor(np.asarray(values, dtype=np.float64).copy()), 1000, 0.95, seed)


def load_tables(engine: Engine, study_id: int) -> dict[str, pd.DataFrame]:
    """The study as tables (raters, cases, reads, ratings), without tokens or images."""
    from sqlalchemy.orm import Session

    with Session(engine) as s:
        raters = pd.DataFrame([{
            "rater": r.label, "role": r.role, "years_experience": r.years_experience,
            "ai_familiarity": r.ai_familiarity, "trust_start": r.trust_start,
            "willingness_start": r.willingness_start, "trust_end": r.trust_end,
            "willingness_end": r.willingness_end, "started_at": r.started_at,
            "finished_at": r.finished_at}
            for r in s.scalars(select(Rater).where(Rater.study_id == study_id).order_by(Rater.id))])
        cases = pd.DataFrame([{
            "case": c.code, "source_key": c.source_key, "truth": c.truth, "ai_score": c.ai_score,
            "ai_positive": c.ai_positive}
            for c in s.scalars(select(Case).where(Case.study_id == study_id).order_by(Case.id))])
        rows = s.execute(select(Read, Assignment, Rater.label, Case.code).join(
            Assignment, Read.assignment_id == Assignment.id).join(
            Rater, Assignment.rater_id == Rater.id).join(Case, Assignment.case_id == Case.id).where(
            Rater.study_id == study_id)).all()
        reads = pd.DataFrame([{
            "rater": label, "case": code, "position": a.position, "control": a.control,
            "complete": r.stage >= 4, "finding1": r.finding1, "confidence1": r.confidence1,
            "finding2": r.finding2, "confidence2": r.confidence2, "finding3": r.finding3,
            "confidence3": r.confidence3, "would_check": r.would_check, "comment": r.comment,
            "seconds": r.seconds} for r, a, label, code in rows])
        rows = s.execute(select(Rating, Explanation.method, Rater.label, Case.code).join(
            Assignment, Rating.assignment_id == Assignment.id).join(
            Rater, Assignment.rater_id == Rater.id).join(
            Explanation, Rating.explanation_id == Explanation.id).join(
            Case, Assignment.case_id == Case.id).where(Rater.study_id == study_id)).all()
        ratings = pd.DataFrame([{
            "rater": label, "case": code, "method": method, "letter": r.letter,
            **{f: getattr(r, f) for f in RATINGS}} for r, method, label, code in rows],
            columns=["rater", "case", "method", "letter", *RATINGS])
    return {"raters": raters, "cases": cases, "reads": reads, "ratings": ratings}


def _study_id(engine: Engine, study_id: int | None) -> int:
    from sqlalchemy.orm import Session

    with Session(engine) as s:
        ids = list(s.scalars(select(Study.id).order_by(Study.id)))
    if not ids:
        raise DataError(None, "the database holds no review study")
    if study_id is None:
        return ids[-1]
    if study_id not in ids:
        raise ConfigError(f"--study {study_id}: no such study; studies: {ids}")
    return study_id


def analyze(db: str, out: str | Path, study_id: int | None = None,
            bench: str | Path | None = None) -> dict[str, Any]:
    """Analyse a study; writes ``out/summary.json``, ``out/tables/*.csv`` and the exported
    tables (``out/export/*.csv``); with ``bench`` (a benchmark run folder) also its correlation
    with the metrics, and the run's report gains a "Clinician review" section."""
    from sqlalchemy.orm import Session

    engine = make_engine(db)
    migrate(engine)
    study_id = _study_id(engine, study_id)
    with Session(engine) as s:
        study = s.get(Study, study_id)
        info = {"name": study.name, "finding": study.finding, "methods": study.methods,
                "source": {k: v for k, v in study.source.items() if k != "salt"}}
        salt = study.source.get("salt", "")
    t = load_tables(engine, study_id)
    engine.dispose()
    out = Path(out)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    (out / "export").mkdir(parents=True, exist_ok=True)
    for name, frame in t.items():
        neutralised(frame).to_csv(out / "export" / f"{name}.csv", index=False)
    tables: dict[str, pd.DataFrame] = {}
    ratings, reads, cases = t["ratings"], t["reads"], t["cases"]
    # ratings per method
    rows = []
    for method, part in ratings.groupby("method"):
        for f in RATINGS:
            v = part[f].to_numpy(dtype=float)
            lo, hi = _ci(v)
            rows.append({"method": method, "rating": f, "n": len(v), "mean": float(v.mean()),
                         "ci_low": lo, "ci_high": hi})
    tables["ratings_by_method"] = pd.DataFrame(rows, columns=["method", "rating", "n", "mean", "ci_low",
                                                               "ci_high"])
    # decision accuracy per stage, paired tests
    done = reads[reads["complete"]].merge(cases[["case", "truth"]], on="case") \
        if not reads.empty else pd.DataFrame()
    acc_rows, test_rows = [], []
    if not done.empty:
        done = done[done["truth"].notna()]
        arms = [("all", done)]
        if done["control"].any():
            arms += [("explanations", done[~done["control"]]), ("control", done[done["control"]])]
        for arm, part in arms:
            correct = {k: (part[f"finding{k}"].astype(bool) == part["truth"].astype(bool)).to_numpy()
                       for k in (1, 2, 3)}
            for k, stage in ((1, "own read"), (2, "after AI prediction"), (3, "after explanations")):
                lo, hi = _ci(correct[k].astype(float))
                acc_rows.append({"arm": arm, "stage": stage, "n": len(part),
                                 "accuracy": float(correct[k].mean()) if len(part) else float("nan"),
                                 "ci_low": lo, "ci_high": hi})
            for a, b in ((1, 2), (2, 3), (1, 3)):
                test_rows.append({"arm": arm, "from": a, "to": b, **mcnemar_exact(correct[a], correct[b])})
    tables["accuracy"] = pd.DataFrame(acc_rows, columns=["arm", "stage", "n", "accuracy", "ci_low",
                                                        "ci_high"])
    tables["mcnemar"] = pd.DataFrame(test_rows, columns=["arm", "from", "to", "n", "worse", "better",
                                                        "p_value"])
    # inter-rater agreement
    agree_rows = []
    for f in RATINGS:
        if ratings.empty:
            break
        m = ratings.pivot_table(index="rater", columns=["case", "method"], values=f, aggfunc="mean")
        agree_rows.append({"measure": f"Krippendorff alpha (ordinal): {f}",
                           "value": krippendorff_alpha_ordinal(m.to_numpy()),
                           "units": m.shape[1], "raters": m.shape[0]})
    for k, label in ((1, "own read"), (3, "final read")):
        if done.empty:
            break
        wide = done.pivot_table(index="case", columns="rater", values=f"finding{k}", aggfunc="first")
        wide = wide.dropna()
        if len(wide):
            yes = wide.astype(bool).sum(1).to_numpy()
            counts = np.stack([yes, wide.shape[1] - yes], 1)
            agree_rows.append({"measure": f"Fleiss kappa: {label}", "value": fleiss_kappa(counts),
                               "units": len(wide), "raters": wide.shape[1]})
    tables["agreement"] = pd.DataFrame(agree_rows, columns=["measure", "value", "units", "raters"])
    # trust before / after
    trust_rows = []
    for before, after in (("trust_start", "trust_end"), ("willingness_start", "willingness_end")):
        r = t["raters"].dropna(subset=[before, after]) if not t["raters"].empty else pd.DataFrame()
        if len(r):
            from scipy.stats import wilcoxon

            diff = (r[after] - r[before]).to_numpy(dtype=float)
            p = float(wilcoxon(diff).pvalue) if np.any(diff != 0) and len(diff) > 1 else float("nan")
            trust_rows.append({"measure": before.split("_")[0], "n": len(r),
                               "before": float(r[before].mean()), "after": float(r[after].mean()),
                               "change": float(diff.mean()), "wilcoxon_p": p})
    tables["trust"] = pd.DataFrame(trust_rows, columns=["measure", "n", "before", "after", "change",
                                                        "wilcoxon_p"])
    # Spearman against the benchmark
    bench = Path(bench) if bench is not None else None
    tables["spearman"] = _spearman(bench, salt, ratings, cases) if bench is not None else pd.DataFrame()
    for name, frame in tables.items():
        neutralised(frame).to_csv(out / "tables" / f"{name}.csv", index=False)
    summary = {"study": info, "raters": len(t["raters"]), "cases": len(cases),
               "complete_reads": int(reads["complete"].sum()) if not reads.empty else 0,
               "ratings": len(ratings),
               "median_seconds_per_case": float(done["seconds"].median())
               if not done.empty and done["seconds"].notna().any() else float("nan"),
               "tables": {k: json.loads(v.to_json(orient="records")) for k, v in tables.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    if bench is not None:
        import shutil

        target = bench / "review"
        if target.resolve() != out.resolve():
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(out, target)
        from pellucid.bench.report import write_report

        write_report(bench)
    return summary


def _spearman(bench: Path, salt: str, ratings: pd.DataFrame, cases: pd.DataFrame) -> pd.DataFrame:
    from scipy.stats import spearmanr

    from pellucid.bench.store import ResultStore
    from pellucid.review.create import case_key

    columns = ["metric", "rating", "n", "rho", "p_value"]
    if not (bench / "parts").is_dir():
        raise DataError(bench, "not a benchmark run folder (no parts/)")
    table = ResultStore(bench).table()
    if table.empty or ratings.empty:
        return pd.DataFrame(columns=columns)
    table = table.assign(source_key=[case_key(salt, c, t) for c, t in
                                     zip(table["case_id"], table["target"], strict=True)])
    metrics = table.groupby(["source_key", "method", "metric"], as_index=False)["value"].mean()
    rated = ratings.merge(cases[["case", "source_key"]], on="case").groupby(
        ["source_key", "method"], as_index=False)[list(RATINGS)].mean()
    rows = []
    for metric, part in metrics.groupby("metric"):
        joined = rated.merge(part, on=["source_key", "method"]).dropna(subset=["value"])
        for f in RATINGS:
            if len(joined) >= 3 and joined[f].nunique() > 1 and joined["value"].nunique() > 1:
                res = spearmanr(joined[f], joined["value"])
                rows.append({"metric": metric, "rating": f, "n": len(joined),
                             "rho": float(res.statistic), "p_value": float(res.pvalue)})
            else:
                rows.append({"metric": metric, "rating": f, "n": len(joined), "rho": math.nan,
                             "p_value": math.nan})
    return pd.DataFrame(rows, columns=columns)
