"""Build a review study from a benchmark run: de-identified case images (pixels only, neutral
codes), the model's prediction, the chosen methods' maps as overlays, and per rater a random case
order, a random order of the explanations under neutral letters and an optional no-explanation
control."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sqlalchemy import select

from pellucid.errors import ConfigError, DataError
from pellucid.review.db import Assignment, Case, Explanation, Rater, Study, make_engine, migrate, sessions
from pellucid.review.security import hash_token, new_token


@dataclass
class CreatedStudy:
    study_id: int
    admin_token: str
    invitations: dict[str, str]  # rater label -> token (shown once, stored hashed)


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def grey_png(image: np.ndarray) -> bytes:
    img = np.asarray(image, dtype=np.float64)
    lo, hi = np.percentile(img, 0.5), np.percentile(img, 99.5)
    grey = np.clip((img - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(img)
    return png_bytes((grey * 255).round().astype(np.uint8))


def overlay_png(heat: np.ndarray) -> bytes:
    """RGBA heatmap: jet colours, opacity rising with the (min-max scaled) attribution."""
    import matplotlib

    h = np.nan_to_num(np.asarray(heat, dtype=np.float64))
    lo, hi = h.min(), h.max()
    h = (h - lo) / (hi - lo) if hi > lo else np.zeros_like(h)
    rgba = matplotlib.colormaps["jet"](h)
    rgba[..., 3] = 0.85 * np.sqrt(h)
    return png_bytes((rgba * 255).round().astype(np.uint8))


def read_raters(path: str | Path) -> list[str]:
    """Rater labels: one per line, or a CSV with a ``label`` column; blank lines and # comments
    are ignored; labels must be unique."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--raters {path}: file not found")
    text = path.read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    if lines and "," in lines[0] and "label" in lines[0].split(","):
        labels = [r["label"].strip() for r in csv.DictReader(io.StringIO(text)) if r["label"].strip()]
    else:
        labels = lines
    if not labels:
        raise ConfigError(f"--raters {path}: no rater labels")
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ConfigError(f"--raters {path}: label {dup[0]!r} listed twice")
    return labels


def case_key(salt: str, case_id: str, target: str) -> str:
    """Salted hash of a benchmark case id and target: joins ratings to metrics without storing
    the id (ChestX-ray14 file names carry patient numbers)."""
    return hashlib.sha256(f"{salt}|{case_id}|{target}".encode()).hexdigest()


def _task(run: Path, task: str | None) -> tuple[str, pd.DataFrame]:
    from pellucid.bench.store import ResultStore

    table = ResultStore(run).table()
    if table.empty:
        raise DataError(run, "the benchmark run has no results")
    keys = sorted({f"{m}|{d}" for m, d in zip(table["model"], table["dataset"], strict=True)})
    if task is None:
        task = keys[0]
    if task not in keys:
        raise ConfigError(f"--task {task!r}: not in the run; tasks: {', '.join(keys)}")
    model, dataset = task.split("|")
    return task, table[(table["model"] == model) & (table["dataset"] == dataset)]


def create_study(run_dir: str | Path, db: str, raters: list[str], cases: int = 20,
                 methods: list[str] | None = None, task: str | None = None,
                 finding: str | None = None, control: float = 0.0, threshold: float = 0.5,
                 seed: int = 0, name: str | None = None) -> CreatedStudy:
    """Create a study in ``db`` from the benchmark run in ``run_dir``."""
    from pellucid.bench.report import task_maps
    from pellucid.bench.store import ResultStore

    run = Path(run_dir)
    if not (run / "gallery.npz").is_file():
        raise DataError(run, "not a benchmark run folder (no gallery.npz); run `pellucid bench` first")
    if not 0 <= control < 1:
        raise ConfigError(f"--control must be in [0, 1), got {control}")
    if cases < 1:
        raise ConfigError(f"--cases must be at least 1, got {cases}")
    task, frame = _task(run, task)
    from pellucid.bench.report import read_gallery

    gallery = read_gallery(run / "gallery.npz")
    fields = {f.split("::", 1)[1]: v for f, v in gallery.items() if f.startswith(task + "::")}
    if "predicted" not in fields:
        raise DataError(run, "the run predates stored predictions; re-run `pellucid bench`")
    available = sorted(frame["method"].unique())
    from pellucid.bench.stats import baseline_methods

    # the trivial baselines are what the benchmark compares with, not explanations to rate (they
    # can still be asked for by name, e.g. as a sanity control)
    methods = methods or [m for m in available if m not in baseline_methods(frame)]
    unknown = [m for m in methods if m not in available]
    if unknown:
        raise ConfigError(f"--methods: {unknown[0]!r} is not in task {task}; available: "
                          f"{', '.join(available)}")
    targets = list(fields["targets"])
    finding = finding or max(set(targets), key=targets.count)
    maps = task_maps(ResultStore(run), frame)
    usable = [i for i, t in enumerate(targets) if t == finding
              and all(f"{fields['case_ids'][i]}|{t}" in maps.get(m, {}) for m in methods)]
    if not usable:
        raise DataError(run, f"no case of task {task} with finding {finding!r} has maps of every "
                             f"chosen method")
    rng = np.random.default_rng(seed)
    labels = fields["labels"][usable]
    pos = [u for u, y in zip(usable, labels, strict=True) if y > 0.5]
    neg = [u for u, y in zip(usable, labels, strict=True) if y <= 0.5]
    rng.shuffle(pos)
    rng.shuffle(neg)
    half = min(len(neg), cases // 2)
    chosen = neg[:half] + pos[: cases - half]
    chosen += neg[half: half + cases - len(chosen)]
    chosen = [int(i) for i in rng.permutation(chosen)]
    engine = make_engine(db)
    migrate(engine)
    admin = new_token()
    salt = secrets.token_hex(16)
    tokens = {label: new_token() for label in raters}
    run_info = json.loads((run / "run.json").read_text()) if (run / "run.json").is_file() else {}
    with sessions(engine).begin() as s:
        study = Study(name=name or f"{run_info.get('config', run.name)}: {finding}", finding=finding,
                      methods=methods, control_fraction=control,
                      source={"run": str(run.resolve()), "task": task, "salt": salt, "seed": seed,
                              "config_hash": run_info.get("config_hash"), "threshold": threshold},
                      admin_token_hash=hash_token(admin), secret=secrets.token_hex(32))
        s.add(study)
        s.flush()
        case_rows = []
        for n, i in enumerate(chosen, start=1):
            cid, tgt = str(fields["case_ids"][i]), targets[i]
            score = float(fields["predicted"][i])
            case = Case(study_id=study.id, code=f"C{n:03d}", source_key=case_key(salt, cid, tgt),
                        truth=bool(fields["labels"][i] > 0.5), ai_score=score,
                        ai_positive=score >= threshold, image_png=grey_png(fields["images"][i]))
            case.explanations = [Explanation(method=m, overlay_png=overlay_png(maps[m][f"{cid}|{tgt}"]))
                                 for m in methods]
            s.add(case)
            case_rows.append(case)
        s.flush()
        for r, label in enumerate(raters):
            rater = Rater(study_id=study.id, label=label, token_hash=hash_token(tokens[label]))
            s.add(rater)
            s.flush()
            _assign(s, rater, case_rows, control, np.random.default_rng([seed, r]))
        study_id = study.id
    engine.dispose()
    return CreatedStudy(study_id, admin, tokens)


def _assign(session, rater: Rater, cases: list[Case], control: float, rng: np.random.Generator) -> None:
    for position, k in enumerate(rng.permutation(len(cases)), start=1):
        case = cases[int(k)]
        order = [case.explanations[int(j)].id for j in rng.permutation(len(case.explanations))]
        session.add(Assignment(rater_id=rater.id, case_id=case.id, position=position,
                               control=bool(rng.random() < control), order=order))


def add_rater(db: str, study_id: int, label: str, seed: int = 0) -> str:
    """Invite one more rater to a study (same cases, own random orders); returns the token."""
    engine = make_engine(db)
    token = new_token()
    with sessions(engine).begin() as s:
        study = s.get(Study, study_id)
        if study is None:
            raise ConfigError(f"study {study_id} does not exist")
        if s.scalar(select(Rater).where(Rater.study_id == study_id, Rater.label == label)):
            raise ConfigError(f"rater label {label!r} already exists in study {study_id}")
        rater = Rater(study_id=study_id, label=label, token_hash=hash_token(token))
        s.add(rater)
        s.flush()
        cases = list(s.scalars(select(Case).where(Case.study_id == study_id).order_by(Case.id)))
        _assign(s, rater, cases, study.control_fraction, np.random.default_rng([seed, rater.id]))
    engine.dispose()
    return token
