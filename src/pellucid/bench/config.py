"""Benchmark configuration: a YAML file (or dict) naming datasets, models, methods and metrics.

    name: demo
    seed: 0
    batch_size: 8               # cases per work unit
    cache: true                 # keep explanations on disk and reuse them
    gallery: 6                  # cases per task kept for the report's gallery
    datasets:
      chest:
        reader: phantom-chest   # any pellucid.data.open_dataset name
        root: null              # folder for real data (relative to $PELLUCID_DATA if not found)
        split: test
        cases: 24
        options: {size: 128}
        require: lesion         # only cases with a positive label / non-empty mask
        shuffle: false          # true: cases in a seeded random order, not the reader's order
    models:
      chest-resnet18:
        datasets: [chest]
        path: models/chest      # a zoo folder, or:
        train: {reader: phantom-chest, options: {size: 128}, n_train: 640, arch: resnet18,
                epochs: 4, batch_size: 32, lr: 0.001}
        targets: positive       # classification: positive | predicted | [class names/indices]
                                # segmentation: [channel names/indices], region predicted|truth|all,
                                #   or the errors against the truth: region fp | fn
                                # regression: the output (reference: explain output - reference)
        sliding_window: {roi_size: [32, 32, 32], overlap: 0.25}  # large volumes, patch-wise
        modality_importance: true  # exact Shapley value of each input channel, per case
    methods: [gradcam, {name: scorecam, options: {batch_size: 64}}]
    metrics: [pointing_game, {name: deletion, options: {step: 128}, skip_methods: [kernelshap]}]
    # a method's options may name its own layer; only_models restricts a method to some models:
    #   {name: gradcam, label: gradcam-layer2, options: {layer: layer2}, only_models: [chest-resnet18]}
    metric_trust: {cases: 8, noise: 0.01}  # which quality metrics tell a randomised model's maps
                                # apart and rank the methods stably under input noise (MetaQuantus)
    verdict: {alpha: 0.05, min_effect: {pointing_game: 0.05}}  # the smallest advantage over the
                                # baselines that matters (metric units); without it, "not better"
                                # needs the interval of the difference at or below zero

Every key is checked up front; an error names the file and the key.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pellucid.errors import ConfigError
from pellucid.pipeline.resolve import BENCH_REGIONS as REGIONS

TOP_KEYS = {"name", "seed", "batch_size", "cache", "gallery", "datasets", "models", "methods",
            "metrics", "threads", "baselines", "verdict", "metric_trust"}
# which quality metrics can be trusted on each task (bench/trust.py): false (the default), true, or
# {cases, noise, perturbations}
TRUST_KEYS = {"cases", "noise", "perturbations"}
# how the report calls a method against the baselines (bench/stats.py ``verdict``): the test level
# and the smallest advantage that matters, one number or one per metric (in the metric's units)
VERDICT_KEYS = {"alpha", "min_effect"}
# the trivial baselines every benchmark runs unless ``baselines: false`` (or a list of some of them)
DEFAULT_BASELINES = ("random", "centre", "edges", "prior")
DATASET_KEYS = {"reader", "root", "split", "cases", "options", "require", "shuffle"}
MODEL_KEYS = {"datasets", "path", "weights", "train", "targets", "region", "layer", "reference",
              "sliding_window", "modality_importance"}
WINDOW_KEYS = {"roi_size", "overlap", "batch_size", "mode"}
TRAIN_KEYS = {"reader", "root", "options", "n_train", "n_val", "arch", "epochs", "batch_size", "lr",
              "seed", "backend", "max_steps", "flip", "rotate", "intensity", "class_weights",
              "optimizer", "schedule"}
ENTRY_KEYS = {"name", "options", "skip_methods", "only_methods", "only_models", "label"}


@dataclass
class DatasetSpec:
    name: str
    reader: str
    root: str | None = None
    split: str = "test"
    cases: int = 16
    options: dict[str, Any] = field(default_factory=dict)
    require: str = "lesion"  # lesion | any
    # False: cases in the reader's order (a CSV's rows, a folder's sorted names); True: a seeded
    # random order (the run's seed), so that a file sorted by class does not give one class only
    shuffle: bool = False


@dataclass
class ModelSpec:
    name: str
    datasets: list[str]
    path: str | None = None
    train: dict[str, Any] | None = None
    targets: Any = "positive"
    region: str = "predicted"
    layer: str | None = None
    reference: float | None = None
    sliding_window: dict[str, Any] | None = None
    modality_importance: bool = False
    weights: str | None = None  # with ``path: package.module:factory`` (and a card.json beside it)


@dataclass
class Entry:
    """A method or metric with its options (``label`` names it in the tables, default ``name``)."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    skip_methods: list[str] = field(default_factory=list)
    only_methods: list[str] = field(default_factory=list)
    label: str = ""
    only_models: list[str] = field(default_factory=list)  # a method run on these models only

    def __post_init__(self) -> None:
        self.label = self.label or self.name


@dataclass
class BenchConfig:
    name: str
    datasets: dict[str, DatasetSpec]
    models: dict[str, ModelSpec]
    methods: list[Entry]
    metrics: list[Entry]
    seed: int = 0
    batch_size: int = 8
    cache: bool = True
    gallery: int = 6
    threads: int | None = None
    verdict: dict[str, Any] = field(default_factory=dict)
    metric_trust: dict[str, Any] | None = None
    source: str = "<dict>"

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("source")
        return d

    def digest(self) -> str:
        """A hash of the configuration (what the results depend on)."""
        text = json.dumps(self.as_dict(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _err(source: str, key: str, problem: str) -> ConfigError:
    return ConfigError(f"{source}: {key}: {problem}")


def _check_keys(source: str, where: str, given: dict, allowed: set[str]) -> None:
    if not isinstance(given, dict):
        raise _err(source, where, f"expected a mapping, got {type(given).__name__}")
    unknown = sorted(str(k) for k in set(given) - allowed)
    if unknown:
        raise _err(source, f"{where}.{unknown[0]}" if where else unknown[0],
                   f"unknown key; allowed: {', '.join(sorted(allowed))}")


def _optional(source: str, where: str, value: Any, kind: type, what: str) -> Any:
    """``value`` when it is None or a ``kind`` (a bool is not a number here), else a ConfigError."""
    if value is None or (isinstance(value, kind) and (kind is bool or not isinstance(value, bool))):
        return value
    raise _err(source, where, f"must be {what}, got {value!r}")


def _names(source: str, where: str, value: Any) -> list[str]:
    """A list of names (strings); None is an empty list."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _err(source, where, f"must be a list of names, got {value!r}")
    return list(value)


def _entries(source: str, key: str, raw: Any, known: list[str], kind: str) -> list[Entry]:
    if not isinstance(raw, list) or not raw:
        raise _err(source, key, f"give a non-empty list of {kind}s")
    out = []
    for i, item in enumerate(raw):
        where = f"{key}[{i}]"
        if isinstance(item, str):
            item = {"name": item}
        _check_keys(source, where, item, ENTRY_KEYS)
        if "name" not in item:
            raise _err(source, where, "missing 'name'")
        name = item["name"]
        if not isinstance(name, str) or name not in known:
            raise _err(source, f"{where}.name", f"unknown {kind} {name!r}; available: "
                                                f"{', '.join(sorted(known))}")
        options = _optional(source, f"{where}.options", item.get("options"), dict, "a mapping")
        if options and not all(isinstance(k, str) for k in options):
            raise _err(source, f"{where}.options", "option names must be text")
        entry = Entry(name, dict(options or {}),
                      _names(source, f"{where}.skip_methods", item.get("skip_methods")),
                      _names(source, f"{where}.only_methods", item.get("only_methods")),
                      _optional(source, f"{where}.label", item.get("label"), str, "text") or "",
                      _names(source, f"{where}.only_models", item.get("only_models")))
        out.append(entry)
    labels = [e.label for e in out]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise _err(source, key, f"{kind} {dup[0]!r} listed twice; give one a 'label'")
    return out


RUNNER_OPTIONS = {"layer"}  # method options the runner itself reads (a method's own CAM layer)


def _check_options(source: str, methods: list[Entry], metrics: list[Entry]) -> None:
    """Build every method and metric with its options now, so that a typo in an option fails here,
    naming the file and key, before any model is trained or any case is read."""
    from pellucid.explainers import create as create_method
    from pellucid.metrics import create as create_metric

    for key, entries, create in (("methods", methods, create_method),
                                 ("metrics", metrics, create_metric)):
        for i, entry in enumerate(entries):
            options = {k: v for k, v in entry.options.items()
                       if not (key == "methods" and k in RUNNER_OPTIONS)}
            try:
                create(entry.name, **options)
            except (ConfigError, TypeError, ValueError) as exc:
                raise _err(source, f"{key}[{i}].options", str(exc)) from None


def parse_config(raw: dict, source: str = "<dict>") -> BenchConfig:
    """Validate a configuration mapping; every error names ``source`` and the key."""
    from pellucid.data import DATASETS
    from pellucid.explainers import names as method_names
    from pellucid.metrics import available as metric_list

    _check_keys(source, "", raw, TOP_KEYS)
    for key in ("datasets", "models", "methods", "metrics"):
        if key not in raw:
            raise _err(source, key, "missing")
    datasets = {}
    if not isinstance(raw["datasets"], dict) or not raw["datasets"]:
        raise _err(source, "datasets", "give a mapping of dataset names to specs")
    for name, spec in raw["datasets"].items():
        where = f"datasets.{name}"
        _check_keys(source, where, spec, DATASET_KEYS)
        reader = spec.get("reader")
        if not isinstance(reader, str) or reader not in DATASETS:
            raise _err(source, f"{where}.reader", f"unknown reader {reader!r}; "
                                                  f"available: {', '.join(DATASETS)}")
        if spec.get("require", "lesion") not in ("lesion", "any"):
            raise _err(source, f"{where}.require", "must be 'lesion' or 'any'")
        cases = spec.get("cases", 16)
        if not isinstance(cases, int) or isinstance(cases, bool) or cases < 1:
            raise _err(source, f"{where}.cases", f"must be a positive integer, got {cases!r}")
        root = _beside(source, _optional(source, f"{where}.root", spec.get("root"), str,
                                         "a folder path"))
        split = _optional(source, f"{where}.split", spec.get("split", "test"), str, "a split name")
        options = _optional(source, f"{where}.options", spec.get("options"), dict, "a mapping")
        shuffle = spec.get("shuffle", False)
        if not isinstance(shuffle, bool):
            raise _err(source, f"{where}.shuffle", f"must be true or false, got {shuffle!r}")
        datasets[name] = DatasetSpec(name, reader, root, split or "test", cases, dict(options or {}),
                                     spec.get("require", "lesion"), shuffle)
    models = {}
    if not isinstance(raw["models"], dict) or not raw["models"]:
        raise _err(source, "models", "give a mapping of model names to specs")
    for name, spec in raw["models"].items():
        where = f"models.{name}"
        _check_keys(source, where, spec, MODEL_KEYS)
        if not spec.get("path") and not spec.get("train"):
            raise _err(source, where, "give 'path' (a saved model) or 'train' (a training spec)")
        _optional(source, f"{where}.path", spec.get("path"), str, "a model folder or file")
        _optional(source, f"{where}.weights", spec.get("weights"), str, "a weights file")
        if spec.get("weights") and ":" not in str(spec.get("path") or ""):
            raise _err(source, f"{where}.weights", "goes with path: package.module:factory")
        _optional(source, f"{where}.layer", spec.get("layer"), str, "a layer name")
        _optional(source, f"{where}.modality_importance", spec.get("modality_importance"), bool,
                  "true or false")
        targets = spec.get("targets", "positive")
        if not isinstance(targets, str | list) or (isinstance(targets, list) and not all(
                isinstance(t, str | int) and not isinstance(t, bool) for t in targets)):
            raise _err(source, f"{where}.targets", f"give 'positive', 'predicted' or a list of "
                                                   f"classes, got {targets!r}")
        if spec.get("train") is not None:
            _check_keys(source, f"{where}.train", spec["train"], TRAIN_KEYS)
            train_reader = spec["train"].get("reader")
            if not isinstance(train_reader, str) or train_reader not in DATASETS:
                raise _err(source, f"{where}.train.reader",
                           f"unknown reader {train_reader!r}")
            _optional(source, f"{where}.train.options", spec["train"].get("options"), dict,
                      "a mapping")
            _optional(source, f"{where}.train.root", spec["train"].get("root"), str, "a folder path")
            for key in ("n_train", "n_val", "epochs", "batch_size", "seed", "max_steps"):
                value = spec["train"].get(key)
                if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                          or value < (0 if key == "seed" else 1)):
                    raise _err(source, f"{where}.train.{key}", f"must be a positive integer, got "
                                                               f"{value!r}")
            lr = spec["train"].get("lr")
            if lr is not None and (not isinstance(lr, int | float) or isinstance(lr, bool)
                                   or not 0 < lr < 10):
                raise _err(source, f"{where}.train.lr", f"must be a number in (0, 10), got {lr!r}")
            for key in ("arch", "backend"):
                _optional(source, f"{where}.train.{key}", spec["train"].get(key), str, "a name")
        used = _names(source, f"{where}.datasets", spec.get("datasets"))
        if not used:
            raise _err(source, f"{where}.datasets", "name at least one dataset")
        for d in used:
            if d not in datasets:
                raise _err(source, f"{where}.datasets", f"unknown dataset {d!r}; defined: "
                                                        f"{', '.join(datasets)}")
        if spec.get("region", "predicted") not in REGIONS:
            raise _err(source, f"{where}.region", f"must be one of {', '.join(REGIONS)}")
        reference = spec.get("reference")
        if reference is not None and (not isinstance(reference, int | float)
                                      or isinstance(reference, bool) or not math.isfinite(reference)):
            raise _err(source, f"{where}.reference", f"must be a finite number, got {reference!r}")
        window = spec.get("sliding_window")
        if window is not None:
            _check_keys(source, f"{where}.sliding_window", window, WINDOW_KEYS)
            roi = window.get("roi_size")
            if not isinstance(roi, list) or not roi or not all(isinstance(r, int) and r > 0
                                                               for r in roi):
                raise _err(source, f"{where}.sliding_window.roi_size",
                           f"give a list of positive integers, got {roi!r}")
            overlap = window.get("overlap", 0.25)
            batch = window.get("batch_size", 4)
            if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
                raise _err(source, f"{where}.sliding_window.batch_size",
                           f"must be a positive integer, got {batch!r}")
            if not isinstance(overlap, int | float) or isinstance(overlap, bool) \
                    or not 0 <= overlap < 1:
                raise _err(source, f"{where}.sliding_window.overlap", f"must be in [0, 1), got "
                                                                      f"{overlap!r}")
            if window.get("mode", "gaussian") not in ("gaussian", "constant"):
                raise _err(source, f"{where}.sliding_window.mode", "must be 'gaussian' or 'constant'")
            window = dict(window)
        path = spec.get("path")
        path = path if path is None or (":" in path and not Path(path).exists()) else _beside(source, path)
        models[name] = ModelSpec(name, list(used), path, spec.get("train"),
                                 spec.get("targets", "positive"), spec.get("region", "predicted"),
                                 spec.get("layer"),
                                 float(reference) if reference is not None else None, window,
                                 bool(spec.get("modality_importance", False)),
                                 _beside(source, spec.get("weights")))
    methods = _entries(source, "methods", raw["methods"], method_names(), "method")
    methods += [Entry(b) for b in _baselines(source, raw.get("baselines", True))
                if b not in {e.name for e in methods}]
    metrics = _entries(source, "metrics", raw["metrics"], [m["name"] for m in metric_list()],
                       "metric")
    _check_options(source, methods, metrics)
    for i, m in enumerate(methods + metrics):
        where = f"methods[{i}]" if i < len(methods) else f"metrics[{i - len(methods)}]"
        for name in m.only_models:
            if name not in models:
                raise _err(source, f"{where}.only_models", f"{name!r} is not a configured model")
    for i, m in enumerate(metrics):
        for key in ("skip_methods", "only_methods"):
            for name in getattr(m, key):
                if name not in {e.label for e in methods}:
                    raise _err(source, f"metrics[{i}].{key}", f"{name!r} is not a configured method")
    for key, low in (("batch_size", 1), ("gallery", 0), ("seed", 0)):
        value = raw.get(key, 0 if key != "batch_size" else 8)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise _err(source, key, f"must be an integer >= {low}, got {value!r}")
    _optional(source, "name", raw.get("name"), str, "text")
    _optional(source, "cache", raw.get("cache"), bool, "true or false")
    threads = raw.get("threads")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool)
                                or threads < 1):
        raise _err(source, "threads", f"must be a positive integer, got {threads!r}")
    return BenchConfig(str(raw.get("name", Path(source).stem)), datasets, models, methods, metrics,
                       int(raw.get("seed", 0)), int(raw.get("batch_size", 8)),
                       bool(raw.get("cache", True)), int(raw.get("gallery", 6)),
                       raw.get("threads"), _verdict(source, raw.get("verdict"), metrics),
                       _trust(source, raw.get("metric_trust", False)), source)


def _trust(source: str, value: Any) -> dict[str, Any] | None:
    """``metric_trust``: false, true (8 cases, noise 0.01, 1 perturbation) or a mapping of those."""
    if value is False or value is None:
        return None
    if value is True:
        return {}
    _check_keys(source, "metric_trust", value, TRUST_KEYS)
    out: dict[str, Any] = {}
    for key, low in (("cases", 3), ("perturbations", 1)):
        if key in value:
            v = value[key]
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise _err(source, f"metric_trust.{key}", f"must be an integer >= {low}, got {v!r}")
            out[key] = v
    if "noise" in value:
        v = value["noise"]
        if not _number(v) or not 0 < v <= 1:
            raise _err(source, "metric_trust.noise", f"must be a number in (0, 1], got {v!r}")
        out["noise"] = float(v)
    return out


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _verdict(source: str, value: Any, metrics: list[Entry]) -> dict[str, Any]:
    """``verdict``: ``alpha`` (0 < alpha <= 0.5, default 0.05) and ``min_effect`` (>= 0, one
    number or {metric label: number})."""
    if value is None:
        return {}
    _check_keys(source, "verdict", value, VERDICT_KEYS)
    out: dict[str, Any] = {}
    if "alpha" in value:
        alpha = value["alpha"]
        if not _number(alpha) or not 0 < alpha <= 0.5:
            raise _err(source, "verdict.alpha", f"must be a number in (0, 0.5], got {alpha!r}")
        out["alpha"] = float(alpha)
    if "min_effect" in value:
        effect = value["min_effect"]
        labels = {m.label for m in metrics}
        if isinstance(effect, dict):
            for k, v in effect.items():
                if k not in labels:
                    raise _err(source, f"verdict.min_effect.{k}", "not a configured metric")
                if not _number(v) or v < 0:
                    raise _err(source, f"verdict.min_effect.{k}", f"must be a number >= 0, got {v!r}")
            out["min_effect"] = {str(k): float(v) for k, v in effect.items()}
        elif _number(effect) and effect >= 0:
            out["min_effect"] = float(effect)
        else:
            raise _err(source, "verdict.min_effect", f"give a number >= 0 or one per metric, got "
                                                     f"{effect!r}")
    return out


def _beside(source: str, path: str | None) -> str | None:
    """A relative path of a configuration file is taken relative to that file (as a user writes
    it) when it exists there; otherwise it stays as given, for the runner's other places (the
    working folder, ``$PELLUCID_DATA`` for data, the output folder for trained models)."""
    if path is None or Path(path).is_absolute() or source == "<dict>" or not Path(source).is_file():
        return path
    beside = Path(source).parent / path
    return str(beside.resolve()) if beside.exists() else path


def _baselines(source: str, value: Any) -> list[str]:
    """``baselines``: true (the default: every trivial baseline), false, or a list of them."""
    from pellucid.explainers.registry import REGISTRY

    if value is True:
        return list(DEFAULT_BASELINES)
    if value is False or value is None:
        return []
    known = [n for n in REGISTRY.names() if REGISTRY.get(n).family == "baseline"]
    if not isinstance(value, list) or not all(isinstance(v, str) and v in known for v in value):
        raise _err(source, "baselines", f"give true, false or a list of {known}, got {value!r}")
    return list(value)


def load_config(path: str | Path) -> BenchConfig:
    """Read and validate a YAML configuration; a name without a folder may be a built-in config
    (``demo``, ``shared``, ``shared-short``)."""
    p = Path(path)
    if not p.is_file():
        builtin = Path(__file__).parent / "configs" / f"{p.stem}.yaml"
        if p.parent == Path(".") and builtin.is_file():
            p = builtin
        else:
            raise ConfigError(f"{path}: no such configuration file")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return parse_config(raw or {}, str(p))
