"""The intended-use check: is this input one the model was made for? The model card's
``intended_use`` states modalities, body parts, photometric interpretations (DICOM values),
channels and a size range; an input outside any of them is refused with one line naming what
differs, unless the user overrides, and then every output records the override. What a file does
not state (a PNG has no modality; a DICOM file may lack BodyPartExamined) is listed as not checked,
never assumed.

Then the input itself: :func:`check_training_data` measures how far it is from the inputs the model
was trained on (:mod:`pellucid.models.training_inputs`). Beyond the card's threshold the outputs
say "input unlike the training data" and state no finding; a model trained on synthetic data
refuses such an input outright (a patient image is not a phantom), unless overridden."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pellucid.errors import DataError, ModelError
from pellucid.io.reading import MedicalImage
from pellucid.models.training_inputs import InputCheck, check_input


class OutsideIntendedUse(ModelError):
    """An input the model card does not cover (a chest-radiograph model given a CT slice)."""


class UnlikeSyntheticTraining(OutsideIntendedUse):
    """An input unlike the synthetic images a model was trained on (a patient's radiograph given
    to a phantom model)."""


@dataclass
class IntendedUse:
    """The outcome for one input: what was outside (empty: inside), what the file could not tell,
    and whether the user overrode a refusal."""

    outside: list[str] = field(default_factory=list)
    not_checked: list[str] = field(default_factory=list)
    override: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"outside": self.outside, "not_checked": self.not_checked, "override": self.override}

    def note(self) -> str | None:
        """The line every output of an overridden case carries; None when inside."""
        if not self.outside:
            return None
        return "OUTSIDE THE MODEL'S INTENDED USE (user override): " + "; ".join(self.outside)


def _channels(source: MedicalImage) -> int:
    """Image channels, a colour file whose channels are all equal counting as one."""
    arr = source.array
    if arr.shape[0] in (3, 4) and source.kind == "image" and \
            bool((arr[:3] == arr[:1]).all()):
        return 1
    if source.kind == "dicom" and source.datasets:
        return int(getattr(source.datasets[0], "SamplesPerPixel", 1) or 1)
    return int(arr.shape[0])


# DICOM objects that are not images of the patient, whatever pixels they carry: never explained,
# with or without the override (a Segmentation's label map is not an image to explain)
NOT_IMAGES = {"SEG": "a Segmentation", "SR": "a structured report", "PR": "a presentation state",
              "KO": "a key object selection", "RTSTRUCT": "an RT structure set",
              "REG": "a registration", "RTDOSE": "an RT dose", "RTPLAN": "an RT plan"}


def check_intended_use(card, source: MedicalImage, override: bool = False) -> IntendedUse:
    """Check ``source`` against ``card.intended_use``; raise :class:`OutsideIntendedUse` when it is
    outside and ``override`` is not given. A DICOM object that is not an image (a Segmentation,
    an SR, ...) is refused whatever the override."""
    if source.kind == "dicom" and source.datasets:
        modality = str(source.datasets[0].get("Modality", "") or "").upper()
        if modality in NOT_IMAGES:
            raise DataError(source.path, f"{NOT_IMAGES[modality]} (Modality {modality}), not an "
                                         f"image to explain")
    result = IntendedUse(override=override)
    use = card.intended_use if card is not None else {}
    if not use:
        result.not_checked.append("the model card states no intended use")
        return result
    ds = source.datasets[0] if source.kind == "dicom" and source.datasets else None
    for key, attribute, label in (("modalities", "Modality", "modality"),
                                  ("body_parts", "BodyPartExamined", "body part"),
                                  ("photometric", "PhotometricInterpretation", "photometric interpretation")):
        allowed = [str(v).upper() for v in use.get(key, [])]
        if not allowed:
            continue
        value = str(ds.get(attribute, "") or "").strip().upper() if ds is not None else ""
        if not value:
            result.not_checked.append(f"{label} (the file does not state {attribute})")
        elif value not in allowed:
            result.outside.append(f"{label} {value}; the model is for {', '.join(allowed)}")
    channels = use.get("channels")
    if channels:
        have = _channels(source)
        if have not in channels:
            result.outside.append(f"{have} image channel(s); the model is for "
                                  f"{' or '.join(str(c) for c in channels)}")
    sides = [int(v) for v in source.array.shape[1:]]
    if "min_size" in use and min(sides) < int(use["min_size"]):
        result.outside.append(f"size {'x'.join(map(str, sides))}; the model needs at least "
                              f"{use['min_size']} px a side")
    if "max_size" in use and max(sides) > int(use["max_size"]):
        result.outside.append(f"size {'x'.join(map(str, sides))}; the model takes at most "
                              f"{use['max_size']} px a side")
    if result.outside and not override:
        raise OutsideIntendedUse(f"{source.path.name}: outside the model's intended use: "
                                 f"{'; '.join(result.outside)} (an explicit override, "
                                 f"--outside-intended-use, is recorded in every output)")
    return result


def check_training_data(loaded, x, source: MedicalImage, use: IntendedUse,
                        sliding_window: bool = False) -> InputCheck:
    """Check the normalised input ``x`` (1, C, *spatial) against the model's training inputs.
    A model trained on synthetic data refuses an input unlike them (:class:`UnlikeSyntheticTraining`)
    unless ``use.override``; with the override it is recorded in ``use.outside``."""
    card = loaded.card
    if sliding_window:
        return InputCheck(not_checked="a sliding window (the training inputs are described at the "
                                      "card's input size)")
    check = check_input(loaded.module, card, x)
    if card is not None and card.synthetic and check.distance is None:
        why = (f"the model was trained on synthetic data and cannot tell a patient image from its "
               f"training images ({check.not_checked})")
        if not use.override:
            raise UnlikeSyntheticTraining(f"{source.path.name}: {why} (an explicit override, "
                                          f"--outside-intended-use, is recorded in every output)")
        use.outside.append(why)
    if check.unlike and card is not None and card.synthetic:
        why = (f"unlike the synthetic images the model was trained on (feature distance "
               f"{check.distance:.1f} > {check.threshold:.1f}, the threshold at "
               f"{check.false_alarm:.0%} false alarms)")
        if not use.override:
            raise UnlikeSyntheticTraining(
                f"{source.path.name}: {why}: a model trained on phantoms does not answer for "
                f"patient images (an explicit override, --outside-intended-use, is recorded in "
                f"every output)")
        use.outside.append(why)
    return check
