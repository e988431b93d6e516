"""``run_bench``: prepare models and cases, cut the grid into work units, run them locally or on
Ray, store every finished unit atomically, then write the tables, statistics and the report."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from rich.console import Console

import pellucid.bench.stats as stats
from pellucid.bench.config import BenchConfig, DatasetSpec, ModelSpec, load_config
from pellucid.bench.provenance import signed, write_signed
from pellucid.bench.store import ResultStore, unit_digest
from pellucid.bench.units import Unit, execute_unit, focus_slice, with_window
from pellucid.errors import ConfigError, DataError, PellucidError
from pellucid.explainers.accelerate import inference_forward
from pellucid.explainers.base import model_guard
from pellucid.paths import shared_data_dir
from pellucid.progress import track

console = Console()
EXECUTORS = ("local", "ray")


@dataclass
class CaseSet:
    """The (case, target) pairs of one model on one dataset, ready for the model."""

    x: torch.Tensor
    images: torch.Tensor  # reader units, for the gallery
    classes: torch.Tensor
    target_names: list[str]
    case_ids: list[str]
    masks: torch.Tensor | None  # the metrics' ground truth (the error region for fp/fn tasks)
    boxes: list[torch.Tensor] | None
    background: torch.Tensor
    truth: torch.Tensor | None = None  # the lesion masks of the explained classes
    prior: torch.Tensor | None = None  # per pair, the mean training ground truth of its class
    predicted: torch.Tensor | None = None  # the model's output for each target (see _scan)
    labels: torch.Tensor | None = None  # the ground truth: finding present (or the value)


def _root(spec_root: str | None) -> Path | None:
    if spec_root is None:
        return None
    p = Path(spec_root).expanduser()
    if p.exists():
        return p
    shared = shared_data_dir() / spec_root
    if shared.exists():
        return shared
    raise DataError(p, "dataset root not found (also looked under $PELLUCID_DATA)")


def _open(reader: str, root: str | None, split: str, options: dict, n: int | None = None):
    from pellucid.data import open_dataset

    opts = dict(options)
    if reader.startswith("phantom") and n is not None:
        opts.setdefault("n", n)
    return open_dataset(reader, _root(root), split=split, **opts)


def is_framework_folder(folder: Path) -> bool:
    """An nnU-Net results folder (or a fold of one) or a MONAI bundle."""
    from pellucid.models.bundle import is_bundle
    from pellucid.models.nnunet import is_results_folder

    return is_results_folder(folder) or (folder.name.startswith("fold_") and
                                         is_results_folder(folder.parent)) or is_bundle(folder)


def prepare_model(spec: ModelSpec, out: Path, seed: int):
    """The model of ``spec``: loaded from its folder, or trained once into ``out/models``."""
    from pellucid.models import TrainConfig, load_model, save_model, train

    if spec.path and ":" in spec.path and not Path(spec.path).exists():  # module:factory + weights
        loaded = load_model(spec.path, spec.weights)
        if loaded.card is None:
            raise DataError(spec.weights or spec.path, f"model {spec.name!r}: no card.json beside the "
                                                       f"weights; make one with pellucid import-model")
        # kept as a model folder of the run (the factory and these weights), which every unit loads
        import dataclasses

        folder = save_model(out / "models" / spec.name, loaded.module,
                            dataclasses.replace(loaded.card, factory=spec.path))
        return load_model(folder), folder
    if spec.path:
        folder = Path(spec.path)
        if not folder.is_absolute() and not folder.exists():
            folder = out / spec.path
        if is_framework_folder(folder):  # nnU-Net results, a MONAI bundle: read as they run
            return load_model(folder), folder
        if not (folder / "card.json").is_file() and not folder.is_file():
            raise DataError(folder, f"model {spec.name!r}: no saved model (card.json) here")
        return load_model(folder), folder
    folder = out / "models" / spec.name
    t = dict(spec.train or {})
    reader, root, options = t.pop("reader", None), t.pop("root", None), dict(t.pop("options", {}) or {})
    n_train, n_val = int(t.pop("n_train", 512)), int(t.pop("n_val", 128))
    if (folder / "card.json").is_file():
        loaded = load_model(folder)
        if loaded.card is not None and not loaded.card.training_inputs and reader:
            # trained before cards described their training inputs: describe them now, on the
            # same validation and test splits, and keep the description with the model
            from pellucid.models.training_inputs import describe_training_inputs

            val = _open(reader, root, "val", options, n_val)
            describe_training_inputs(loaded.module, loaded.card, val,
                                     _open(reader, root, "test", options, n_val))
            loaded.card.training_data = getattr(val, "training_data", "")  # as the reader says
            if loaded.card.training_data == "synthetic":
                loaded.card.finding_codes = {}
            save_model(folder, loaded.module, loaded.card)
            loaded = load_model(folder)
        return loaded, folder
    config = TrainConfig(seed=int(t.pop("seed", seed)), progress=True, **t)
    console.print(f"[bold]training[/] {spec.name} ({config.arch}, {config.epochs} epoch"
                  f"{'' if config.epochs == 1 else 's'})")
    result = train(_open(reader, root, "train", options, n_train), config,
                   _open(reader, root, "val", options, n_val),
                   _open(reader, root, "test", options, n_val), dataset_name=reader)
    save_model(folder, result.module, result.card)
    return load_model(folder), folder


def prepare_cases(dspec: DatasetSpec, mspec: ModelSpec, loaded, need_prior: bool = False,
                  seed: int = 0) -> CaseSet:
    """Scan the dataset for ``cases`` cases (with a lesion when required) and expand them into
    (case, target) pairs following the model's ``targets``. Cases are taken in the reader's order
    (a CSV's rows, a folder's sorted file names) unless the dataset says ``shuffle: true``: then
    in a random order drawn from ``seed``, the same on every run of the configuration."""
    if getattr(loaded, "framework", None) is not None:
        return framework_cases(dspec, mspec, loaded, need_prior, seed)
    card = loaded.card
    ds = _open(dspec.reader, dspec.root, dspec.split, card_options(dspec, card),
               max(4 * dspec.cases, 64))
    order = (np.random.default_rng(seed).permutation(len(ds)).tolist() if dspec.shuffle
             else range(len(ds)))
    names = list(card.class_names)
    segmentation = card.task == "segmentation"
    regression = card.task == "regression"
    wanted = mspec.targets
    explicit: list[int] | None = None
    if isinstance(wanted, list):
        explicit = []
        for t in wanted:
            if isinstance(t, int) and 0 <= t < len(names):
                explicit.append(t)
            elif t in names:
                explicit.append(names.index(t))
            else:
                raise ConfigError(f"models.{mspec.name}.targets: unknown target {t!r}; the model's "
                                  f"outputs: {', '.join(names)}")
    elif wanted not in ("positive", "predicted") or ((segmentation or regression)
                                                      and wanted != "positive"):
        raise ConfigError(f"models.{mspec.name}.targets: give 'positive', 'predicted' or a list")
    pairs: list[tuple[dict, int]] = []
    extra: list[dict] = []  # cases beyond the benchmark's: the background set of GradientSHAP
    n_cases = 0
    for i in order:
        if n_cases >= dspec.cases and len(extra) >= 8:
            break
        sample = ds[i]
        label = sample.get("label")
        if segmentation:
            classes = explicit or [0]
            keep = [k for k in classes if dspec.require == "any" or bool(sample["mask"][k].any())]
        elif regression:  # one target per case: the output; "lesion" needs a non-empty first mask
            k = (explicit or [0])[0]
            keep = [k] if dspec.require == "any" or "mask" not in sample or \
                bool(sample["mask"][0].any()) else []
        elif explicit is not None:
            keep = [k for k in explicit if dspec.require == "any" or _lesion(sample, k)]
        elif wanted == "positive":
            keep = [int(k) for k in torch.nonzero(label > 0).flatten()
                    if dspec.require == "any" or _lesion(sample, int(k))]
        else:
            keep = [-1]  # predicted: filled after one forward
        if (dspec.require == "lesion" and not keep) or n_cases >= dspec.cases:
            if len(extra) < 8:
                extra.append(sample)
            continue
        pairs += [(sample, k) for k in keep]
        n_cases += 1
    if not pairs:
        raise DataError(dspec.root or dspec.reader, f"dataset {dspec.name!r}: no usable cases")
    images = torch.stack([p[0]["image"] for p in pairs])
    x = card.normalize(images.float())
    classes = torch.tensor([k for _, k in pairs])
    has_masks = all("mask" in p[0] for p in pairs)

    def masks_of(chosen: torch.Tensor) -> torch.Tensor | None:  # a regressor's lesion: mask 0
        if not has_masks:
            return None
        return torch.stack([_class_mask(p[0], 0 if regression else k, dspec.name,
                                         not (segmentation or regression))
                            for (p, k) in zip(pairs, chosen.tolist(), strict=True)])

    errors = None
    if mspec.region in ("fp", "fn"):
        truth = masks_of(classes)
        if truth is None:
            raise DataError(dspec.name, f"region {mspec.region} needs ground-truth masks; the "
                                        f"dataset has none")
        errors = (mspec.region, truth)
    classes, predicted, regions = _scan(loaded, x, classes, errors)
    masks = truth = masks_of(classes)
    if regions is not None:  # explain only the cases that have an error region
        keep_rows = torch.nonzero(regions.flatten(1).any(1)).flatten()
        if len(keep_rows) == 0:
            kind = "false-positive" if mspec.region == "fp" else "false-negative"
            raise DataError(dspec.name, f"no case has a {kind} region: nothing to explain")
        masks = regions[keep_rows]
        x, images, classes = x[keep_rows], images[keep_rows], classes[keep_rows]
        truth, predicted = truth[keep_rows], predicted[keep_rows]
        pairs = [pairs[i] for i in keep_rows.tolist()]
    boxes = None
    if any("boxes" in p[0] for p in pairs):  # a case without a box of its class: no box (NaN)
        boxes = [p[0]["boxes"][p[0]["box_labels"] == k] if "boxes" in p[0] else torch.zeros(0, 4)
                 for p, k in zip(pairs, classes.tolist(), strict=True)]
        if masks is None and x.ndim == 4:  # boxes feed every localisation metric, as in evaluate()
            masks = boxes_as_masks(boxes, tuple(x.shape[2:]))
    labels = torch.tensor([_truth_label(p[0], k, segmentation, regression)
                           for p, k in zip(pairs, classes.tolist(), strict=True)])
    bg_source = extra or [p[0] for p in pairs[:8]]
    background = card.normalize(torch.stack([s["image"] for s in bg_source[:8]]).float())
    prior = _class_priors(dspec, tuple(x.shape[2:]), len(names), regression,
                          options=card_options(dspec, card)) if need_prior else None
    return CaseSet(x, images, classes, [names[k] for k in classes.tolist()],
                   [p[0]["case_id"] for p in pairs], masks, boxes, background, truth,
                   predicted=predicted, labels=labels,
                   prior=prior[classes.clamp_min(0)] if prior is not None else None)


def framework_cases(dspec: DatasetSpec, mspec: ModelSpec, loaded, need_prior: bool = False,
                    seed: int = 0) -> CaseSet:
    """The case set of a model that reads its own input (an nnU-Net results folder, a MONAI
    bundle): each case's file is read through the framework's own reading and preprocessing, and
    its ground-truth label file taken onto the same grid by the framework
    (:meth:`read_truth`); the targets are the listed classes, or every class but the background
    (channel 0) of a softmax model, each case's predicted region of that class. The benchmark
    batches the cases, so their grids must agree; a dataset whose files give several grids is
    refused in one line."""
    card, framework = loaded.card, loaded.framework
    if card.task != "segmentation":
        raise ConfigError(f"models.{mspec.name}: a framework model is benchmarked as a segmentation "
                          f"model; this one is {card.task}")
    if need_prior:
        raise ConfigError(f"models.{mspec.name}: the prior baseline reads training masks through "
                          f"pellucid's readers, not this framework's; leave it out (baselines)")
    if mspec.region in ("fp", "fn"):
        raise ConfigError(f"models.{mspec.name}: region {mspec.region} of a framework model is not "
                          f"supported yet; use the predicted region")
    ds = _open(dspec.reader, dspec.root, dspec.split, dict(dspec.options), max(4 * dspec.cases, 64))
    names = list(card.class_names)
    if isinstance(mspec.targets, list):
        wanted = []
        for t in mspec.targets:
            if not (t in names or (isinstance(t, int) and 0 <= t < len(names))):
                raise ConfigError(f"models.{mspec.name}.targets: unknown target {t!r}; the model's "
                                  f"outputs: {', '.join(names)}")
            wanted.append(names.index(t) if t in names else int(t))
    elif mspec.targets == "positive":
        wanted = list(range(1 if card.activation == "softmax" else 0, len(names)))
    else:
        raise ConfigError(f"models.{mspec.name}.targets: give 'positive' or a list")
    order = (np.random.default_rng(seed).permutation(len(ds)).tolist() if dspec.shuffle
             else range(len(ds)))
    xs, truths, pairs = [], [], []
    for i in order:
        if len(xs) >= dspec.cases:
            break
        sample = ds[i]
        if "path" not in sample:
            raise ConfigError(f"dataset {dspec.name!r}: a framework model reads each case from its "
                              f"file; reader {dspec.reader!r} gives no file (use the csv reader)")
        path = Path(sample["path"])
        framework.accepts(path)
        x, context = framework.read(path)
        labels = framework.read_truth(Path(sample["mask_path"]), path, context) \
            if "mask_path" in sample else None
        keep = [k for k in wanted if dspec.require == "any" or
                (labels is not None and bool((labels == k).any()))]
        if not keep:
            continue
        if xs and x.shape != xs[0].shape:
            raise DataError(path, f"dataset {dspec.name!r}: on the model's grid this case is "
                                  f"{tuple(x.shape[1:])}, the first {tuple(xs[0].shape[1:])}; the "
                                  f"benchmark batches cases of one grid (resample the files alike)")
        xs.append(x)
        truths.append(labels)
        pairs += [(len(xs) - 1, k, sample["case_id"]) for k in keep]
    if not pairs:
        raise DataError(dspec.root or dspec.reader, f"dataset {dspec.name!r}: no usable cases"
                        + ("" if dspec.require == "any" else " (require: lesion needs label files "
                                                              "with the target classes)"))
    index = torch.tensor([p[0] for p in pairs])
    x = torch.cat(xs)[index]
    classes = torch.tensor([p[1] for p in pairs])
    masks = None
    if all(t is not None for t in truths):
        masks = torch.stack([truths[i] == k for i, k, _ in pairs])
    classes, predicted, _ = _scan(loaded, x, classes)
    labels = torch.tensor([float(bool(m.any())) for m in masks]) if masks is not None else None
    return CaseSet(x, x.clone(), classes, [names[k] for k in classes.tolist()],
                   [p[2] for p in pairs], masks, None, torch.cat(xs)[:8], masks,
                   predicted=predicted, labels=labels)


GENERIC_READERS = ("csv", "folder", "coco")  # a user's data: read as the model card says
RESIZING_READERS = (*GENERIC_READERS, "chestxray14", "lgg")  # 2D readers that take the card's resize


def card_options(dspec: DatasetSpec, card) -> dict:
    """The reader options, with what the model card records about its inputs filled in for the
    generic readers: the resize method, and the size when the card's input is square and 2D (as
    ``pellucid explain`` reads an input for this model)."""
    options = dict(dspec.options)
    if dspec.reader in RESIZING_READERS:
        options.setdefault("resize", card.resize)
    if dspec.reader in GENERIC_READERS:
        size = list(card.input_size)
        if card.spatial_dims == 2 and len(size) == 2 and size[0] == size[1]:
            options.setdefault("size", size[0])
    return options


def _class_priors(dspec: DatasetSpec, spatial: tuple[int, ...], classes: int, regression: bool,
                  n: int | None = None, options: dict | None = None) -> torch.Tensor | None:
    """(K, *spatial): per class, the mean ground-truth mask (masks, or boxes made masks) over every
    case of the dataset's training split that has ground truth of that class (``n``: the first n
    cases only, for tests), read with the benchmark's reader ``options`` and resized to its grid.
    A class without any such case is NaN (the prior baseline refuses it in one line). None when
    the benchmark's own split is the training data (the prior would have seen the cases it is
    scored on) or the training split has no ground truth at all."""
    if dspec.split not in ("test", "val") or regression:
        return None
    try:
        train_ds = _open(dspec.reader, dspec.root, "train", dict(options or dspec.options), n)
    except PellucidError:
        return None
    total, count = torch.zeros(classes, *spatial, dtype=torch.float64), torch.zeros(classes)
    for i in range(len(train_ds) if n is None else min(len(train_ds), n)):
        sample = train_ds[i]
        for k in range(classes):
            if "mask" in sample and sample["mask"].shape[0] in (1, classes):
                m = sample["mask"][k if sample["mask"].shape[0] > 1 else 0].float()
                if sample["mask"].shape[0] == 1 and not bool(sample["label"][k] > 0):
                    continue  # one mask per image: the lesion of its own finding only
            elif "boxes" in sample and len(spatial) == 2:
                own = sample["boxes"][sample["box_labels"] == k]
                if not len(own):
                    continue
                m = boxes_as_masks([own], tuple(sample["image"].shape[1:]))[0].float()
            else:
                continue
            if not m.any():
                continue
            if tuple(m.shape) != tuple(spatial):
                mode = "bilinear" if len(spatial) == 2 else "trilinear"
                m = torch.nn.functional.interpolate(m[None, None], size=spatial, mode=mode,
                                                    align_corners=False)[0, 0]
            total[k] += m.double()
            count[k] += 1
    if not count.any():
        return None
    prior = (total / count.clamp_min(1).view(-1, *[1] * len(spatial))).float()
    prior[count == 0] = float("nan")  # no training ground truth of this class: no prior
    return prior


def _class_mask(sample: dict, k: int, dataset: str, classification: bool = True) -> torch.Tensor:
    """The ground truth of class ``k``: its channel of the mask, or the one mask of an image whose
    reader gives a single mask, which belongs to the image's own finding(s) only: for a class the
    image is not labelled with it is empty (no ground truth: the case is excluded, NaN, as a case
    without a box of that class is)."""
    mask = sample["mask"]
    if mask.shape[0] == 1:
        label = sample.get("label")
        if classification and label is not None and label.ndim == 1 and k < len(label) \
                and not bool(label[k] > 0):
            return torch.zeros_like(mask[0], dtype=torch.bool)
        return mask[0] > 0
    if k >= mask.shape[0]:
        raise DataError(dataset, f"case {sample.get('case_id', '?')}: its mask has {mask.shape[0]} "
                                 f"channels, none for class {k}")
    return mask[k] > 0


def boxes_as_masks(boxes: list[torch.Tensor], spatial: tuple[int, int]) -> torch.Tensor:
    """Boxes (x0, y0, x1, y1 in pixels) as masks exactly as ``pellucid.evaluate(boxes=...)`` makes
    them, each box first clipped to the image (a box rounded past the border is not an error)."""
    from pellucid.metrics.evaluate import _masks

    h, w = spatial
    clipped = []
    for bx in boxes:
        bx = torch.as_tensor(bx, dtype=torch.float32).reshape(-1, 4).clone()
        bx[:, 0::2] = bx[:, 0::2].clamp(0, w)
        bx[:, 1::2] = bx[:, 1::2].clamp(0, h)
        clipped.append(bx[(bx[:, 2] > bx[:, 0]) & (bx[:, 3] > bx[:, 1])])
    return _masks(None, clipped, spatial, len(boxes))


def _truth_label(sample: dict, k: int, segmentation: bool, regression: bool) -> float:
    if regression:
        return float(sample["label"][k])
    if segmentation:
        return float(bool(sample["mask"][k].any()))
    return float(sample["label"][k] > 0)


@torch.no_grad()
def _scan(loaded, x: torch.Tensor, classes: torch.Tensor,
          errors: tuple[str, torch.Tensor] | None = None
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One chunked forward over the cases, giving: the classes (-1, "predicted", becomes the arg-max),
    each target's prediction (the class probability; for segmentation the largest voxel probability
    of the channel, "is there a lesion?"; for regression the value), and with ``errors = (kind,
    truth)`` the false-positive or false-negative region of each case's segmentation."""
    from pellucid.targets import SegmentationErrorTarget

    card = loaded.card
    chosen, scores, regions = [], [], []
    with model_guard(loaded.module):  # eval mode, one output tensor; the user's modes restored
        forward = inference_forward(loaded.module, x[:1])  # forward-only: any backend
        ys = [forward(x[start:start + 8]).float() for start in range(0, len(x), 8)]
    for start, y in zip(range(0, len(x), 8), ys, strict=True):
        sl = slice(start, start + 8)
        k = classes[sl].to(y.device)
        k = torch.where(k < 0, y.argmax(1), k) if y.ndim == 2 else k
        if card.task == "regression":
            scores.append(y.gather(1, k[:, None])[:, 0])
        else:
            prob = torch.sigmoid(y) if card.activation == "sigmoid" else torch.softmax(y, 1)
            picked = prob[torch.arange(len(k)), k]
            scores.append(picked.flatten(1).amax(1) if picked.ndim > 1 else picked)
        if errors is not None:
            kind, truth = errors
            bound = SegmentationErrorTarget(truth[sl], k, kind, card.activation).bind(y)
            regions.append((bound.region > 0).cpu())
        chosen.append(k.cpu())
    return (torch.cat(chosen), torch.cat(scores).cpu(),
            torch.cat(regions) if errors is not None else None)


def _lesion(sample: dict, k: int) -> bool:
    """Class ``k`` is present, and localised when the dataset gives masks (ChestX-ray14 gives boxes
    for a few images only)."""
    if not bool(sample["label"][k] > 0):
        return False
    return "mask" not in sample or bool(_class_mask(sample, k, "").any())


def _metric_hash(config: BenchConfig) -> str:
    text = json.dumps([(m.label, m.name, m.options, m.skip_methods, m.only_methods)
                       for m in config.metrics], sort_keys=True, default=str)
    return unit_digest(text)[:8]


def unit_key(model: str, dataset: str, batch: int, label: str, metrics: str, seed: int,
             weights: str = "") -> str:
    """A unit's identity in the result store; the weights' digest and a reduced precision are part
    of it, so a run resumed after the model was retrained (same name, new weights) or under another
    precision never mixes its results with the earlier ones."""
    from pellucid.runtime import precision_name

    key = f"{model}|{dataset}|{batch:04d}|{label}|{metrics}|{seed}"
    key = f"{key}|w{weights[:16]}" if weights else key
    return key if precision_name() == "fp32" else f"{key}|{precision_name()}"


def make_units(config: BenchConfig, model: str, folder: Path, dataset: str, cases: CaseSet,
               mspec: ModelSpec, out: Path, weights: str = "") -> list[Unit]:
    units = []
    n = len(cases.case_ids)
    metrics = _metric_hash(config)
    for method in config.methods:
        if method.only_models and model not in method.only_models:
            continue
        for b, start in enumerate(range(0, n, config.batch_size)):
            sl = slice(start, start + config.batch_size)
            key = unit_key(model, dataset, b, method.label, metrics, config.seed, weights)
            units.append(Unit(
                key=key, model=model, model_folder=str(folder), dataset=dataset, method=method,
                metrics=config.metrics, x=cases.x[sl], classes=cases.classes[sl],
                target_names=cases.target_names[sl], case_ids=cases.case_ids[sl],
                masks=cases.masks[sl] if cases.masks is not None else None,
                boxes=cases.boxes[sl] if cases.boxes is not None else None, region=mspec.region,
                truth_regions=cases.truth[sl].float() if cases.truth is not None else None,
                layer=mspec.layer, reference=mspec.reference, sliding_window=mspec.sliding_window,
                seed=config.seed,
                cache_dir=str(out / "cache") if config.cache else None,
                supplies={need: (getattr(cases, need)[sl] if need in PER_CASE_SUPPLIES
                                 and getattr(cases, need) is not None else getattr(cases, need))
                          for need in requires(method.name)}))
    return units


PER_CASE_SUPPLIES = {"prior"}  # one per (case, target) pair, sliced with the unit's batch


def requires(method: str) -> frozenset[str]:
    """What a method's class requires from the case set (each a CaseSet field of that name)."""
    from pellucid.explainers.registry import REGISTRY

    return REGISTRY.get(method).requires


def environment(config: BenchConfig) -> dict[str, Any]:
    """Package versions, seeds, configuration hash and hardware of a run."""
    import importlib.metadata as md

    versions = {}
    for pkg in ("pellucid", "torch", "torchvision", "monai", "captum", "zennit", "numpy", "scipy",
                "pandas", "ray", "onnxruntime", "openvino"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    from pellucid.inference import backend_setting
    from pellucid.runtime import precision_name

    return {"config": config.name, "config_hash": config.digest(), "seed": config.seed,
            "precision": precision_name(), "backend": backend_setting(), "versions": versions,
            "python": platform.python_version(),
            "hardware": {"machine": platform.machine(), "processor": platform.processor(),
                         "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                         "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
            "started": datetime.now(UTC).isoformat(timespec="seconds")}


@contextlib.contextmanager
def pinned_backends(out: Path):
    """Each model and input shape's forward-only backend (under ``--backend auto``) and chunk size
    are decided at their first use in the run, the chunk size timed on throwaway batches, and
    recorded in ``backends.json`` (tagged) at once; a resumed run reads them and computes with the
    same backends and chunks, so resuming is bit-identical to running through. An untagged file
    (not written here) is ignored and decided anew."""
    from pellucid.inference.select import Pinned, pin_backends

    path = out / "backends.json"
    choices: dict[str, str | int] = {}
    if path.is_file() and signed(path):
        try:
            found = json.loads(path.read_text())
            choices = dict(found) if isinstance(found, dict) else {}
        except ValueError:
            choices = {}

    def record(name: str, value: str | int) -> None:
        choices[name] = value
        write_signed(path, json.dumps(choices, indent=1, sort_keys=True) + "\n")

    pin_backends(Pinned(dict(choices), record))
    try:
        yield
    finally:
        pin_backends(None)


def _run_local(units: list[Unit], store: ResultStore, progress: bool) -> None:
    for unit in track(units, "explain + evaluate", enabled=progress):
        rows, maps = execute_unit(unit)
        store.write(unit.key, rows, maps)


def _ray_execute(unit: Unit, threads: int):
    from pellucid.runtime import configure_threads

    configure_threads(threads)  # torch, ONNX Runtime and OpenVINO: the CPUs Ray gave this task
    return execute_unit(unit)


def _run_ray(units: list[Unit], store: ResultStore, progress: bool, address: str | None,
             workers: int | None = None, threads: int | None = None) -> None:
    """Each task holds ``threads`` CPUs of Ray's and runs that many intra-op threads, so the tasks
    running at once never ask for more threads than the cores Ray has. A local cluster gets every
    usable core; ``workers`` tasks run at once, each with cores // workers threads."""
    from pellucid.runtime import usable_cores

    try:
        import ray
    except ImportError:
        raise ConfigError("the ray executor needs Ray: pip install 'pellucid[ray]'") from None
    started = False
    cores = usable_cores()
    if threads is None:
        threads = 1 if address or workers is None else max(1, cores // workers)
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address:
            kwargs["address"] = address
        else:
            kwargs["num_cpus"] = threads * workers if workers else cores
        ray.init(**kwargs)
        started = True
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        task = ray.remote(num_cpus=threads, num_gpus=1 if gpus else 0)(_ray_execute)
        pending = {task.remote(u, threads): u for u in units}
        bar = track(range(len(units)), "explain + evaluate (ray)", enabled=progress)
        for _ in bar:
            done, _rest = ray.wait(list(pending), num_returns=1)
            unit = pending.pop(done[0])
            rows, maps = ray.get(done[0])
            store.write(unit.key, rows, maps)
    finally:
        if started:
            ray.shutdown()


def iter_tasks(config: BenchConfig) -> Iterator[tuple[str, ModelSpec, str, DatasetSpec]]:
    for mname, mspec in config.models.items():
        for dname in mspec.datasets:
            yield mname, mspec, dname, config.datasets[dname]


def run_bench(config: BenchConfig | str | Path, out: str | Path | None = None,
              executor: str = "local", address: str | None = None, progress: bool = True,
              report: bool = True, workers: int | None = None) -> pd.DataFrame:
    """Run (or resume) a benchmark; returns the tidy result table. Writes under ``out``:
    results.parquet/.csv, run.json, performance.json, tables/, report.html. ``workers``: Ray
    workers (CPUs) of a local Ray cluster started for the run (default: every core)."""
    from pellucid.models import evaluate_model
    from pellucid.runtime import configure_threads

    if not isinstance(config, BenchConfig):
        config = load_config(config)
    if executor not in EXECUTORS:
        raise ConfigError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    out = Path(out or f"bench_{config.name}")
    out.mkdir(parents=True, exist_ok=True)
    configure_threads(config.threads)
    store = ResultStore(out)
    store.sweep()  # partial files of a killed earlier run (never committed parts)
    start = time.perf_counter()
    units: list[Unit] = []
    performance: dict[str, Any] = {}
    gallery: dict[str, Any] = {}
    modality: dict[str, Any] = {}
    tasks: dict[str, Any] = {}
    trust_inputs: list[tuple[str, Any, CaseSet, ModelSpec, Path, str]] = []
    for mname, mspec, dname, dspec in iter_tasks(config):
        task_start = time.perf_counter()
        loaded, folder = prepare_model(mspec, out, config.seed)
        weights = loaded.digest()
        loaded = with_window(loaded, mspec.sliding_window)
        cases = prepare_cases(dspec, mspec, loaded,
                              need_prior=any("prior" in requires(m.name) for m in config.methods),
                              seed=config.seed)
        perf_key = f"{mname}|{dname}"
        tasks[perf_key] = {"task": loaded.card.task, "region": mspec.region,
                           "reference": mspec.reference, "sliding_window": mspec.sliding_window,
                           "channels": list(loaded.card.channel_names), "weights_sha256": weights}
        if mspec.modality_importance:
            modality[perf_key] = modality_importance(loaded, cases, mspec)
        try:
            test = _open(dspec.reader, dspec.root, dspec.split, card_options(dspec, loaded.card), 128)
            outputs = len(loaded.card.class_names)
            labels = len(test.mask_names if loaded.card.task == "segmentation" else test.class_names)
            if labels != outputs:
                raise ConfigError(f"dataset {dname!r} has {labels} labels, the model {outputs} "
                                  f"outputs: no performance figures")
            performance[perf_key] = {"task": loaded.card.task, "report": evaluate_model(
                loaded.module, loaded.card, test), "cases": len(test)}
        except PellucidError as exc:
            performance[perf_key] = {"task": loaded.card.task, "error": str(exc)}
        gallery[perf_key] = _gallery_images(cases)
        units += make_units(config, mname, folder, dname, cases, mspec, out, weights)
        if config.metric_trust is not None:
            trust_inputs.append((perf_key, loaded, cases, mspec, folder, weights))
        if progress:
            console.print(f"{perf_key}: model, cases and performance ready in "
                          f"{time.perf_counter() - task_start:.0f} s")
    todo = [u for u in units if not store.done(u.key)]
    if len(todo) < len(units):
        console.print(f"resuming: {len(units) - len(todo)} of {len(units)} units already done")
    run_info = environment(config) | {"executor": executor, "units": len(units),
                                      "config_source": config.source, "tasks": tasks,
                                      "gallery": config.gallery, "verdict": config.verdict}
    if modality:
        (out / "modality.json").write_text(json.dumps(modality, indent=2) + "\n")
    write_signed(out / "run.json", json.dumps(run_info, indent=2) + "\n")
    (out / "performance.json").write_text(json.dumps(performance, indent=2, default=float) + "\n")
    np.savez_compressed(out / "gallery.npz", **{f"{k}::{f}": v for k, d in gallery.items()
                                                for f, v in d.items()})
    phase = time.perf_counter()
    # the metric checks too run with the run's backends: their randomised copies stay in torch
    # (unpinned, two of the demo's three were exported to ONNX and timed, about 10 s for nothing)
    try:
        with pinned_backends(out):
            if executor == "ray":
                _run_ray(todo, store, progress, address, workers)
            else:
                _run_local(todo, store, progress)
            if progress and todo:
                console.print(f"{len(todo)} units in {time.perf_counter() - phase:.0f} s")
            if trust_inputs:
                phase = time.perf_counter()
                trust_tasks(config, trust_inputs, out, run_info["config_hash"])
                if progress:
                    console.print(f"metric checks in {time.perf_counter() - phase:.0f} s")
    finally:
        from pellucid.bench.units import release

        release()
    table = store.table()
    store.export(table)
    run_info["seconds"] = round(time.perf_counter() - start, 1)
    write_signed(out / "run.json", json.dumps(run_info, indent=2) + "\n")
    if report:
        from pellucid.bench.report import write_report

        phase = time.perf_counter()
        write_report(out, table)
        if progress:
            console.print(f"report in {time.perf_counter() - phase:.0f} s")
    return table


def _first_pairs(cases: CaseSet, n: int) -> CaseSet:
    """The first ``n`` (case, target) pairs of a case set."""
    sliced = {}
    for f in dataclasses.fields(cases):
        value = getattr(cases, f.name)
        sliced[f.name] = value if f.name == "background" or value is None else value[:n]
    return CaseSet(**sliced)


def trust_tasks(config: BenchConfig, inputs: list, out: Path, config_hash: str) -> None:
    """``metric_trust.json``: per task, which quality metrics can be trusted (bench/trust.py), on
    the first pairs of its cases; kept for a resumed run of the same configuration and weights."""
    from pellucid.bench.trust import TrustSettings, metric_trust
    from pellucid.metrics.base import REGISTRY as METRICS

    path = out / "metric_trust.json"
    done: dict[str, Any] = {}
    if path.is_file() and signed(path):  # kept only when this installation wrote it
        try:
            old = json.loads(path.read_text())
            if isinstance(old, dict) and old.get("config_hash") == config_hash:
                done = old.get("tasks", {}) if isinstance(old.get("tasks"), dict) else {}
        except ValueError:
            done = {}
    settings = TrustSettings(**(config.metric_trust or {}), seed=config.seed)
    quality = [m for m in config.metrics if METRICS.get(m.name).role == "quality"]
    tasks: dict[str, Any] = {}
    for key, loaded, cases, mspec, folder, weights in inputs:
        previous = done.get(key)
        if isinstance(previous, dict) and previous.get("weights_sha256") == weights:
            tasks[key] = previous
            continue
        n = min(settings.cases, len(cases.case_ids))
        part = _first_pairs(cases, n)
        compared = [m for m in config.methods if _family(m.name) != "baseline"
                    and (not m.only_models or key.split("|")[0] in m.only_models)]
        cfg = dataclasses.replace(config, batch_size=n, methods=compared)
        units = make_units(cfg, key.split("|")[0], folder, key.split("|")[1], part, mspec, out, weights)
        console.print(f"metric checks on {key}: {len(units)} methods x {n} cases")
        found = metric_trust(units, loaded, quality, settings)
        tasks[key] = {"weights_sha256": weights, "cases": n, "noise": settings.noise,
                      "perturbations": settings.perturbations, "metrics": found}
    write_signed(path, json.dumps({"config_hash": config_hash, "tasks": tasks}, indent=2,
                                  default=float) + "\n")


def _family(method: str) -> str:
    from pellucid.explainers.registry import REGISTRY

    return REGISTRY.get(method).family


def modality_importance(loaded, cases: CaseSet, mspec: ModelSpec) -> dict[str, Any]:
    """Exact modality Shapley values (every input channel a player) of each benchmark case."""
    from pellucid.explainers.modality import modality_shapley
    from pellucid.pipeline.resolve import card_target

    values, full, empty = [], [], []
    for start in range(0, len(cases.x), 8):
        sl = slice(start, start + 8)
        truth = cases.truth[sl].float() if cases.truth is not None else None
        target = card_target(loaded.card, cases.classes[sl], mspec.region, truth, mspec.reference)
        out = modality_shapley(loaded, cases.x[sl], target)
        values.append(out["values"].cpu())
        full.append(out["full"].cpu())
        empty.append(out["empty"].cpu())
    names = list(loaded.card.channel_names) or [f"channel {i}" for i in range(cases.x.shape[1])]
    return {"channels": names, "case_ids": cases.case_ids, "targets": cases.target_names,
            "shapley": torch.cat(values).tolist(), "f_all": torch.cat(full).tolist(),
            "f_none": torch.cat(empty).tolist()}


def _gallery_images(cases: CaseSet) -> dict[str, np.ndarray]:
    img = cases.images[:, 0].float()
    masks = cases.masks
    if img.ndim == 4:  # 3D: the slice the units keep the maps at
        idx = [focus_slice(masks[i] if masks is not None else None, img.shape[1])
               for i in range(len(img))]
        img = torch.stack([v[k] for v, k in zip(img, idx, strict=True)])
        masks = torch.stack([m[k] for m, k in zip(masks, idx, strict=True)]) if masks is not None else None
    out = {"images": img.numpy().astype(np.float16),
           "case_ids": np.array(cases.case_ids), "targets": np.array(cases.target_names)}
    if cases.predicted is not None:
        out["predicted"] = cases.predicted.numpy().astype(np.float32)
        out["labels"] = cases.labels.numpy().astype(np.float32)
    if masks is not None:
        out["masks"] = masks.numpy().astype(bool)
    return out


def print_leaderboard(table: pd.DataFrame) -> None:
    """The average rank per task and method, best first, as a terminal table."""
    from rich.table import Table

    avg = stats.ranks(stats.summary(table))
    cost = table.groupby(["dataset", "model", "method"], as_index=False)["explain_seconds"].mean()
    avg = avg.merge(cost, on=["dataset", "model", "method"], how="left")
    for (dataset, model), part in avg.groupby(["dataset", "model"], sort=True):
        t = Table("rank", "method", "average rank", "metrics", "s / case",
                  title=f"{dataset} / {model}")
        for i, (_, r) in enumerate(part.sort_values("average_rank").iterrows(), start=1):
            t.add_row(str(i), r["method"], f"{r['average_rank']:.2f}", str(int(r["metrics"])),
                      f"{r['explain_seconds']:.3f}")
        console.print(t)
