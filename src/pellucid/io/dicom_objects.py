"""Standard DICOM objects from an explanation (highdicom), all in new series that reference the
source study, series, images and frame of reference, with pellucid as manufacturer and software:

- ``parametric_map``: the float heatmap, with a real-world value mapping (identity, unitless);
- ``segmentation``: binary (a thresholded map or the model's own mask) or fractional (8 bit);
- ``secondary_capture``: an RGB overlay with the heatmap burned in and a colour legend, which any
  viewer shows;
- ``structured_report``: a Comprehensive 3D SR (TID 1500 Measurement Report) recording the model
  and its version, the prediction and its probability, the explanation method, and references to
  the source images and to the Parametric Map and Segmentation.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from pellucid.errors import ConfigError
from pellucid.version import __version__

MANUFACTURER = "pellucid"
PRIVATE_SCHEME = "99PELLUCID"


def _common(series_number: int, uid_seed: str | None = None) -> dict[str, Any]:
    """Series and instance identity. With ``uid_seed`` the UIDs derive from it (a hash under
    pydicom's UID root): the same source, model weights, method and options give the same UIDs, so
    a re-run stores the same instances again and a PACS keeps one copy instead of duplicates."""
    import highdicom as hd
    from pydicom.uid import generate_uid

    if uid_seed is None:
        series, instance = hd.UID(), hd.UID()
    else:
        series = generate_uid(entropy_srcs=[uid_seed, "series"])
        instance = generate_uid(entropy_srcs=[uid_seed, "instance"])
    return {"series_instance_uid": series, "series_number": series_number,
            "sop_instance_uid": instance, "instance_number": 1, "manufacturer": MANUFACTURER}


def _device() -> dict[str, Any]:
    return {"manufacturer_model_name": "pellucid explanations",
            "software_versions": __version__, "device_serial_number": "0"}


def _frames(source: Sequence[Any], array: np.ndarray) -> np.ndarray:
    """(frames, rows, columns) matching the source images: one frame per source image."""
    arr = np.asarray(array)
    if arr.ndim == 2:
        arr = arr[None]
    rows, cols = int(source[0].Rows), int(source[0].Columns)
    frames = sum(int(getattr(ds, "NumberOfFrames", 1) or 1) for ds in source)
    if arr.shape != (frames, rows, cols):
        raise ConfigError(f"the map has shape {arr.shape}; the source images need "
                          f"{(frames, rows, cols)} (resample the map to the source grid first)")
    return arr


@contextmanager
def _highdicom_errors(what: str) -> Iterator[None]:
    """highdicom's refusals (e.g. a multi-frame source without plane positions) as one clear line."""
    try:
        yield
    except ValueError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(f"cannot build a {what} for this source: {first}") from None


def parametric_map(source: Sequence[Any], heatmap: np.ndarray, method: str,
                   series_number: int = 901, notes: Sequence[str] = (),
                   uid_seed: str | None = None) -> Any:
    """A Parametric Map of the float ``heatmap`` on the source grid."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    arr = _frames(source, heatmap).astype(np.float32)
    lo, hi = float(arr.min()), float(arr.max())
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="ATTR", lut_explanation=f"{method} attribution",
        unit=codes.UCUM.NoUnits, value_range=(lo, hi if hi > lo else lo + 1.0),
        slope=1.0, intercept=0.0)
    if not source[0].get("FrameOfReferenceUID"):
        raise ConfigError("a Parametric Map needs a source image with a Frame of Reference (this "
                          "image, e.g. a CR without one, gets the Segmentation, Secondary Capture "
                          "and SR only)")
    source = _without_bad_spacing(source)
    # LINEAR_EXACT: the window maps the float range exactly, whatever its width (a width under 1
    # is only valid with it, PS3.3 C.11.2.1.3)
    window = hd.VOILUTTransformation(window_center=(lo + hi) / 2, window_width=max(hi - lo, 1e-6),
                                     voi_lut_function=hd.VOILUTFunctionValues.LINEAR_EXACT)
    with _highdicom_errors("Parametric Map"):
        pm = hd.pm.ParametricMap(
            source_images=list(source), pixel_array=arr, real_world_value_mappings=[mapping],
            voi_lut_transformations=[window], contains_recognizable_visual_features=False,
            content_label="PELLUCID", content_description=f"{method} explanation map",
            **_common(series_number, uid_seed), **_device())
    return _series_attributes(pm, source[0], f"pellucid {method} map", notes)


def segmentation(source: Sequence[Any], mask: np.ndarray, label: str, kind: str = "binary",
                 series_number: int = 902, notes: Sequence[str] = (),
                 uid_seed: str | None = None, model: ReportedModel | None = None,
                 finding: str | None = None, method: str = "") -> Any:
    """A Segmentation of one segment: ``kind`` binary (``mask`` boolean) or fractional (``mask``
    in [0, 1], stored in 8 bits).

    The segment is what it is: an explanation region, coded 99PELLUCID EXPLAIN "Model
    explanation" / EXPLREG "Explanation region" (never a finding such as SNOMED CT "Lesion"),
    described as "explanation region of <model> for <finding>" (SegmentDescription; the label
    is that sentence cut to 64 characters), with ``model`` (the model whose output ``method``
    explained) as the segment's algorithm. Without ``model``, pellucid is named instead."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if kind not in ("binary", "fractional"):
        raise ConfigError(f"segmentation kind must be 'binary' or 'fractional', got {kind!r}")
    arr = _frames(source, mask)
    arr = arr.astype(bool) if kind == "binary" else np.clip(arr.astype(np.float32), 0, 1)
    sentence = label
    if model is not None:
        version = f" {model.version}" if model.version else ""
        sentence = (f"explanation region of {model.name}{version} for {finding or 'its output'}"
                    + (f" ({method})" if method else ""))
    algorithm = model.identification(method) if model is not None else \
        hd.AlgorithmIdentificationSequence(name="pellucid", version=__version__,
                                           family=codes.cid7162.ArtificialIntelligence)
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label=sentence[:64],
        segmented_property_category=_private("explanation_category"),
        segmented_property_type=_private("region"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_uid=_uid(uid_seed, "segment 1"), tracking_id=sentence[:64])
    if kind == "fractional":  # DICOM has PROBABILITY and OCCUPANCY; the value is neither: say so
        sentence += "; fractional value: the map scaled to [0, 1] (min to max), not a probability"
    description.SegmentDescription = sentence[:1024]
    extra = {"fractional_type": hd.seg.SegmentationFractionalTypeValues.PROBABILITY} \
        if kind == "fractional" else {}
    source = _without_bad_spacing(source)
    with _highdicom_errors("Segmentation"):
        seg = hd.seg.Segmentation(
            source_images=list(source), pixel_array=arr,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY if kind == "binary"
            else hd.seg.SegmentationTypeValues.FRACTIONAL,
            segment_descriptions=[description], omit_empty_frames=False,
            content_label="PELLUCID", content_description=f"pellucid {kind} segmentation"[:64],
            **extra, **_common(series_number, uid_seed), **_device())
    if "FrameOfReferenceUID" not in seg:  # a radiograph: the image plane is given by labels
        seg.PatientOrientation = list(_patient_orientation(source[0]) or [])
        _image_axes_orientation(seg)
        _nominal_thickness(seg)
    seg.SeriesDescription = f"pellucid {label}"[:64]  # (a SEG series carries no Laterality)
    seg.ImageComments = " ".join([*notes, RESEARCH_NOTICE])
    return seg


def _image_axes_orientation(seg: Any) -> None:
    """A SEG of an image without a frame of reference (a projection radiograph) gets a shared Plane
    Orientation of the image's own axes (1\\0\\0\\0\\1\\0). Without a frame of reference it
    places nothing in patient space (the directions are in PatientOrientation); it is the
    convention viewers apply to such images, and OHIF overlays no SEG that lacks it."""
    from pydicom.dataset import Dataset

    plane = Dataset()
    plane.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence = [plane]


def _nominal_thickness(seg: Any) -> None:
    """A SEG of an image without a frame of reference keeps the Pixel Measures highdicom copies
    from the radiograph (its Pixel Spacing: OHIF 3.13 overlays no such SEG without it) and gets a
    nominal Slice Thickness of 1 mm, which highdicom's reader requires beside a Pixel Spacing
    (PS3.3 C.7.6.16.2.1 after CP 1426: required only with a frame of reference, allowed without).
    A projection has no slice thickness; without a frame of reference the value places nothing in
    patient space, and 1 mm is what viewers assume for a single plane."""
    for group in (*seg.SharedFunctionalGroupsSequence,
                  *seg.get("PerFrameFunctionalGroupsSequence", [])):
        for measures in group.get("PixelMeasuresSequence", []):
            if "PixelSpacing" in measures and "SliceThickness" not in measures:
                measures.SliceThickness = 1


def _valid_spacing(value: Any) -> bool:
    try:
        return value is not None and len(value) == 2 and min(float(v) for v in value) > 0
    except (TypeError, ValueError):
        return False


def _without_bad_spacing(source: Sequence[Any]) -> list[Any]:
    """The source datasets, with a PixelSpacing that is not two positive values (e.g. ``0\\0``)
    left out of copies, so that no derived object inherits it and misleads a measurement."""
    import copy

    out = []
    for ds in source:
        if "PixelSpacing" in ds and not _valid_spacing(ds.PixelSpacing):
            ds = copy.deepcopy(ds)  # the caller's dataset keeps what the file says
            del ds.PixelSpacing
        out.append(ds)
    return out


def _series_attributes(obj: Any, source: Any, description: str, notes: Sequence[str] = ()) -> Any:
    """What highdicom leaves out but a PACS and a validator expect of a new series: the source's
    Laterality (Type 2C; empty when the source does not say), a series description, and the
    run's notes (e.g. an intended-use override) as Image Comments."""
    if "Laterality" not in obj:
        obj.Laterality = source.get("Laterality", "") or ""
    obj.SeriesDescription = description[:64]
    obj.ImageComments = " ".join([*notes, RESEARCH_NOTICE])
    return obj


def _patient_orientation(source: Any) -> tuple[str, str] | None:
    """Row and column direction labels: the source's PatientOrientation, else derived from its
    ImageOrientationPatient (also inside an enhanced image's shared functional groups), else the
    conventional display of a frontal (PA/AP) radiograph."""
    orientation = source.get("PatientOrientation") or _orientation_labels(source)
    if not orientation and str(source.get("ViewPosition", "")).upper() in ("PA", "AP"):
        orientation = ("L", "F")
    return tuple(str(v) for v in orientation) if orientation and len(orientation) == 2 else None


def overlay_rgb(image: np.ndarray, heatmap: np.ndarray, title: str, alpha: float = 0.45) -> np.ndarray:
    """(rows, columns, 3) uint8: the grey image with the min-max heatmap blended in ``jet``, every
    image pixel kept; the legend (a colour bar with the map's end values) in a panel to its right and
    the caption (``title`` and the research-use statement), wrapped in a font scaled to the image
    and never smaller than 12 px, in a band above it. The canvas is at least 360 px wide so that the
    caption stays readable on small images; the image is padded, never resampled."""
    import matplotlib
    from PIL import Image, ImageDraw, ImageFont

    cmap = matplotlib.colormaps["jet"]
    img = np.asarray(image, float)
    lo, hi = img.min(), img.max()
    grey = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    h = np.asarray(heatmap, float)
    hlo, hhi = h.min(), h.max()
    norm = (h - hlo) / (hhi - hlo) if hhi > hlo else np.zeros_like(h)
    blend = (1 - alpha) * np.repeat(grey[..., None], 3, 2) + alpha * cmap(norm)[..., :3]
    rows, cols = grey.shape
    size = max(12, min(rows, cols) // 40)
    font = ImageFont.load_default(size=size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    labels = f"{hhi:.3g}", f"{hlo:.3g}"
    bar = max(6, size)
    panel = bar + 12 + int(max(probe.textlength(t, font=font) for t in labels)) + 4
    width = max(cols + panel, 360)
    lines = _wrap(probe, f"{title} | {RESEARCH_NOTICE}", font, width - 8)
    line_height = int(size * 1.3)
    band = line_height * len(lines) + 8
    canvas = Image.new("RGB", (width, band + rows), (0, 0, 0))
    canvas.paste(Image.fromarray((np.clip(blend, 0, 1) * 255).astype(np.uint8)), (0, band))
    ramp = cmap(np.linspace(1, 0, rows))[:, :3][:, None, :].repeat(bar, 1)
    canvas.paste(Image.fromarray((ramp * 255).astype(np.uint8)), (cols + 4, band))
    draw = ImageDraw.Draw(canvas)
    for k, line in enumerate(lines):
        draw.text((4, 4 + k * line_height), line, fill=(255, 255, 255), font=font)
    draw.text((cols + bar + 8, band), labels[0], fill=(255, 255, 255), font=font)
    draw.text((cols + bar + 8, band + rows - line_height), labels[1], fill=(255, 255, 255), font=font)
    return np.asarray(canvas)


def _wrap(draw: Any, text: str, font: Any, width: int) -> list[str]:
    """``text`` in lines no wider than ``width`` pixels (words kept whole where they fit)."""
    lines: list[str] = []
    for word in text.split():
        trial = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(trial, font=font) <= width:
            lines[-1] = trial
        else:
            lines.append(word)
    return lines or [""]


def secondary_capture(source: Any, rgb: np.ndarray, series_number: int = 903,
                      notes: Sequence[str] = (), uid_seed: str | None = None,
                      method: str = "") -> Any:
    """An RGB Secondary Capture image (burned-in overlay of ``method``'s map) referencing
    ``source``."""
    description = f"pellucid {method + ' ' if method else ''}overlay"[:64]
    import highdicom as hd

    spacing = source.get("PixelSpacing")
    pixel_spacing = tuple(float(v) for v in spacing) if _valid_spacing(spacing) else None
    orientation = _patient_orientation(source)
    if orientation is None:
        raise ConfigError("the source image gives no patient orientation (PatientOrientation, "
                          "ImageOrientationPatient or a PA/AP ViewPosition) for the overlay")
    if not all(re.fullmatch(r"[APRLHF]{1,3}", label) for label in orientation):
        raise ConfigError(f"PatientOrientation {' / '.join(orientation)} is not made of the "
                          f"letters A, P, R, L, H, F: no overlay can state its orientation")
    # highdicom takes one letter per direction; an oblique direction (PF, posterior and toward the
    # feet, valid DICOM) is written with its first letter, then set as the source states it
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=np.asarray(rgb, np.uint8),
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB, bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        patient_orientation=tuple(label[0] for label in orientation),
        pixel_spacing=pixel_spacing, series_description=description,
        **_common(series_number, uid_seed))
    sc.PatientOrientation = list(orientation)
    sc.BurnedInAnnotation = "YES"  # the caption and legend are pixels
    from pydicom.dataset import Dataset

    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = source.SOPClassUID, source.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    return _series_attributes(sc, source, description, notes)


def _orientation_labels(ds: Any) -> tuple[str, str] | None:
    """Patient orientation labels (row direction, column direction) from ImageOrientationPatient:
    the dominant LPS axis of each direction cosine (e.g. ("L", "P") for an axial slice)."""
    iop = ds.get("ImageOrientationPatient")
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        if iop is None and groups in ds:  # an enhanced multi-frame image
            first = ds[groups][0]
            if "PlaneOrientationSequence" in first:
                iop = first.PlaneOrientationSequence[0].get("ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        return None

    def label(v: np.ndarray) -> str:
        axis = int(np.argmax(np.abs(v)))
        return ("LR", "PA", "HF")[axis][0 if v[axis] > 0 else 1]

    return label(np.asarray(iop[:3], float)), label(np.asarray(iop[3:], float))


RESEARCH_NOTICE = "For research use only. Not for diagnostic use."
# pellucid's own coding scheme (documented in docs/clinical-integration.md) for what standard
# terminologies do not name: a finding without a card mapping, the operating threshold, the
# predicted fraction or value, an explanation map
PRIVATE_CODES = {
    "threshold": ("OPTHR", "Operating threshold"),
    "fraction": ("PREDFRAC", "Fraction of the image predicted"),
    "value": ("PREDVAL", "Predicted value"),
    "explanation": ("EXPLMAP", "Explanation map"),
    "share": ("MAPSHARE", "Share of the map's positive mass in the region"),
    "evidence": ("BENCHEV", "Benchmark evidence"),
    "no_finding": ("NOFIND", "No finding stated"),
    "explanation_category": ("EXPLAIN", "Model explanation"),
    "region": ("EXPLREG", "Explanation region"),
    "key_images": ("KEYFIND", "Images with findings"),
}


def _uid(seed: str | None, *parts: str) -> str:
    """A UID derived from ``seed`` and ``parts`` (the same content, the same UID), or a new one
    without a seed."""
    import highdicom as hd
    from pydicom.uid import generate_uid

    return hd.UID() if seed is None else generate_uid(entropy_srcs=[seed, *parts])


@dataclass
class Finding:
    """One class (output, region) of the model as the report states it: its score, the operating
    threshold it is judged by, and whether it is present (None: no operating point, so neither)."""

    name: str
    score: float
    kind: str = "probability"  # probability | fraction | value
    threshold: float | None = None
    present: bool | None = None
    code: tuple[str, str, str] | None = None  # (scheme, value, meaning) where the card maps one
    frame: int | None = None  # the frame (from 1) of a multi-frame source it is about

    def concept(self) -> Any:
        from pydicom.sr.coding import Code

        if self.code is not None:
            scheme, value, meaning = self.code
            return Code(value, scheme, meaning)
        return Code(self.name.upper().replace(" ", "_")[:16], PRIVATE_SCHEME, self.name)


@dataclass
class ReportedModel:
    """The model as the objects name it: the algorithm of the SR, the SEG and the KOS."""

    name: str
    version: str
    digest: str  # SHA-256 of the state dict (pellucid's identity of the weights, any file)
    file_name: str = ""  # the weights file as stored (model.safetensors, model.onnx, ...)
    file_sha256: str = ""  # SHA-256 of that file's bytes: what ``sha256sum`` prints

    def parameters(self) -> list[str]:
        """The weights' identity as the algorithm's parameters: the stored file's SHA-256 first
        (an auditor reproduces it with ``sha256sum``), then the state-dict digest."""
        stored = [f"weights file sha256: {self.file_sha256} ({self.file_name})"] \
            if self.file_sha256 else []
        return [*stored, f"weights state-dict sha256: {self.digest}"]

    def observer(self) -> Any:
        """The SR's and KOS's device observer: pellucid running this model, its UID derived from
        the model's name, version and weights (the same device, the same UID)."""
        import highdicom as hd
        from pydicom.sr.codedict import codes
        from pydicom.uid import generate_uid

        return hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=generate_uid(entropy_srcs=["pellucid device", self.name, self.version,
                                               self.digest]),
                name="pellucid", manufacturer_name=MANUFACTURER, model_name=self.name))

    def identification(self, method: str) -> Any:
        """The SEG's Algorithm Identification: the model (name, version, family AI) whose output
        ``method`` explained, pellucid as the algorithm's source."""
        import highdicom as hd
        from pydicom.sr.codedict import codes

        parameters = {"explanation method": method}
        if self.file_sha256:
            parameters["weights file sha256"] = self.file_sha256
        return hd.AlgorithmIdentificationSequence(
            name=self.name[:64] or "unnamed model", version=(self.version or "unversioned")[:64],
            family=codes.cid7162.ArtificialIntelligence, source=f"pellucid {__version__}",
            parameters=parameters)


def _private(key: str) -> Any:
    from pydicom.sr.coding import Code

    value, meaning = PRIVATE_CODES[key]
    return Code(value, PRIVATE_SCHEME, meaning)


def structured_report(source: Sequence[Any], model: ReportedModel, findings: Sequence[Finding],
                      methods: dict[str, dict[str, Any]], pmap: Any | None = None,
                      seg: Any | None = None, overlays: dict[str, Any] | None = None,
                      notes: Sequence[str] = (), summary: str = "", series_number: int = 904,
                      uid_seed: str | None = None, regions: dict[str, ExplainedRegion] | None = None,
                      explained: str | None = None, evidence: dict[str, list[str]] | None = None
                      ) -> Any:
    """A Comprehensive 3D SR (TID 1500 Measurement Report) that states only what the model said:
    one group per finding with its score, its operating threshold and Present / Absent (SNOMED CT)
    where the card gives an operating point; one group per explanation method with its parameters,
    referencing its Secondary Capture overlay and (the first method) the Parametric Map and the
    Segmentation (of a volume: a volumetric ROI group referencing the segment). The model's name,
    version and weights digest, the plain-text ``summary``, ``notes`` (e.g. an intended-use override)
    and the research-use statement are the algorithm's parameters.

    Each finding is an image-level TID 1501 group (no region: the model's output is about the
    image) with its Presence as a qualitative evaluation; on a single-frame image its score is
    INFERRED FROM the image's edges (a closed POLYLINE: what the output was inferred from, not a
    finding's region). Each method's group on a single-frame image is a TID 1410 planar ROI: the
    box around its explained region (``regions``), with the share of the map's positive mass in
    the box as a TID 300 measurement. Every group has a Comment naming the finding, its score, the
    method and the model; a method's Comment names the other findings too, because OHIF 3.13 lists
    only groups with a region of their own (it fails on a group without coordinates and leaves out
    image-level groups), so its measurement panel still shows every finding the model stated.

    ``evidence`` (``--evidence RUN``): per method, its benchmark scores on this model as text items
    "Benchmark evidence" (99PELLUCID BENCHEV) in the method's group, one line per metric (mean, 95 %
    interval, whether it beat the best trivial baseline) and the randomisation check's pass rate."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    observer = model.observer()
    parameters = [*model.parameters(), *([f"summary: {summary}"] if summary else []),
                  *notes, RESEARCH_NOTICE]
    algorithm = hd.sr.AlgorithmIdentification(name=model.name, version=model.version or "unversioned",
                                               parameters=parameters)
    presence = Code("705057003", "SCT", "Presence")
    groups: list[Any] = []
    planar = len(source) == 1 and int(getattr(source[0], "NumberOfFrames", 1) or 1) == 1
    whole = ExplainedRegion(0, 0, int(source[0].Columns), int(source[0].Rows), 1.0)
    for f in findings:
        name = codes.DCM.Probability if f.kind == "probability" else _private(f.kind)
        measurements = [hd.sr.Measurement(  # an image-level output: inferred from the whole image
            name=name, value=float(f.score), unit=codes.UCUM.NoUnits, algorithm_id=algorithm,
            referenced_coordinates=[whole.coordinates(source[0])] if planar else None)]
        if f.threshold is not None:
            measurements.append(hd.sr.Measurement(name=_private("threshold"), value=float(f.threshold),
                                                  unit=codes.UCUM.NoUnits, algorithm_id=algorithm))
        evaluations = [] if f.present is None else [hd.sr.QualitativeEvaluation(
            name=presence, value=codes.SCT.Present if f.present else codes.SCT.Absent)]
        version = f" {model.version}" if model.version else ""
        groups.append(_group(  # TID 1501: an image-level output, no region of its own
            source, None,
            f"finding {f.name}" + (f" frame {f.frame}" if f.frame else ""), f.concept(), algorithm,
            measurements, evaluations, f"{_finding_words(f)}; model {model.name}{version}",
            frame=f.frame, seed=uid_seed))
    if not findings:  # nothing stated (an input unlike the training data): say so, and why
        groups.append(_group(source, None, "no finding stated", _private("no_finding"), algorithm,
                             [], [], (notes[0] if notes else summary or "no finding stated")[:1024],
                             seed=uid_seed))
    for number, (method, options) in enumerate(methods.items()):
        method_id = hd.sr.AlgorithmIdentification(
            name=f"pellucid {method}", version=__version__,
            parameters=[f"{k}: {v}" for k, v in options.items()] or None)
        first = number == 0
        made = [o for o in ((pmap if first else None), (seg if first and planar else None),
                            (overlays or {}).get(method)) if o is not None]
        region = (regions or {}).get(method) if planar else None
        stated = next((f for f in findings if f.name == explained), None)
        comment, measurements, shown = _region_comment(stated, explained, method, model), [], None
        others = [_finding_words(f) for f in findings if f is not stated]
        if planar and others:  # a viewer lists only groups with a region: the rest are named here
            comment += _listed(comment, others)
        if region is not None:
            measurements, shown = [region.measurement(source[0], method_id, made)], region
        elif planar and regions is not None:  # the caller found no region: the map was empty
            comment, shown = f"the {method} map is empty (constant): no explained region", whole
        group = _group(source, shown, f"explanation {method}", _private("explanation"),
                       method_id, measurements, [], comment, made, seed=uid_seed)
        for line in (evidence or {}).get(method, []):
            group[0].ContentSequence.append(hd.sr.TextContentItem(
                name=_private("evidence"), relationship_type="CONTAINS", value=line[:1024]))
        groups.append(group)
    if seg is not None and not planar:  # a volume: the explained region as a referenced segment
        reference = hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID, segment_number=1,
            source_images=[hd.sr.SourceImageForSegmentation.from_source_image(ds) for ds in source])
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=_uid(uid_seed, "tracking", "explained region"), identifier="explained region"),
            referenced_segment=reference, algorithm_id=algorithm, finding_type=_private("explanation")))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=Code("363679005", "SCT", "Imaging procedure"),
        imaging_measurements=groups)
    evidence = list(source) + [o for o in (pmap, seg, *(overlays or {}).values()) if o is not None]
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence, content=report, **_common(series_number, uid_seed),
        series_description="pellucid explanation report")
    _segment_not_frame(sr)
    return sr


def key_object_selection(key_images: Sequence[Any], model: ReportedModel, findings: Sequence[Finding],
                         derived: Sequence[Any] = (), notes: Sequence[str] = (),
                         series_number: int = 905, uid_seed: str | None = None) -> Any:
    """A Key Object Selection (DCM 113000 "Of Interest") of ``key_images``, the source images on
    which the model stated a finding present, with the objects ``derived`` from them (the SR, the
    SEG, the PM): the IHE AI Results profile's flag for a reader's worklist. Its description names
    the model and the findings ("images with findings of <model>: <finding>, ..."); the device
    observer is the model. Only present findings select an image: without one there is no KOS
    (the caller skips it and says why)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    present = [f for f in findings if f.present]
    if not present or not key_images:
        raise ConfigError("no finding is present: no image to select")
    names = ", ".join(dict.fromkeys(
        f.name + (f" (frame {f.frame})" if f.frame else "") for f in present))
    version = f" {model.version}" if model.version else ""
    observer = model.observer()
    description = f"images with findings of {model.name}{version}: {names}. {RESEARCH_NOTICE}"
    content = hd.ko.KeyObjectSelection(
        document_title=codes.DCM.OfInterest, referenced_objects=[*key_images, *derived],
        observer_device_context=observer, description=description[:1024])
    common = _common(series_number, uid_seed)
    with _highdicom_errors("Key Object Selection"):
        kos = hd.ko.KeyObjectSelectionDocument(
            evidence=[*key_images, *derived], content=content,
            series_instance_uid=common["series_instance_uid"], series_number=series_number,
            sop_instance_uid=common["sop_instance_uid"], instance_number=1,
            manufacturer=MANUFACTURER)
    kos.SeriesDescription = "pellucid key images (findings)"
    return kos


@dataclass
class ExplainedRegion:
    """The box (pixel edges, columns x0..x1, rows y0..y1) around a 2D map's explained region
    (min-max normalised map >= 0.5, as in the Segmentation) and the share of the map's positive
    mass inside it."""

    x0: int
    y0: int
    x1: int
    y1: int
    share: float

    @classmethod
    def of(cls, heat: np.ndarray) -> ExplainedRegion | None:
        heat = np.asarray(heat, dtype=np.float64)
        if heat.ndim != 2 or not np.isfinite(heat).all() or heat.max() <= heat.min():
            return None
        rows, cols = np.nonzero((heat - heat.min()) / (heat.max() - heat.min()) >= 0.5)
        y0, y1, x0, x1 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
        positive = np.clip(heat, 0, None)
        total = float(positive.sum())
        share = float(positive[y0:y1, x0:x1].sum()) / total if total > 0 else 0.0
        return cls(x0, y0, x1, y1, share)

    def corners(self) -> np.ndarray:
        """The closed POLYLINE around the box in SCOORD image coordinates ((0, 0) is the top-left
        corner of the first pixel)."""
        x0, y0, x1, y1 = self.x0, self.y0, self.x1, self.y1
        return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float32)

    def coordinates(self, source: Any) -> Any:
        """The box on ``source`` for a measurement's INFERRED FROM."""
        import highdicom as hd

        return hd.sr.CoordinatesForMeasurement(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=self.corners(),
            source_image=hd.sr.SourceImageForRegion.from_source_image(source))

    def image_region(self, source: Any) -> Any:
        """The box on ``source`` as a planar ROI group's region."""
        import highdicom as hd

        return hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=self.corners(),
            source_image=hd.sr.SourceImageForRegion.from_source_image(source))

    def measurement(self, source: Any, algorithm: Any, made: Sequence[Any] = ()) -> Any:
        """TID 300: the share (%), INFERRED FROM the box on ``source`` and from the objects
        ``made`` of the map (Parametric Map, Segmentation, overlay)."""
        import highdicom as hd
        from pydicom.sr.codedict import codes

        images = [hd.sr.SourceImageForMeasurement(referenced_sop_class_uid=o.SOPClassUID,
                                                  referenced_sop_instance_uid=o.SOPInstanceUID)
                  for o in made]
        return hd.sr.Measurement(name=_private("share"), value=round(100 * self.share, 2),
                                 unit=codes.UCUM.Percent, algorithm_id=algorithm,
                                 referenced_coordinates=[self.coordinates(source)],
                                 referenced_images=images or None)


def _group(source: Sequence[Any], region: ExplainedRegion | None, tracking: str, finding: Any,
           algorithm: Any, measurements: list[Any], evaluations: list[Any], comment: str,
           made: Sequence[Any] = (), frame: int | None = None, seed: str | None = None) -> Any:
    """One measurement group. On a single-frame image a TID 1410 planar ROI group whose region is
    ``region`` (a viewer draws it and lists the group by its Comment); otherwise (a volume, a
    multi-frame image) a TID 1501 group referencing the source images and the objects ``made``.
    Its tracking UID derives from ``seed`` and ``tracking`` (the same report, the same UIDs)."""
    import highdicom as hd

    identifier = hd.sr.TrackingIdentifier(uid=_uid(seed, "tracking", tracking), identifier=tracking[:64])
    if region is not None:
        inferred = [m[0].ContentSequence.pop(k) for m in measurements
                    for k, item in enumerate(m[0].get("ContentSequence", []))
                    if item.ValueType == "SCOORD"]
        group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=identifier, referenced_region=region.image_region(source[0]),
            finding_type=finding, algorithm_id=algorithm, measurements=measurements or None,
            qualitative_evaluations=evaluations or None)
        # highdicom keeps a measurement's own coordinates out of a planar ROI group (the group's
        # region is the ROI); TID 300 allows them, and OHIF reads a measurement's geometry only
        # from there, so they go back in after the group is built
        numbers = [item for item in group[0].ContentSequence if item.ValueType == "NUM"]
        for number, scoord in zip(numbers, inferred, strict=False):
            number.ContentSequence.append(scoord)
        _comment(group, comment)
        return group
    frames = {"referenced_frame_numbers": [frame]} if frame else {}
    images = [hd.sr.SourceImageForMeasurementGroup.from_source_image(ds, **frames)
              for ds in source] + [
        hd.sr.SourceImageForMeasurementGroup(referenced_sop_class_uid=o.SOPClassUID,
                                             referenced_sop_instance_uid=o.SOPInstanceUID)
        for o in made]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=identifier, algorithm_id=algorithm, finding_type=finding,
        measurements=measurements or None, qualitative_evaluations=evaluations or None,
        source_images=images)
    _comment(group, comment)
    return group


def _comment(group: Any, text: str) -> None:
    """A Comment (DCM 121106) in a measurement group: the line a viewer lists for it."""
    import highdicom as hd
    from pydicom.sr.coding import Code

    group[0].ContentSequence.append(hd.sr.TextContentItem(
        name=Code("121106", "DCM", "Comment"), relationship_type="CONTAINS", value=text[:1024]))


def _finding_words(f: Finding) -> str:
    """A finding as the report states it, never more than the model said."""
    verdict = {True: "present", False: "absent", None: "not judged"}[f.present]
    cut = "" if f.threshold is None else f", threshold {f.threshold:.2f}"
    where = f" in frame {f.frame}" if f.frame else ""
    if f.kind == "value":
        return f"{f.name}{where}: value {f.score:.4g}"
    return f"{f.name} {verdict}{where} ({f.kind} {f.score:.2f}{cut})"


def _listed(head: str, others: list[str], limit: int = 1024) -> str:
    """"; other findings: a, b, ..." with as many whole findings as fit in a Comment after
    ``head`` (a finding cut inside its number would state another value); the rest counted."""
    for shown in range(len(others), -1, -1):
        rest = len(others) - shown
        more = f"{', ' if shown else ''}and {rest} more (the image-level groups)" if rest else ""
        text = f"; other findings: {', '.join(others[:shown])}{more}"
        if len(head) + len(text) <= limit:
            return text
    return ""


def _region_comment(stated: Finding | None, explained: str | None, method: str,
                    model: ReportedModel) -> str:
    """One line for a viewer's measurement panel: the explained finding, the method, the model."""
    what = _finding_words(stated) if stated is not None else f"{explained or 'output'}"
    version = f" {model.version}" if model.version else ""
    return f"{what}; explained by {method}; model {model.name}{version}"


def _segment_not_frame(item: Any) -> None:
    """A reference to a Segmentation names its segment; naming a frame as well is not allowed
    (PS3.3 C.17.3.2.1, checked by dciodvfy): the frame number goes."""
    for ref in item.get("ReferencedSOPSequence", []):
        if "ReferencedSegmentNumber" in ref and "ReferencedFrameNumber" in ref:
            del ref.ReferencedFrameNumber
    for child in item.get("ContentSequence", []):
        _segment_not_frame(child)
