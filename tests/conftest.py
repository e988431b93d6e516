"""Shared fixtures. Under CI (CI=true) missing shared data fails a test instead of skipping it."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

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
def chest_model(tmp_path_factory):
    """A ResNet-18 trained on chest phantoms (saved as a zoo folder), with its test report."""
    from pellucid.data import open_dataset
    from pellucid.models import TrainConfig, load_model, save_model, train

    opts = {"size": 128}
    result = train(open_dataset("phantom-chest", split="train", n=640, **opts),
                   TrainConfig(arch="resnet18", epochs=4, batch_size=32, progress=False, seed=0),
                   open_dataset("phantom-chest", split="val", n=128, **opts),
                   open_dataset("phantom-chest", split="test", n=160, **opts))
    folder = save_model(tmp_path_factory.mktemp("models") / "chest", result.module, result.card)
    return load_model(folder)


@pytest.fixture(scope="session")
def brain_unet(tmp_path_factory):
    """A 2D U-Net trained on brain phantoms (WT/TC/ET), saved as a zoo folder."""
    from pellucid.data import open_dataset
    from pellucid.models import TrainConfig, load_model, save_model, train

    opts = {"size": 64, "task": "segmentation"}
    result = train(open_dataset("phantom-brain", split="train", n=384, **opts),
                   TrainConfig(arch="unet", epochs=25, batch_size=16, lr=3e-3, progress=False),
                   open_dataset("phantom-brain", split="val", n=64, **opts),
                   open_dataset("phantom-brain", split="test", n=96, **opts))
    folder = save_model(tmp_path_factory.mktemp("models") / "unet", result.module, result.card)
    return load_model(folder)


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
                 "test_frames", "test_viewer", "test_vit_phantoms"}


# modules whose tests build networks of the model libraries of the "models" extra (timm,
# transformers, smp, torchxrayvision, nnU-Net, ONNX Runtime, OpenVINO, lxt); `make test-lowest`
# leaves them out
MODEL_LIBRARY_MODULES = {"test_model_libraries", "test_blackbox", "test_backends"}
# tests against an oracle that `make install` adds outside the extras (MetaQuantus)
ORACLE_TESTS = {"test_consistency_equals_metaquantus"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        if HEAVY_FIXTURES & set(item.fixturenames) or module in HEAVY_MODULES:
            item.add_marker(pytest.mark.slow)
        if module in MODEL_LIBRARY_MODULES:
            item.add_marker(pytest.mark.models)
        if item.originalname in ORACLE_TESTS:
            item.add_marker(pytest.mark.oracles)
