"""The explanation card of a benchmark run (``pellucid report RUN --card``): per task, a Markdown
and a JSON file under ``RUN/cards/`` that state what a reader must know before trusting the maps
of this model: the model and data, how many cases were explained, the recommended method(s) with
their verdicts against the trivial baselines and the intervals behind them, the sanity checks,
what this run could not decide and about how many cases would, the cost, and the known
limitations. Every statement is computed from the run's own tables (bench/stats.py), the same
numbers as the report's first screen.

It names the reporting items it answers: CLAIM, the Checklist for Artificial Intelligence in
Medical Imaging (Mongan et al. 2020; Tejani et al. 2024 update), its item on the methods of
explainability or interpretability and how they were validated; and the EU AI Act, Art. 13(3)(b)(iv)
(the technical capabilities to provide information relevant to explain the system's output) and
Art. 13(3)(d) (the human-oversight measures, including those that help deployers interpret the
outputs).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

import pellucid.bench.glance as glance
import pellucid.bench.stats as stats
from pellucid.bench.answers import answers
from pellucid.bench.store import ResultStore
from pellucid.errors import DataError

CHECKLIST = [
    {"item": "CLAIM (Mongan et al. 2020; 2024 update): methods of explainability or "
             "interpretability and how they were validated",
     "answered_by": "recommended methods, verdicts against trivial baselines, sanity checks"},
    {"item": "EU AI Act Art. 13(3)(b)(iv): technical capabilities to provide information "
             "relevant to explain the output",
     "answered_by": "recommended methods with their measured quality and cost"},
    {"item": "EU AI Act Art. 13(3)(d): human-oversight measures, including those that help "
             "deployers interpret the outputs",
     "answered_by": "what this run cannot tell, known limitations"},
]


def _clean(value: Any) -> Any:
    """JSON-able: NaN becomes None, numpy scalars plain numbers."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _model_card(run: Path, model: str) -> dict[str, Any]:
    path = run / "models" / model / "card.json"
    if not path.is_file():
        return {}
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    keep = ("name", "version", "arch", "task", "class_names", "activation", "input_size",
            "intended_use", "training", "metrics")
    return {k: card[k] for k in keep if k in card} if isinstance(card, dict) else {}


def task_cards(run: str | Path) -> list[dict[str, Any]]:
    """One card (a JSON-able dict) per task of the run."""
    run = Path(run)
    frame = ResultStore(run).table()
    if frame.empty:
        raise DataError(run, "no verified result parts to describe; run `pellucid bench` first")
    found = answers(run, frame)
    info, settings = found.run, found.settings
    baselines = found.baselines
    cards = []
    for (dataset, model), part in frame.groupby(stats.TASK, sort=True):
        key = f"{model}|{dataset}"
        parts = found.task(dataset, model)
        mine, rec, checks = parts["versus"], parts["recommendation"], parts["checks"]
        untrusted = sorted(parts["untrusted"])
        chance = {key: parts["chance"]}
        counts = {(dataset, model): parts["counts"]}
        task_info = (info.get("tasks") or {}).get(key, {}) if isinstance(info.get("tasks"), dict) \
            else {}
        cost = part.groupby("method", as_index=False).agg(seconds_per_case=("explain_seconds", "mean"),
                                                          forwards_per_case=("forwards_per_case", "mean"))
        recommended = []
        if rec is not None and rec["verdicts"].get("better", 0) and not chance.get(key):
            rows = mine[mine["method"] == rec["best"]] if not mine.empty else pd.DataFrame()
            recommended.append({"method": rec["best"], "seconds_per_case": rec["best_seconds"],
                                "verdicts": rows[["metric", "verdict", "mean", "baseline",
                                                  "baseline_mean", "diff", "diff_ci_low",
                                                  "diff_ci_high", "p_holm"]].to_dict("records")})
            for b in rec["budgets"]:  # a cheaper method, where one is shown better on something
                if b.get("better", 0) and b["method"] not in {r["method"] for r in recommended}:
                    rows = mine[mine["method"] == b["method"]]
                    recommended.append({"method": b["method"], "seconds_per_case": b["seconds"],
                                        "budget_seconds": b["budget"],
                                        "verdicts": rows[["metric", "verdict", "diff", "diff_ci_low",
                                                          "diff_ci_high"]].to_dict("records")})
        undetermined = mine[mine["verdict"] == "undetermined"] if not mine.empty else pd.DataFrame()
        limitations = list(chance.get(key, []))
        for metric in untrusted:
            limitations.append(f"{metric} {glance.failed_checks(parts['untrusted'][metric])}: its "
                               f"verdicts carry little weight.")
        if "conservation" in part:
            lrp = part[part["method"].str.startswith("lrp")].drop_duplicates(["method", "case_id",
                                                                               "target"])
            cons = lrp["conservation"].dropna()
            if len(cons) and not 0.25 <= float(cons.mean()) <= 4:
                limitations.append(f"LRP's relevance sums to {cons.mean():.0%} of the explained "
                                   f"score on average (tolerance 25% to 400%).")
        limitations.append(f"The verdicts hold for the {counts[(dataset, model)]['cases']} cases of "
                           f"{dataset} and this model's weights only; another model, scanner or "
                           f"population needs its own run.")
        card = {
            "task": {"dataset": dataset, "model": model, **counts[(dataset, model)]},
            "model": {"weights_sha256": task_info.get("weights_sha256"),
                      **_model_card(run, model)},
            "data": {"dataset": dataset, "cases": counts[(dataset, model)]["cases"],
                     "case_target_pairs": counts[(dataset, model)]["pairs"]},
            "answer": glance.sentences(rec, mine, counts[(dataset, model)], parts["untrusted"],
                                       chance.get(key)),
            "recommended": recommended,
            "verdict_counts": {v: int((mine["verdict"] == v).sum()) if not mine.empty else 0
                               for v in stats.VERDICTS},
            "sanity": glance.sanity_rows(part, baselines),
            "metric_checks": {m: {k: t.get(k) for k in ("IEC_AR", "IEC_NR", "IAC_AR", "IAC_NR", "MC",
                                                        "separates", "stable", "trusted", "pairs")}
                              for m, t in checks.items()},
            "undetermined": undetermined[["metric", "method", "diff", "diff_ci_low", "diff_ci_high",
                                          "cases_to_settle"]].to_dict("records")
            if not undetermined.empty else [],
            "cost": cost.to_dict("records"),
            "limitations": limitations,
            "checklist": CHECKLIST,
            "run": {"folder": str(run), "config": info.get("config"),
                    "config_hash": info.get("config_hash"), "started": info.get("started"),
                    "pellucid": (info.get("versions") or {}).get("pellucid"),
                    "verdict_settings": {"alpha": settings[0], "min_effect": settings[1] or 0.0}},
        }
        cards.append(_clean(card))
    return cards


def _num(v: Any, digits: str = ".3g") -> str:
    return "n/a" if v is None else format(v, digits)


def card_markdown(card: dict[str, Any]) -> str:
    """The card as Markdown (the JSON's content, for a person)."""
    t, m = card["task"], card["model"]
    lines = [f"# Explanation card: {t['model']} on {t['dataset']}", ""]
    lines += ["## Model", ""]
    lines.append(f"- name: {m.get('name') or t['model']}" + (f" {m['version']}" if m.get("version") else ""))
    for k in ("arch", "task", "activation", "input_size", "class_names"):
        if m.get(k):
            lines.append(f"- {k}: {m[k]}")
    lines.append(f"- weights SHA-256: {m.get('weights_sha256') or 'not recorded'}")
    lines += ["", "## Data", "",
              f"- {t['dataset']}: {t['cases']} cases explained ({t['pairs']} case-target pairs)", ""]
    lines += ["## The answer", ""] + [f"{i}. {s}" for i, s in enumerate(card["answer"], 1)] + [""]
    lines += ["## Recommended", ""]
    if not card["recommended"]:
        lines.append("No method is recommended: none is shown better than the trivial baselines "
                     "on a quality metric (or the model is near chance).")
    for r in card["recommended"]:
        budget = f" (within {r['budget_seconds']:g} s per case)" if r.get("budget_seconds") else ""
        lines.append(f"- **{r['method']}**{budget}: {_num(r['seconds_per_case'])} s per case")
        for v in r["verdicts"]:
            lines.append(f"  - {v['metric']}: {v['verdict'].replace('_', ' ')}, difference "
                         f"{_num(v['diff'], '+.3g')} (95% CI {_num(v['diff_ci_low'], '+.3g')} to "
                         f"{_num(v['diff_ci_high'], '+.3g')})")
    counts = card["verdict_counts"]
    lines += ["", "## Verdicts against the trivial baselines", "",
              f"better {counts['better']}, not better {counts['not_better']}, undetermined "
              f"{counts['undetermined']} (method x quality metric; alpha "
              f"{card['run']['verdict_settings'].get('alpha', stats.ALPHA)})", ""]
    lines += ["## Sanity checks", ""]
    lines += [f"- {s['metric']} / {s['method']}: " + (f"passed in {s['pass_rate']:.0%} of "
                                                      f"{s['cases']} cases" if s["pass_rate"] is not None
                                                      else f"mean {_num(s['mean'])}")
              for s in card["sanity"]] or ["- none in this run"]
    lines += ["", "## Which metrics can be trusted here (MetaQuantus criteria)", ""]
    word = {True: "trusted", False: "NOT trusted", None: "cannot tell (no pairs for a criterion)"}
    lines += [f"- {m}: {word[c['trusted']]} (tells randomised-model maps "
              f"apart, IEC_AR {_num(c['IEC_AR'])}; ranks methods stably under input noise, IEC_NR "
              f"{_num(c['IEC_NR'])}; {c['pairs']} pairs)" for m, c in card["metric_checks"].items()] \
        or ["- not checked in this run (`metric_trust: true` in the configuration)"]
    lines += ["", "## What this run cannot tell", ""]
    if card["undetermined"]:
        for u in card["undetermined"]:
            settle = (f"; about {int(u['cases_to_settle'])} cases would show the observed difference"
                      if u.get("cases_to_settle") else "; the observed difference does not favour "
                                                       "the method")
            lines.append(f"- {u['method']} on {u['metric']}: difference {_num(u['diff'], '+.3g')} "
                         f"(95% CI {_num(u['diff_ci_low'], '+.3g')} to "
                         f"{_num(u['diff_ci_high'], '+.3g')}){settle}")
    else:
        lines.append("- every verdict is settled with these cases")
    lines += ["", "## Cost", "", "| method | seconds per case | forwards per case |", "|---|---|---|"]
    lines += [f"| {c['method']} | {_num(c['seconds_per_case'])} | {_num(c['forwards_per_case'])} |"
              for c in card["cost"]]
    lines += ["", "## Known limitations", ""] + [f"- {x}" for x in card["limitations"]]
    lines += ["", "## Reporting items this card answers", ""]
    lines += [f"- {c['item']}: {c['answered_by']}" for c in card["checklist"]]
    run = card["run"]
    lines += ["", f"Run {run['folder']} (config {run['config']}, hash {run['config_hash']}, started "
                  f"{run['started']}, pellucid {run['pellucid']}).", ""]
    return "\n".join(lines)


def write_cards(run: str | Path) -> list[Path]:
    """Write ``cards/<model>__<dataset>.md`` and ``.json`` for every task of ``run``."""
    run = Path(run)
    folder = run / "cards"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for card in task_cards(run):
        stem = f"{card['task']['model']}__{card['task']['dataset']}"
        (folder / f"{stem}.json").write_text(json.dumps(card, indent=2) + "\n")
        (folder / f"{stem}.md").write_text(card_markdown(card))
        written += [folder / f"{stem}.md", folder / f"{stem}.json"]
    return written
