"""Saving and loading models: a zoo folder, a TorchScript file, or ``module:factory`` + weights.

A zoo folder holds ``model.safetensors`` and ``card.json``. Loading never downloads anything.
"""

from __future__ import annotations

import importlib
import json
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pellucid.errors import ModelError
from pellucid.models.card import CARD, ModelCard
from pellucid.models.outputs import output_selector, select_output
from pellucid.models.training_inputs import ATTRIBUTE, TrainingInputs
from pellucid.models.zoo import build

WEIGHTS = "model.safetensors"
TORCHSCRIPT = "model.pt"  # an imported TorchScript network


@dataclass
class LoadedModel:
    """A model ready to explain: the module in eval mode and its card (``None`` if it has none)."""

    module: nn.Module
    card: ModelCard | None
    source: str
    weights_file: Path | None = None  # the file the weights were read from, as stored
    weights_file_sha256: str = ""  # its SHA-256 at load time (what ``sha256sum`` prints)
    # a framework's own reading of a case and way back to the file's voxels (nnU-Net), or None
    framework: Any = None

    def stored(self) -> tuple[str, str]:
        """The weights file's name and SHA-256 as stored (empty when the weights came from no
        file, e.g. a factory without ``--weights``)."""
        if self.weights_file is None:
            return "", ""
        return self.weights_file.name, self.weights_file_sha256

    def digest(self) -> str:
        """SHA-256 of the weights (every parameter and buffer, by name, shape, dtype and bytes):
        what identifies this model in outputs, whatever its folder is called."""
        return weights_digest(self.module)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks (equal to ``sha256sum path``)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _stored(loaded: LoadedModel, file: Path | None) -> LoadedModel:
    """``loaded`` with the weights file it came from and that file's SHA-256: what an auditor
    checks with ``sha256sum`` (the state-dict digest of :meth:`LoadedModel.digest` identifies the
    weights whatever file holds them, but no tool outside pellucid reproduces it)."""
    if file is not None and file.is_file():
        loaded.weights_file, loaded.weights_file_sha256 = file, file_sha256(file)
    return loaded


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of the module's state dict (a black box's own digest: its ONNX file's)."""
    import hashlib

    if isinstance(getattr(module, "weights_sha256", None), str):
        return module.weights_sha256

    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_model(folder: str | Path, module: nn.Module, card: ModelCard) -> Path:
    """Write ``model.safetensors`` and ``card.json`` into ``folder`` (created if needed), and the
    description of the training inputs when the module carries one
    (:mod:`pellucid.models.training_inputs`). A tensor
    that several names share (nnU-Net's networks register their modules twice) is written once,
    and the other names are recorded as aliases in the file's metadata."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state, aliases, seen = {}, {}, {}
    for name, tensor in module.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tuple(tensor.stride()), tensor.dtype, tensor.device)
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        state[name] = tensor.detach().cpu().contiguous()
    metadata = {"arch": card.arch, "task": card.task}
    if aliases:
        metadata["aliases"] = json.dumps(aliases)
    save_file(state, str(folder / WEIGHTS), metadata=metadata)
    stats = getattr(module, ATTRIBUTE, None)
    if stats is not None and card.training_inputs.get("file"):
        card.training_inputs["sha256"] = stats.save(folder / card.training_inputs["file"])
    card.save(folder / CARD)
    return folder


def factory_module(text: str) -> nn.Module:
    """Call ``package.module:factory`` (no arguments); it must return an ``nn.Module``."""
    import inspect
    import sys

    mod_name, _, factory_name = text.partition(":")
    if not mod_name or not factory_name or not all(
            part.isidentifier() for part in [*mod_name.split("."), *factory_name.split(".")]):
        raise ModelError(f"{text!r}: a factory is package.module:function (Python names)")
    if mod_name.split(".")[0] in sys.stdlib_module_names or mod_name == "builtins":
        raise ModelError(f"{text}: a factory builds a network; {mod_name} is Python's standard "
                         f"library, not a model library")
    try:
        factory = importlib.import_module(mod_name)
        for part in factory_name.split("."):
            factory = getattr(factory, part)
    except (ImportError, AttributeError) as exc:
        raise ModelError(f"{text}: cannot import the factory ({exc})") from None
    except Exception as exc:  # the module's own import failed
        raise ModelError(f"{text}: importing {mod_name} failed ({type(exc).__name__}: "
                         f"{str(exc)[:160]})") from None
    if not (inspect.isfunction(factory) or inspect.isclass(factory)) or inspect.isbuiltin(factory):
        raise ModelError(f"{text}: not a function or class that builds a network")
    try:
        module = factory()
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise ModelError(f"{text}: the factory failed when called without arguments "
                         f"({type(exc).__name__}: {first})") from None
    if not isinstance(module, nn.Module):
        raise ModelError(f"{text}: factory returned {type(module).__name__}, not an nn.Module")
    return module


# a TorchXRayVision network's calibration (``op_threshs``): its forward returns op_norm(sigmoid(z)),
# probabilities rescaled so that each class's operating point is 0.5. An imported model keeps the
# logits z and moves the operating points to the card's thresholds (the same decisions)
CALIBRATION = "op_threshs moved to thresholds"


def load_torchscript(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """``torch.jit.load`` without torch's deprecation warning for TorchScript (a message to those
    who write TorchScript, not to a user loading a model shipped as one)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*deprecated.*")
        return torch.jit.load(str(path), map_location=map_location)


def load_folder_network(folder: Path, card: ModelCard) -> nn.Module:
    """The network of an imported folder: TorchScript (``model.pt``), or the card's factory with
    the folder's weights."""
    if card.arch == "torchscript":
        return load_torchscript(folder / TORCHSCRIPT)
    module = factory_module(card.factory)
    if card.training.get("calibration") == CALIBRATION and hasattr(module, "op_threshs"):
        module.op_threshs = None  # its operating points are the card's thresholds
    _load_state(module, _read_state_dict(folder / WEIGHTS), folder / WEIGHTS)
    return module


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            from safetensors.torch import load_file

            state = load_file(str(path))
            with safe_open(str(path), "pt") as fh:
                aliases = json.loads((fh.metadata() or {}).get("aliases", "{}"))
            for name, source in aliases.items():
                if source not in state:
                    raise ModelError(f"{path}: alias {name} names a missing tensor {source}")
                state[name] = state[source]
            return state
        # a torch state dict: PyTorch's restricted loader, which builds tensors and plain
        # containers only and refuses any other object (it runs no code from the file)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ModelError(f"{path}: refused: the file holds Python objects other than tensors; save "
                         f"a state dict of tensors (torch.save(model.state_dict())) or safetensors") \
            from None
    except Exception as exc:
        raise ModelError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def _load_state(module: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelError(f"{source}: weights do not fit the network ({first})") from None


def _attach_training_inputs(module: nn.Module, card: ModelCard, folder: Path) -> None:
    """Restore the description of the training inputs that the card names, checked against the
    SHA-256 the card recorded (a changed or missing file is an error, never a silent skip)."""
    import hashlib

    name = card.training_inputs.get("file")
    if not name:
        return
    file = folder / name
    if not file.is_file():
        raise ModelError(f"{file}: the model card names this description of the training inputs, "
                         f"and it is missing")
    expected = card.training_inputs.get("sha256")
    if expected and hashlib.sha256(file.read_bytes()).hexdigest() != expected:
        raise ModelError(f"{file}: differs from the SHA-256 the model card recorded")
    setattr(module, ATTRIBUTE, TrainingInputs.load(file))


def load_model(spec: str | Path, weights: str | Path | None = None,
               device: str | torch.device = "cpu") -> LoadedModel:
    """Load a model from a zoo folder, an nnU-Net v2 results folder or one ``fold_<k>`` of it (run
    as nnU-Net runs it, :mod:`pellucid.models.nnunet`), a MONAI bundle folder (run as its own
    configuration runs it, :mod:`pellucid.models.bundle`), a TorchScript file, an ONNX file (a
    forward-only black box run by ONNX Runtime, :mod:`pellucid.models.blackbox`), or
    ``package.module:factory``.

    ``module:factory`` is called with no arguments and must return an ``nn.Module``; ``weights``
    (safetensors or a torch state dict) are then loaded into it. A ``card.json`` beside a TorchScript
    file or given folder is used when present.
    """
    text = str(spec)
    path = Path(text)
    if path.is_dir() and not (path / CARD).is_file():
        from pellucid.models.frameworks import framework_kind, load_framework

        if framework_kind(path) is not None:  # nnU-Net results, a MONAI bundle: as they run
            module, card, adapter, checkpoint = load_framework(path)
            loaded = _stored(LoadedModel(module, card, text), checkpoint)
            loaded.framework = adapter
            return loaded
    if path.is_dir():
        card = ModelCard.load(path / CARD)
        from pellucid.models.frameworks import KINDS, load_imported

        if card.arch in KINDS:  # imported from nnU-Net or a bundle: its copy, checked
            module, card, adapter, checkpoint = load_imported(path, card)
            loaded = _stored(LoadedModel(module, card, text), checkpoint)
            loaded.framework = adapter
            return loaded
        if card.factory or card.arch == "torchscript":  # an imported model (pellucid import-model)
            module = select_output(load_folder_network(path, card), output_selector(card.output))
            _attach_training_inputs(module, card, path)
            return _stored(LoadedModel(module.to(device).eval(), card, text),
                           path / (TORCHSCRIPT if card.arch == "torchscript" else WEIGHTS))
        module = build(card.arch, card.spatial_dims, card.in_channels, card.num_outputs,
                       backend=card.backend, input_size=card.input_size).module
        _load_state(module, _read_state_dict(path / WEIGHTS), path / WEIGHTS)
        _attach_training_inputs(module, card, path)
        return _stored(LoadedModel(module.to(device).eval(), card, text), path / WEIGHTS)
    if path.is_file() and path.suffix.lower() == ".onnx":  # a deployed model: forwards only
        from pellucid.models.blackbox import load_onnx

        card_path = path.with_name(CARD)
        card = ModelCard.load(card_path) if card_path.is_file() else None
        return _stored(LoadedModel(load_onnx(path, output=output_selector(card.output) if card
                                             and card.output else 0), card, text), path)
    if path.is_file():
        try:
            module = load_torchscript(path, device)
        except Exception as exc:
            raise ModelError(f"{path}: not a TorchScript file ({type(exc).__name__}); pass a zoo "
                             f"folder or 'module:factory' with --weights") from None
        card_path = path.with_name(CARD)
        card = ModelCard.load(card_path) if card_path.is_file() else None
        return _stored(LoadedModel(module.eval(), card, text), path)
    if ":" in text and not path.exists():
        module = factory_module(text)
        card = None
        if weights is not None:
            wpath = Path(weights)
            _load_state(module, _read_state_dict(wpath), wpath)
            card_path = wpath.with_name(CARD)
            card = ModelCard.load(card_path) if card_path.is_file() else None
        if card is not None and card.output:
            select_output(module, output_selector(card.output))
        return _stored(LoadedModel(module.to(device).eval(), card, text),
                       Path(weights) if weights is not None else None)
    raise ModelError(f"{text}: no such model folder or file (expected a zoo folder with card.json, "
                     f"a TorchScript file, or 'module:factory')")
