"""Explaining one case: read -> check against the model -> normalise -> target -> explanations.
The CLI (files), the REST service and the PACS command all go through :func:`read_case` and
:func:`explain_case`; :mod:`pellucid.pipeline.outputs` writes what they produce."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pellucid.data.inputs import InputImage, load_input
from pellucid.errors import ConfigError
from pellucid.explainers.base import Explanation, upsample
from pellucid.models.sliding import windowed
from pellucid.models.training_inputs import InputCheck
from pellucid.pipeline.intended_use import IntendedUse, check_intended_use, check_training_data
from pellucid.pipeline.resolve import REGIONS, card_target, class_index, load_mask
from pellucid.targets import Target


@dataclass
class CaseOptions:
    """Everything a user chooses about explaining a case besides the model and the input: the
    options of ``pellucid explain``, honoured the same way for files, the service and a PACS."""

    methods: list[str]
    target: str | None = None  # class name or index; None: the predicted class
    layer: str | None = None  # the CAM layer; None: the card's
    region: str = "predicted"  # segmentation: predicted | all | fp | fn
    truth: Path | None = None  # ground-truth mask for fp / fn
    reference: float | None = None  # regression: explain output - reference
    sliding_window: list[int] | None = None  # patch size: segmentation by sliding window
    overlap: float = 0.25
    modalities: bool = False  # exact per-channel Shapley values
    outside_intended_use: bool = False  # explain an input the card does not cover, and say so
    evidence: Path | None = None  # a `pellucid bench` run of this model: its scores go in the SR
    evidence_model: str | None = None  # the model's name in that run, when it has several
    evidence_unverified: bool = False  # accept a run not written here, every line marked
    segmentation: str = "binary"  # the DICOM SEG: binary (map >= half its range) | fractional

    def check(self) -> None:
        """Refuse, in one line, anything that would otherwise be ignored or fail after work."""
        from pellucid.explainers import create

        if not self.methods:
            raise ConfigError("give at least one method")
        for m in self.methods:
            create(m)  # an unknown name fails before any work
        if self.region not in REGIONS:
            raise ConfigError(f"--region must be one of {', '.join(REGIONS)}, got {self.region!r}")
        if self.region in ("fp", "fn") and self.truth is None:
            raise ConfigError(f"--region {self.region} needs --truth MASK (the ground truth)")
        if self.truth is not None and self.region not in ("fp", "fn"):
            raise ConfigError("--truth is the ground truth of --region fp or fn; give one of them")
        if not 0 <= self.overlap < 1:
            raise ConfigError(f"--overlap must be in [0, 1), got {self.overlap}")
        if self.evidence is not None and not (Path(self.evidence) / "run.json").is_file():
            raise ConfigError(f"--evidence {self.evidence}: not a pellucid bench run (no run.json)")
        if self.evidence_model is not None and self.evidence is None:
            raise ConfigError("--evidence-model goes with --evidence RUN")
        if self.evidence_unverified and self.evidence is None:
            raise ConfigError("--evidence-unverified goes with --evidence RUN")
        if self.segmentation not in ("binary", "fractional"):
            raise ConfigError(f"--segmentation must be binary or fractional, got {self.segmentation!r}")
        if self.sliding_window is None and self.overlap != 0.25:
            raise ConfigError("--overlap goes with --sliding-window")
        if self.sliding_window is not None and any(v <= 0 for v in self.sliding_window):
            raise ConfigError(f"--sliding-window sides must be positive, got {self.sliding_window}")


def prepare_model(loaded, options: CaseOptions):
    """The model as the options run it: by sliding window when a patch size is given."""
    if options.sliding_window is not None:
        return windowed(loaded, options.sliding_window, options.overlap)
    return loaded


@dataclass
class Case:
    """One input, read and normalised for the model, with the target the options ask for."""

    item: InputImage
    x: torch.Tensor  # (1, C, *spatial), normalised as the card says
    target: Target | int | None
    intended_use: IntendedUse = field(default_factory=IntendedUse)
    # how far the input is from the model's training inputs (pellucid.models.training_inputs)
    training_data: InputCheck = field(default_factory=lambda: InputCheck(not_checked="not run"))
    segmentation: str = "binary"  # the DICOM SEG the options ask for: binary | fractional
    context: Any = None  # a framework's record of the case (nnU-Net's properties), to map back


def read_case(loaded, path: Path, options: CaseOptions) -> Case:
    """Read ``path`` at the model's channels and input size (at its own size under a sliding
    window), check it against the card's intended use, normalise it, check it against the
    model's training inputs, and resolve the target (with the ground truth resized to the
    input)."""
    card = loaded.card
    if getattr(loaded, "framework", None) is not None:
        return _framework_case(loaded, path, options)
    use = IntendedUse(not_checked=["no model card"])
    check = InputCheck(not_checked="no model card")
    if card is not None:
        size = None if options.sliding_window is not None else card.input_size
        item = load_input(path, card.in_channels, size, card.spatial_dims, card.resize)
        use = check_intended_use(card, item.source, options.outside_intended_use)
        x = card.normalize(item.image[None])
        check = check_training_data(loaded, x, item.source, use, options.sliding_window is not None)
    else:
        item = load_input(path, 1, None, 2)
        x = item.image[None]
    truth = load_mask(options.truth, tuple(x.shape[2:])) if options.truth is not None else None
    target = card_target(card, class_index(card, options.target), options.region, truth,
                         options.reference)
    return Case(item, x, target, use, check, options.segmentation)


@dataclass
class CaseResult:
    """The explanations of one case, their maps at the source resolution, and what the model said."""

    case: Case
    explanations: dict[str, Explanation]
    maps: dict[str, torch.Tensor]  # method -> (1, *spatial) at the resolution the file was read
    prediction: dict[str, Any]  # the model's own answer: class, index, probability | value | voxels
    explained: dict[str, Any]  # the class (output, region) the explanations are of
    classes: dict[str, float]  # every class: probability, predicted fraction, or value
    modality_importance: dict[str, Any] | None = None
    modality_share: dict[str, dict[str, float]] = field(default_factory=dict)


def _framework_case(loaded, path: Path, options: CaseOptions) -> Case:
    """A case of a model whose framework reads its own input (nnU-Net: its reader, crop,
    normalisation and resampling, :mod:`pellucid.models.nnunet`): the input is what the framework
    predicts on; the file as pellucid reads it is kept for the overlays and to map back to."""
    card = loaded.card
    if options.sliding_window is not None:
        raise ConfigError("--sliding-window: this model's framework runs its own sliding window")
    if options.truth is not None:
        raise ConfigError("--truth: a ground truth on this framework's grid is not supported yet")
    path = Path(path)
    dicom = path.is_dir() or path.suffix.lower() in (".dcm", ".dicom")
    if dicom:
        loaded.framework.accepts_dicom(path)
    else:
        loaded.framework.accepts(path)
    item = load_input(path, card.in_channels, None, card.spatial_dims)
    use = check_intended_use(card, item.source, options.outside_intended_use)
    if dicom:  # the series as pellucid reads it (modality values, its RAS affine), as a file
        x, context = _read_as_nifti(loaded.framework, item)
    else:
        x, context = loaded.framework.read(path)
    check = InputCheck(not_checked="the model's framework records no description of its "
                                   "training inputs")
    target = card_target(card, class_index(card, options.target), options.region, None,
                         options.reference)
    return Case(item, x, target, use, check, options.segmentation, context)


def _read_as_nifti(framework, item: InputImage):
    """A DICOM image read by pellucid (modality values, no window; its voxels in pellucid's order
    with their RAS affine) handed to the framework as a NIfTI file of those voxels, so that the
    framework's way back lands on the series' own voxels (the DICOM objects go on the series)."""
    import shutil
    import tempfile

    import nibabel as nib
    import numpy as np

    source = item.source
    if source.affine is None or source.array.shape[0] != 1:
        raise ConfigError(f"{source.path}: a DICOM input for this framework needs one volume with "
                          f"its geometry (one channel, an affine)")
    folder = Path(tempfile.mkdtemp(prefix="pellucid-dicom-"))
    try:
        file = folder / "series_0000.nii.gz"
        nib.save(nib.Nifti1Image(source.array[0].numpy().astype(np.float32), source.ras_affine), file)
        return framework.read(file)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def explain_case(loaded, case: Case, options: CaseOptions) -> CaseResult:
    """Explain ``case`` with every method of ``options``."""
    import pellucid

    explanations: dict[str, Explanation] = {}
    maps: dict[str, torch.Tensor] = {}
    shares: dict[str, dict[str, float]] = {}
    names = channel_names(loaded, case.x)
    for m in options.methods:
        exp = pellucid.explain(loaded, case.x, m, target=case.target, layer=options.layer,
                               check_inputs=False)  # (checked by read_case)
        explanations[m] = exp
        if getattr(loaded, "framework", None) is not None:  # the framework's way back (nnU-Net)
            maps[m] = loaded.framework.to_source(exp.attributions[0], case.context)
        else:
            maps[m] = upsample(exp.attributions, tuple(case.item.original.shape[1:]), "linear")[0]
        if options.modalities and exp.raw is not None and exp.raw.shape[:2] == case.x.shape[:2]:
            share = exp.raw.clamp_min(0).flatten(2).sum(2)[0]
            shares[m] = dict(zip(names, (share / share.sum().clamp_min(1e-30)).tolist(), strict=True))
    first = next(iter(explanations.values()))
    explained = int(first.target.classes[0])
    output = first.output
    if getattr(loaded, "framework", None) is not None and output.ndim > 2:
        # the voxels the framework itself would report: its output taken back to the file
        output = loaded.framework.output_to_source(output[:1], case.context)[None]
    prediction, classes = answer(loaded, output, explained)
    result = CaseResult(case, explanations, maps, prediction, _entry(loaded, classes, explained),
                        classes, modality_share=shares)
    if options.modalities:
        result.modality_importance = modality_summary(loaded, case.x, case.target)
    return result


def _names(loaded, width: int) -> list[str]:
    card = loaded.card
    return list(card.class_names) if card is not None else [str(i) for i in range(width)]


def _entry(loaded, classes: dict[str, float], index: int) -> dict[str, Any]:
    name = list(classes)[index]
    card = loaded.card
    key = "value" if card is not None and card.task == "regression" else \
        "fraction" if _dense(loaded) else "probability" if card is not None else "logit"
    return {"class": name, "index": index, key: classes[name]}


def _dense(loaded) -> bool:
    return loaded.card is not None and loaded.card.task == "segmentation"


def answer(loaded, output: torch.Tensor, explained: int = 0) -> tuple[dict[str, Any], dict[str, float]]:
    """What the model said about one case, with a one-line text, and every class's value.
    Classification: the top class, probabilities by the card's activation (softmax when there is
    no card); segmentation: the ``explained`` region's predicted voxels (sigmoid > 0.5, or arg-max
    for softmax, as :class:`pellucid.targets.SegmentationTarget` counts them) and each class's
    predicted fraction; regression: the ``explained`` output's value."""
    card = loaded.card
    out = output.detach().float().cpu()
    names = _names(loaded, out.shape[1])
    activation = card.activation if card is not None else "softmax"
    if card is not None and card.task == "regression":
        values = out[0] if out.ndim == 2 else out
        classes = {n: float(v) for n, v in zip(names, values, strict=True)}
        top = explained
        text = f"{names[top]} = {classes[names[top]]:.2f}"
        return {"class": names[top], "index": top, "value": classes[names[top]], "text": text}, classes
    if out.ndim > 2:
        if activation == "softmax" and out.shape[1] > 1:
            marked = torch.stack([out[0].argmax(0) == k for k in range(out.shape[1])])
        else:
            marked = out[0] > 0
        voxels = marked.flatten(1).sum(1)
        classes = {n: float(v) / marked[0].numel() for n, v in zip(names, voxels, strict=True)}
        top = explained
        return {"class": names[top], "index": top, "fraction": classes[names[top]],
                "voxels": int(voxels[top]),
                "text": f"{names[top]}: {int(voxels[top])} voxels predicted"}, classes
    if card is None:  # no card, no activation: a probability would be a guess, so raw outputs
        classes = {n: float(v) for n, v in zip(names, out[0], strict=True)}
        top = int(out[0].argmax())
        return {"class": names[top], "index": top, "logit": classes[names[top]],
                "text": f"{names[top]} logit={classes[names[top]]:.2f} (no model card: no "
                        f"probability)"}, classes
    probs = torch.sigmoid(out[0]) if activation == "sigmoid" else torch.softmax(out[0], 0)
    classes = {n: float(p) for n, p in zip(names, probs, strict=True)}
    top = int(probs.argmax())
    return {"class": names[top], "index": top, "probability": classes[names[top]],
            "text": f"{names[top]} p={classes[names[top]]:.2f}"}, classes


def describe(prediction: dict[str, Any], explained: dict[str, Any]) -> str:
    """The one line that titles overlays and the console: what the model said, and what is explained
    when that differs."""
    text = prediction["text"]
    ex = explained
    if ex["index"] != prediction["index"]:
        value = {k: v for k, v in ex.items() if k in ("probability", "fraction", "value", "logit")}
        shown = "".join(f" {'p' if k == 'probability' else k}={v:.2f}" for k, v in value.items())
        text += f"; explaining {ex['class']}{shown}"
    return text


def channel_names(loaded, x: torch.Tensor) -> list[str]:
    names = list(loaded.card.channel_names) if loaded.card is not None else []
    return names if len(names) == x.shape[1] else [f"channel {i}" for i in range(x.shape[1])]


def modality_summary(loaded, x: torch.Tensor, target) -> dict[str, Any]:
    """Exact modality Shapley values of one input: {channel: phi}, with f(all) and f(none)."""
    from pellucid.explainers.modality import modality_shapley

    out = modality_shapley(loaded, x, target)
    return {"shapley": dict(zip(channel_names(loaded, x), out["values"][0].tolist(), strict=True)),
            "f_all": float(out["full"][0]), "f_none": float(out["empty"][0])}
