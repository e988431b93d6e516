"""Every metric runs on segmentation targets (the region's logit sum) and on 3D volumes (MSFI,
which needs per-modality maps, not a CAM, is tested in test_modality_targets.py)."""

from __future__ import annotations

import torch

import pellucid
from pellucid.metrics import available
from pellucid.models import build
from pellucid.targets import SegmentationTarget

LIGHT = {
    "deletion": {"step": 64}, "insertion": {"step": 64}, "pixel_flipping": {"features_in_step": 64},
    "faithfulness_correlation": {"nr_runs": 6, "subset_size": 32},
    "infidelity": {"n_perturb_samples": 4}, "road": {"fractions": (0.2, 0.6)},
    "road_morf": {"fractions": (0.2, 0.6)}, "road_lerf": {"fractions": (0.2, 0.6)},
    "max_sensitivity": {"nr_samples": 2}, "local_lipschitz": {"nr_samples": 2},
    "model_randomization": {"progress": False, "depth": 1},
    "smooth_mprt": {"samples": 3, "progress": False},  # 50 noisy maps per layer: 36 s of 111 here
}


def _run_all(model, x, explanation, masks, skip=()):
    names = [m["name"] for m in available() if m["name"] not in skip]
    specs = [(n, LIGHT.get(n, {})) for n in names]
    results = pellucid.evaluate(model, x, explanation, metrics=specs, masks=masks)
    for name, r in results.items():
        assert r.scores.shape == (x.shape[0],), name
        assert torch.isfinite(r.scores).any() or name in ("iou", "dice"), (name, r.scores)
    return results


def test_all_metrics_on_a_2d_segmentation_target(brain_unet):
    from pellucid.data import BrainPhantom

    ds = BrainPhantom(6, 64, seed=5)
    cases = [ds[i] for i in range(6)][:3]
    x = torch.stack([c["image"] for c in cases])
    masks = torch.stack([c["mask"][0] for c in cases])  # whole tumour
    target = SegmentationTarget(0, "predicted")
    e = pellucid.explain(brain_unet, x, "gradcam", target=target)
    boxes = [torch.tensor([[10.0, 10.0, 40.0, 40.0]])] * 3
    r = _run_all(brain_unet, x, e, masks, skip=("box_accuracy", "msfi"))
    assert r["road"].extras["morf"].shape == (3, 2)
    b = pellucid.evaluate(brain_unet, x, e, metrics=["box_accuracy"], boxes=boxes)
    assert b["box_accuracy"].scores.shape == (3,)


def test_all_metrics_on_3d_volumes():
    torch.manual_seed(0)
    model = build("unet", 3, 2, 2, unet_channels=(4, 8, 16)).module.eval()
    x = torch.randn(2, 2, 16, 16, 16)
    masks = torch.zeros(2, 16, 16, 16, dtype=torch.bool)
    masks[:, 4:10, 4:10, 4:10] = True
    e = pellucid.explain(model, x, "gradcam", target=SegmentationTarget(1, "all"))
    r = _run_all(model, x, e, masks, skip=("box_accuracy", "msfi"))
    assert torch.isnan(r["model_randomization"].extras["table"]["model"]["hog"]).all()  # 2D only
    cls = build("resnet18", 3, 1, 3).module.eval()
    xc = torch.randn(2, 1, 16, 16, 16)
    _run_all(cls, xc, pellucid.explain(cls, xc, "gradcam"), masks, skip=("box_accuracy", "msfi"))
