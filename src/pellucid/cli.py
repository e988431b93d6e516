"""The ``pellucid`` command line. A user's mistake prints one ``error:`` line and exits with 2."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from pellucid.errors import ConfigError, PellucidError
from pellucid.guards import SERVICE_LIMITS

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Explain medical imaging models and measure how good the explanations are.")
console = Console()


PRECISION_HELP = "fp32 (default), bf16 or fp16: model calls under autocast (changes the numbers)"
BACKEND_HELP = ("forward-only work (Score-CAM, occlusion, RISE, LIME, SHAP, faithfulness metrics) on "
                "auto (default: the fastest, timed once per model), torch, onnxruntime or openvino; "
                "also $PELLUCID_BACKEND")


def _split_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


@app.command()
def datasets() -> None:
    """List the dataset readers."""
    from pellucid.data import DATASETS

    table = Table("name", "what")
    for name, what in DATASETS.items():
        table.add_row(name, what)
    console.print(table)


@app.command()
def methods() -> None:
    """List the explanation methods with their family."""
    from pellucid.explainers import available

    table = Table("method", "family", "needs layer", "summary")
    for m in available():
        table.add_row(m["name"], m["family"], "yes" if m["needs_layer"] else "no", m["summary"])
    console.print(table)


@app.command()
def train(
    arch: Annotated[str, typer.Option(help="resnet18, resnet50, densenet121, vit or unet")] = "resnet18",
    data: Annotated[str, typer.Option(help="dataset name (see `pellucid datasets`)")] = "phantom-chest",
    out: Annotated[Path, typer.Option(help="folder to write the model into")] = Path("models/model"),
    root: Annotated[Path | None, typer.Option(help="dataset folder (real datasets)")] = None,
    epochs: int = 5,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    size: Annotated[int | None, typer.Option(help="resize images to this side")] = None,
    n_train: Annotated[int | None, typer.Option(help="phantoms: training images")] = None,
    backend: Annotated[str | None, typer.Option(help="torchvision or monai (ResNets)")] = None,
    dims: Annotated[int | None, typer.Option(help="BraTS: 2 (slices) or 3 (volumes)")] = None,
    label_file: Annotated[str | None, typer.Option(help="BraTS: label file name in each case")] = None,
    max_steps: Annotated[int | None, typer.Option(help="stop after this many steps")] = None,
    flip: Annotated[bool, typer.Option(help="augment: random flips along the width")] = False,
    rotate: Annotated[float, typer.Option(help="augment: random rotations up to this many degrees "
                                                "(2D)")] = 0.0,
    intensity: Annotated[float, typer.Option(help="augment: random gain and offset up to this "
                                                   "fraction")] = 0.0,
    class_weights: Annotated[str, typer.Option(help="none or balanced (imbalanced and multi-label "
                                                     "data)")] = "none",
    optimizer: Annotated[str, typer.Option(help="adamw or sgd")] = "adamw",
    schedule: Annotated[str, typer.Option(help="onecycle, cosine or constant")] = "onecycle",
    csv_columns: Annotated[str | None, typer.Option(
        help="csv data: the CSV's column names as JSON, e.g. '{\"path\": \"file\", \"label\": "
             "\"finding\", \"split\": \"fold\"}' (a split column is used as given)")] = None,
    csv_box_format: Annotated[str | None, typer.Option(
        help="csv data with box columns: xyxy (pixels, the default), xywh (pixels), yolo (centre "
             "and size as fractions) or fractions (corners as fractions)")] = None,
) -> None:
    """Train a zoo network on a dataset; writes weights, model card and metrics. A dataset with a
    given split (a CSV's split column) is trained, validated and tested on it as given."""
    from pellucid.data import open_dataset
    from pellucid.models import TrainConfig, save_model
    from pellucid.models import train as run_train

    opts: dict = {"seed": seed}
    if size is not None:
        opts["size"] = size
    if dims is not None:
        opts["spatial_dims"] = dims
    if label_file is not None:
        opts["label_file"] = label_file
    if csv_columns is not None:
        try:
            opts["columns"] = json.loads(csv_columns)
        except json.JSONDecodeError:
            raise ConfigError(f"--csv-columns: not valid JSON: {csv_columns!r}") from None
    if csv_box_format is not None:
        opts["box_format"] = csv_box_format
    if data == "phantom-brain" or data == "phantom-brain-3d":
        opts["task"] = "segmentation" if arch == "unet" else "classification"
    splits = {}
    for split in ("train", "val", "test"):
        split_opts = dict(opts)
        if data.startswith("phantom") and split == "train" and n_train:
            split_opts["n"] = n_train
        splits[split] = open_dataset(data, root, split=split, **split_opts)
    config = TrainConfig(arch=arch, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                         backend=backend, max_steps=max_steps, flip=flip, rotate=rotate,
                         intensity=intensity, class_weights=class_weights, optimizer=optimizer,
                         schedule=schedule)
    result = run_train(splits["train"], config, splits["val"], splits["test"], dataset_name=data)
    save_model(out, result.module, result.card)
    console.print(f"saved {arch} to {out} ({result.seconds:.0f} s)")
    console.print_json(json.dumps(result.card.metrics.get("test", {}), default=float))


@app.command()
def info(model: Annotated[str, typer.Argument(help="zoo folder, TorchScript file or module:factory")],
         ) -> None:
    """Show a model's card."""
    from pellucid.models import load_model

    loaded = load_model(model)
    if loaded.card is None:
        console.print(f"{model}: no model card")
        return
    console.print_json(json.dumps(loaded.card.__dict__, default=str))


@app.command("import-model")
def import_model_command(
    source: Annotated[str, typer.Argument(help="a state dict or safetensors file (with --arch), a "
                                               "TorchScript file, module:factory (with --weights), an "
                                               "nnU-Net v2 results folder (or a fold_k of it) or a "
                                               "MONAI bundle folder")],
    out: Annotated[Path, typer.Option(help="the model folder to write")],
    task: Annotated[str | None, typer.Option(help="classification, segmentation or regression")] = None,
    classes: Annotated[str | None, typer.Option(help="output names in output order, comma-separated")] = None,
    activation: Annotated[str | None, typer.Option(
        help="softmax (one class per image or pixel), sigmoid (each class on its own) or identity "
             "(regression); required for a multi-class head")] = None,
    input_size: Annotated[str | None, typer.Option(help="e.g. 224,224 or 96,96,96")] = None,
    channels: Annotated[int | None, typer.Option(help="input channels (default: read off the "
                                                      "first convolution)")] = None,
    weights: Annotated[Path | None, typer.Option(help="weights for module:factory")] = None,
    arch: Annotated[str | None, typer.Option(help="with a weights file: resnet18, resnet50, "
                                                 "densenet121, vit or unet")] = None,
    backend: Annotated[str | None, typer.Option(help="with --arch: torchvision or monai")] = None,
    normalization: Annotated[str, typer.Option(
        help="none, imagenet or meanstd:M1,M2/S1,S2 (what the model was trained with, applied to "
             "inputs in [0, 1])")] = "none",
    layer: Annotated[str | None, typer.Option(help="CAM layer (default: the last down-sampled "
                                                   "spatial layer)")] = None,
    resize: Annotated[str, typer.Option(
        help="how inputs were resized in training: bilinear, pil_uint8 (torchvision's Resize of "
             "8-bit PIL images), nearest or bicubic")] = "bilinear",
    name: Annotated[str, typer.Option(help="the model's name in reports")] = "",
    version: Annotated[str, typer.Option(help="the model's version in reports")] = "",
    output: Annotated[str, typer.Option(
        help="which part of a tuple, dict or ModelOutput to explain: a key (logits, out) or an "
             "index (default: logits, else out, else the only tensor, else the first element)")] = "",
) -> None:
    """Make a model folder (card.json + network) from a state dict, safetensors, TorchScript, a
    module:factory, an nnU-Net v2 results folder or a MONAI bundle. What can be read off the
    network is checked, what cannot is asked for; a framework's folder says everything itself."""
    from pellucid.models import load_model
    from pellucid.models.frameworks import framework_kind, import_framework
    from pellucid.models.importing import ImportSpec, import_model

    if Path(source).is_dir() and framework_kind(Path(source)) is not None:
        # nnU-Net results or a MONAI bundle: the framework says what the model is; nothing to ask
        options = {"task": task, "classes": classes, "activation": activation,
                   "input-size": input_size, "channels": channels, "weights": weights, "arch": arch,
                   "backend": backend, "layer": layer, "output": output,
                   "normalization": normalization != "none", "resize": resize != "bilinear"}
        given = [f"--{n}" for n, v in options.items() if v]
        if given:
            raise ConfigError(f"{' '.join(given)}: {source} is read as its framework runs it (its "
                              f"own classes, preprocessing and activation); give only --out, "
                              f"--name and --version")
        _out_folder(out, "--out")
        folder = import_framework(Path(source), out, name, version)
        card = load_model(folder).card
        console.print(f"{folder}: {card.arch} ({card.library}), {card.task}, classes "
                      f"{', '.join(card.class_names)} ({card.activation}), "
                      f"{card.in_channels} channel(s)")
        return
    try:
        size = [int(v) for v in _split_list(input_size)] if input_size else []
    except ValueError:
        raise ConfigError(f"--input-size: give integers like 224,224, got {input_size!r}") from None
    _out_folder(out, "--out")
    spec = ImportSpec(source, task, _split_list(classes) if classes else [], activation, size,
                      channels, str(weights) if weights else None, arch, backend, normalization,
                      layer, name, version, resize=resize, output=output)
    from pellucid.explainers import default_layer

    folder = import_model(spec, out, find_layer=default_layer)
    card = load_model(folder).card
    console.print(f"{folder}: {card.task}, {len(card.class_names)} outputs ({card.activation}), "
                  f"{card.in_channels} channel(s) at {'x'.join(map(str, card.input_size))}, "
                  f"CAM layer {card.default_layer}")


@app.command()
def layers(model: Annotated[str, typer.Argument(help="zoo folder or module:factory")],
           weights: Path | None = None) -> None:
    """List the layers a CAM can use (maps or token sequences), with their output shapes and layout."""
    import torch

    from pellucid.explainers import candidate_layers, default_layer
    from pellucid.models import load_model

    loaded = load_model(model, weights)
    if loaded.card is None:
        raise ConfigError(f"{model}: listing layers needs a model card for the input shape")
    example = torch.zeros(1, loaded.card.in_channels, *loaded.card.input_size)
    table = Table("layer", "type", "output (without batch)", "layout", "grid", "channels")
    for info_ in candidate_layers(loaded.module, example):
        table.add_row(info_["name"], info_["type"], str(info_["shape"]), info_["layout"],
                      "x".join(map(str, info_["grid"])), str(info_["channels"]))
    console.print(table)
    console.print(f"default: {loaded.card.default_layer or default_layer(loaded.module, example)}")


@app.command()
def explain(
    model: Annotated[str, typer.Option(help="zoo folder, TorchScript file or module:factory")],
    input: Annotated[list[Path] | None, typer.Option("--input", help="image/NIfTI/DICOM file(s)")] = None,
    method: Annotated[str, typer.Option(help="comma-separated methods")] = "gradcam",
    out: Annotated[Path, typer.Option(help="output folder")] = Path("explanations"),
    target: Annotated[str | None, typer.Option(help="class name or index (default: predicted)")] = None,
    layer: Annotated[str | None, typer.Option(help="layer name (default: the card's)")] = None,
    region: Annotated[str, typer.Option(help="segmentation: predicted, all, or the errors against "
                                             "--truth: fp (marked, not true) | fn (missed)")] = "predicted",
    truth: Annotated[Path | None, typer.Option(help="ground-truth mask for --region fp/fn")] = None,
    reference: Annotated[float | None, typer.Option(
        help="regression: explain the deviation from this value")] = None,
    sliding_window: Annotated[str | None, typer.Option(
        help="patch size, e.g. 96,96,96: run a segmentation network by sliding window on "
             "inputs kept at their own size")] = None,
    overlap: Annotated[float, typer.Option(help="sliding-window overlap")] = 0.25,
    modalities: Annotated[bool, typer.Option(
        help="add exact per-channel (modality) Shapley values to summary.json")] = False,
    outside_intended_use: Annotated[bool, typer.Option(
        help="explain an input outside the model card's intended use (modality, body part, "
             "photometric interpretation, channels, size); every output records the override")] = False,
    evidence: Annotated[Path | None, typer.Option(
        help="a `pellucid bench` run of this model (same weights): each method's benchmark scores, "
             "whether it beat the trivial baselines and its randomisation check go into "
             "summary.json and the SR")] = None,
    evidence_model: Annotated[str | None, typer.Option(
        help="the model's name in the --evidence run, when it has several")] = None,
    evidence_unverified: Annotated[bool, typer.Option(
        help="use an --evidence run this installation did not write (copied, edited, or older); "
             "every stated number is marked UNVERIFIED")] = False,
    weights: Annotated[Path | None, typer.Option(help="weights for module:factory")] = None,
    pacs: Annotated[str | None, typer.Option(help="DICOMweb URL: pull --study, explain, push back")] = None,
    study: Annotated[str | None, typer.Option(help="Study Instance UID (with --pacs)")] = None,
    user: Annotated[str | None, typer.Option(envvar="PELLUCID_PACS_USER", help="PACS user")] = None,
    password: Annotated[str | None, typer.Option(envvar="PELLUCID_PACS_PASSWORD",
                                                 help="PACS password")] = None,
    precision: Annotated[str | None, typer.Option(help=PRECISION_HELP)] = None,
    backend: Annotated[str | None, typer.Option(help=BACKEND_HELP)] = None,
    dicom: Annotated[bool, typer.Option(
        help="for DICOM --input, also write the DICOM objects beside the maps: an overlay per "
             "method (Secondary Capture), the Parametric Map, the Segmentation and the SR, as "
             "--pacs stores them")] = False,
    segmentation: Annotated[str, typer.Option(
        help="the DICOM Segmentation of the first method's map: binary (the map >= half its "
             "range) or fractional (the map scaled to [0, 1], 8 bits)")] = "binary",
) -> None:
    """Explain a model on files (overlay PNGs, raw maps, summary.json; with --dicom the DICOM
    objects of DICOM input too), or on a PACS study (--pacs URL --study UID): results go back to
    the study as DICOM objects."""
    from pellucid.inference import use_backend
    from pellucid.models import load_model
    from pellucid.pipeline import CaseOptions
    from pellucid.runtime import use_precision

    window = None
    if sliding_window:
        try:
            window = [int(v) for v in _split_list(sliding_window)]
        except ValueError:
            raise ConfigError(f"--sliding-window: give integers like 96,96,96, got "
                              f"{sliding_window!r}") from None
    options = CaseOptions(_split_list(method), target, layer, region, truth, reference, window,
                          overlap, modalities, outside_intended_use, evidence, evidence_model,
                          evidence_unverified, segmentation)
    options.check()  # every option is checked before the model loads, for files and PACS alike
    if pacs is not None and input:
        raise ConfigError("give --input FILE or --pacs URL --study UID, not both")
    if pacs is not None and not study:
        raise ConfigError("--pacs needs --study UID")
    if study is not None and pacs is None:
        raise ConfigError("--study goes with --pacs URL")
    if dicom and pacs is not None:
        raise ConfigError("--dicom goes with --input (--pacs always writes the DICOM objects)")
    use_precision(precision)
    use_backend(backend)
    _out_folder(out, "--out")
    loaded = load_model(model, weights)
    if pacs is not None:
        from pellucid.pacs import DicomWeb, pull_explain_push
        from pellucid.privacy import redact_library_messages

        redact_library_messages()
        summary = pull_explain_push(DicomWeb(pacs, user, password), study, loaded, Path(model).name,
                                    options, out)
        # one JSON document on stdout, as written: rich would wrap long strings at the width
        sys.stdout.write(json.dumps(summary, indent=2, default=float) + "\n")
        return
    if not input:
        raise ConfigError("give --input FILE (or --pacs URL --study UID)")
    from pellucid.pipeline import explain_files
    from pellucid.pipeline.case import describe

    for row in explain_files(loaded, input, options, out, dicom=dicom, model_name=Path(model).name):
        for number, case in enumerate(row.get("frames", [row]), start=1):  # a multi-frame: per frame
            where = f" frame {number}" if "frames" in row else ""
            text = describe(case["prediction"], case["explained"])
            console.print(f"{row['input']}{where}: {text} -> {', '.join(case['files'])}")
            if "modality_importance" in case:
                shap = case["modality_importance"]["shapley"]
                console.print("  modality Shapley: " + ", ".join(f"{k} {v:+.3f}"
                                                                 for k, v in shap.items()))


@app.command()
def bench(config: Annotated[str, typer.Argument(help="YAML configuration (or a built-in: demo, "
                                                      "shared, shared-short)")],
          out: Annotated[Path | None, typer.Option(help="output folder (default bench_<name>)")] = None,
          executor: Annotated[str, typer.Option(help="local or ray")] = "local",
          address: Annotated[str | None, typer.Option(help="Ray cluster address (ray executor)")] = None,
          workers: Annotated[int | None, typer.Option(help="Ray workers of a local cluster")] = None,
          no_report: Annotated[bool, typer.Option("--no-report", help="skip report.html")] = False,
          precision: Annotated[str | None, typer.Option(help=PRECISION_HELP)] = None,
          backend: Annotated[str | None, typer.Option(help=BACKEND_HELP)] = None
          ) -> None:
    """Run (or resume) a benchmark grid and write results, statistics and report.html."""
    from pellucid.bench import load_config, run_bench
    from pellucid.bench.runner import print_leaderboard
    from pellucid.inference import use_backend
    from pellucid.runtime import use_precision

    use_precision(precision)
    use_backend(backend)

    cfg = load_config(config)
    folder = _out_folder(out or Path(f"bench_{cfg.name}"), "--out")
    table = run_bench(cfg, folder, executor=executor, address=address, report=not no_report,
                      workers=workers)
    print_leaderboard(table)
    console.print(f"results: {folder}/results.parquet" + ("" if no_report else
                                                          f", report: {folder}/report.html"))


@app.command()
def report(run: Annotated[Path, typer.Argument(help="a benchmark output folder")],
           card: Annotated[bool, typer.Option(
               "--card", help="also write the explanation card of every task (cards/*.md, .json)")
           ] = False) -> None:
    """Re-compute the statistics and report.html of a finished benchmark folder."""
    from pellucid.bench.report import write_report

    if not (run / "parts").is_dir():
        raise ConfigError(f"{run}: not a benchmark output folder (no parts/)")
    console.print(f"report: {write_report(run)}")
    if card:
        from pellucid.bench.card import write_cards

        for path in write_cards(run):
            console.print(f"card: {path}")


@app.command()
def serve(ctx: typer.Context,
          models: Annotated[Path, typer.Option(help="folder of model folders (each with card.json)")],
          host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
          port: Annotated[int, typer.Option(help="port")] = 8000,
          out: Annotated[Path, typer.Option(help="where results are kept")] = Path("pellucid_results"),
          api_key: Annotated[str | None, typer.Option(
              envvar="PELLUCID_API_KEY", help="require this X-API-Key; set it in the PELLUCID_API_KEY "
                                              "environment variable (an option is visible in the "
                                              "process list)")] = None,
          max_upload_mb: Annotated[float, typer.Option(help="largest upload")] = 64.0,
          max_pixels: Annotated[int, typer.Option(help="largest decoded 2D image (pixels)")] =
          SERVICE_LIMITS.max_pixels,
          max_voxels: Annotated[int, typer.Option(help="largest decoded volume (voxels)")] =
          SERVICE_LIMITS.max_voxels,
          max_frames: Annotated[int, typer.Option(help="most frames or slices")] =
          SERVICE_LIMITS.max_frames,
          max_methods: Annotated[int, typer.Option(help="most methods per request")] = 8,
          workers: Annotated[int, typer.Option(help="worker processes running jobs")] = 2,
          queue: Annotated[int, typer.Option(help="jobs waiting beyond the workers (then 503)")] = 8,
          job_timeout: Annotated[float, typer.Option(help="seconds one job may run (then 504)")] = 300.0,
          retention_hours: Annotated[float, typer.Option(
              help="delete results older than this (0 keeps them)")] = 24.0,
          body_timeout: Annotated[float, typer.Option(
              help="seconds an upload may take to arrive (then 408)")] = 120.0,
          body_idle: Annotated[float, typer.Option(
              help="longest pause in seconds within an upload (then 408)")] = 15.0) -> None:
    """Serve the REST API (POST /v1/explain, GET /v1/models, /health, /ready, /docs); limits and
    their reasons: docs/security.md."""
    import logging

    import uvicorn

    from pellucid.guards import DecodeLimits
    from pellucid.privacy import redact_library_messages
    from pellucid.service import create_app
    from pellucid.service.app import ServiceConfig

    source = ctx.get_parameter_source("api_key")
    if api_key is not None and getattr(source, "name", "") == "COMMANDLINE":
        print("warning: --api-key is visible to every user of this machine in the process list; "
              "set PELLUCID_API_KEY instead", file=sys.stderr)
    if not models.is_dir():
        raise ConfigError(f"--models {models}: no such models folder")
    _out_folder(out, "--out")
    try:
        limits = DecodeLimits(max_pixels, max_voxels, max_frames)
    except ValueError as exc:
        raise ConfigError(f"--{str(exc).split()[0].replace('_', '-')}: {exc}") from None
    config = ServiceConfig(api_key=api_key, max_upload_mb=max_upload_mb, max_methods=max_methods,
                           workers=workers, queue=queue, job_timeout_s=job_timeout,
                           retention_hours=retention_hours, limits=limits,
                           body_timeout_s=body_timeout, body_idle_s=body_idle)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    redact_library_messages()
    uvicorn.run(create_app(models, out, config=config), host=host, port=port, log_level="info")


@app.command()
def node(config: Annotated[Path, typer.Option(help="the node's YAML file: listener, spool, "
                                                   "destinations, routes")]) -> None:
    """Run a DICOM node a PACS routes studies to: C-STORE in, a durable spool, each image explained
    by the first route that takes it, the results sent by C-STORE or STOW-RS with retries; GET
    /health and /metrics on 127.0.0.1 (docs/clinical-integration.md, "pellucid node")."""
    import logging
    import signal

    from pellucid.node import Node, load_node_config
    from pellucid.privacy import redact_library_messages

    settings = load_node_config(config)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # no per-association lines
    redact_library_messages()
    running = Node(settings).start()
    signal.signal(signal.SIGTERM, lambda *_: running.request_stop())
    try:
        running.wait()
    except KeyboardInterrupt:
        pass
    finally:
        running.stop()


def _out_folder(path: Path, option: str) -> Path:
    """An output folder that is not an existing file (it is created when needed)."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {path}: exists and is not a folder")
    return path


@app.command()
def demo(out: Annotated[Path, typer.Option(help="output folder")] = Path("demo_out"),
         quick: Annotated[bool, typer.Option(help="fewer cases and methods (a smoke run)")] = False,
         full: Annotated[bool, typer.Option(help="every method x every metric (20 minutes or more "
                                                 "on 2 cores)")] = False,
         backend: Annotated[str | None, typer.Option(
             help="forward-only work on torch (the demo's default: its three small models ran "
                  "fastest in torch here, and timing ONNX Runtime and OpenVINO first costs a "
                  "newcomer's first run 7 s), auto, onnxruntime or openvino; also "
                  "$PELLUCID_BACKEND")] = None,
         ) -> None:
    """The main job on the embedded phantoms: train, explain with the seed's methods beside the
    trivial baselines, score them, and write the report and the explanation cards (--full: every
    method x every metric)."""
    from pellucid.demo import run_demo
    from pellucid.inference import use_backend

    use_backend(backend or os.environ.get("PELLUCID_BACKEND") or "torch")
    run_demo(_out_folder(out, "--out"), quick=quick, full=full)


review_app = typer.Typer(help="Clinician review study: create, serve, invite, analyze.",
                         no_args_is_help=True)
app.add_typer(review_app, name="review")
DB_HELP = "SQLite file or postgresql://user@host:port/db"


@review_app.command("create")
def review_create(
    from_run: Annotated[Path, typer.Option("--from", help="a benchmark run folder")],
    raters: Annotated[Path, typer.Option(help="file of rater labels (one per line, or CSV 'label')")],
    db: Annotated[str, typer.Option(help=DB_HELP)] = "review.db",
    cases: Annotated[int, typer.Option(help="cases in the study")] = 20,
    methods: Annotated[str | None, typer.Option(help="comma-separated methods (default: all)")] = None,
    task: Annotated[str | None, typer.Option(help="MODEL|DATASET of the run (default: the first)")] = None,
    finding: Annotated[str | None, typer.Option(help="the finding asked about (default: the "
                                                     "task's most common target)")] = None,
    control: Annotated[float, typer.Option(help="fraction of cases shown without explanations")] = 0.0,
    threshold: Annotated[float, typer.Option(help="AI score at which the prediction is positive")] = 0.5,
    seed: int = 0,
    base_url: Annotated[str, typer.Option(help="prefix of the invitation links")] = "http://127.0.0.1:8100",
    invitations: Annotated[Path, typer.Option(help="CSV of rater links (keep it secret)")] =
    Path("invitations.csv"),
) -> None:
    """Build a blinded study from a benchmark run; writes the invitation links to a CSV and prints
    the admin token once (only hashes are stored)."""
    import csv

    from pellucid.review.create import create_study, read_raters

    made = create_study(from_run, db, read_raters(raters), cases, _split_list(methods) if methods else None,
                        task, finding, control, threshold, seed)
    with open(invitations, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["rater", "link"])
        for label, token in made.invitations.items():
            w.writerow([label, f"{base_url.rstrip('/')}/r/{token}"])
    invitations.chmod(0o600)
    console.print(f"study {made.study_id} in {db}: {len(made.invitations)} raters, links in "
                  f"{invitations}")
    console.print(f"admin token (shown once): {made.admin_token}")


@review_app.command("serve")
def review_serve(db: Annotated[str, typer.Option(help=DB_HELP)] = "review.db",
                 host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
                 port: Annotated[int, typer.Option(help="port")] = 8100,
                 trusted_proxy: Annotated[list[str] | None, typer.Option(
                     help="address of a reverse proxy whose X-Forwarded-For is honoured "
                          "(repeatable); without it the header is ignored")] = None) -> None:
    """Serve the rater pages and the admin API."""
    import ipaddress

    import uvicorn

    from pellucid.review.app import create_review_app

    proxies = list(trusted_proxy or [])
    for address in proxies:
        try:
            ipaddress.ip_network(address, strict=False)
        except ValueError:
            raise ConfigError(f"--trusted-proxy: {address!r} is not an IP address or network") \
                from None
    uvicorn.run(create_review_app(db), host=host, port=port, log_level="warning",
                proxy_headers=bool(proxies), forwarded_allow_ips=",".join(proxies) or None)


@review_app.command("invite")
def review_invite(label: Annotated[str, typer.Argument(help="the new rater's label")],
                  db: Annotated[str, typer.Option(help=DB_HELP)] = "review.db",
                  study: Annotated[int, typer.Option(help="study id")] = 1,
                  base_url: Annotated[str, typer.Option(help="link prefix")] = "http://127.0.0.1:8100"
                  ) -> None:
    """Invite one more rater; prints the secret link."""
    from pellucid.review.create import add_rater

    console.print(f"{base_url.rstrip('/')}/r/{add_rater(db, study, label)}")


@review_app.command("analyze")
def review_analyze(db: Annotated[str, typer.Option(help=DB_HELP)] = "review.db",
                   out: Annotated[Path, typer.Option(help="output folder")] = Path("review_analysis"),
                   study: Annotated[int | None, typer.Option(help="study id (default: the latest)")] = None,
                   bench: Annotated[Path | None, typer.Option(
                       help="the benchmark run: correlate with its metrics, add the report section")]
                   = None) -> None:
    """Ratings with bootstrap CIs, decision accuracy per stage with McNemar tests, Krippendorff's
    alpha and Fleiss' kappa, Spearman with the benchmark; tables and CSV exports."""
    from pellucid.review.analysis import analyze

    summary = analyze(db, _out_folder(out, "--out"), study, bench)
    console.print(f"{summary['raters']} raters, {summary['complete_reads']} complete reads, "
                  f"{summary['ratings']} ratings -> {out}/summary.json, {out}/tables, {out}/export")
    for row in summary["tables"]["ratings_by_method"]:
        if row["rating"] == "agreement":
            console.print(f"  {row['method']}: agreement {row['mean']:.2f} "
                          f"[{row['ci_low']:.2f}, {row['ci_high']:.2f}]")


def _click_exceptions() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(ClickException, UsageError, Abort) of click and of the copy of click that typer carries."""
    import click

    kinds: list[tuple[type, type, type]] = [(click.ClickException, click.UsageError,
                                             click.exceptions.Abort)]
    try:
        from typer._click import exceptions as vendored
    except ImportError:  # a typer that uses click itself
        pass
    else:
        kinds.append((vendored.ClickException, vendored.UsageError, typer.Abort))
    return tuple(k[0] for k in kinds), tuple(k[1] for k in kinds), tuple(k[2] for k in kinds)


def usage_line(exc: Exception) -> str:
    """One line for a command-line mistake: what was wrong, the closest valid spelling of an
    unknown option or command when there is one, the command's usage and where its help is."""
    import difflib

    ctx = getattr(exc, "ctx", None)
    message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    message = " ".join(message.split())
    if ctx is not None and "Did you mean" not in message:
        wrong = getattr(exc, "option_name", None)
        if wrong:
            known = [o for p in ctx.command.params for o in (*p.opts, *p.secondary_opts)]
            close = difflib.get_close_matches(wrong, known, n=1, cutoff=0.75)
            if close:
                message += f" Did you mean {close[0]}?"
    if ctx is None:
        return f"error: {message}"
    usage = " ".join(ctx.get_usage().split())
    return f"error: {message} ({usage}; `{ctx.command_path} --help` lists the options)"


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app; a PellucidError or a command-line mistake (an unknown or misspelt
    option or command, a missing or bad value) becomes one line on stderr and exit status 2."""
    click_error, usage_error, abort = _click_exceptions()
    try:
        app(args=argv, standalone_mode=False, prog_name="pellucid")
    except PellucidError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except abort:
        print("error: aborted", file=sys.stderr)
        sys.exit(130)
    except usage_error as exc:
        print(usage_line(exc), file=sys.stderr)
        sys.exit(2)
    except click_error as exc:
        print(f"error: {' '.join(exc.format_message().split())}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":  # pragma: no cover
    main()
