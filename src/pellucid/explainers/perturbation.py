"""Perturbation attributions: the model is only run forward, on many perturbed copies of the input,
``batch_size`` at a time, through an optimised inference copy of the model.

==============  ==========================================================================  ===============
method          attribution                                                                 source
==============  ==========================================================================  ===============
occlusion       mean over the windows covering a pixel of y(x) - y(x with window = baseline)  Zeiler 2014
rise            sum_i y(x * M_i) M_i / (N p), M_i up-sampled random binary grids, shifted    Petsiuk 2018
lime            ridge coefficients of y(z) on superpixel indicators z, kernel                Ribeiro 2016
                sqrt(exp(-d(z, 1)^2 / w^2)), d = cosine distance
kernelshap      weighted least squares with the Shapley kernel (M-1) / (C(M,|z|) |z| (M-|z|)) Lundberg 2017
                under sum(phi) = y(x) - y(baseline); all coalitions when they fit the budget
shapley         exact Shapley values by enumerating all 2^M coalitions (M <= 12)             Shapley 1953
==============  ==========================================================================  ===============

Features for lime/kernelshap/shapley are superpixels (SLIC; supervoxels in 3D), a grid, or label
maps given by the user; a feature that is "off" takes the baseline value (zero, the image mean, a
blurred copy, or a number). The map paints each feature's value on its pixels.
"""

from __future__ import annotations

import math
import warnings
from abc import abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from pellucid.errors import ConfigError
from pellucid.explainers.accelerate import AutoBatch
from pellucid.explainers.attribution import InputAttribution, gaussian_blur
from pellucid.explainers.features import feature_labels
from pellucid.explainers.occlusion_plan import IncrementalPlan
from pellucid.explainers.registry import register

MAX_EXACT_FEATURES = 12


def fill_baseline(inputs: torch.Tensor, kind: str | float, sigma: float = 5.0) -> torch.Tensor:
    """Values that "off" pixels take: zeros, per-channel image mean, a blurred copy, or a number."""
    if isinstance(kind, (int, float)):
        return torch.full_like(inputs, float(kind))
    if kind == "zeros":
        return torch.zeros_like(inputs)
    if kind == "mean":
        dims = tuple(range(2, inputs.ndim))
        return inputs.mean(dims, keepdim=True).expand_as(inputs).clone()
    if kind == "blur":
        return gaussian_blur(inputs, sigma)
    raise ConfigError(f"baseline must be 'zeros', 'mean', 'blur' or a number, got {kind!r}")


def evaluate_coalitions(runner, bound, x: torch.Tensor, base: torch.Tensor, labels: torch.Tensor,
                        z: torch.Tensor, row: int, batch_size: int | None) -> torch.Tensor:
    """Target scores of sample ``row`` with features on where ``z`` (n, M) is 1."""
    scores = []
    for start, stop in AutoBatch(batch_size, runner.model, x).chunks(len(z)):
        keep = z[start:stop].to(x.dtype)[:, labels][:, None]  # (n, 1, *spatial)
        perturbed = x * keep + base * (1 - keep)
        out = runner.fast_forward(perturbed)
        rows = torch.full((stop - start,), row, device=x.device, dtype=torch.long)
        scores.append(bound.score(out, rows).float())
    return torch.cat(scores)


@dataclass
class FeatureAttribution(InputAttribution):
    """Base of superpixel methods (not registered)."""

    features: str | torch.Tensor = "slic"
    n_features: int = 50
    compactness: float = 0.1
    baseline: str | float = "zeros"
    batch_size: int | None = None
    seed: int = 0
    family: ClassVar[str] = "perturbation"
    black_box: ClassVar[bool] = True

    @abstractmethod
    def feature_values(self, runner, bound, x, base, labels, m, row, batch):
        """(M,) values of the ``m`` features of one sample."""

    def attribute(self, runner, model, inputs, bound, output):
        base = fill_baseline(inputs, self.baseline)
        labels = feature_labels(inputs, self.features, self.n_features, self.compactness)
        batch = self.batch_size
        maps = torch.zeros(inputs.shape[0], 1, *inputs.shape[2:], device=inputs.device)
        values = []
        for i, lab in enumerate(labels):
            m = int(lab.max()) + 1
            phi = self.feature_values(runner, bound, inputs[i:i + 1], base[i:i + 1], lab, m, i,
                                      batch)
            maps[i, 0] = phi.to(maps)[lab]
            values.append(phi)
        return maps, {"feature_values": values, "features": labels}


def all_coalitions(m: int, device) -> torch.Tensor:
    """(2^m, m) binary matrix; row k holds the bits of k."""
    k = torch.arange(2**m, device=device)
    return ((k[:, None] >> torch.arange(m, device=device)) & 1).float()


@register
@dataclass
class ExactShapley(FeatureAttribution):
    """Exact Shapley values of up to 12 features by enumerating every coalition (Shapley 1953)."""

    n_features: int = 8
    name: ClassVar[str] = "shapley"

    def feature_values(self, runner, bound, x, base, labels, m, row, batch):
        if m > MAX_EXACT_FEATURES:
            raise ConfigError(f"exact Shapley values need at most {MAX_EXACT_FEATURES} features "
                              f"(2^M model calls); this sample has {m}: lower n_features or use "
                              f"kernelshap")
        z = all_coalitions(m, x.device)
        v = evaluate_coalitions(runner, bound, x, base, labels, z, row, batch).double()
        size = z.sum(1).long()
        fact = torch.tensor([math.factorial(s) for s in range(m + 1)], dtype=torch.float64,
                            device=x.device)
        phi = torch.zeros(m, dtype=torch.float64, device=x.device)
        idx = torch.arange(2**m, device=x.device)
        for i in range(m):
            without = idx[(idx >> i) & 1 == 0]
            s = size[without]
            weight = fact[s] * fact[m - s - 1] / fact[m]
            phi[i] = (weight * (v[without | (1 << i)] - v[without])).sum()
        return phi.float()


def shapley_kernel(m: int, sizes: torch.Tensor) -> torch.Tensor:
    """pi(z) = (M - 1) / (C(M, |z|) |z| (M - |z|)) for 0 < |z| < M."""
    comb = torch.tensor([math.comb(m, int(s)) for s in sizes.tolist()], dtype=torch.float64,
                        device=sizes.device)
    s = sizes.double()
    return (m - 1) / (comb * s * (m - s))


@register
@dataclass
class KernelSHAP(FeatureAttribution):
    """KernelSHAP over superpixels: Shapley-kernel weighted least squares with the efficiency
    constraint; enumerates all coalitions when 2^M - 2 <= samples (then equal to exact Shapley)."""

    samples: int = 200
    name: ClassVar[str] = "kernelshap"

    def feature_values(self, runner, bound, x, base, labels, m, row, batch):
        ends = evaluate_coalitions(runner, bound, x, base, labels,
                                   torch.stack([torch.zeros(m), torch.ones(m)]).to(x.device), row,
                                   batch).double()
        v0, v1 = ends[0], ends[1]
        if m == 1:
            return (v1 - v0).float().reshape(1)
        if 2**m - 2 <= self.samples:
            z = all_coalitions(m, x.device)[1:-1]
            weights = shapley_kernel(m, z.sum(1))
        else:
            z = self._sample(m, x.device)
            weights = torch.ones(len(z), dtype=torch.float64, device=x.device)
        v = evaluate_coalitions(runner, bound, x, base, labels, z, row, batch).double()
        z = z.double()
        # eliminate the last feature with the constraint sum(phi) = v1 - v0
        y = v - v0 - z[:, -1] * (v1 - v0)
        a = z[:, :-1] - z[:, -1:]
        aw = a * weights[:, None]
        # a small (M-1) x (M-1) system, solved on the CPU: its rank-revealing driver (gelsy) is
        # not offered on a GPU, whose 'gels' assumes full rank
        gram = (aw.T @ a).cpu()
        rank = int(torch.linalg.matrix_rank(gram))
        if rank < m - 1:
            warnings.warn(f"kernelshap: {len(z)} samples determine only {rank} of the {m - 1} free "
                          f"Shapley values of {m} features (complementary pairs count once); the "
                          f"minimum-norm solution is returned. Use samples >= {2 * m} or fewer "
                          f"features", stacklevel=2)
        phi = torch.linalg.lstsq(gram, (aw.T @ y).cpu()).solution.to(y.device)
        return torch.cat([phi, (v1 - v0 - phi.sum()).reshape(1)]).float()

    def _sample(self, m: int, device) -> torch.Tensor:
        """Coalitions with sizes drawn from the Shapley kernel's size distribution, in complementary
        pairs (so their weights are equal and need no correction)."""
        gen = torch.Generator().manual_seed(self.seed)
        sizes = torch.arange(1, m)
        p = (m - 1) / (sizes * (m - sizes)).double()
        p = p / p.sum()
        half = max(1, self.samples // 2)
        drawn = sizes[torch.multinomial(p, half, replacement=True, generator=gen)]
        z = torch.zeros(half, m)
        for k, s in enumerate(drawn.tolist()):
            z[k, torch.randperm(m, generator=gen)[:s]] = 1
        return torch.cat([z, 1 - z]).to(device)


@register
@dataclass
class LIME(FeatureAttribution):
    """LIME over superpixels: a weighted ridge surrogate of the target score on feature indicators
    (Ribeiro et al. 2016); kernel sqrt(exp(-d^2 / width^2)) on the cosine distance to the image."""

    samples: int = 200
    kernel_width: float = 0.25
    alpha: float = 1.0
    name: ClassVar[str] = "lime"

    def feature_values(self, runner, bound, x, base, labels, m, row, batch):
        gen = torch.Generator().manual_seed(self.seed + row)
        z = (torch.rand(self.samples, m, generator=gen) < 0.5).float()
        z[0] = 1.0
        z = z.to(x.device)
        v = evaluate_coalitions(runner, bound, x, base, labels, z, row, batch).double()
        zd = z.double()
        distance = 1 - zd.sum(1) / (zd.norm(dim=1) * math.sqrt(m)).clamp_min(1e-12)
        w = torch.sqrt(torch.exp(-(distance**2) / self.kernel_width**2))
        design = torch.cat([zd, torch.ones(len(zd), 1, dtype=zd.dtype, device=zd.device)], 1)
        penalty = torch.eye(m + 1, dtype=zd.dtype, device=zd.device) * self.alpha
        penalty[-1, -1] = 0.0  # no penalty on the intercept
        dw = design * w[:, None]
        coef = torch.linalg.solve(dw.T @ design + penalty, dw.T @ v)
        return coef[:m].float()


@register
@dataclass
class Occlusion(InputAttribution):
    """Occlusion: the drop of the target score when a sliding window is set to a baseline value,
    averaged over the windows covering each pixel (Zeiler & Fergus 2014).

    ``incremental`` ("auto", True, False): evaluate the occluded copies by recomputing, layer by
    layer, only the part of each activation the window can reach (:mod:`pellucid.inference.
    incremental`, Krypton, Nakandala et al. 2019): exact, checked on every call against the model's
    clean output and the full forward (:mod:`pellucid.explainers.occlusion_plan`). "auto" keeps it
    where it saves time, True wherever the checks pass (else a one-line refusal);
    ``extras["incremental"]`` says what ran and why."""

    window: int | tuple[int, ...] = 16
    stride: int | tuple[int, ...] = 8
    baseline: str | float = 0.0
    batch_size: int | None = None
    incremental: bool | str = "auto"
    family: ClassVar[str] = "perturbation"
    black_box: ClassVar[bool] = True
    name: ClassVar[str] = "occlusion"

    def attribute(self, runner, model, inputs, bound, output):
        if self.incremental not in (True, False, "auto"):
            raise ConfigError(f"incremental must be 'auto', true or false, got {self.incremental!r}")
        spatial = tuple(inputs.shape[2:])
        nd = len(spatial)
        window = (self.window,) * nd if isinstance(self.window, int) else tuple(self.window)
        stride = (self.stride,) * nd if isinstance(self.stride, int) else tuple(self.stride)
        if len(window) != nd or len(stride) != nd or min(window) < 1 or min(stride) < 1:
            raise ConfigError(f"window and stride need {nd} positive sizes, got {window}, {stride}")
        if any(w > s for w, s in zip(window, spatial, strict=True)):
            raise ConfigError(f"window {window} is larger than the image {spatial}")
        starts = [range(0, s - w + 1, st) for s, w, st in zip(spatial, window, stride, strict=True)]
        corners = torch.cartesian_prod(*[torch.tensor(list(r)) for r in starts]).reshape(-1, nd)
        base = fill_baseline(inputs, self.baseline)
        clean = bound.score(output).float()
        b = inputs.shape[0]
        total = torch.zeros(b, 1, *spatial, device=inputs.device)
        count = torch.zeros(1, 1, *spatial, device=inputs.device)
        windows = []
        for corner in corners.tolist():
            mask = torch.zeros(spatial, device=inputs.device)
            mask[tuple(slice(c, c + w) for c, w in zip(corner, window, strict=True))] = 1
            windows.append(mask)
        masks = torch.stack(windows)  # (W, *spatial)
        count += masks.sum(0)
        plan = IncrementalPlan(self.incremental, runner, model, inputs, output, self.batch_size,
                               len(masks), window)
        try:
            left = [i for i in range(b)
                    if not plan.run(i, corners.to(inputs.device), window, base, masks, bound, clean,
                                    total)]
        finally:
            plan.close()
        pairs = torch.cartesian_prod(torch.tensor(left, dtype=torch.long),
                                     torch.arange(len(masks))).reshape(-1, 2)
        for start, stop in AutoBatch(self.batch_size, model, inputs).chunks(len(pairs)):
            chunk = pairs[start:stop]
            rows, wins = chunk[:, 0].to(inputs.device), chunk[:, 1].to(inputs.device)
            m = masks[wins][:, None]
            out = runner.fast_forward(inputs[rows] * (1 - m) + base[rows] * m)
            drop = clean[rows] - bound.score(out, rows).float()
            total.index_add_(0, rows, drop.view(-1, 1, *([1] * nd)) * m)
        attr = torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))
        return attr, {"windows": len(masks), "incremental": plan.note}


@register
@dataclass
class RISE(InputAttribution):
    """RISE: the target score of the input under random smooth masks, averaged with the masks as
    weights, sum_i y(x * M_i) M_i / (N p) (Petsiuk et al. 2018)."""

    masks: int = 2000
    cells: int = 7
    keep: float = 0.5
    seed: int = 0
    batch_size: int | None = None
    family: ClassVar[str] = "perturbation"
    black_box: ClassVar[bool] = True
    name: ClassVar[str] = "rise"

    def random_masks(self, spatial: tuple[int, ...], device) -> torch.Tensor:
        """(N, *spatial) masks: Bernoulli(keep) grids of ``cells`` per axis, up-sampled (bi- or
        tri-linear) to (cells + 1) x cell size and cropped at a random shift."""
        gen = torch.Generator().manual_seed(self.seed)
        nd = len(spatial)
        cell = [math.ceil(s / self.cells) for s in spatial]
        grid = (torch.rand(self.masks, 1, *([self.cells] * nd), generator=gen) < self.keep).float()
        up = [(self.cells + 1) * c for c in cell]
        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[nd]
        big = F.interpolate(grid, size=up, mode=mode, align_corners=False)
        shifts = torch.stack([torch.randint(0, c, (self.masks,), generator=gen) for c in cell], 1)
        out = torch.empty(self.masks, *spatial)
        for i in range(self.masks):
            sl = tuple(slice(int(s), int(s) + n) for s, n in zip(shifts[i], spatial, strict=True))
            out[i] = big[i, 0][sl]
        return out.to(device)

    def attribute(self, runner, model, inputs, bound, output):
        if not 0 < self.keep < 1 or self.masks < 1 or self.cells < 1:
            raise ConfigError("rise needs masks >= 1, cells >= 1 and 0 < keep < 1")
        spatial = tuple(inputs.shape[2:])
        masks = self.random_masks(spatial, inputs.device)
        b = inputs.shape[0]
        sal = torch.zeros(b, *spatial, device=inputs.device)
        batcher = AutoBatch(self.batch_size, model, inputs)
        for i in range(b):
            for start, stop in batcher.chunks(len(masks)):
                m = masks[start:stop]
                out = runner.fast_forward(inputs[i:i + 1] * m[:, None])
                rows = torch.full((len(m),), i, device=inputs.device, dtype=torch.long)
                scores = bound.score(out, rows).float()
                sal[i] += torch.tensordot(scores, m, dims=1)
        sal = sal / (len(masks) * self.keep)
        return sal[:, None], {}

