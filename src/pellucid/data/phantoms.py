"""Synthetic phantoms with exactly known lesions: pellucid's embedded default data.

Nothing is stored: sample ``i`` of a phantom set is drawn from ``numpy.random.default_rng((seed,
i))``, so any sample can be regenerated from (seed, index) alone. 2D images and 3D volumes come
from one code path over an n-dimensional coordinate grid.

**Chest radiograph phantom** (1 channel): body outline, two lungs, heart, spine and ribs, blurred
and with Gaussian noise. Three findings, each drawn independently with probability
``finding_probability``; a finding's label is 1 exactly when its lesion is drawn, and its mask is
that lesion:

- ``Cardiomegaly``: the heart is drawn with a cardiothoracic ratio in [0.58, 0.68] instead of the
  normal [0.36, 0.46]; the mask is the heart.
- ``Nodule``: a bright disc of radius 3-5 % of the image inside a lung; the mask is the disc.
- ``Consolidation``: an irregular bright opacity (a noisy ellipse) inside a lung, clipped to it;
  the mask is the opacity.

**Brain MRI phantom** (4 channels: T1, T1ce, T2, FLAIR): skull, brain with smooth texture and
ventricles. With probability ``tumour_probability`` a glioma is drawn with BraTS sub-regions,
nested necrotic core (NCR, label 1) within enhancing tumour (ET, label 4) within oedema (ED,
label 2), each with its own contrast per channel (ET bright on T1ce, oedema bright on T2 and
FLAIR, necrosis dark on T1/T1ce/FLAIR and bright on T2). Masks are the BraTS evaluation regions
WT = NCR|ED|ET, TC = NCR|ET, ET; the classification label ``Tumour`` is 1 exactly when WT is not
empty. Intensities are z-scored over the head per channel, as the BraTS reader does.

**Survival phantom** (``task="survival"``, M2Net-style overall-survival regression): the same
volumes, always with a tumour, labelled with an overall survival in months that falls with the
enhancing and oedema volumes, as relative to the brain (f_ET, f_ED):

    OS = clip(60 - 300 f_ET - 120 f_ED + N(0, 1.5), 2, 60)

so the enhancing rim (bright on T1ce) and the oedema (bright on T2/FLAIR) carry the prognosis.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

from pellucid.data.base import CHEST_FINDING_CODES, CHEST_RADIOGRAPH, PellucidDataset, brain_mri
from pellucid.errors import ConfigError

CHEST_FINDINGS = ("Cardiomegaly", "Nodule", "Consolidation")
BRAIN_CHANNELS = ("T1", "T1ce", "T2", "FLAIR")
BRAIN_REGIONS = ("WT", "TC", "ET")
SURVIVAL = ("OverallSurvival",)

# tissue intensity per channel (T1, T1ce, T2, FLAIR)
_TISSUE = {
    "brain": (0.60, 0.60, 0.40, 0.45),
    "csf": (0.15, 0.15, 0.90, 0.10),
    "skull": (0.85, 0.85, 0.30, 0.50),
    "edema": (0.45, 0.45, 0.80, 0.85),
    "enhancing": (0.55, 0.95, 0.70, 0.70),
    "necrosis": (0.25, 0.25, 0.85, 0.40),
}


def _grid(shape: Sequence[int]) -> np.ndarray:
    """Normalised coordinates in [0, 1], shape (ndim, *shape)."""
    axes = [np.linspace(0.0, 1.0, n, dtype=np.float32) for n in shape]
    return np.stack(np.meshgrid(*axes, indexing="ij"))


def _ellipsoid_distance(grid: np.ndarray, centre: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    """sum_i ((x_i - c_i) / r_i)^2: below 1 inside the ellipse/ellipsoid."""
    c = np.asarray(centre, dtype=np.float32).reshape(-1, *([1] * (grid.ndim - 1)))
    r = np.asarray(radii, dtype=np.float32).reshape(-1, *([1] * (grid.ndim - 1)))
    return (((grid - c) / r) ** 2).sum(0)


def _smooth_noise(rng: np.random.Generator, shape: Sequence[int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return (field - field.mean()) / (field.std() + 1e-8)


class _PhantomBase(PellucidDataset):
    training_data = "synthetic"

    def __init__(self, n: int, size: int | Sequence[int], seed: int) -> None:
        if n < 1:
            raise ConfigError(f"phantom n must be >= 1, got {n}")
        shape = (size,) * self.spatial_dims if isinstance(size, int) else tuple(size)
        if len(shape) != self.spatial_dims or min(shape) < 16:
            raise ConfigError(
                f"phantom size must be {self.spatial_dims} sides of at least 16 px, got {size}")
        self.n, self.shape, self.seed = n, shape, seed

    def __len__(self) -> int:
        return self.n

    def _rng(self, index: int) -> np.random.Generator:
        if not 0 <= index < self.n:
            raise IndexError(index)
        return np.random.default_rng((self.seed, index))


class ChestPhantom(_PhantomBase):
    """Chest radiograph-like 2D images with Cardiomegaly / Nodule / Consolidation findings."""

    task = "classification"
    class_names = CHEST_FINDINGS
    mask_names = CHEST_FINDINGS
    channel_names = ("X-ray",)
    intended_use = CHEST_RADIOGRAPH
    # the codes the same findings have in patients; a model trained on phantoms does not get them
    # (its classes are not findings in patients: pellucid.models.train)
    finding_codes = CHEST_FINDING_CODES
    multilabel = True
    spatial_dims = 2

    def __init__(self, n: int = 512, size: int = 128, seed: int = 0,
                 finding_probability: float = 0.4, noise: float = 0.03,
                 nodule_at: str = "lung") -> None:
        super().__init__(n, size, seed)
        if nodule_at not in ("lung", "centre"):
            raise ConfigError(f"nodule_at must be 'lung' or 'centre', got {nodule_at!r}")
        self.finding_probability, self.noise = finding_probability, noise
        # "centre": every nodule at the image centre (a dataset whose lesions a centre prior finds)
        self.nodule_at = nodule_at

    def __getitem__(self, index: int) -> dict:
        rng = self._rng(index)
        grid = _grid(self.shape)  # (2, H, W): row (y), column (x)
        y, x = grid
        present = rng.random(3) < self.finding_probability
        img = np.full(self.shape, 0.05, np.float32)

        body = _ellipsoid_distance(grid, (0.55, 0.5), (0.47, 0.42 + rng.uniform(-0.02, 0.02))) <= 1
        img[body] = 0.45
        img += 0.05 * body * (y - 0.5)  # mild cranio-caudal gradient

        lungs = []
        for side in (-1, 1):
            centre = (0.47 + rng.uniform(-0.02, 0.02), 0.5 + side * (0.18 + rng.uniform(-0.01, 0.01)))
            radii = (0.30 + rng.uniform(-0.02, 0.02), 0.135 + rng.uniform(-0.01, 0.01))
            lungs.append((centre, radii, _ellipsoid_distance(grid, centre, radii) <= 1))
        lung_mask = lungs[0][2] | lungs[1][2]
        img[lung_mask] = 0.15

        # ribs: bright parabolic bands across the lungs
        for k in range(6):
            y0 = 0.22 + 0.09 * k + rng.uniform(-0.01, 0.01)
            band = np.abs(y - (y0 + 0.6 * (x - 0.5) ** 2)) < 0.012
            img[band & body] += 0.10

        spine = (np.abs(x - 0.5) < 0.035) & body
        img[spine] = 0.55

        thorax_width = 2 * (0.18 + 0.135)
        ctr = rng.uniform(0.58, 0.68) if present[0] else rng.uniform(0.36, 0.46)
        heart_rx = ctr * thorax_width / 2
        heart = _ellipsoid_distance(grid, (0.64, 0.53), (0.6 * heart_rx + 0.04, heart_rx)) <= 1
        img[heart] = 0.62

        masks = np.zeros((3, *self.shape), np.float32)
        if present[0]:
            masks[0] = heart
        if present[1]:
            (cy, cx), (ry, rx), lung = lungs[rng.integers(2)]
            r = rng.uniform(0.03, 0.05)
            centre = (cy + rng.uniform(-0.5, 0.5) * (ry - r), cx + rng.uniform(-0.4, 0.4) * (rx - r))
            if self.nodule_at == "centre":
                centre = (0.5 + rng.uniform(-0.02, 0.02), 0.5 + rng.uniform(-0.02, 0.02))
            nodule = _ellipsoid_distance(grid, centre, (r, r)) <= 1
            img[nodule] += 0.35
            masks[1] = nodule
        if present[2]:
            (cy, cx), (ry, rx), lung = lungs[rng.integers(2)]
            centre = (cy + rng.uniform(0.0, 0.5) * ry, cx + rng.uniform(-0.3, 0.3) * rx)
            radii = (rng.uniform(0.07, 0.11), rng.uniform(0.06, 0.09))
            blob = _ellipsoid_distance(grid, centre, radii) + 0.35 * _smooth_noise(
                rng, self.shape, sigma=max(self.shape) / 24) <= 1
            blob &= lung
            texture = 0.05 * _smooth_noise(rng, self.shape, sigma=1.5)
            img[blob] += 0.25 + texture[blob]
            masks[2] = blob

        img = ndimage.gaussian_filter(img, 0.8)
        img += self.noise * rng.standard_normal(self.shape).astype(np.float32)
        img = np.clip(img, 0.0, 1.0)
        return {
            "image": torch.from_numpy(img[None].copy()),
            "label": torch.from_numpy(present.astype(np.float32)),
            "mask": torch.from_numpy(masks),
            "case_id": f"chest-phantom-{self.seed}-{index}",
            "spacing": (1.0, 1.0),
        }


class BrainPhantom(_PhantomBase):
    """4-channel brain MRI-like slices (``spatial_dims=2``) or volumes (3) with BraTS regions."""

    class_names = ("Tumour",)
    mask_names = BRAIN_REGIONS
    channel_names = BRAIN_CHANNELS
    intended_use = brain_mri(len(BRAIN_CHANNELS))
    multilabel = True

    def __init__(self, n: int = 256, size: int | Sequence[int] = 96, seed: int = 0,
                 spatial_dims: int = 2, tumour_probability: float = 0.8,
                 task: str = "segmentation", noise: float = 0.03) -> None:
        if spatial_dims not in (2, 3):
            raise ConfigError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if task not in ("segmentation", "classification", "survival"):
            raise ConfigError(f"task must be 'segmentation', 'classification' or 'survival', "
                              f"got {task!r}")
        self.spatial_dims, self.task = spatial_dims, task
        self.survival = task == "survival"
        if self.survival:  # a regression dataset: one continuous label, every case has a tumour
            self.task, self.class_names, self.multilabel = "regression", SURVIVAL, False
            tumour_probability = 1.0
        super().__init__(n, size, seed)
        self.tumour_probability, self.noise = tumour_probability, noise

    def __getitem__(self, index: int) -> dict:
        rng = self._rng(index)
        nd = self.spatial_dims
        grid = _grid(self.shape)
        centre = np.full(nd, 0.5) + rng.uniform(-0.02, 0.02, nd)
        head_r = np.full(nd, 0.45) + rng.uniform(-0.02, 0.02, nd)
        head_d = _ellipsoid_distance(grid, centre, head_r)
        head = head_d <= 1
        brain = _ellipsoid_distance(grid, centre, head_r - 0.045) <= 1
        skull = head & ~brain

        labels = np.zeros(self.shape, np.uint8)  # 0 bg/healthy, 1 NCR, 2 ED, 4 ET
        has_tumour = rng.random() < self.tumour_probability
        if has_tumour:
            offset = rng.uniform(-1, 1, nd)
            offset *= rng.uniform(0.05, 0.22) / (np.linalg.norm(offset) + 1e-8)
            t_centre = centre + offset
            r_ed = rng.uniform(0.12, 0.20)
            axes = r_ed * rng.uniform(0.8, 1.2, nd)
            wobble = _smooth_noise(rng, self.shape, sigma=max(self.shape) / 16)
            d = _ellipsoid_distance(grid, t_centre, axes)
            r_core = rng.uniform(0.5, 0.7)
            r_nec = r_core * rng.uniform(0.3, 0.55)
            edema = (d + 0.25 * wobble <= 1) & brain
            core = (d + 0.08 * wobble <= r_core**2) & brain
            necrosis = (d <= r_nec**2) & brain
            labels[edema] = 2
            labels[core] = 4
            labels[necrosis] = 1

        ventricles = np.zeros(self.shape, bool)
        for side in (-1, 1):
            v_centre = centre.copy()
            v_centre[-1] += side * 0.06
            v_r = np.full(nd, 0.05)
            v_r[0] = 0.11
            ventricles |= _ellipsoid_distance(grid, v_centre, v_r) <= 1
        ventricles &= labels == 0

        texture = _smooth_noise(rng, self.shape, sigma=max(self.shape) / 20)
        channels = []
        for c in range(4):
            ch = np.zeros(self.shape, np.float32)
            ch[brain] = _TISSUE["brain"][c] + 0.04 * texture[brain]
            ch[skull] = _TISSUE["skull"][c]
            ch[ventricles] = _TISSUE["csf"][c]
            for value, tissue in ((2, "edema"), (4, "enhancing"), (1, "necrosis")):
                ch[labels == value] = _TISSUE[tissue][c]
            ch = ndimage.gaussian_filter(ch, 0.7)
            ch[head] += self.noise * rng.standard_normal(int(head.sum())).astype(np.float32)
            ch[~head] = 0.0
            vals = ch[head]
            ch[head] = (vals - vals.mean()) / (vals.std() + 1e-8)
            channels.append(ch)
        image = np.stack(channels)
        regions = np.stack([labels > 0, (labels == 1) | (labels == 4), labels == 4]).astype(np.float32)
        label = float(regions[0].any())
        if self.survival:
            brain_voxels = float(brain.sum())
            f_et = float((labels == 4).sum()) / brain_voxels
            f_ed = float((labels == 2).sum()) / brain_voxels
            label = float(np.clip(60 - 300 * f_et - 120 * f_ed + 1.5 * rng.standard_normal(), 2, 60))
        sample = {
            "image": torch.from_numpy(image),
            "label": torch.tensor([label]),
            "mask": torch.from_numpy(regions),
            "labels": torch.from_numpy(labels),
            "case_id": f"{'survival' if self.survival else 'brain'}-phantom-{nd}d-{self.seed}-{index}",
            "spacing": (1.0,) * nd,
        }
        if nd == 3:
            sample["affine"] = torch.eye(4, dtype=torch.float64)
        return sample
