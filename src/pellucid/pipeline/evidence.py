"""Benchmark evidence for a report (``pellucid explain --evidence RUN``): for each method used on
a case, how that method scored on this model in a ``pellucid bench`` run: every faithfulness and
localisation metric with its mean and 95 % bootstrap interval, its verdict against the best trivial
baseline (``better``, ``not_better`` or ``undetermined``: bench/stats.py ``against_baselines``, the
same words as the report) and the randomisation sanity check's pass rate. The run must have
scored these very weights (its run.json records their SHA-256); anything else is refused, since
another model's scores are no evidence for this one.

The run must also show that this installation wrote it (:mod:`pellucid.bench.provenance`: run.json,
metric_trust.json and every result part carry a valid tag): a run folder rewritten by hand, with
its manifests' digests recomputed, is refused in one line. ``unverified=True``
(``--evidence-unverified``) states such a run's numbers with every line marked unverified."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pellucid.errors import ConfigError, DataError

CATEGORIES = ("faithfulness", "localization")


@dataclass
class Evidence:
    """Per method, the lines a report states (an empty list: nothing to state)."""

    run: str
    model: str
    weights_sha256: str
    methods: dict[str, list[str]] = field(default_factory=dict)
    verified: bool = True  # False: the run does not verify as this installation's (see above)

    def lines(self, method: str) -> list[str]:
        lines = self.methods.get(method) or [f"{method} was not benchmarked in {self.run}"]
        return lines if self.verified else [f"{UNVERIFIED}: {line}" for line in lines]

    def as_dict(self) -> dict[str, Any]:
        return {"run": self.run, "model": self.model, "weights_sha256": self.weights_sha256,
                "verified": self.verified,
                "methods": {m: self.lines(m) for m in self.methods}}


UNVERIFIED = "UNVERIFIED (benchmark run not written by this installation)"


def _run_record(info_file: Path) -> dict[str, Any]:
    """run.json's tasks, each checked for the shape pellucid writes; one-line DataError else."""
    try:
        info = json.loads(info_file.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise DataError(info_file, f"not a readable run record ({type(exc).__name__})") from None
    if not isinstance(info, dict):
        raise DataError(info_file, "not a run record (not a JSON object)")
    tasks = info.get("tasks") or {}
    if not isinstance(tasks, dict):
        raise DataError(info_file, f"'tasks' must map MODEL|DATASET to a record, got "
                                   f"{type(tasks).__name__}")
    for key, task in tasks.items():
        if "|" not in key or not isinstance(task, dict):
            raise DataError(info_file, f"task {key[:60]!r}: expected 'MODEL|DATASET' with a record")
        if not isinstance(task.get("weights_sha256"), (str, type(None))):
            raise DataError(info_file, f"task {key[:60]!r}: weights_sha256 must be a string")
    return info


def _model_in_run(run: Path, tasks: dict[str, Any], digest: str, name: str | None) -> str:
    models = sorted({key.split("|")[0] for key in tasks})
    if name is not None:
        if name not in models:
            raise ConfigError(f"--evidence-model {name!r} is not a model of {run} "
                              f"(it has {', '.join(models)})")
        return name
    same = sorted({key.split("|")[0] for key, t in tasks.items() if t.get("weights_sha256") == digest})
    if len(same) == 1:
        return same[0]
    if len(models) == 1:
        return models[0]
    raise ConfigError(f"{run} benchmarked {', '.join(models)}; give --evidence-model NAME")


def load_evidence(run: str | Path, loaded, methods: list[str], model: str | None = None,
                  unverified: bool = False) -> Evidence:
    """The evidence of ``run`` for ``methods`` of ``loaded`` (``model``: its name in the run, when
    the run has several and the weights do not tell; ``unverified``: accept a run this
    installation did not write, every line marked)."""
    from pellucid.bench import stats
    from pellucid.bench.answers import trust_file, verdict_settings, verdict_table
    from pellucid.bench.provenance import provenance
    from pellucid.bench.store import ResultStore

    run = Path(run)
    info_file = run / "run.json"
    if not info_file.is_file():
        raise ConfigError(f"--evidence {run}: not a pellucid bench run (no run.json)")
    info = _run_record(info_file)
    tasks = info.get("tasks") or {}
    origin = provenance(run)
    if not origin.verified and not unverified:
        raise ConfigError(f"--evidence {run}: this installation did not write the run "
                          f"({origin.why_not()}: copied from elsewhere, edited, or made before "
                          f"pellucid tagged runs); run `pellucid bench` here, or give "
                          f"--evidence-unverified to state its numbers marked unverified")
    digest = loaded.digest()
    name = _model_in_run(run, tasks, digest, model)
    recorded = {t.get("weights_sha256") for key, t in tasks.items() if key.split("|")[0] == name}
    if recorded == {None}:
        raise ConfigError(f"--evidence {run}: the run does not record the weights it scored "
                          f"(made before pellucid recorded them); run `pellucid bench` again")
    if recorded != {digest}:
        other = next(iter(recorded - {digest}), "") or ""
        raise ConfigError(f"--evidence {run}: model {name!r} was benchmarked with other weights "
                          f"(sha256 {other[:12]}) than this model ({digest[:12]}); its scores are not "
                          f"evidence for this model")
    frame = ResultStore(run).table()
    frame = frame[frame["model"] == name] if not frame.empty else frame
    evidence = Evidence(str(run), name, digest, verified=origin.verified)
    if frame.empty:
        return evidence
    summ = stats.summary(frame)
    versus = verdict_table(frame, verdict_settings(info), trust_file(run))  # as the report says
    for method in methods:
        lines: list[str] = []
        for row in summ[(summ["method"] == method) & summ["category"].isin(CATEGORIES)].itertuples():
            line = (f"{row.dataset}: {row.metric} mean {row.mean:.3f} (95% CI {row.ci_low:.3f} to "
                    f"{row.ci_high:.3f}, n {row.n})")
            if not versus.empty:
                match = versus[(versus["dataset"] == row.dataset) & (versus["metric"] == row.metric)
                               & (versus["method"] == method)]
                if not match.empty:
                    v = match.iloc[0]
                    line += (f"; best trivial baseline {v['baseline']} {v['baseline_mean']:.3f}: "
                             f"{v['verdict']} (difference {v['diff']:+.3f}, 95% CI "
                             f"{v['diff_ci_low']:+.3f} to {v['diff_ci_high']:+.3f}; Holm p "
                             f"{v['p_holm']:.2g})")
                    if v.get("metric_trusted") is False:
                        line += (f"; {row.metric} did not pass the metric checks on this task, so "
                                 f"this verdict carries little weight")
            lines.append(line)
        lines += _randomization(frame, method)
        evidence.methods[method] = lines
    return evidence


def _randomization(frame, method: str) -> list[str]:
    """The randomisation sanity check's pass rate (a pass: the map changed more than the baseline
    similarity when the model's weights were randomised; Adebayo et al. 2018)."""
    import pellucid.metrics  # noqa: F401 - registers the metrics
    from pellucid.metrics.base import REGISTRY

    panel = {n for n in REGISTRY.names() if REGISTRY.get(n).report_panel == "randomization"}
    part = frame[(frame["method"] == method) & frame["metric_name"].isin(panel)]
    out = []
    for (dataset, metric), group in part.groupby(["dataset", "metric"], sort=True):
        passed = [bool(json.loads(e)["passed"]) for e in group["extra"] if e and "passed" in e]
        if passed:
            rate = sum(passed) / len(passed)
            out.append(f"{dataset}: randomisation sanity check ({metric}) passed in "
                       f"{rate:.0%} of {len(passed)} cases")
    return out


def load_options_evidence(loaded, options) -> Evidence | None:
    """The evidence ``options`` (a :class:`CaseOptions`) ask for, loaded before any case."""
    if options.evidence is None:
        if options.evidence_model is not None:
            raise ConfigError("--evidence-model goes with --evidence RUN")
        if options.evidence_unverified:
            raise ConfigError("--evidence-unverified goes with --evidence RUN")
        return None
    return load_evidence(options.evidence, loaded, list(options.methods), options.evidence_model,
                         options.evidence_unverified)
