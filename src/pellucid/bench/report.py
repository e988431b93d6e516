"""The benchmark report: one self-contained ``report.html`` (figures embedded as PNG data URIs)
and the tables as CSV, Markdown and LaTeX under ``tables/``. Every number and figure is computed
from the run's own table, performance file and stored maps."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from jinja2 import Environment, FileSystemLoader

import pellucid.bench.glance as glance
import pellucid.bench.stats as stats
from pellucid.bench.answers import answers, side_file
from pellucid.bench.store import ResultStore
from pellucid.errors import DataError, PellucidError
from pellucid.progress import warn


def _declared(frame: pd.DataFrame, attribute: str) -> dict[str, Any]:
    """{metric name in the table: its class's ``attribute``} for the metrics that declare one (a
    name the registry does not know, from an old run, declares nothing)."""
    from pellucid.metrics.base import REGISTRY

    out = {}
    for name in sorted(set(frame["metric_name"])):
        try:
            value = getattr(REGISTRY.get(name), attribute)
        except PellucidError:
            continue
        if value is not None:
            out[name] = value
    return out


_png = glance.png


def markdown_table(frame: pd.DataFrame) -> str:
    cols = list(frame.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(_fmt(row[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def write_tables(frames: dict[str, pd.DataFrame], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, frame in frames.items():
        frame.to_csv(folder / f"{name}.csv", index=False)
        (folder / f"{name}.md").write_text(markdown_table(frame))
        (folder / f"{name}.tex").write_text(frame.to_latex(index=False, float_format="%.4g"))


def _metric_charts(summ: pd.DataFrame) -> str:
    metrics = list(dict.fromkeys(summ["metric"]))
    cols = 4
    rows = math.ceil(len(metrics) / cols)
    methods = sorted(summ["method"].unique())
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 0.22 * len(methods) * rows + 1.2 * rows),
                             squeeze=False)
    for ax, metric in zip(axes.flat, metrics, strict=False):
        part = summ[summ["metric"] == metric].set_index("method").reindex(methods)
        y = np.arange(len(methods))
        mean = part["mean"].to_numpy(dtype=float)
        err = np.vstack([mean - part["ci_low"].to_numpy(dtype=float),
                         part["ci_high"].to_numpy(dtype=float) - mean])
        ax.barh(y, mean, xerr=np.nan_to_num(err), color="#4C72B0", ecolor="#333", capsize=2)
        ax.set_yticks(y, methods, fontsize=7)
        ax.invert_yaxis()
        arrow = "higher is better" if bool(part["higher_is_better"].dropna().iloc[0]) else \
            "lower is better"
        ax.set_title(f"{metric} ({arrow})", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.tight_layout()
    return _png(fig)


def _curve_metrics(frame: pd.DataFrame) -> list[str]:
    """The metrics of ``frame`` that declare a report curve and carry curves."""
    labels = _declared(frame, "report_curve")
    return [m for m in labels if frame[(frame["metric_name"] == m)]["curve"].notna().any()]


def _curves(frame: pd.DataFrame) -> str | None:
    """Mean curves of every metric that declares a report curve (its x-axis label)."""
    labels = _declared(frame, "report_curve")
    names = _curve_metrics(frame)
    if not names:
        return None
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), squeeze=False)
    for ax, metric in zip(axes[0], names, strict=True):
        part = frame[(frame["metric_name"] == metric) & frame["curve"].notna()]
        for method, group in part.groupby("method"):
            curves = [np.asarray(c, dtype=float) for c in group["curve"]]
            length = min(len(c) for c in curves)
            mean = np.mean([c[:length] for c in curves], axis=0)
            ax.plot(np.linspace(0, 1, length), mean, label=f"{method} ({group['value'].mean():.3f})",
                    lw=1)
        ax.set_xlabel(labels[metric])
        ax.set_ylabel("score")
        ax.set_title(f"{metric}: mean curve (AUC)")
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return _png(fig)


def _randomization(frame: pd.DataFrame) -> tuple[str | None, pd.DataFrame]:
    """The panel of the metrics that declare ``report_panel = "randomization"``."""
    panel = [m for m, kind in _declared(frame, "report_panel").items() if kind == "randomization"]
    part = frame[frame["metric_name"].isin(panel) & frame["curve"].notna()]
    if part.empty:
        return None, pd.DataFrame()
    fig, ax = plt.subplots(figsize=(8, 4))
    rows = []
    baseline = float("nan")
    steps: list[str] = []
    for method, group in part.groupby("method"):
        curves = np.array([np.asarray(c, dtype=float) for c in group["curve"]])
        extras = [json.loads(e) for e in group["extra"] if e]
        steps = extras[0]["steps"] if extras else steps
        key = group["metric"].iloc[0]
        base = extras[0]["baseline"] if extras else {}
        sim = next(iter(base)) if base else ""
        metric_sim = [k for k in base if k in key] or ["ssim"]
        baseline = float(base.get(metric_sim[0], base.get(sim, float("nan")))) if base else baseline
        ax.plot(range(1, curves.shape[1] + 1), np.nanmean(curves, 0), marker="o", ms=3, lw=1,
                label=method)
        passed = [e["passed"] for e in extras]
        rows.append({"method": method, "final similarity": float(np.nanmean(curves[:, -1])),
                     "baseline": baseline, "pass rate": float(np.mean(passed)) if passed else np.nan})
    ax.axhline(baseline, color="k", ls="--", lw=1, label="randomisation baseline")
    ax.set_xticks(range(1, len(steps) + 1), steps, rotation=60, fontsize=6, ha="right")
    ax.set_ylabel("similarity to the original map")
    ax.set_xlabel("randomised down to (from the output)")
    ax.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    return _png(fig), pd.DataFrame(rows).sort_values("final similarity")


def task_maps(store: ResultStore, frame: pd.DataFrame) -> dict[str, dict[str, np.ndarray]]:
    """{method: {"case|target": map}} from the stored maps of the task's units."""
    maps: dict[str, dict[str, np.ndarray]] = {}
    for unit, part in frame.groupby("unit", sort=False):
        stored = store.load_maps(unit)
        if "attributions" not in stored:
            continue
        ids = list(dict.fromkeys(zip(part["case_id"], part["target"], strict=True)))
        for (cid, tgt), m in zip(ids, stored["attributions"], strict=False):
            maps.setdefault(part["method"].iloc[0], {})[f"{cid}|{tgt}"] = m
    return maps


def _grey(image: np.ndarray, size: int) -> np.ndarray:
    """The image min-max scaled to [0, 1] and resized to ``size`` x ``size`` (bilinear)."""
    from scipy.ndimage import zoom

    img = image.astype(np.float32)
    lo, hi = img.min(), img.max()
    grey = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    if grey.shape != (size, size):
        grey = zoom(grey, (size / grey.shape[0], size / grey.shape[1]), order=1)
    return grey


def _cell(grey: np.ndarray, heat: np.ndarray | None, size: int) -> np.ndarray:
    """An RGB tile: the scaled grey image (:func:`_grey`), with the min-max scaled map blended
    over it in ``jet``."""
    from scipy.ndimage import zoom

    rgb = np.repeat(grey[..., None], 3, axis=2)
    if heat is not None:
        h = heat.astype(np.float32)
        lo, hi = np.nanmin(h), np.nanmax(h)
        h = (h - lo) / (hi - lo) if hi > lo else np.zeros_like(h)
        if h.shape != (size, size):
            h = zoom(h, (size / h.shape[0], size / h.shape[1]), order=1)
        rgb = 0.55 * rgb + 0.45 * plt.get_cmap("jet")(h)[..., :3]
    return rgb


def _gallery(maps: dict[str, dict[str, np.ndarray]], images: dict[str, np.ndarray],
             methods: list[str], cases: list[int], titles: list[str], size: int = 192) -> str | None:
    """Cases (rows) x methods (columns) as one mosaic: the image with the ground truth outlined,
    then each method's map over it."""
    from scipy.ndimage import binary_dilation, zoom

    keys = [f"{c}|{t}" for c, t in zip(images["case_ids"], images["targets"], strict=True)]
    methods = [m for m in methods if m in maps]
    if not methods or not cases:
        return None
    gap = 4
    cols = len(methods) + 1
    mosaic = np.ones((len(cases) * (size + gap), cols * (size + gap), 3), dtype=np.float32)
    for r, i in enumerate(cases):
        grey = _grey(images["images"][i], size)  # once per row: every tile of the row is over it
        tiles = [_cell(grey, None, size)]
        if "masks" in images and images["masks"][i].any():
            m = images["masks"][i].astype(float)
            m = zoom(m, (size / m.shape[0], size / m.shape[1]), order=0) > 0.5
            edge = binary_dilation(m) & ~m
            tiles[0][edge] = (0.2, 1.0, 0.2)
        tiles += [_cell(grey, maps[method].get(keys[i]), size) for method in methods]
        for c, tile in enumerate(tiles):
            y, x = r * (size + gap), c * (size + gap)
            mosaic[y:y + size, x:x + size] = tile
    return _labelled_png((np.clip(mosaic, 0, 1) * 255 + 0.5).astype(np.uint8),
                         ["image", *methods], titles, size, gap)


def _labelled_png(mosaic: np.ndarray, columns: list[str], rows: list[str], size: int,
                  gap: int) -> str:
    """The 8-bit RGB mosaic of ``size``-pixel tiles ``gap`` apart at its own resolution (one image
    pixel per PNG pixel, no resampling) with the column names centred above the tiles and the row
    titles left of them, as a PNG data URI. Drawn with Pillow in matplotlib's DejaVu Sans:
    matplotlib's imshow resampled the large mosaic for 1.8 s per gallery, most of the report's
    time."""
    import base64
    import io

    from matplotlib import font_manager
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(font_manager.findfont("DejaVu Sans"), 13)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = 8 + int(max((probe.textlength(t, font=font) for t in rows), default=0))
    top = 24
    height, width = mosaic.shape[:2]
    canvas = Image.new("RGB", (left + width, top + height), "white")
    canvas.paste(Image.fromarray(mosaic), (left, top))
    draw = ImageDraw.Draw(canvas)
    pitch = size + gap
    for c, name in enumerate(columns):
        draw.text((left + c * pitch + size / 2, top - 5), name, fill="black", font=font, anchor="md")
    for r, title in enumerate(rows):
        draw.text((left - 6, top + r * pitch + size / 2), title, fill="black", font=font, anchor="rm")
    buf = io.BytesIO()
    canvas.save(buf, format="png", compress_level=3)  # 2-3x faster than 6, a few % larger
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _best_worst(frame: pd.DataFrame, method: str, keys: list[str]) -> tuple[list[int], list[str], str]:
    """The best and the worst of the gallery's cases (``keys``: "case|target") for ``method`` on
    the first metric (by ``gallery_rank``) whose scores of those cases differ: a metric on which
    they all tie (a pointing game that every case hits) has no best or worst case to show. With
    every metric tied, the first one and its two tied cases, as before."""
    ranks = _declared(frame, "gallery_rank")
    ordered = [m for m in sorted(ranks, key=lambda m: (ranks[m], m))
               if frame[(frame["metric_name"] == m)]["value"].notna().any()]
    if not ordered:
        return [], [], ""
    key = frame["case_id"].astype(str) + "|" + frame["target"].astype(str)
    shown = frame[key.isin(keys) & (frame["method"] == method)].dropna(subset=["value"])
    metric, part = ordered[0], shown[shown["metric_name"] == ordered[0]]
    for name in ordered:
        candidate = shown[shown["metric_name"] == name]
        if candidate["value"].nunique() > 1:
            metric, part = name, candidate
            break
    if part.empty:
        return [], [], metric
    higher = bool(part["higher_is_better"].iloc[0])
    part = part.sort_values("value", ascending=not higher, kind="stable")
    picks = [part.iloc[0], part.iloc[-1]]
    idx, titles = [], []
    for label, row in zip(("best", "worst"), picks, strict=True):
        idx.append(keys.index(f"{row['case_id']}|{row['target']}"))
        titles.append(f"{label}: {metric} {row['value']:.2f}")
    return idx, titles, metric


def _modality_chart(info: dict, shares: dict[str, np.ndarray]) -> tuple[str, pd.DataFrame]:
    """Per-modality bars: the model's reliance (share of the positive exact Shapley values) next
    to each method's share of positive attribution per input channel; the table behind it."""
    names = info["channels"]
    phi = np.clip(np.asarray(info["shapley"], dtype=float), 0, None)
    reliance = phi / np.clip(phi.sum(1, keepdims=True), 1e-30, None)
    rows = {"model (exact Shapley)": reliance.mean(0)}
    rows.update({m: v.mean(0) for m, v in sorted(shares.items())})
    table = pd.DataFrame(rows, index=names).T.reset_index(names="source")
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(names)), 3.6))
    width = 0.8 / len(rows)
    for i, (label, values) in enumerate(rows.items()):
        ax.bar(np.arange(len(names)) + (i - (len(rows) - 1) / 2) * width, values, width,
               label=label, color="black" if i == 0 else None)
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_ylabel("share")
    ax.set_title("per-modality importance: model reliance vs where each method puts attribution",
                 fontsize=9)
    ax.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    return _png(fig), table


def _channel_shares(store: ResultStore, frame: pd.DataFrame) -> dict[str, np.ndarray]:
    shares: dict[str, list[np.ndarray]] = {}
    for unit, part in frame.groupby("unit", sort=False):
        stored = store.load_maps(unit)
        if "channel_share" in stored:
            shares.setdefault(part["method"].iloc[0], []).append(stored["channel_share"])
    return {m: np.concatenate(v) for m, v in shares.items()}


def _resolution(frame: pd.DataFrame) -> tuple[str | None, pd.DataFrame]:
    """Localisation against map resolution: each method's map stride (input pixels per map
    pixel) and its mean localisation scores, as a table and a scatter per metric."""
    loc = frame[(frame["category"] == "localization") & frame["value"].notna()]
    if loc.empty or "map_stride" not in loc or loc["map_stride"].nunique() < 2:
        return None, pd.DataFrame()
    table = loc.groupby(["method", "metric"], as_index=False).agg(
        map_stride=("map_stride", "mean"), mean=("value", "mean")).pivot_table(
        index=["method", "map_stride"], columns="metric", values="mean").reset_index()
    table = table.sort_values("map_stride")
    metrics = [c for c in table.columns if c not in ("method", "map_stride")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        ax.scatter(table["map_stride"], table[metric], s=14)
        for _, r in table.iterrows():
            ax.annotate(r["method"], (r["map_stride"], r[metric]), fontsize=5)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("map stride (input px per map px)")
        ax.set_title(metric, fontsize=8)
    fig.tight_layout()
    return _png(fig), table


def _largest_errors(images: dict[str, np.ndarray], count: int) -> tuple[list[int], list[str]]:
    """Cases with the largest error regions (the masks of an fp/fn task), largest first."""
    if "masks" not in images:
        return [], []
    sizes = images["masks"].reshape(len(images["masks"]), -1).sum(1)
    order = [int(i) for i in np.argsort(-sizes)[:count] if sizes[i] > 0]
    return order, [f"{images['case_ids'][i]}: {int(sizes[i])} px in this slice" for i in order]


def _performance_rows(perf: dict) -> list[dict[str, Any]]:
    rows = []
    for key, info in perf.items():
        model, dataset = key.split("|")
        rep = info.get("report", {})
        row = {"model": model, "dataset": dataset, "task": info.get("task"), "cases": info.get("cases")}
        if info.get("error"):
            row["note"] = info["error"]
        for k in ("macro_auroc", "macro_precision", "macro_recall", "macro_f1", "accuracy",
                  "mean_dice", "mean_hd95", "mae", "rmse", "r2", "c_index"):
            if k in rep:
                row[k] = rep[k]
            if k == "macro_auroc" and rep.get("macro_auroc_ci"):
                lo, hi = rep["macro_auroc_ci"]
                row["macro_auroc 95% CI"] = f"{lo:.3f} to {hi:.3f}"
        rows.append(row)
    return rows


def _galleries(store: ResultStore, part: pd.DataFrame, gallery_npz: dict[str, np.ndarray], key: str,
               methods: list[str], info: dict, size: int) -> dict[str, Any]:
    """The task's map galleries: the first cases, the best and worst cases of the first method,
    and the largest errors for fp/fn tasks."""
    task: dict[str, Any] = {}
    images = {f.split("::", 1)[1]: v for f, v in gallery_npz.items() if f.startswith(key + "::")}
    n = min(len(images["images"]), size)
    ids = [f"{c}|{t}" for c, t in zip(images["case_ids"], images["targets"], strict=True)]
    maps = task_maps(store, part)
    task["gallery"] = _gallery(maps, images, methods, list(range(n)),
                               [f"{images['case_ids'][i]} ({images['targets'][i]})" for i in range(n)])
    if methods:
        idx, titles, metric = _best_worst(part, methods[0], ids)
        task["extremes_metric"] = metric
        task["extremes"] = _gallery(maps, images, methods, idx, titles) if idx else None
    if info.get("region") in ("fp", "fn"):
        idx, titles = _largest_errors(images, n)
        task["errors"] = _gallery(maps, images, methods, idx, titles) if idx else None
    return task


REQUIRED_COLUMNS = ("dataset", "model", "method", "metric", "metric_name", "value", "case_id",
                    "target", "reason", "explain_seconds", "unit")


def read_gallery(path: Path) -> dict[str, np.ndarray]:
    """The gallery images (no unpickling; {} with a warning when the file is broken)."""
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as exc:  # zip and npy format errors of several types
        warn(f"{path.name} unreadable ({type(exc).__name__}); the galleries are left out")
        return {}


def _optional(name: str, build, default):
    """An optional report section built from a side file; a malformed file costs the section, not
    the report."""
    try:
        return build()
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        warn(f"{name} has unexpected content ({type(exc).__name__}); its section is left out")
        return default


def _int(value: Any, default: int) -> int:
    try:
        return int(value) if value else default
    except (TypeError, ValueError):
        return default


def write_report(out: str | Path, frame: pd.DataFrame | None = None) -> Path:
    """Compute the statistics of the run in ``out`` and write ``report.html`` and ``tables/``."""
    out = Path(out)
    store = ResultStore(out)
    frame = store.table() if frame is None else frame
    missing = [c for c in REQUIRED_COLUMNS if c not in frame]
    if frame.empty or missing:
        raise DataError(out, "no verified result parts to report on" + (
            f" (columns {missing} missing)" if missing and not frame.empty else "")
            + "; run `pellucid bench` on its configuration to compute them")
    found = answers(out, frame)
    run, perf = found.run, found.performance
    gallery_npz = read_gallery(out / "gallery.npz")
    modality = side_file(out / "modality.json")
    task_info = run.get("tasks", {}) if isinstance(run.get("tasks"), dict) else {}
    summ, costq, versus, baselines = found.summary, found.costq, found.versus, found.baselines
    tests, pairs = stats.friedman(frame)
    recs = found.recommendations
    winners = stats.family_winners(summ, versus, baselines)
    block_ranks = stats.block_ranks(frame)
    cost = frame.groupby(["dataset", "model", "method"], as_index=False).agg(
        seconds_per_case=("explain_seconds", "mean"), forwards_per_case=("forwards_per_case", "mean"),
        backward_passes=("backward_passes", "mean"), peak_memory_mb=("peak_memory_bytes", "mean"))
    cost["peak_memory_mb"] = cost["peak_memory_mb"] / 2**20
    if "work_ratio" in frame:  # MACs done / MACs of full forwards (below 1: incremental)
        work = frame.groupby(["dataset", "model", "method"], as_index=False).agg(
            work_ratio=("work_ratio", "mean"))
        cost = cost.merge(work, on=["dataset", "model", "method"], how="left")
    if "conservation" in frame:  # LRP: the mean relevance sum over the explained score
        kept = frame.drop_duplicates(["dataset", "model", "method", "case_id", "target"])
        cons = kept.groupby(["dataset", "model", "method"], as_index=False).agg(
            conservation=("conservation", "mean"))
        cost = cost.merge(cons, on=["dataset", "model", "method"], how="left")
    skipped = frame[frame["reason"] != ""].groupby(["method", "metric", "reason"], as_index=False) \
        .size().rename(columns={"size": "rows"})
    write_tables({"summary": summ, "summary_by_class": stats.summary(frame, by=["target"]),
                  "leaderboard": costq, "friedman": tests, "pairwise": pairs,
                  "against_baselines": versus, "critical_difference": block_ranks,
                  "cost": cost, "skipped": skipped,
                  "performance": pd.DataFrame(_optional("performance.json",
                                                        lambda: _performance_rows(perf), []))},
                 out / "tables")
    tasks = []
    for (dataset, model), part in frame.groupby(["dataset", "model"], sort=True):
        tsumm = summ[(summ["dataset"] == dataset) & (summ["model"] == model)]
        board = costq[(costq["dataset"] == dataset) & (costq["model"] == model)]
        methods = list(board["method"])
        task: dict[str, Any] = {"dataset": dataset, "model": model, "leaderboard": board,
                                "charts": _metric_charts(tsumm) if not tsumm.empty else None,
                                "curves": _curves(part),
                                "curve_metrics": _curve_metrics(part),
                                "baseline_methods": baselines}
        mine = found.task(dataset, model)
        task["against_baselines"] = mine["versus"]
        task["verdicts"] = stats.baseline_verdicts(task["against_baselines"])
        task["counts"], task["trust"], task["chance"] = mine["counts"], mine["checks"], mine["chance"]
        rec = mine["recommendation"]
        order = [rec["best"]] if rec else []
        order += [m for m in board["method"] if m not in order and m not in baselines]
        task["glance_figure"] = glance.verdict_figure(tsumm, task["against_baselines"], baselines,
                                                      order, set(mine["untrusted"]))
        task["sanity"] = glance.sanity_rows(part, baselines)
        task["sentences"] = glance.sentences(rec, task["against_baselines"], task["counts"],
                                             mine["untrusted"], task["chance"])
        task["untrusted"] = sorted(mine["untrusted"])
        task_ranks = block_ranks[(block_ranks["dataset"] == dataset) & (block_ranks["model"] == model)] \
            if not block_ranks.empty else pd.DataFrame()
        task["cd"] = glance.cd_diagram(task_ranks, baselines)
        task["randomization"], task["randomization_table"] = _randomization(part)
        key = f"{model}|{dataset}"
        info = task_info.get(key, {})
        task["info"] = info
        task["resolution"], task["resolution_table"] = _resolution(part)
        task["modality"], task["modality_table"] = None, pd.DataFrame()
        if key in modality:
            task["modality"], task["modality_table"] = _optional(
                "modality.json", lambda key=key, part=part: _modality_chart(
                    modality[key], _channel_shares(store, part)), (None, pd.DataFrame()))
        if f"{key}::images" in gallery_npz:
            task.update(_optional("gallery.npz", lambda key=key, part=part, info=info, methods=methods:
                                  _galleries(store, part, gallery_npz, key, methods, info,
                                             _int(run.get("gallery"), 6)), {}))
        task["friedman"] = tests[(tests["dataset"] == dataset) & (tests["model"] == model)] \
            if not tests.empty else pd.DataFrame()
        tasks.append(task)
    env = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"),
                      autoescape=True)  # select_autoescape would skip ".j2"
    env.filters["fmt"] = _fmt
    perf_rows = _optional("performance.json", lambda: _performance_rows(perf), [])
    columns = list(dict.fromkeys(k for row in perf_rows for k in row))
    perf_rows = [{k: row.get(k, "") for k in columns} for row in perf_rows]
    review = None
    if (out / "review" / "summary.json").is_file():  # `pellucid review analyze --bench OUT`
        review = side_file(out / "review" / "summary.json")
        frames = _optional("review/summary.json", lambda: {
            k: pd.DataFrame(v) for k, v in review["tables"].items()}, None)
        review = dict(review, frames=frames) if frames is not None else None
    html = env.get_template("report.html.j2").render(
        run=run, tasks=tasks, performance=perf_rows, recommendations=recs,
        winners=winners,
        cost=cost, skipped=skipped, rows=len(frame), review=review)
    path = out / "report.html"
    path.write_text(html)
    return path
