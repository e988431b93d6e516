"""The model card: a JSON file next to the weights that supplies defaults for explaining.

It records the task, class names, input channels and size, intensity normalisation, the default
target layer for CAMs, the data the model was trained on, its validation/test metrics, the pellucid
version and the seed. Any ``nn.Module`` can be explained without one.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from pellucid.errors import DataError

CARD = "card.json"  # a model folder's card file
TASKS = ("classification", "segmentation", "regression")
# what a card may say about the inputs the model is meant for (pellucid.pipeline.intended_use):
# DICOM Modality and BodyPartExamined values, PhotometricInterpretation values, the number of
# image channels, and the smallest and largest side in pixels
INTENDED_USE_KEYS = ("modalities", "body_parts", "photometric", "channels", "min_size", "max_size")
ACTIVATIONS = ("sigmoid", "softmax", "identity")  # identity: regression outputs
TRAINING_DATA = ("synthetic", "real", "")  # "": the card does not say
# the readers of pellucid's synthetic phantoms, as a card's training["dataset"] names them (cards
# written before training_data existed are read as synthetic when they name one of these)
PHANTOM_DATASETS = ("phantom-chest", "phantom-brain", "phantom-brain-3d", "phantom-survival",
                    "ChestPhantom", "BrainPhantom")


@dataclass
class ModelCard:
    """Everything pellucid needs to know about a saved model besides its weights."""

    arch: str
    task: str
    class_names: list[str]
    in_channels: int
    spatial_dims: int
    input_size: list[int]
    activation: str = "sigmoid"
    backend: str = "monai"
    channel_names: list[str] = field(default_factory=list)
    normalization: dict[str, Any] = field(default_factory=lambda: {"kind": "none"})
    default_layer: str | None = None
    # per class, the probability at which the model calls the finding present; None = the class has
    # no operating point (e.g. a TorchXRayVision class its calibration does not cover)
    thresholds: list[float | None] = field(default_factory=list)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    pellucid_version: str = ""
    seed: int | None = None
    name: str = ""
    intended_use: dict[str, Any] = field(default_factory=dict)
    version: str = ""  # the model's own version, as its makers name it
    # class name -> [coding scheme, code value, code meaning] (SNOMED CT "SCT", RadLex "RADLEX"),
    # used by the structured report; a class without one is coded in pellucid's own scheme
    finding_codes: dict[str, list[str]] = field(default_factory=dict)
    # "package.module:factory" that builds the network of an imported model (arch "custom")
    factory: str = ""
    # how inputs are resized to input_size (pellucid.data.transforms.RESIZE_METHODS): bilinear, or
    # pil_uint8 for a model trained on torchvision's Resize of 8-bit PIL images
    resize: str = "bilinear"
    # which part of a non-tensor output is explained (pellucid.models.outputs): a key, or an index
    # written as digits; "" = the rule (logits, out, the only tensor, the first element)
    output: str = ""
    # the library and version the network's class comes from (e.g. "timm 1.0.22")
    library: str = ""
    # what the model was trained on: "synthetic" (e.g. pellucid's phantoms), "real", or "" (not
    # stated). A model trained on synthetic data refuses inputs unlike its training data and never
    # codes its classes in SNOMED CT or RadLex
    training_data: str = ""
    # how its training inputs are described, for the check every explanation makes
    # (pellucid.models.training_inputs): method, layer, threshold, false-alarm rates
    training_inputs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise DataError(None, f"model card: task must be one of {TASKS}, got {self.task!r}")
        if self.activation not in ACTIVATIONS:
            raise DataError(None, f"model card: activation must be one of {ACTIVATIONS}, "
                                  f"got {self.activation!r}")
        if any(t is not None and not (isinstance(t, (int, float)) and 0 <= t <= 1)
               for t in self.thresholds):
            raise DataError(None, f"model card: thresholds must be probabilities in [0, 1] or null "
                                  f"(no operating point), got {self.thresholds}")
        bad = [k for k, v in self.finding_codes.items() if k not in self.class_names or len(v) != 3]
        if bad:
            raise DataError(None, f"model card: finding_codes for {', '.join(bad)}: give a class name "
                                  f"and [scheme, value, meaning]")
        from pellucid.data.transforms import RESIZE_METHODS

        if self.resize not in RESIZE_METHODS:
            raise DataError(None, f"model card: resize must be one of {RESIZE_METHODS}, got "
                                  f"{self.resize!r}")
        if self.training_data not in TRAINING_DATA:
            raise DataError(None, f"model card: training_data must be synthetic, real or empty, "
                                  f"got {self.training_data!r}")
        if self.training_data == "synthetic" and self.finding_codes:
            raise DataError(None, "model card: a model trained on synthetic data has no clinical "
                                  "finding_codes (SNOMED CT, RadLex): its classes are not findings "
                                  "in patients")
        unknown = sorted(set(self.intended_use) - set(INTENDED_USE_KEYS))
        if unknown:
            raise DataError(None, f"model card: intended_use has unknown key(s) {', '.join(unknown)}; "
                                  f"known: {', '.join(INTENDED_USE_KEYS)}")

    @property
    def synthetic(self) -> bool:
        """Whether the model was trained on synthetic data (stated, or a pellucid phantom reader
        named as its training dataset)."""
        return self.training_data == "synthetic" or \
            str(self.training.get("dataset", "")) in PHANTOM_DATASETS

    @property
    def num_outputs(self) -> int:
        return len(self.class_names)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the card's intensity normalisation to a batch (B, C, *spatial) in reader units."""
        kind = self.normalization.get("kind", "none")
        if kind == "none":
            return x
        if kind == "meanstd":
            shape = (1, -1) + (1,) * (x.ndim - 2)
            mean = torch.as_tensor(self.normalization["mean"], dtype=x.dtype, device=x.device)
            std = torch.as_tensor(self.normalization["std"], dtype=x.dtype, device=x.device)
            return (x - mean.view(shape)) / std.view(shape)
        raise DataError(None, f"model card: unknown normalization kind {kind!r}")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelCard:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise DataError(path, "model card not found") from None
        except json.JSONDecodeError as exc:
            raise DataError(path, f"model card is not valid JSON ({exc})") from None
        known = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls)
                    if f.default is MISSING and f.default_factory is MISSING}
        missing = sorted(required - data.keys())
        if missing:
            raise DataError(path, f"model card lacks key(s) {', '.join(missing)}")
        if "activation" not in data and data.get("task") != "regression" \
                and len(data.get("class_names") or []) > 1:
            raise DataError(path, "model card lacks 'activation': say softmax (one class per image "
                                  "or pixel) or sigmoid (each class on its own); pellucid does not "
                                  "guess it for a multi-class head")
        unknown = sorted(data.keys() - known)
        if unknown:
            raise DataError(path, f"model card has unknown key(s) {', '.join(unknown)}")
        try:
            return cls(**data)
        except DataError as exc:
            raise DataError(path, exc.problem) from None
