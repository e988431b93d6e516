"""nnU-Net v2 results folders, explained as nnU-Net runs them.

A results folder (``nnUNet_results/DatasetXXX_Name/<trainer>__<plans>__<configuration>``, with
``plans.json``, ``dataset.json`` and ``fold_<k>/checkpoint_final.pth``) is read with nnU-Net's own
code, never re-implemented: :class:`nnunetv2.inference.predict_from_raw_data.nnUNetPredictor` builds
the network from the plans and loads each fold; nnU-Net's image reader and preprocessor give the
input it would predict on (transpose, crop to the non-zero region, the normalisation scheme of each
channel, resampling to the configuration's spacing); nnU-Net's resampling, un-cropping and
transpose take a map back to the original image geometry.

What pellucid adds is a differentiable copy of nnU-Net's inference on the preprocessed input
(:class:`NnUNetInference`): the same padding to the patch size, the same tiles (nnU-Net's own
tile list), the Gaussian importance weights (nnU-Net's ``compute_gaussian``), test-time mirroring
over the axes the checkpoint allows, the same float16 accumulation of the tiles, and the mean over
the folds of an ensemble. Its logits equal ``nnUNetPredictor.predict_logits_from_preprocessed_data``
(tests/test_nnunet.py), so every map is a map of the prediction nnU-Net makes. What this module
cannot honour (a cascade's previous stage, a region-based label set) is refused in one line.

Isensee et al., "nnU-Net: a self-configuring method for deep learning-based biomedical image
segmentation", Nature Methods 18 (2021).
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pellucid.errors import ConfigError, DataError, ModelError

CHECKPOINT = "checkpoint_final.pth"


def is_results_folder(path: str | Path) -> bool:
    """Whether ``path`` is an nnU-Net v2 results folder (plans, dataset and at least one fold)."""
    path = Path(path)
    return (path / "plans.json").is_file() and (path / "dataset.json").is_file() and \
        any(path.glob("fold_*/checkpoint_*.pth"))


@dataclass
class Preprocessed:
    """An input as nnU-Net predicts on it: ``data`` (C, *spatial) on the configuration's grid, and
    nnU-Net's properties of the case (spacing, crop box, shapes) to go back with."""

    data: np.ndarray
    properties: dict[str, Any]
    original: np.ndarray  # (C, *spatial) as nnU-Net's reader read it (its axis order)


class NnUNetResults:
    """An nnU-Net v2 results folder: ``folds`` (None: every fold with a checkpoint, as nnU-Net
    does; several: their ensemble), ``checkpoint`` (``checkpoint_final.pth``), test-time
    ``mirroring`` and the sliding window's ``step`` (nnU-Net's defaults: on, 0.5)."""

    def __init__(self, folder: str | Path, folds: list[int | str] | None = None,
                 checkpoint: str = CHECKPOINT, mirroring: bool = True, step: float = 0.5) -> None:
        folder = Path(folder)
        if not (folder / "plans.json").is_file() or not (folder / "dataset.json").is_file():
            raise ConfigError(f"{folder}: not an nnU-Net v2 results folder (no plans.json and "
                              f"dataset.json)")
        found = sorted(p.parent.name.removeprefix("fold_") for p in folder.glob(f"fold_*/{checkpoint}"))
        if not found:
            raise ConfigError(f"{folder}: no fold_*/{checkpoint}: train the folds, or give the "
                              f"checkpoint that exists")
        chosen = [str(f) for f in folds] if folds else found
        missing = [f for f in chosen if f not in found]
        if missing:
            raise ConfigError(f"{folder}: fold(s) {', '.join(missing)} have no {checkpoint} "
                              f"(found: {', '.join(found)})")
        try:
            from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        except ImportError:
            raise ConfigError("an nnU-Net results folder needs nnunetv2 (pip install "
                              "'pellucid[models]')") from None
        predictor = nnUNetPredictor(tile_step_size=step, use_gaussian=True, use_mirroring=mirroring,
                                    perform_everything_on_device=False, device=torch.device("cpu"),
                                    verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(
            str(folder), tuple(int(f) if f != "all" else f for f in chosen), checkpoint)
        label_manager = predictor.label_manager
        if label_manager.has_regions:
            raise ModelError(f"{folder}: region-based labels (sigmoid per region) are not supported "
                             f"yet; a softmax label set is")
        if predictor.configuration_manager.previous_stage_name is not None:
            raise ModelError(f"{folder}: a cascade stage needs the previous stage's segmentation; "
                             f"explain the first stage, or the 3d_fullres configuration")
        self.folder, self.folds, self.checkpoint = folder, chosen, checkpoint
        self.predictor = predictor
        self.plans = predictor.plans_manager
        self.configuration = predictor.configuration_manager
        self.labels = label_manager
        self.dataset = predictor.dataset_json

    # -- what the card records ---------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """Where every setting came from: the plans' configuration, its normalisation schemes,
        spacing, patch size; the sliding window and mirroring of nnU-Net's predictor."""
        c = self.configuration
        return {"framework": "nnunetv2", "folder": str(self.folder), "folds": self.folds,
                "checkpoint": self.checkpoint, "trainer": self.predictor.trainer_name,
                "plans": self.plans.plans_name, "configuration": c.configuration_name if hasattr(
                    c, "configuration_name") else "", "patch_size": [int(v) for v in c.patch_size],
                "spacing": [float(v) for v in c.spacing],
                "normalization": list(c.normalization_schemes),
                "use_mask_for_norm": [bool(v) for v in c.use_mask_for_norm],
                "tile_step_size": self.predictor.tile_step_size, "gaussian": True,
                "mirroring_axes": None if not self.predictor.use_mirroring else
                [int(a) for a in (self.predictor.allowed_mirroring_axes or ())],
                "accumulation": "float16 (as nnU-Net)",
                "channels": {str(k): str(v) for k, v in self.dataset["channel_names"].items()},
                "labels": {str(k): v for k, v in self.dataset["labels"].items()},
                "file_ending": self.dataset.get("file_ending", "")}

    def class_names(self) -> list[str]:
        """The label names by output channel (background first)."""
        by_value = {int(v): str(k) for k, v in self.dataset["labels"].items()}
        return [by_value[v] for v in sorted(by_value)]

    # -- in and out ---------------------------------------------------------------------------
    def preprocess(self, files: list[str | Path]) -> Preprocessed:
        """Read one case (one file per channel, nnU-Net's channel order) with the reader the plans
        name, and preprocess it with the configuration's own preprocessor."""
        files = [str(f) for f in files]
        channels = len(self.dataset["channel_names"])
        if len(files) != channels:
            raise ConfigError(f"{files[0]}: the model takes {channels} channel file(s) "
                              f"({', '.join(self.dataset['channel_names'].values())}), got {len(files)}")
        reader = self.plans.image_reader_writer_class()
        original, properties = reader.read_images(files)
        preprocessor = self.configuration.preprocessor_class(verbose=False)
        data, _, properties = preprocessor.run_case_npy(original.copy(), None, properties, self.plans,
                                                        self.configuration, self.dataset)
        return Preprocessed(np.ascontiguousarray(data, dtype=np.float32), properties,
                            np.asarray(original))

    def to_original(self, maps: np.ndarray | torch.Tensor, properties: dict[str, Any]) -> np.ndarray:
        """Maps (K, *spatial) on the preprocessed grid back to the original image as nnU-Net's
        export takes its logits back: its probability resampling to the shape before resampling,
        zero outside the crop box, its backward transpose."""
        from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image

        maps = torch.as_tensor(np.asarray(maps, dtype=np.float32))
        spacing = [properties["spacing"][i] for i in self.plans.transpose_forward]
        current = self.configuration.spacing if len(self.configuration.spacing) == \
            len(properties["shape_after_cropping_and_before_resampling"]) else \
            [spacing[0], *self.configuration.spacing]
        back = self.configuration.resampling_fn_probabilities(
            maps, properties["shape_after_cropping_and_before_resampling"], current, spacing)
        back = torch.as_tensor(np.asarray(back, dtype=np.float32))
        full = torch.zeros((maps.shape[0], *properties["shape_before_cropping"]), dtype=torch.float32)
        full = insert_crop_into_image(full, back, properties["bbox_used_for_cropping"])
        full = np.asarray(full)
        return full.transpose([0] + [i + 1 for i in self.plans.transpose_backward])

    def module(self) -> NnUNetInference:
        """The differentiable inference (every fold) on the preprocessed input."""
        return NnUNetInference(self)


def _half(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to float16 values (nnU-Net's accumulation), kept in float32 with the gradient
    of the identity: float16 gradients overflow where the Gaussian weights are near zero (1 / w
    at a tile's corner is 1.7e7)."""
    return t + (t.half().float() - t).detach()


class NnUNetInference(nn.Module):
    """nnU-Net's sliding-window inference as a differentiable module: (1, C, *spatial) on the
    preprocessed grid -> logits (1, K, *spatial).

    ``logits = mean_f [ sum_t w * m_f(tile_t) / sum_t w ]`` over folds ``f`` and tiles ``t``, with
    ``w`` nnU-Net's Gaussian importance map (sigma = patch/8) and ``m_f`` the fold's network
    averaged over the mirrorings the checkpoint allows; the tiles are nnU-Net's own list (step 0.5
    of the patch), the input is padded to the patch size first, and every sum is rounded to float16
    as in nnU-Net's predictor (the gradient is taken through the float32 values). Under autograd
    each tile's activations are recomputed in the backward pass instead of kept (a volume's tiles
    together would not fit in memory): a forward pass more per tile, the same gradient."""

    def __init__(self, results: NnUNetResults) -> None:
        super().__init__()
        predictor = results.predictor
        base = predictor.network
        nets = []
        for params in predictor.list_of_parameters:
            net = copy.deepcopy(base)
            net.load_state_dict(params)
            nets.append(net.eval())
        self.folds = nn.ModuleList(nets)
        self._predictor = predictor
        self.patch_size = tuple(int(v) for v in results.configuration.patch_size)
        self.heads = int(results.labels.num_segmentation_heads)
        axes = predictor.allowed_mirroring_axes if predictor.use_mirroring else None
        self.mirror_axes = tuple(int(a) for a in axes) if axes else ()
        self.spatial_dims = len(self.patch_size)

    def _mirrored(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        prediction = net(x)
        if self.mirror_axes:
            axes = [a + 2 for a in self.mirror_axes]
            combos = [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]
            for dims in combos:
                prediction = prediction + torch.flip(net(torch.flip(x, dims)), dims)
            prediction = prediction / (len(combos) + 1)
        return prediction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *spatial) -> (B, K, *spatial): each case as nnU-Net predicts it on its own."""
        # a 2d configuration predicts a volume (B, C, Z, Y, X) slice by slice, as nnU-Net does
        if x.ndim not in (2 + self.spatial_dims, 5) or x.shape[0] < 1:
            raise ModelError(f"nnU-Net inference takes cases (B, C, *spatial) of {self.spatial_dims} "
                             f"spatial dimensions, got shape {tuple(x.shape)}")
        return torch.cat([self._case(x[i:i + 1]) for i in range(x.shape[0])])

    def _case(self, x: torch.Tensor) -> torch.Tensor:
        from acvl_utils.cropping_and_padding.padding import pad_nd_image
        from nnunetv2.inference.sliding_window_prediction import compute_gaussian

        data, revert = pad_nd_image(x[0], self.patch_size, "constant", {"value": 0}, True, None)
        slicers = self._predictor._internal_get_sliding_window_slicers(data.shape[1:])
        gaussian = compute_gaussian(self.patch_size, sigma_scale=1. / 8, value_scaling_factor=10,
                                    device=torch.device("cpu")).clone()
        gaussian = gaussian.float()
        total = None
        for net in self.folds:
            logits = torch.zeros((self.heads, *data.shape[1:]))
            weights = torch.zeros(data.shape[1:])
            for sl in slicers:
                patch = data[sl][None]
                if torch.is_grad_enabled() and patch.requires_grad:  # a backward will follow: keep
                    # no tile's activations (a volume's would not fit), recompute them in backward
                    out = checkpoint(self._mirrored, net, patch, use_reentrant=False)
                else:
                    out = self._mirrored(net, patch)
                tile = out[0] * gaussian
                logits[sl] = _half(logits[sl] + tile)  # nnU-Net's float16 sum
                weights[sl[1:]] = _half(weights[sl[1:]] + gaussian)
            fold = _half(logits / weights)
            total = fold if total is None else _half(total + fold)  # as nnU-Net's ensemble
        if len(self.folds) > 1:
            total = _half(total / len(self.folds))
        return total[(slice(None), *revert[1:])][None]


# -- pellucid's side: a loaded model, its card, its cases -------------------------------------
READERS_IN_VOXEL_ORDER = ("SimpleITKIO", "NibabelIO")  # (z, y, x): the file's voxels reversed


class NnUNetAdapter:
    """What :func:`pellucid.models.load_model` attaches to an nnU-Net model: reads a case as
    nnU-Net does and takes a map back to the file's voxels (pellucid's voxel order, the file's
    affine)."""

    def __init__(self, results: NnUNetResults) -> None:
        reader = results.plans.image_reader_writer_class.__name__
        if reader not in READERS_IN_VOXEL_ORDER:
            raise ModelError(f"{results.folder}: the plans read images with {reader}; pellucid maps "
                             f"back through {' or '.join(READERS_IN_VOXEL_ORDER)} only")
        self.results = results

    def accepts_dicom(self, path: Path) -> None:
        """nnU-Net does not reorient: its model learnt the voxel order of the files it was trained
        on, which depends on how their DICOM were converted; refused rather than guessed."""
        ending = self.results.dataset.get("file_ending", ".nii.gz")
        raise ConfigError(f"{path}: nnU-Net does not reorient images, so its model knows only the "
                          f"voxel order its training files had; convert the series as they were "
                          f"converted (e.g. dcm2niix) and give the {ending} file")

    def accepts(self, path: Path) -> None:
        """Refuse, in one line, a file nnU-Net's reader for this model would not take."""
        ending = str(self.results.dataset.get("file_ending", ""))
        if ending and not str(path).endswith(ending):
            raise ConfigError(f"{path}: this nnU-Net model reads {ending} files (its dataset.json)")

    def read(self, path: Path) -> tuple[torch.Tensor, Preprocessed]:
        """The preprocessed input (1, C, *spatial) and nnU-Net's record of the case."""
        self.accepts(path)
        case = self.results.preprocess([path])
        if not np.isfinite(case.data).all():  # never a map of NaN or inf as if it were a finding
            raise DataError(path, "not finite after nnU-Net's preprocessing (NaN or inf values); "
                                  "pellucid does not explain it")
        return torch.from_numpy(case.data)[None], case

    def read_truth(self, mask: Path, image: Path, case: Preprocessed) -> torch.Tensor:
        """A ground-truth label file on the grid the model predicts on, by nnU-Net's own
        preprocessing of a case with its segmentation (crop, nearest-neighbour resampling of the
        labels); (*spatial) of label values, 0 outside the crop."""
        reader = self.results.plans.image_reader_writer_class()
        try:
            seg, _ = reader.read_seg(str(mask))
        except Exception as exc:
            raise DataError(mask, f"nnU-Net's reader cannot read it ({type(exc).__name__})") from None
        original, properties = reader.read_images([str(image)])
        preprocessor = self.results.configuration.preprocessor_class(verbose=False)
        _, labels, _ = preprocessor.run_case_npy(original, seg, properties, self.results.plans,
                                                 self.results.configuration, self.results.dataset)
        labels = torch.from_numpy(np.asarray(labels[0])).long().clamp_min(0)
        if tuple(labels.shape) != tuple(case.data.shape[1:]):
            raise DataError(mask, f"on nnU-Net's grid its shape is {tuple(labels.shape)}, the "
                                  f"image's {tuple(case.data.shape[1:])}")
        return labels

    def output_to_source(self, logits: torch.Tensor, case: Preprocessed) -> torch.Tensor:
        """(1, K, *grid) logits -> (K, *the file's voxels), as nnU-Net's export resamples its
        logits before the arg-max."""
        return self.to_source(logits[0], case)

    def to_source(self, maps: torch.Tensor, case: Preprocessed) -> torch.Tensor:
        """(1, *preprocessed grid) -> (1, *the file's voxels in pellucid's order)."""
        back = self.results.to_original(maps.detach().float().cpu().numpy(), case.properties)
        spatial = back.ndim - 1
        return torch.from_numpy(np.ascontiguousarray(
            back.transpose([0, *range(spatial, 0, -1)])))  # (z, y, x) -> the file's (x, y, z)


def load_results(path: Path) -> tuple[nn.Module, Any, NnUNetAdapter, Path | None]:
    """A results folder (every fold: their ensemble, as nnU-Net predicts) or one ``fold_<k>``
    folder inside it, for :func:`pellucid.models.store.load_model`: the inference module, its card,
    the adapter that reads cases and maps back, and the checkpoint file of a single fold."""
    from pellucid.models.card import ModelCard
    from pellucid.version import __version__

    folds = None
    if path.name.startswith("fold_") and (path.parent / "plans.json").is_file():
        folds, path = [path.name.removeprefix("fold_")], path.parent
    results = NnUNetResults(path, folds)
    adapter = NnUNetAdapter(results)
    channels = [str(results.dataset["channel_names"][k])
                for k in sorted(results.dataset["channel_names"], key=int)]
    card = ModelCard(
        arch="nnunet", task="segmentation", class_names=results.class_names(),
        in_channels=len(channels), spatial_dims=len(results.configuration.patch_size),
        input_size=[], activation="softmax", backend="nnunetv2", channel_names=channels,
        normalization={"kind": "nnunet", **{k: v for k, v in results.describe().items()
                                            if k in ("normalization", "use_mask_for_norm", "spacing")}},
        default_layer=None, training={"nnunet": results.describe()}, pellucid_version=__version__,
        name=f"{path.parent.name}/{path.name}", library="nnunetv2")
    single = len(results.folds) == 1
    weights = path / f"fold_{results.folds[0]}" / results.checkpoint if single else None
    return results.module().eval(), card, adapter, weights
