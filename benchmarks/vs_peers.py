"""pellucid against the peer stack on one grid, and against the hardware floor.

One grid (trained phantom models x methods x metrics) runs twice in one process: with pellucid,
and with the stack a user would otherwise assemble: pytorch-grad-cam for the CAMs, Captum for
gradients / occlusion / KernelSHAP, zennit for LRP, Quantus for the metrics. Outputs are checked to
agree, then the script prints per method and metric: seconds, the peer/pellucid speed-up, and
pellucid's ratio to the forward-pass floor (the forwards and backwards the item needs x the model's
measured batched time per input: forward-only on the fastest backend that passes pellucid's
verification, torch / ONNX Runtime / OpenVINO; forward+backward in eager torch); then totals,
peak memory under a bound, and the same grid through pellucid's Ray executor with 1 and 2 workers.

    .venv/bin/python benchmarks/vs_peers.py            # the full grid (about 10 minutes here)
    .venv/bin/python benchmarks/vs_peers.py --quick    # a routine check (under 2 minutes)
    .venv/bin/python benchmarks/vs_peers.py --backend torch   # pellucid's forward-only work in torch
    python benchmarks/vs_peers.py --device cuda --no-ray                    # the GPU table
    python benchmarks/vs_peers.py --device cuda --no-ray --precision bf16   # pellucid under autocast

Models are trained once into --models (default /tmp/pellucid-vs-peers) and reused. On a GPU TF32 is
off (both sides compute in float32); ``--precision bf16|fp16`` runs pellucid's model calls under
autocast (``pellucid.runtime.set_precision``) while the peers stay in float32, so the agreement
column then measures what the reduced precision changes. ``--backend`` (default ``auto``, decided
per model at its first forward-only call, before anything is timed) picks pellucid's forward-only
backend (:mod:`pellucid.inference`).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cam_vs_peers import peers_gradcam, quiet_tqdm
from common import bare_forward_backward, device_name, peak_rss_mb, setup_device, sync, table
from metrics_vs_quantus import per_image_seconds, without_ties

import pellucid
import pellucid.inference.select as select
from pellucid.explainers.accelerate import inference_forward
from pellucid.inference import SETTINGS, use_backend
from pellucid.runtime import configure_threads, set_memory_limit, set_precision
from pellucid.targets import ClassTarget, SegmentationTarget

warnings.filterwarnings("ignore")


def _timed(fn) -> tuple[float, object]:
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return time.perf_counter() - start, result


def measure_pair(ours_fn, peer_fn, warm_ours=None, warm_peer=None) -> tuple[float, object,
                                                                           float, object]:
    """Seconds and results of pellucid's and the peer's call. ``warm_ours`` and ``warm_peer`` (the
    same call on the first case alone) run first, untimed: each side's one-time work for a model
    and input shape (pellucid's incremental forward is traced and its choice made, as for a user
    who explains more than one image) is not charged to the item. Each then runs once; when the
    longer one took under 3 s, both run again in alternation (7 pairs under 0.5 s, else 3) and the
    medians count, so that a drift of this shared machine's speed hits both sides alike.
    pellucid's optimised inference copy is built before any timing (the floor measurement builds
    it)."""
    for warm in (warm_ours, warm_peer):
        if warm is not None:
            warm()
    gc.collect()  # once: a full collection costs ~0.3 s here, more than many items
    t_ours, ours = _timed(ours_fn)
    t_peer, peer = _timed(peer_fn)
    longest = max(t_ours, t_peer)
    if longest < 3.0:
        ours_times, peer_times = [], []
        for _ in range(7 if longest < 0.5 else 3):
            t, ours = _timed(ours_fn)
            ours_times.append(t)
            t, peer = _timed(peer_fn)
            peer_times.append(t)
        t_ours, t_peer = statistics.median(ours_times), statistics.median(peer_times)
    return t_ours, ours, t_peer, peer


@dataclass
class Task:
    name: str
    reader: str
    arch: str
    size: int
    n_train: int
    epochs: int
    cases: int
    methods: dict[str, dict]
    options: dict = field(default_factory=dict)
    metrics: bool = False  # Quantus runs on classification outputs only


def grid(quick: bool) -> list[Task]:
    if quick:
        cls = {"gradcam": {}, "scorecam": {}, "saliency": {}, "integratedgradients": {"steps": 16},
               "occlusion": {"window": 16, "stride": 16}, "kernelshap": {"samples": 40}}
        return [Task("resnet18", "phantom-chest", "resnet18", 64, 192, 2, 2, cls | {"lrp": {}},
                     metrics=True),
                Task("unet-2d", "phantom-brain", "unet", 48, 96, 3, 2,
                     {"gradcam": {}, "saliency": {}, "occlusion": {"window": 16, "stride": 16}},
                     {"task": "segmentation"})]
    # the 2026 CAMs: ShapleyCAM on the peer's ReST target (softmax, as the logit target here);
    # on a segmentation region with the region's own score, as the peer's SemanticSegmentationTarget;
    # KPCA-CAM with scikit-learn's sign (the peer's); Finer-CAM on classification only
    cls = {"gradcam": {}, "gradcampp": {}, "scorecam": {}, "saliency": {},
           "integratedgradients": {"steps": 32}, "occlusion": {"window": 16, "stride": 8},
           "kernelshap": {"samples": 100}, "shapleycam": {}, "finercam": {},
           "kpcacam": {"sign": "largest"}}
    # the peers' other 2026 methods, on the classifier: RefineCAM (pytorch-grad-cam), Recipro-CAM
    # (openvino-xai's PyTorch one), Blur IG / Guided IG / XRAI (PAIR's saliency), CRP (zennit-crp)
    newer = {"refinecam": {}, "reciprocam": {}, "blurig": {"steps": 32, "max_sigma": 16},
             "guidedig": {"steps": 32}, "xrai": {"steps": 16}, "crp": {"concepts": [0, 1, 2, 3]}}
    seg = {"gradcam": {}, "gradcampp": {}, "scorecam": {}, "saliency": {},
           "integratedgradients": {"steps": 32}, "occlusion": {"window": 16, "stride": 8},
           "shapleycam": {"score": "target"}, "kpcacam": {"sign": "largest"}}
    return [Task("resnet18", "phantom-chest", "resnet18", 128, 512, 3, 8,
                 cls | {"lrp": {}} | newer, metrics=True),
            Task("densenet121", "phantom-chest", "densenet121", 96, 256, 2, 4,
                 {k: v for k, v in cls.items() if k != "scorecam"} | {"scorecam": {}}, metrics=True),
            Task("unet-2d", "phantom-brain", "unet", 96, 256, 8, 8, seg, {"task": "segmentation"}),
            Task("unet-3d", "phantom-brain-3d", "unet", 32, 48, 4, 2,
                 {k: v for k, v in seg.items() if k != "scorecam"} |
                 {"gradcam": {"upsample": "bspline"}, "gradcampp": {"upsample": "bspline"},
                  "shapleycam": {"score": "target", "upsample": "bspline"},
                  "kpcacam": {"sign": "largest", "upsample": "bspline"},
                  "occlusion": {"window": 8, "stride": 8}}, {"task": "segmentation"})]
    # 3D CAMs: pytorch-grad-cam up-samples volumes with scipy.ndimage.zoom(order=3), pellucid's
    # "bspline" option; Score-CAM is not run in 3D by the peer (its up-sampling is 2D only)


DEVICE = torch.device("cpu")


def trained(task: Task, root: Path):
    from pellucid.data import open_dataset
    from pellucid.models import TrainConfig, load_model, save_model, train

    folder = root / f"{task.name}-{task.size}"
    if not (folder / "card.json").is_file():
        opts = {"size": task.size, **task.options}
        result = train(open_dataset(task.reader, split="train", n=task.n_train, **opts),
                       TrainConfig(arch=task.arch, epochs=task.epochs, batch_size=16, lr=2e-3,
                                   progress=False, device=str(DEVICE)))
        save_model(folder, result.module.cpu(), result.card)
    return load_model(folder, device=DEVICE), folder


def cases(task: Task, loaded):
    """Test cases with the explained target: a positive finding (its mask is the ground truth) for
    classification, the predicted whole-tumour region for segmentation."""
    from pellucid.data import open_dataset

    ds = open_dataset(task.reader, split="test", n=16 * task.cases, size=task.size, **task.options)
    picked, targets, masks = [], [], []
    for i in range(len(ds)):
        s = ds[i]
        positive = torch.nonzero(s["label"] > 0).flatten()
        if len(positive) and s["mask"][int(positive[0])].any():
            picked.append(s["image"])
            k = int(positive[0]) if loaded.card.task == "classification" else 0
            targets.append(k)
            masks.append(s["mask"][k] > 0)
        if len(picked) == task.cases:
            break
    x = loaded.card.normalize(torch.stack(picked).float())
    return x.to(DEVICE), torch.tensor(targets, device=DEVICE), torch.stack(masks).to(DEVICE)


# ---------------------------------------------------------------- the peer stack

def seg_forward(model, region: torch.Tensor):
    """A scalar per row: the class-0 logits summed over the fixed predicted region (the segmentation
    target a Captum user writes); rows of expanded batches (IG's steps) reuse the region."""
    def forward(x):
        out = model(x)[:, 0]
        reps = x.shape[0] // region.shape[0]
        return (out * region.repeat(reps, *([1] * (region.ndim - 1)))).flatten(1).sum(1)
    return forward


def peer_explain(method: str, opts: dict, loaded, layer, x, y, region, features):
    from captum.attr import IntegratedGradients, KernelShap, Occlusion, Saliency

    model = loaded.module
    seg = loaded.card.task == "segmentation"
    if method in NEW_CAMS:
        return torch.from_numpy(peer_new_cam(method, model, layer, x, y, region, seg)).to(x.device)
    if method in NEWER:
        return peer_newer(method, opts, loaded, x, y)
    if method in ("gradcam", "gradcampp", "scorecam"):
        from pytorch_grad_cam.utils.model_targets import (
            ClassifierOutputTarget,
            SemanticSegmentationTarget,
        )

        targets = [SemanticSegmentationTarget(0, region[i].float().cpu().numpy())
                   for i in range(len(x))] if seg else [ClassifierOutputTarget(int(k)) for k in y]
        return torch.from_numpy(peers_gradcam(method, model, layer, x, targets)).to(x.device)
    fwd, target = (seg_forward(model, region.float()), None) if seg else (model, y)
    if method == "saliency":
        return Saliency(fwd).attribute(x, target=target)
    if method == "integratedgradients":
        return IntegratedGradients(fwd).attribute(x, target=target, n_steps=opts["steps"])
    if method == "occlusion":
        w, s, c = opts["window"], opts["stride"], x.shape[1]
        nd = x.ndim - 2
        return Occlusion(fwd).attribute(x, (c, *(w,) * nd), strides=(c, *(s,) * nd), target=target)
    if method == "kernelshap":
        mask = features[:, None].expand_as(x)
        return torch.cat([KernelShap(fwd).attribute(x[i:i + 1], target=target[i:i + 1],
                                                     feature_mask=mask[i:i + 1],
                                                     n_samples=opts["samples"])
                          for i in range(len(x))])
    if method == "lrp":
        from zennit.attribution import Gradient
        from zennit.composites import EpsilonPlusFlat
        from zennit.torchvision import ResNetCanonizer

        with Gradient(model=model, composite=EpsilonPlusFlat(canonizers=[ResNetCanonizer()])) as a:
            out = model(x).detach()
            return a(x, torch.nn.functional.one_hot(y, out.shape[1]) * out)[1]
    raise ValueError(method)


NEW_CAMS = ("shapleycam", "finercam", "kpcacam")


def peer_new_cam(method: str, model, layer, x, y, region, seg: bool):
    """pytorch-grad-cam 1.5.7's ShapleyCAM (ReST target, or the region's), Finer-CAM (one sample
    at a time: it takes one ``target_idx``) and KPCA-CAM."""
    from pytorch_grad_cam import KPCA_CAM, FinerCAM, ShapleyCAM
    from pytorch_grad_cam.utils.model_targets import (
        ClassifierOutputReST,
        SemanticSegmentationTarget,
    )

    if method == "kpcacam":
        with KPCA_CAM(model=model, target_layers=[layer]) as cam:
            return cam(input_tensor=x, targets=None)
    if method == "finercam":
        with FinerCAM(model=model, target_layers=[layer]) as cam:
            return np.concatenate([cam(input_tensor=x[i:i + 1], target_idx=int(k))
                                   for i, k in enumerate(y)])
    targets = [SemanticSegmentationTarget(0, region[i].float().cpu().numpy()) for i in range(len(x))] \
        if seg else [ClassifierOutputReST(int(k)) for k in y]
    cam = ShapleyCAM(model=model, target_layers=[layer])
    out = cam(input_tensor=x, targets=targets)
    for handle in cam.activations_and_grads.handles:  # its clean-up fails on gradient views
        handle.remove()
    return out


NEWER = ("refinecam", "reciprocam", "blurig", "guidedig", "xrai", "crp")


def _pair_gradients(model, y):
    """PAIR's call_model_function for channels-last numpy batches of sample i's class."""
    import saliency.core as sal

    def call(batch, call_model_args=None, expected_keys=None):
        t = torch.tensor(np.asarray(batch), dtype=torch.float32).movedim(-1, 1).contiguous()
        t.requires_grad_(True)
        (grad,) = torch.autograd.grad(model(t)[:, y].sum(), t)
        return {sal.INPUT_OUTPUT_GRADIENTS: grad.movedim(1, -1).numpy()}
    return call


def peer_newer(method: str, opts: dict, loaded, x, y) -> torch.Tensor:
    """The classifier's peer for each method of ``NEWER``, on the same layer and options."""
    model = loaded.module
    layer = loaded.card.default_layer
    if method == "refinecam":
        from pytorch_grad_cam import RefineCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        from pellucid.explainers.fusion import default_layers

        names = default_layers(model, x[:1])
        cam = RefineCAM(model, [model.get_submodule(n) for n in names])
        return torch.from_numpy(cam(input_tensor=x, targets=[ClassifierOutputTarget(int(k))
                                                             for k in y]))
    if method == "reciprocam":
        import importlib

        import openvino

        openvino.runtime = openvino  # openvino-xai 1.1.0 imports the pre-2025 module names
        sys.modules.setdefault("openvino.runtime", openvino)
        for name in ("opset10", "utils", "utils.data_helpers", "utils.data_helpers.wrappers"):
            sys.modules.setdefault(f"openvino.runtime.{name}",
                                   importlib.import_module(f"openvino.{name}"))
        from openvino_xai.methods.white_box.torch import TorchReciproCAM

        peer = TorchReciproCAM(model, embed_scaling=False, prepare_model=False)
        # the peer finds its layer by substring (layer4 would select layer4.1.bn2): given exactly
        peer._find_feature_module_by_name = lambda m, name: m.get_submodule(name)
        peer._target_layer = layer
        peer.prepare_model()
        maps = torch.from_numpy(peer.generate_saliency_map(x.cpu().numpy()))
        return maps[torch.arange(len(y)), y.cpu()]
    import saliency.core as sal

    if method == "xrai":
        params = sal.XRAIParameters(steps=opts["steps"])
        return torch.from_numpy(np.stack([sal.XRAI().GetMask(
            x[i].movedim(0, -1).numpy(), _pair_gradients(model, int(k)), batch_size=16,
            extra_parameters=params) for i, k in enumerate(y)]))
    if method == "blurig":
        return torch.from_numpy(np.stack([sal.BlurIG().GetMask(
            x[i].movedim(0, -1).numpy(), _pair_gradients(model, int(k)), steps=opts["steps"],
            max_sigma=opts["max_sigma"], batch_size=16) for i, k in enumerate(y)])).movedim(-1, 1)
    if method == "guidedig":
        # the path is a chain of threshold decisions: gradients or float64 sums one rounding apart
        # move the map by 1-3 % (PAIR against itself on (H, W, C) instead of (C, H, W) arrays:
        # 1.7e-2; pellucid's batch of 8 against one sample at a time: 1.2e-2), so its agreement
        # column shows that scale; on equal gradients the two are equal (tests/test_pair_saliency.py)
        original = np.quantile  # saliency 0.2.1 calls numpy 1's quantile(interpolation=)
        np.quantile = lambda a, q, interpolation=None, **kw: original(
            a, q, **kw, **({"method": interpolation} if interpolation else {}))
        try:
            return torch.from_numpy(np.stack([sal.GuidedIG().GetMask(
                x[i].movedim(0, -1).numpy(), _pair_gradients(model, int(k)),
                x_steps=opts["steps"]) for i, k in enumerate(y)])).movedim(-1, 1)
        finally:
            np.quantile = original
    if method == "crp":
        from crp.attribution import CondAttribution

        from pellucid.explainers.lrp import build_composite

        composite = build_composite("epsilonplusflat", model, x, {}, None, None)
        conditions = [{"y": [int(k)], layer: opts["concepts"]} for k in y]
        # no_param_grad=False: by default it switches off the model's parameter gradients for good
        attribution = CondAttribution(model, no_param_grad=False)
        return attribution(x.clone().requires_grad_(True), conditions, composite).heatmap
    raise ValueError(method)


def agreement(method: str, ours, peer) -> str:
    peer = peer.to(ours.attributions.device)
    if method in ("refinecam", "reciprocam", "xrai", "crp"):
        mine = ours.attributions[:, 0] if method in ("refinecam", "xrai", "crp") else ours.raw[:, 0]
        diff = (mine.double() - peer.double()).abs().max() / peer.abs().max().clamp_min(1e-12)
        return f"rel {float(diff):.1e}"
    if method in ("blurig", "guidedig"):
        diff = (ours.raw.double() - peer.double()).abs().max() / peer.abs().max().clamp_min(1e-12)
        return f"rel {float(diff):.1e}"
    if method in ("gradcam", "gradcampp", "scorecam", *NEW_CAMS):
        diff = (ours.attributions[:, 0] - peer).abs().max()
    elif method == "occlusion":
        diff = (ours.attributions[:, 0] - peer[:, 0]).abs().max()
    elif method in ("saliency", "integratedgradients", "lrp"):
        diff = (ours.raw - peer).abs().max() / peer.abs().max().clamp_min(1e-12)
        return f"rel {float(diff):.1e}"
    else:
        return "sampled (not elementwise)"
    return f"{float(diff):.1e}"


# ---------------------------------------------------------------- the grid, both ways

def run_grid(tasks: list[Task], root: Path) -> list[dict]:
    rows = []
    for task in tasks:
        rows += run_task(task, root)
    return rows


def run_task(task: Task, root: Path) -> list[dict]:
    import quantus

    rows = []
    loaded, _ = trained(task, root)
    model = loaded.module.eval()
    x, y, masks = cases(task, loaded)
    seg = loaded.card.task == "segmentation"
    layer_name = loaded.card.default_layer
    layer = model.get_submodule(layer_name)
    with torch.no_grad():
        region = (torch.sigmoid(model(x)[:, 0]) > 0.5) if seg else None
    target = SegmentationTarget(0, "predicted") if seg else ClassTarget(y, kind="logit")
    one = target if seg else ClassTarget(y[:1], kind="logit")  # the first case's, for warm-ups
    fwd, fastest, chosen = forward_floor(model, x)
    fb = per_image_seconds(lambda xb: bare_forward_backward(
        model, xb, torch.zeros(len(xb), dtype=torch.long, device=xb.device)), x, 8)
    features = None
    if "kernelshap" in task.methods:
        from pellucid.explainers.features import slic_labels

        features = torch.stack([slic_labels(x[i], 40, 10.0) for i in range(len(x))]).to(x.device)
    print(f"{task.name}: {tuple(x.shape)}, forward {fwd * 1e3:.2f} ms/input (fastest backend: "
          f"{fastest}, batched), forward+backward {fb * 1e3:.2f} ms/input; pellucid's backend "
          f"{chosen}", flush=True)
    maps = {}
    for method, opts in task.methods.items():
        kw = dict(opts)
        if method == "kernelshap":
            kw["features"] = features
        t_ours, ours, t_peer, peer = measure_pair(
            lambda m=method, k=kw: pellucid.explain(loaded, x, m, target=target, **k),
            lambda m=method, o=opts: peer_explain(m, o, loaded, layer, x, y, region, features),
            lambda m=method, k=kw: pellucid.explain(
                loaded, x[:1], m, target=one,
                **{**k, **({"features": features[:1]} if "features" in k else {})}),
            lambda m=method, o=opts: peer_explain(
                m, o, loaded, layer, x[:1], y[:1], None if region is None else region[:1],
                None if features is None else features[:1]))
        per = fb if ours.cost.backward_passes else fwd
        floor = ours.cost.forward_samples * per
        rows.append({"model": task.name, "item": method, "kind": "method",
                     "pellucid": t_ours, "peer": t_peer, "floor": floor,
                     "agreement": agreement(method, ours, peer.detach()),
                     "work": least_work(method, ours, lambda k=kw: pellucid.explain(
                         loaded, x, "occlusion", target=target, **{**k, "incremental": True})),
                     "ran": ours.extras.get("incremental")})
        maps[method] = ours
    if task.metrics:
        rows += run_metrics(task, loaded, x, y, masks, maps, layer, fwd, fb, quantus)
    return rows


def least_work(method: str, ours, incremental) -> float | None:
    """Occlusion's work (MACs done / MACs of full forwards): the least of what ran and of the
    incremental forward's, also where "auto" kept the full forward (1 where it cannot run)."""
    if method != "occlusion":
        return None
    from pellucid.errors import PellucidError

    try:
        forced = incremental().cost.work_ratio
    except PellucidError:
        forced = None
    return min(w for w in (ours.cost.work_ratio, forced, 1.0) if w is not None)


def exact_bounds(rows: list[dict]) -> list[dict]:
    """Per occlusion row: its speed-up beside an exact method's at the forward floor."""
    out = []
    for r in rows:
        if r["item"] != "occlusion" or not r["floor"] or not r.get("work"):
            continue
        out.append({"model": r["model"], "speed-up": f"{r['peer'] / r['pellucid']:.2f}x",
                    "work": f"{r['work']:.2f}", "peer/floor": f"{r['peer'] / r['floor']:.2f}",
                    "speed-up at the floor": f"{r['peer'] / (r['work'] * r['floor']):.2f}x",
                    "pellucid ran": (r.get("ran") or "")[:60]})
    return out


def forward_floor(model, x) -> tuple[float, str, str]:
    """Seconds per input of the fastest forward-only backend that passes pellucid's verification
    (batches of 16), its name, and the backend pellucid's setting runs (``auto``: decided here,
    before anything is timed)."""
    import warnings

    from pellucid.errors import ConfigError
    from pellucid.explainers.base import model_guard
    from pellucid.inference import BACKENDS, backend_setting, set_backend

    setting = backend_setting()
    times = {}
    for backend in BACKENDS if x.device.type == "cpu" else ("torch",):
        set_backend(backend)
        with warnings.catch_warnings(), model_guard(model):
            warnings.simplefilter("ignore")
            try:
                fast = inference_forward(model, x[:1])
            except ConfigError:  # a backend without the precision asked for (bf16 on ORT)
                continue
            if fast.backend == backend:  # refused by the verification: not a floor of pellucid's
                with torch.inference_mode():
                    times[backend] = per_image_seconds(fast, x, 16)
    set_backend(setting)
    with model_guard(model), torch.inference_mode():
        chosen = inference_forward(model, x[:1]).backend
    fastest = min(times, key=times.get)
    return times[fastest], fastest, chosen


def run_metrics(task, loaded, x, y, masks, maps, layer, fwd, fb, quantus) -> list[dict]:
    """Each metric over every method's maps of the task's cases: pellucid evaluates the maps with
    one shared ``cache`` (work that does not read the map, such as faithfulness correlation's
    perturbed forwards, runs once), the peer calls Quantus once per map."""
    model = loaded.module
    xn, yn, sn = x.cpu().numpy(), y.cpu().numpy(), masks[:, None].float().cpu().numpy()
    dev = str(x.device)
    n, size = len(x), task.size
    step = size * size // 16
    names = list(maps)
    ranked = {m: without_ties(maps[m].attributions) for m in names}
    arrays = {m: ranked[m].cpu().numpy() for m in names}
    rows = []

    def ours(spec, target, **kw):
        def run():
            bound = target
            if "masks" not in kw:  # a forward metric: bind the target once (an Explanation has it)
                with torch.no_grad():
                    bound = target.bind(model(x))
            cache: dict = {}
            return [pellucid.evaluate(model, x, ranked[m], target=bound, metrics=[spec],
                                      cache=cache, **kw) for m in names]
        return run

    def each(peer_fn):
        """One Quantus call per map."""
        return lambda: [peer_fn(arrays[m]) for m in names]

    def add(name, ours_fn, peer_fn, floor, values, label=f"{len(names)} maps"):
        """``ours_fn()`` (evaluate() results) and ``peer_fn()`` (Quantus scores) give lists of the
        same length, compared pairwise."""
        t_ours, ours_out, t_peer, peer_out = measure_pair(ours_fn, peer_fn)
        diff = max(float(np.nanmax(np.abs(values(o) - np.asarray(p, dtype=float))))
                   for o, p in zip(ours_out, peer_out, strict=True))
        rows.append({"model": task.name, "item": f"{name} [{label}]", "kind": "metric",
                     "pellucid": t_ours, "peer": t_peer, "floor": floor,
                     "agreement": f"{diff:.1e}"})

    logit = ClassTarget(y, kind="logit")
    add("pointing game", ours("pointing_game", logit, masks=masks),
        each(lambda an: quantus.PointingGame(disable_warnings=True)(
            model=model, x_batch=xn, y_batch=yn, a_batch=an, s_batch=sn, device=dev)),
        0.0, lambda r: r["pointing_game"].scores.cpu().numpy())
    add("relevance mass", ours("relevance_mass", logit, masks=masks),
        each(lambda an: quantus.RelevanceMassAccuracy(disable_warnings=True)(
            model=model, x_batch=xn, y_batch=yn, a_batch=an, s_batch=sn, device=dev)),
        0.0, lambda r: r["relevance_mass"].scores.cpu().numpy())
    add("pixel flipping 16 steps",
        ours(("pixel_flipping", {"features_in_step": step}),
             ClassTarget(y, kind="probability", activation="softmax")),
        each(lambda an: quantus.PixelFlipping(features_in_step=step, disable_warnings=True)(
            model=model, x_batch=xn, y_batch=yn, a_batch=an, device=dev, softmax=True)),
        n * (1 + 17 * len(names)) * fwd, lambda r: r["pixel_flipping"].curves.cpu().numpy())

    def quantus_fc(an):
        np.random.seed(42)
        return quantus.FaithfulnessCorrelation(disable_warnings=True, return_aggregate=False)(
            model=model, x_batch=xn, y_batch=yn, a_batch=an, device=dev)

    # the 100 random subsets (seeded) are the same for every map: pellucid runs them once
    add("faithfulness correlation", ours("faithfulness_correlation", logit), each(quantus_fc),
        n * 102 * fwd, lambda r: r["faithfulness_correlation"].scores.cpu().numpy())
    cam = maps["gradcam"]

    def peer_cam(model, inputs, targets, **_):
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        return peers_gradcam("gradcam", model, layer, torch.as_tensor(inputs),
                             [ClassifierOutputTarget(int(k)) for k in targets])[:, None]

    def quantus_ms():
        np.random.seed(42)
        return quantus.MaxSensitivity(nr_samples=5, disable_warnings=True, return_aggregate=False)(
            model=model, x_batch=xn, y_batch=yn, a_batch=cam.attributions.cpu().numpy(),
            device=dev, explain_func=peer_cam)

    add("max-sensitivity 5 samples",
        lambda: [pellucid.evaluate(model, x, cam, metrics=[("max_sensitivity", {"nr_samples": 5})])],
        lambda: [quantus_ms()], n * 5 * fb, lambda r: r["max_sensitivity"].scores.cpu().numpy(),
        "gradcam")
    return rows


def memory_check(tasks: list[Task], root: Path, bound_mb: float, quick: bool) -> list[dict]:
    """Peak memory growth of the heaviest batched items, with and without the bound, each in a
    fresh process (the allocator of a used process keeps freed pages, hiding the growth)."""
    import json
    import subprocess

    out = []
    for task in tasks:
        heavy = [m for m in ("scorecam", "occlusion") if m in task.methods]
        if task.name == "unet-3d":
            heavy = ["occlusion"]
        for method in heavy[:1]:
            for bound in (None, bound_mb):
                args = [sys.executable, __file__, "--probe", task.name, method, str(bound or 0),
                        "--models", str(root), "--device", str(DEVICE)] + \
                    (["--quick"] if quick else [])
                res = subprocess.run(args, capture_output=True, text=True, timeout=600)
                probe = json.loads(res.stdout.strip().splitlines()[-1])
                out.append({"model": task.name, "method": method,
                            "bound MiB": "none" if bound is None else f"{bound:.0f}",
                            "peak growth MiB": f"{probe['peak_mb']:.0f}",
                            "seconds": f"{probe['seconds']:.2f}"})
    return out


def probe(task: Task, root: Path, method: str, bound_mb: float) -> None:
    """One explanation in this (fresh) process; prints its peak memory growth as JSON."""
    import json

    loaded, _ = trained(task, root)
    x, y, _ = cases(task, loaded)
    target = SegmentationTarget(0, "predicted") if loaded.card.task == "segmentation" else \
        ClassTarget(y, kind="logit")
    set_memory_limit(bound_mb or None)
    inference_forward(loaded.module, x[:1])
    peak, exp = peak_rss_mb(lambda: pellucid.explain(loaded, x, method, target=target,
                                                     **task.methods[method]), DEVICE)
    print(json.dumps({"peak_mb": peak, "seconds": exp.cost.seconds}))


def ray_scaling(tasks: list[Task], root: Path, workdir: Path) -> list[dict]:
    """pellucid's side of the grid through the Ray executor with 1 and 2 workers."""
    from pellucid.bench import run_bench
    from pellucid.bench.config import parse_config

    datasets, models, methods = {}, {}, {}
    for task in tasks:
        _, folder = trained(task, root)
        datasets[task.name] = {"reader": task.reader, "split": "test", "cases": task.cases,
                               "options": {"size": task.size, **task.options}}
        models[task.name] = {"datasets": [task.name], "path": str(folder),
                             "targets": [0] if task.arch == "unet" else "positive"}
        for method, opts in task.methods.items():
            if method == "kernelshap":
                opts = {**opts, "n_features": 40}
            methods.setdefault((method, str(sorted(opts.items()))), (method, opts, []))[2].append(
                task.name)
    config = parse_config({
        "name": "vs-peers-ray", "batch_size": max(t.cases for t in tasks), "cache": False,
        "datasets": datasets, "models": models,
        "methods": [{"name": m, "label": f"{m}-{i}", "options": o, "only_models": ms}
                    for i, (m, o, ms) in enumerate(methods.values())],
        "metrics": ["pointing_game", "relevance_mass", {"name": "deletion", "options": {"steps": 16}}]})
    out = []
    for workers in (1, 2):
        start = time.perf_counter()
        run_bench(config, workdir / f"ray{workers}", executor="ray", workers=workers,
                  progress=False, report=False)
        out.append({"workers": workers, "seconds": time.perf_counter() - start})
    out[1]["speed-up"] = f"{out[0]['seconds'] / out[1]['seconds']:.2f}x"
    for r in out:
        r["seconds"] = f"{r['seconds']:.1f}"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small grid (under 2 minutes)")
    parser.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "pellucid-vs-peers")
    parser.add_argument("--memory-mb", type=float, default=64.0,
                        help="the memory bound of batched forwards in the memory check")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray scaling runs")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                        help="pellucid's model calls under autocast (the peers stay in float32)")
    parser.add_argument("--backend", default="auto", choices=list(SETTINGS),
                        help="pellucid's forward-only backend (auto decides per model before "
                             "timing)")
    parser.add_argument("--methods", help="comma-separated: time only these methods of the grid "
                                          "(no metrics, memory or Ray runs), e.g. shapleycam,kpcacam")
    parser.add_argument("--probe", nargs=3, metavar=("MODEL", "METHOD", "BOUND_MB"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    only = [m.strip() for m in args.methods.split(",")] if args.methods else None
    global DEVICE
    DEVICE = setup_device(args.device)
    if args.probe:
        configure_threads()
        task = next(t for t in grid(args.quick) if t.name == args.probe[0])
        probe(task, args.models, args.probe[1], float(args.probe[2]))
        return
    start = time.perf_counter()
    configure_threads()
    quiet_tqdm()
    torch.manual_seed(0)
    tasks = grid(args.quick)
    if only:
        tasks = [dataclasses.replace(t, methods={m: o for m, o in t.methods.items() if m in only},
                                     metrics=False) for t in tasks]
        tasks = [t for t in tasks if t.methods]
        args.no_ray = args.no_memory = True
    for task in tasks:  # train (or load) every model before anything is timed
        trained(task, args.models)
    set_precision(args.precision)
    use_backend(args.backend)  # also for the probe and Ray processes
    select.TRIAL_AFTER_S = 0.0  # auto decides at the first forward-only call, before the timing
    rows = run_grid(tasks, args.models)
    set_precision(None)
    printable = []
    for r in rows:
        printable.append({"model": r["model"], "item": r["item"],
                          "pellucid s": f"{r['pellucid']:.3f}", "peer s": f"{r['peer']:.3f}",
                          "speed-up": f"{r['peer'] / r['pellucid']:.2f}x",
                          "pellucid/floor": f"{r['pellucid'] / r['floor']:.2f}" if r["floor"] else "n/a",
                          "agreement": r["agreement"]})
    print(table(printable, ["model", "item", "pellucid s", "peer s", "speed-up", "pellucid/floor",
                            "agreement"]))
    totals = []
    for kind in ("method", "metric", None):
        part = [r for r in rows if kind is None or r["kind"] == kind]
        if not part:
            continue
        ours = sum(r["pellucid"] for r in part)
        peer = sum(r["peer"] for r in part)
        floored = [r for r in part if r["floor"]]
        floor_ratio = sum(r["pellucid"] for r in floored) / sum(r["floor"] for r in floored)
        slower = [f"{r['model']}/{r['item']}" for r in part if r["pellucid"] > r["peer"]]
        totals.append({"part": kind + "s" if kind else "whole grid", "pellucid s": f"{ours:.1f}",
                       "peer s": f"{peer:.1f}", "speed-up": f"{peer / ours:.2f}x",
                       "pellucid/floor": f"{floor_ratio:.2f}",
                       "slower than peer": ", ".join(slower) or "none"})
    print()
    print(table(totals, ["part", "pellucid s", "peer s", "speed-up", "pellucid/floor",
                         "slower than peer"]))
    bounds = exact_bounds(rows)
    if bounds:
        print("\nOcclusion beside what exact values allow: 'work' is the least share of the full"
              "\nforwards' MACs the occluded copies need (the incremental forward's, which recomputes"
              "\nonly what a window can reach); at the forward floor's speed per MAC they take"
              "\nwork x floor, so an exact method running at the floor gains peer / (work x floor)")
        print(table(bounds, ["model", "speed-up", "work", "peer/floor", "speed-up at the floor",
                             "pellucid ran"]))
    if not args.no_memory:
        print()
        print(table(memory_check(tasks, args.models, args.memory_mb, args.quick),
                    ["model", "method", "bound MiB", "peak growth MiB", "seconds"]))
    if not args.no_ray:
        with tempfile.TemporaryDirectory() as work:
            print()
            print(table(ray_scaling(tasks, args.models, Path(work)), ["workers", "seconds",
                                                                      "speed-up"]))
    print(f"\npellucid {pellucid.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {device_name(DEVICE)}, pellucid precision "
          f"{args.precision}, backend {args.backend}; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
