"""Reduced precision (``pellucid.runtime.set_precision``): off by default, float32 attributions,
maps close to float32 ones, LRP kept in float32, bad names refused. Checked with bfloat16 autocast
on the CPU; the GPU effect is measured by benchmarks/vs_peers.py --precision."""

from __future__ import annotations

import pytest
import torch

import pellucid
from pellucid.errors import ConfigError
from pellucid.models import build
from pellucid.runtime import autocast_dtype, set_precision


@pytest.fixture()
def model_and_inputs():
    torch.manual_seed(0)
    return build("resnet18", 2, 1, 3).module.eval(), torch.randn(2, 1, 64, 64)


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


@pytest.mark.parametrize("method, options", [
    ("gradcam", {"layer": "layer3"}), ("scorecam", {"layer": "layer4"}),
    ("integratedgradients", {"steps": 16}), ("occlusion", {}),
    ("kernelshap", {"samples": 40, "n_features": 12}),
])
def test_bf16_maps_are_float32_and_close_to_full_precision(model_and_inputs, method, options):
    model, x = model_and_inputs
    assert autocast_dtype() is None  # off unless asked for
    full = pellucid.explain(model, x, method, target=0, **options)
    set_precision("bf16")
    try:
        mixed = pellucid.explain(model, x, method, target=0, **options)
    finally:
        set_precision(None)
    assert mixed.attributions.dtype == torch.float32
    assert not torch.equal(mixed.attributions, full.attributions)  # autocast really ran
    assert _corr(mixed.attributions, full.attributions) > 0.98


def test_lrp_stays_in_full_precision(model_and_inputs):
    """zennit's rules re-run layers in the backward pass, outside autocast: LRP ignores it."""
    model, x = model_and_inputs
    full = pellucid.explain(model, x, "lrp", target=0)
    set_precision("bf16")
    try:
        mixed = pellucid.explain(model, x, "lrp", target=0)
    finally:
        set_precision(None)
    assert torch.equal(mixed.attributions, full.attributions)


def test_metric_forwards_follow_the_precision(model_and_inputs):
    model, x = model_and_inputs
    exp = pellucid.explain(model, x, "gradcam", target=0, layer="layer3")
    full = pellucid.evaluate(model, x, exp, target=0, metrics=["deletion"])["deletion"].scores
    set_precision("bf16")
    try:
        mixed = pellucid.evaluate(model, x, exp, target=0, metrics=["deletion"])["deletion"].scores
    finally:
        set_precision(None)
    assert mixed.dtype == full.dtype
    assert not torch.equal(mixed, full)
    assert torch.allclose(mixed, full, atol=0.02)


def test_unknown_precision_is_refused(monkeypatch):
    with pytest.raises(ConfigError, match="precision must be one of fp32, bf16, fp16"):
        set_precision("int8")
    monkeypatch.setenv("PELLUCID_PRECISION", "half")
    with pytest.raises(ConfigError, match="PELLUCID_PRECISION"):
        autocast_dtype()
    monkeypatch.setenv("PELLUCID_PRECISION", "bf16")
    assert autocast_dtype() is torch.bfloat16


def test_cli_precision_option_runs_and_refuses_bad_names(chest_model, tmp_path, monkeypatch):
    """``pellucid explain --precision bf16`` explains under autocast (and tells Ray workers through
    the environment); a bad name is one line naming the option's values."""
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    from pellucid.data import ChestPhantom

    image = tmp_path / "phantom.png"
    Image.fromarray((ChestPhantom(1, 64, seed=3)[0]["image"][0].numpy() * 255).astype(np.uint8)
                    ).save(image)
    monkeypatch.delenv("PELLUCID_PRECISION", raising=False)
    args = [sys.executable, "-m", "pellucid.cli", "explain", "--model", chest_model.source,
            "--method", "gradcam", "--input", str(image)]
    ok = subprocess.run([*args, "--out", str(tmp_path / "bf16"), "--precision", "bf16"],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "bf16" / "phantom_gradcam.npy").is_file()
    bad = subprocess.run([*args, "--out", str(tmp_path / "bad"), "--precision", "half"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0
    assert "precision must be one of fp32, bf16, fp16" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_benchmark_units_of_another_precision_never_mix(monkeypatch):
    """A run folder resumed under bf16 does not pick up float32 results: the unit keys differ
    (float32 keys are as before), and the run's environment records the precision."""
    from pellucid.bench.config import parse_config
    from pellucid.bench.runner import environment, unit_key

    config = parse_config({"name": "p", "datasets": {"d": {"reader": "phantom-chest", "cases": 2}},
                           "models": {"m": {"datasets": ["d"], "path": "zoo/m"}},
                           "methods": ["gradcam"], "metrics": ["pointing_game"]})
    monkeypatch.delenv("PELLUCID_PRECISION", raising=False)
    fp32 = unit_key("m", "d", 0, "gradcam", "abc", 0)
    assert fp32 == "m|d|0000|gradcam|abc|0" and environment(config)["precision"] == "fp32"
    monkeypatch.setenv("PELLUCID_PRECISION", "bf16")
    assert unit_key("m", "d", 0, "gradcam", "abc", 0) == fp32 + "|bf16"
    assert environment(config)["precision"] == "bf16"
