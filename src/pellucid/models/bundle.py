"""MONAI bundles, explained as the bundle runs them.

A bundle folder (``configs/metadata.json``, ``configs/inference.json`` or ``.yaml``,
``models/model.pt``; the MONAI Bundle specification) is read with MONAI's own
:class:`monai.bundle.ConfigParser`, never re-implemented: its ``network_def`` builds the network,
its checkpoint (``ckpt_path``, else ``models/model.pt``) is loaded as its ``CheckpointLoader``
would, its ``preprocessing`` transform chain reads and prepares each case, its ``inferer``
(``SimpleInferer`` or ``SlidingWindowInferer``) runs the network, and MONAI's ``Invertd`` takes a
map back through the preprocessing to the file's voxels, as the bundle's own postprocessing takes
its prediction back. The activation (softmax or sigmoid) is read off the bundle's postprocessing
(``Activationsd``), else off the output's format in ``metadata.json`` (``labels``: one class per
voxel; ``classes``: each class on its own); a bundle that says neither is refused in one line.

The prediction through pellucid equals the bundle's inference workflow
(:class:`monai.bundle.ConfigWorkflow`) within 1e-4 (tests/test_monai_bundle.py). A bundle's
configuration runs the Python expressions it holds (``$...``) as MONAI does: load bundles you trust.

Cardoso et al., "MONAI: An open-source framework for deep learning in healthcare", arXiv
2211.02701 (2022); the MONAI Bundle specification (docs.monai.io, ``mb_specification``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pellucid.errors import ConfigError, DataError, ModelError

CONFIGS = ("inference.json", "inference.yaml", "inference.yml")
INFERERS = ("SimpleInferer", "SlidingWindowInferer")


def is_bundle(path: str | Path) -> bool:
    """Whether ``path`` is a MONAI bundle with an inference configuration."""
    configs = Path(path) / "configs"
    return (configs / "metadata.json").is_file() and any((configs / c).is_file() for c in CONFIGS)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


class MonaiBundle:
    """A MONAI bundle folder read by MONAI's ConfigParser (``config``: the inference configuration
    under ``configs/``; default the first of inference.json, .yaml, .yml). Everything it builds is
    the bundle's own object: ``network``, ``preprocessing``, ``inferer``, ``postprocessing``."""

    def __init__(self, folder: str | Path, config: str | None = None) -> None:
        folder = Path(folder).resolve()
        if not is_bundle(folder):
            raise ConfigError(f"{folder}: not a MONAI bundle (no configs/metadata.json and "
                              f"configs/inference.json or .yaml)")
        configs = folder / "configs"
        name = config or next(c for c in CONFIGS if (configs / c).is_file())
        if not (configs / name).is_file():
            raise ConfigError(f"{configs / name}: no such bundle configuration")
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        try:
            parser.read_meta(str(configs / "metadata.json"))
            parser.read_config(str(configs / name))
        except Exception as exc:
            raise ModelError(f"{configs / name}: cannot read the bundle configuration "
                             f"({_first_line(exc)})") from None
        parser["bundle_root"] = str(folder)
        if "device" in parser:
            parser["device"] = "$torch.device('cpu')"
        self.folder, self.config_name, self.parser = folder, name, parser
        self.metadata: dict[str, Any] = _metadata(configs / "metadata.json")
        fmt = self.metadata.get("network_data_format", {})
        inputs, outputs = fmt.get("inputs", {}) or {}, fmt.get("outputs", {}) or {}
        if not inputs or not outputs:
            raise ModelError(f"{configs / 'metadata.json'}: network_data_format names no input or "
                             f"no output")
        self.input_key, self.input_format = next(iter(inputs.items()))
        self.output_key, self.output_format = next(iter(outputs.items()))
        for key in ("network_def", "preprocessing", "inferer"):
            if key not in parser:
                raise ModelError(f"{configs / name}: the bundle defines no {key!r}; pellucid runs "
                                 f"the bundle's own {key}")
        self.network = self._parsed("network_def")
        if not isinstance(self.network, nn.Module):
            raise ModelError(f"{configs / name}: network_def is not a torch module")
        self.weights = self._checkpoint_path()
        self._load_weights()
        self.preprocessing = self._parsed("preprocessing")
        self.inferer = self._parsed("inferer")
        kind = type(self.inferer).__name__
        if kind not in INFERERS:
            raise ModelError(f"{configs / name}: inferer {kind} is not supported; pellucid runs "
                             f"{' or '.join(INFERERS)} as the bundle does")
        self.postprocessing = self._parsed("postprocessing") if "postprocessing" in parser else None
        self.activation, self.activation_source = self._activation()
        self.task = self._task()

    # -- reading the bundle -------------------------------------------------------------------
    def _parsed(self, key: str) -> Any:
        try:
            return self.parser.get_parsed_content(key)
        except Exception as exc:
            raise ModelError(f"{self.folder / 'configs' / self.config_name}: cannot build {key!r} "
                             f"({_first_line(exc)})") from None

    def _checkpoint_path(self) -> Path:
        path = Path(self._parsed("ckpt_path")) if "ckpt_path" in self.parser else \
            self.folder / "models" / "model.pt"
        if not path.is_file():
            raise ModelError(f"{path}: the bundle's weights are missing")
        return path

    def _load_weights(self) -> None:
        """As the bundle's CheckpointLoader with ``load_dict={"model": network}``: the file's
        ``model`` entry when it has one, else the whole file; strict, tensors only."""
        try:
            state = torch.load(self.weights, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ModelError(f"{self.weights}: cannot read the weights as tensors "
                             f"({_first_line(exc)})") from None
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
        try:
            self.network.load_state_dict(state, strict=True)
        except Exception as exc:
            raise ModelError(f"{self.weights}: weights do not fit the bundle's network_def "
                             f"({_first_line(exc)})") from None
        self.network.eval()

    def _activation(self) -> tuple[str, str]:
        """softmax or sigmoid, and where it was read; refused when the bundle does not say."""
        from monai.transforms import Activationsd, Compose

        steps = self.postprocessing.transforms if isinstance(self.postprocessing, Compose) else \
            [self.postprocessing] if self.postprocessing is not None else []
        for step in steps:
            if isinstance(step, Activationsd) and self.output_key in step.keys:
                i = list(step.keys).index(self.output_key)
                if step.other[i] is not None:
                    raise ModelError(f"{self.folder}: the bundle's postprocessing applies its own "
                                     f"activation function; pellucid explains softmax or sigmoid")
                if step.softmax[i] and not step.sigmoid[i]:
                    return "softmax", "postprocessing: Activationsd(softmax=True)"
                if step.sigmoid[i] and not step.softmax[i]:
                    return "sigmoid", "postprocessing: Activationsd(sigmoid=True)"
        fmt = str(self.output_format.get("format", ""))
        if fmt == "labels":
            return "softmax", "metadata.json: output format 'labels' (one class per voxel)"
        if fmt == "classes":
            return "sigmoid", "metadata.json: output format 'classes' (each class on its own)"
        raise ModelError(f"{self.folder}: neither the postprocessing (Activationsd) nor the "
                         f"output format in metadata.json ({fmt or 'none'}) says softmax or "
                         f"sigmoid; pellucid does not guess")

    def _task(self) -> str:
        kind = str(self.output_format.get("type", ""))
        if kind == "image":
            return "segmentation"
        if kind == "probabilities":
            return "classification"
        raise ModelError(f"{self.folder}: output type {kind!r} in metadata.json: pellucid explains "
                         f"'image' (segmentation) and 'probabilities' (classification) outputs")

    # -- what the card records ---------------------------------------------------------------
    def class_names(self) -> list[str]:
        """The output channels' names (``channel_def``), by channel index."""
        defs = self.output_format.get("channel_def") or {}
        count = int(self.output_format.get("num_channels", len(defs)) or len(defs))
        names = {int(k): str(v) for k, v in defs.items()}
        return [names.get(i, f"channel{i}") for i in range(count)]

    def channel_names(self) -> list[str]:
        defs = self.input_format.get("channel_def") or {}
        count = int(self.input_format.get("num_channels", len(defs)) or 1)
        names = {int(k): str(v) for k, v in defs.items()}
        return [names.get(i, f"channel{i}") for i in range(count)]

    def spatial_dims(self) -> int:
        roi = getattr(self.inferer, "roi_size", None)
        if roi is not None:
            return len(roi)
        shape = self.input_format.get("spatial_shape") or []
        if not shape:
            raise ModelError(f"{self.folder}: cannot tell 2D from 3D (no roi_size, no spatial_shape "
                             f"in metadata.json)")
        return len(shape)

    def describe(self) -> dict[str, Any]:
        """Where every setting came from: the configuration, weights, transforms and inferer."""
        inferer = self.inferer
        settings: dict[str, Any] = {"kind": type(inferer).__name__}
        for name in ("roi_size", "sw_batch_size", "overlap", "mode", "sigma_scale", "padding_mode",
                     "cval"):
            if hasattr(inferer, name):
                value = getattr(inferer, name)
                settings[name] = value if isinstance(value, int | float | str) else \
                    np.ravel(value).tolist()
        steps = getattr(self.preprocessing, "transforms", [self.preprocessing])
        return {"framework": "monai_bundle", "folder": str(self.folder),
                "config": f"configs/{self.config_name}", "weights": str(self.weights),
                "bundle_version": str(self.metadata.get("version", "")),
                "monai_version": str(self.metadata.get("monai_version", "")),
                "preprocessing": [type(t).__name__ for t in steps], "inferer": settings,
                "activation": self.activation, "activation_source": self.activation_source,
                "input": self.input_key, "output": self.output_key}

    def module(self) -> BundleInference:
        return BundleInference(self.network, self.inferer)


def _metadata(path: Path) -> dict[str, Any]:
    import json

    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: not valid JSON ({exc})") from None


class BundleInference(nn.Module):
    """The bundle's inferer around its network, differentiable: (B, C, *spatial) on the grid of the
    bundle's preprocessing -> the network's output on the same grid. Under a sliding window each
    window's activations are recomputed in the backward pass instead of kept (a volume's windows
    together would not fit in memory): a forward more per window, the same gradient."""

    def __init__(self, network: nn.Module, inferer: Any) -> None:
        super().__init__()
        self.network = network
        self._inferer = inferer
        self._windows = type(inferer).__name__ == "SlidingWindowInferer"

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        if self._windows and torch.is_grad_enabled() and x.requires_grad:
            return checkpoint(self.network, x, use_reentrant=False)
        return self.network(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._inferer(x, self._run)
        if not isinstance(out, torch.Tensor):
            raise ModelError(f"the bundle's network returned {type(out).__name__}, not one tensor")
        from monai.data import MetaTensor

        return out.as_tensor() if isinstance(out, MetaTensor) else out


@dataclass
class BundleCase:
    """A case as the bundle's preprocessing left it: the transformed dictionary (its image a
    MetaTensor that records every transform applied, for the way back)."""

    data: dict[str, Any]


class BundleAdapter:
    """What :func:`pellucid.models.load_model` attaches to a bundle: reads a case through the
    bundle's preprocessing and takes a map back through MONAI's inverse of it."""

    def __init__(self, bundle: MonaiBundle) -> None:
        self.bundle = bundle

    def accepts_dicom(self, path: Path) -> None:
        """A DICOM series is handed to the bundle as a NIfTI of pellucid's reading of it (its RAS
        affine); only a bundle that reorients its input (``Orientationd``) sees it as it would see
        any other conversion of the series."""
        steps = getattr(self.bundle.preprocessing, "transforms", [self.bundle.preprocessing])
        if not any(type(t).__name__ in ("Orientationd", "Orientation") for t in steps):
            raise ConfigError(f"{path}: this bundle does not reorient its input (no Orientationd), "
                              f"so it knows only the voxel order of its training files; convert the "
                              f"series as they were converted and give the NIfTI file")

    def accepts(self, path: Path) -> None:
        from pellucid.io.files import is_nifti

        if not is_nifti(path):
            raise ConfigError(f"{path}: a MONAI bundle's input is read here from a NIfTI volume "
                              f"(the axis order of MONAI's 2D and DICOM readers is not mapped back "
                              f"yet)")

    def read(self, path: Path) -> tuple[torch.Tensor, BundleCase]:
        """The preprocessed input (1, C, *spatial) and the bundle's record of the case."""
        self.accepts(path)
        try:
            data = self.bundle.preprocessing({self.bundle.input_key: str(path)})
        except Exception as exc:
            raise DataError(path, f"the bundle's preprocessing failed ({_first_line(exc)})") from None
        image = data[self.bundle.input_key]
        x = image.detach().cpu().as_subclass(torch.Tensor) if isinstance(image, torch.Tensor) \
            else torch.as_tensor(np.asarray(image))
        x = x.float()
        if not torch.isfinite(x).all():  # never a map of NaN or inf as if it were a finding
            raise DataError(path, "not finite after the bundle's preprocessing (NaN or inf values); "
                                  "pellucid does not explain it")
        return x[None].contiguous(), BundleCase(data)

    def read_truth(self, mask: Path, image: Path, case: BundleCase) -> torch.Tensor:
        """A ground-truth label file on the grid the model predicts on: each voxel of the
        preprocessed image takes the label at the same world position (the two affines), nearest
        neighbour; (*spatial) of label values, 0 outside the file."""
        import nibabel as nib
        from scipy.ndimage import affine_transform

        from pellucid.io.files import is_nifti

        if not is_nifti(mask):
            raise DataError(mask, "a ground truth of a MONAI bundle's case is read from NIfTI")
        try:
            img = nib.load(str(mask))
            labels = np.asarray(img.dataobj).squeeze()
        except Exception as exc:
            raise DataError(mask, f"cannot read NIfTI ({type(exc).__name__})") from None
        grid = case.data[self.bundle.input_key]
        target = np.asarray(grid.affine, dtype=np.float64)  # voxel -> RAS world, as nibabel's
        spatial = tuple(int(v) for v in grid.shape[1:])
        if labels.ndim != len(spatial):
            raise DataError(mask, f"a label volume of {len(spatial)} dimensions was expected, got "
                                  f"shape {labels.shape}")
        matrix = np.linalg.inv(np.asarray(img.affine, dtype=np.float64)) @ target
        out = affine_transform(labels.astype(np.float32), matrix[:3, :3], matrix[:3, 3], spatial,
                               order=0, mode="constant", cval=0.0)
        return torch.from_numpy(np.rint(out)).long().clamp_min(0)

    def output_to_source(self, logits: torch.Tensor, case: BundleCase) -> torch.Tensor:
        """(1, K, *grid) logits -> (K, *the file's voxels) as the bundle's postprocessing takes its
        prediction back (activation, then ``Invertd``), returned as logits of those probabilities
        (log p for softmax, log p/(1-p) for sigmoid) so that the activation gives them again."""
        activated = torch.softmax(logits[0].float(), 0) if self.bundle.activation == "softmax" \
            else torch.sigmoid(logits[0].float())
        p = self.to_source(activated, case).clamp(1e-12, 1 - 1e-7)
        return p.log() if self.bundle.activation == "softmax" else torch.logit(p)

    def to_source(self, maps: torch.Tensor, case: BundleCase) -> torch.Tensor:
        """(K, *preprocessed grid) -> (K, *the file's voxels), by MONAI's inverse of the bundle's
        preprocessing (linear interpolation, as ``Invertd(nearest_interp=False)``)."""
        from monai.data import MetaTensor
        from monai.transforms import Invertd

        key = self.bundle.input_key
        invert = Invertd(keys="_map", transform=self.bundle.preprocessing, orig_keys=key,
                         nearest_interp=False, to_tensor=True)
        if not case.data[key].applied_operations:
            raise ModelError("the bundle's preprocessing recorded no transform to invert (its image "
                             "is not a MetaTensor that tracks them): a map cannot be taken back")
        try:  # a MetaTensor: Invertd takes the record of the image's transforms onto it
            back = invert({key: case.data[key],
                           "_map": MetaTensor(maps.detach().float().cpu())})["_map"]
        except Exception as exc:
            raise ModelError(f"the bundle's preprocessing cannot be inverted to take a map back to "
                             f"the file ({_first_line(exc)})") from None
        back = back.as_subclass(torch.Tensor) if isinstance(back, torch.Tensor) else torch.as_tensor(back)
        original = case.data[key].meta.get("spatial_shape")
        if original is not None and tuple(back.shape[1:]) != tuple(int(v) for v in np.ravel(original)):
            raise ModelError(f"the inverted map has shape {tuple(back.shape[1:])}, the file "
                             f"{tuple(np.ravel(original))}: not taken back")
        return back.float().contiguous()


def load_bundle(path: Path) -> tuple[nn.Module, Any, BundleAdapter, Path]:
    """A bundle folder for :func:`pellucid.models.store.load_model`: the inference module, its card,
    the adapter that reads cases and maps back, and the weights file."""
    from pellucid.models.card import ModelCard
    from pellucid.version import __version__

    bundle = MonaiBundle(path)
    meta = bundle.metadata
    card = ModelCard(
        arch="monai_bundle", task=bundle.task, class_names=bundle.class_names(),
        in_channels=len(bundle.channel_names()), spatial_dims=bundle.spatial_dims(), input_size=[],
        activation=bundle.activation, backend="monai", channel_names=bundle.channel_names(),
        normalization={"kind": "monai_bundle", "preprocessing": bundle.describe()["preprocessing"]},
        default_layer=None, training={"monai_bundle": bundle.describe()},
        pellucid_version=__version__, name=str(meta.get("name") or bundle.folder.name),
        version=str(meta.get("version", "")), library="monai")
    return bundle.module().eval(), card, BundleAdapter(bundle), bundle.weights
