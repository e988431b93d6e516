"""Trivial baselines: maps that know nothing of the model. An explanation method earns trust only
where it scores better than these; the benchmark runs them by default and the report says, per
metric, which methods do not beat the best of them.

- ``random``: a uniform random map, U(0, 1) per pixel (seeded): chance on every metric.
- ``centre``: a centred Gaussian prior, exp(-sum_d (x_d - c_d)^2 / (2 (sigma * n_d)^2)), n_d the
  size of axis d and c_d its centre: what a pointing game rewards when lesions sit mid-image
  (the "centre bias" of saliency benchmarks, Judd et al. 2012).
- ``edges``: the gradient magnitude of the input, sqrt(sum_c sum_d (d x_c / d x_d)^2) by central
  differences: structure of the image alone (Adebayo et al. 2018 show edge detectors pass for
  saliency maps to the eye).
- ``prior``: the mean ground-truth map of the sample's class over the training data, given as
  ``prior`` (the benchmark computes it from every case of the dataset's training split with ground
  truth of that class): where lesions of that class usually are, knowing nothing of the image. A
  class without training ground truth has no prior (NaN) and is refused in one line.

Each runs the model once (the clean forward that binds the target, as every method does), so that
its rows carry the same target and output as a real method's.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from pellucid.errors import ConfigError
from pellucid.explainers.attribution import InputAttribution
from pellucid.explainers.registry import register


class _Baseline(InputAttribution):
    family: ClassVar[str] = "baseline"
    channel_maps: ClassVar[bool] = False
    black_box: ClassVar[bool] = True

    def attribute(self, runner, model, inputs, bound, output):
        return self.baseline_map(inputs).to(inputs.dtype), {}

    @abstractmethod
    def baseline_map(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, 1, *spatial) from the inputs alone (each baseline defines it)."""


@register
@dataclass
class RandomBaseline(_Baseline):
    """Uniform random map U(0, 1), seeded: the chance level of every metric."""

    seed: int = 0
    name: ClassVar[str] = "random"

    def baseline_map(self, inputs: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator().manual_seed(int(self.seed))
        shape = (inputs.shape[0], 1, *inputs.shape[2:])
        return torch.rand(shape, generator=generator, dtype=torch.float64).to(inputs.device)


@register
@dataclass
class CentreBaseline(_Baseline):
    """Centred Gaussian prior, sigma a fraction of each axis: the centre bias of a dataset."""

    sigma: float = 0.25
    name: ClassVar[str] = "centre"

    def baseline_map(self, inputs: torch.Tensor) -> torch.Tensor:
        if not self.sigma > 0:
            raise ConfigError(f"centre: sigma must be > 0 (a fraction of the image size), got "
                              f"{self.sigma!r}")
        spatial = inputs.shape[2:]
        exponent = torch.zeros(spatial, dtype=torch.float64)
        for axis, n in enumerate(spatial):
            coords = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
            shape = [1] * len(spatial)
            shape[axis] = n
            exponent = exponent + (coords.view(shape) / (self.sigma * n)) ** 2 / 2
        prior = torch.exp(-exponent)
        return prior.expand(inputs.shape[0], 1, *spatial).to(inputs.device).clone()


@register
@dataclass
class EdgesBaseline(_Baseline):
    """Gradient magnitude of the input (central differences, summed over channels)."""

    name: ClassVar[str] = "edges"

    def baseline_map(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs.double()
        squared = torch.zeros_like(x)
        for dim in range(2, x.ndim):
            if x.shape[dim] > 1:
                squared = squared + torch.gradient(x, dim=dim)[0] ** 2
        return squared.sum(1, keepdim=True).sqrt()


@register
@dataclass
class PriorBaseline(_Baseline):
    """The mean ground-truth map of the sample's class over the training data (given as prior)."""

    prior: torch.Tensor | None = None
    name: ClassVar[str] = "prior"
    requires: ClassVar[frozenset[str]] = frozenset({"prior"})

    def baseline_map(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.prior is None:
            raise ConfigError("prior: no ground truth to average (the benchmark takes it from the "
                              "dataset's training split, which has no masks or boxes, or is the "
                              "benchmark's own cases)")
        prior = torch.as_tensor(self.prior).double()
        spatial = inputs.shape[2:]
        missing = torch.isnan(prior.reshape(prior.shape[0], -1)).all(1) if prior.ndim > len(spatial) \
            else torch.isnan(prior).all().reshape(1)
        if missing.any():
            raise ConfigError(f"prior: no ground truth of the class of sample(s) "
                              f"{torch.nonzero(missing).flatten().tolist()} in the training data, "
                              f"so no prior map for it (its rows stay empty)")
        if prior.ndim == len(spatial):
            prior = prior.expand(inputs.shape[0], *prior.shape)
        if prior.ndim == len(spatial) + 1:
            prior = prior[:, None]
        if prior.shape[0] != inputs.shape[0] or prior.ndim != inputs.ndim:
            raise ConfigError(f"prior: give one map per sample, (B, *spatial); got "
                              f"{tuple(self.prior.shape)} for inputs {tuple(inputs.shape)}")
        if tuple(prior.shape[2:]) != tuple(spatial):
            mode = "bilinear" if len(spatial) == 2 else "trilinear"
            prior = F.interpolate(prior, size=tuple(spatial), mode=mode, align_corners=False)
        return prior.to(inputs.device)
