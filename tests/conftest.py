"""Shared fixtures. Under CI (CI=true) missing shared data fails a test instead of skipping it."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import gc
import os
import shutil
import sys
import tempfile
from pathlib import Path

# Under pytest-xdist every worker may use every core, with OpenMP's idle threads sleeping instead
# of spinning (OMP_WAIT_POLICY=PASSIVE, read once when torch loads its OpenMP runtime, so before
# `import torch`): then a worker that waits (on a subprocess, a browser, a lock) leaves the cores to
# the other. Measured, two processes training at once on 2 cores: 2 threads each spinning 34 s,
# 1 thread each 18 s, 2 threads each passive 17 s. The CLI subprocesses a test starts inherit both.
if os.environ.get("PYTEST_XDIST_WORKER") and "PELLUCID_THREADS" not in os.environ:
    if "torch" in sys.modules:  # too late for the wait policy: each worker takes its share
        from pellucid.runtime import usable_cores

        _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        os.environ["PELLUCID_THREADS"] = str(max(1, usable_cores() // _workers))
    else:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

from pellucid.runtime import configure_threads

configure_threads()
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# Forward-only work runs in torch unless a test asks for a backend (tests/test_backends.py runs each
# backend and auto's trial against torch); `PELLUCID_BACKEND=auto make test` runs the suite on auto.
# Exports go to a private cache folder of this session, never the user's.
os.environ.setdefault("PELLUCID_BACKEND", "torch")
if "PELLUCID_CACHE" not in os.environ:
    os.environ["PELLUCID_CACHE"] = tempfile.mkdtemp(prefix="pellucid-test-cache-")
    atexit.register(shutil.rmtree, os.environ["PELLUCID_CACHE"], True)
if "PELLUCID_KEY_FILE" not in os.environ:  # the tests sign with a key of their own
    _keys = tempfile.mkdtemp(prefix="pellucid-test-key-")
    os.environ["PELLUCID_KEY_FILE"] = os.path.join(_keys, "key")
    atexit.register(shutil.rmtree, _keys, True)


# Models trained by the fixtures below are trained once per run and shared by every xdist worker:
# the controller makes the folder before the workers start (they inherit the variable), a lock
# makes one worker train while the others wait, and only the process that made it removes it.
if "PELLUCID_TEST_MODELS" not in os.environ:
    os.environ["PELLUCID_TEST_MODELS"] = tempfile.mkdtemp(prefix="pellucid-test-models-")
    atexit.register(shutil.rmtree, os.environ["PELLUCID_TEST_MODELS"], True)


def shared_model(name: str, train_and_save) -> Path:
    """The folder of the test model ``name``: ``train_and_save(folder)`` writes it the first time
    any worker of this run asks; later calls (in any worker) reuse it."""
    from filelock import FileLock

    root = Path(os.environ["PELLUCID_TEST_MODELS"])
    folder = root / name
    with FileLock(str(root / f"{name}.lock")):
        if not (folder / ".complete").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            train_and_save(folder)
            (folder / ".complete").touch()
    return folder


def _shared_data() -> Path:
    env = os.environ.get("PELLUCID_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = _shared_data()
    if not path.is_dir():
        message = f"shared sample data not found at {path} (set PELLUCID_DATA)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def chest_model():
    """A ResNet-18 trained on chest phantoms (saved as a zoo folder), with its test report."""
    from pellucid.data import open_dataset
    from pellucid.models import TrainConfig, load_model, save_model, train

    def make(folder: Path) -> None:
        opts = {"size": 128}
        # 480 images x 3 epochs: test macro AUROC 0.98, every class >= 0.93 (measured; the
        # training test asks 0.95 and 0.9), in 36 s on 2 quiet cores (640 x 4: about 60 s)
        result = train(open_dataset("phantom-chest", split="train", n=480, **opts),
                       TrainConfig(arch="resnet18", epochs=3, batch_size=32, progress=False, seed=0),
                       open_dataset("phantom-chest", split="val", n=128, **opts),
                       open_dataset("phantom-chest", split="test", n=160, **opts))
        save_model(folder, result.module, result.card)
    return load_model(shared_model("chest", make))


@pytest.fixture(scope="session")
def brain_unet():
    """A 2D U-Net trained on brain phantoms (WT/TC/ET), saved as a zoo folder."""
    from pellucid.data import open_dataset
    from pellucid.models import TrainConfig, load_model, save_model, train

    def make(folder: Path) -> None:
        opts = {"size": 64, "task": "segmentation"}
        result = train(open_dataset("phantom-brain", split="train", n=384, **opts),
                       TrainConfig(arch="unet", epochs=16, batch_size=16, lr=3e-3, progress=False),
                       open_dataset("phantom-brain", split="val", n=64, **opts),
                       open_dataset("phantom-brain", split="test", n=96, **opts))
        save_model(folder, result.module, result.card)
    return load_model(shared_model("unet", make))


@pytest.fixture(autouse=True, scope="module")
def _release_memory():
    """After each module: collect, and hand freed heap pages back to the system (glibc keeps them
    otherwise). A small share: measured 0.7 of 7.5 GB on the bench tests; what had grown a worker
    to 15 GB was one frozen torch copy per model load, now reused (inference/torch_copy.py)."""
    yield
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to hand back
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@pytest.fixture()
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(0)


# Fixtures that train a model, run a benchmark or start a service: a test using one is "slow" and
# left out of `make check` (every test still runs under `make test`).
HEAVY_FIXTURES = {"chest_model", "brain_unet", "tiny_model", "unet3d", "review_run", "run_folder",
                  "server", "service", "orthanc", "postgres_server", "db_url", "throwaway"}
# modules whose tests train or run benchmarks inline
HEAVY_MODULES = {"test_training", "test_bench", "test_seed_systems", "test_metrics_vs_peers",
                 "test_sliding_window", "test_service_hardening", "test_pacs", "test_evidence",
                 "test_frames", "test_viewer", "test_vit_phantoms", "test_nnunet", "test_monai_bundle"}


# modules whose tests build networks of the model libraries of the "models" extra (timm,
# transformers, smp, torchxrayvision, nnU-Net, ONNX Runtime, OpenVINO, lxt); `make test-lowest`
# leaves them out
MODEL_LIBRARY_MODULES = {"test_model_libraries", "test_blackbox", "test_backends", "test_nnunet",
                         "test_monai_bundle"}
# tests against an oracle that `make install` adds outside the extras (MetaQuantus, zennit-crp,
# openvino-xai: their pins conflict with the stack, so they come without their dependencies)
ORACLE_TESTS = {"test_consistency_equals_metaquantus"}
ORACLE_MODULES = {"test_crp", "test_reciprocam"}


# the longest modules (minutes each on one thread), started first: `make test` runs `pytest -n auto
# --dist loadfile --no-loadscope-reorder` (a module runs whole on one worker, in this order; xdist's
# default reorder by test count started the one-test ViT module last and left a worker idle). The
# first ones train the shared models (chest_model, brain_unet) while the others need neither.
LONGEST_FIRST = ["test_bench", "test_hostile_inputs", "test_seed_systems", "test_cam_vs_gradcam",
                 "test_tutorial", "test_review", "test_pacs", "test_nnunet", "test_monai_bundle",
                 "test_model_libraries", "test_viewer",
                 "test_service_hardening", "test_baselines", "test_node", "test_vit_phantoms",
                 "test_explain_api",
                 "test_cli", "test_own_data", "test_gradients", "test_perturbation"]


def _module_rank(item) -> int:
    module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
    return LONGEST_FIRST.index(module) if module in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_module_rank)  # stable: a module's own order is kept
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        if HEAVY_FIXTURES & set(item.fixturenames) or module in HEAVY_MODULES:
            item.add_marker(pytest.mark.slow)
        if module in MODEL_LIBRARY_MODULES:
            item.add_marker(pytest.mark.models)
        if item.originalname in ORACLE_TESTS or module in ORACLE_MODULES:
            item.add_marker(pytest.mark.oracles)
