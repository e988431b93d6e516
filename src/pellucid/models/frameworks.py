"""Models that read their own input: nnU-Net v2 results folders (:mod:`pellucid.models.nnunet`) and
MONAI bundles (:mod:`pellucid.models.bundle`), found in a folder, and imported into a pellucid model
folder.

``pellucid import-model <results folder | fold_k | bundle> --out FOLDER`` copies what the framework
runs (nnU-Net: ``plans.json``, ``dataset.json`` and each chosen fold's checkpoint; a bundle: its
folder less its ``eval`` outputs) into ``FOLDER/nnunet`` or ``FOLDER/bundle`` and writes the card the
framework gives (``card.json``), with the SHA-256 of every weights file. The card is the user's to
complete (name, version, intended use, finding codes); what the framework decides (the class names,
channels, activation) is checked against the copy each time the folder is loaded, and a changed
weights file is refused.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from pellucid.errors import ConfigError, ModelError
from pellucid.models.card import CARD

KINDS = {"nnunet": "nnunet", "monai_bundle": "bundle"}  # card.arch -> its copy's folder name


def framework_kind(path: Path) -> str | None:
    """``nnunet`` for a results folder or one of its ``fold_<k>``, ``monai_bundle`` for a bundle."""
    from pellucid.models.bundle import is_bundle
    from pellucid.models.nnunet import is_results_folder

    if is_results_folder(path) or (path.name.startswith("fold_") and is_results_folder(path.parent)):
        return "nnunet"
    if is_bundle(path):
        return "monai_bundle"
    return None


def load_framework(path: Path) -> tuple[nn.Module, Any, Any, Path | None]:
    """(module, card, adapter, weights file) of a results folder, a fold or a bundle."""
    kind = framework_kind(path)
    if kind == "nnunet":
        from pellucid.models.nnunet import load_results

        return load_results(path)
    if kind == "monai_bundle":
        from pellucid.models.bundle import load_bundle

        return load_bundle(path)
    raise ConfigError(f"{path}: neither an nnU-Net v2 results folder nor a MONAI bundle")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _weight_files(copy: Path) -> list[Path]:
    return sorted(p for p in copy.rglob("*") if p.is_file() and p.suffix in (".pth", ".pt", ".ts",
                                                                             ".safetensors"))


def _copy_framework(source: Path, copy: Path, kind: str) -> None:
    """What the framework runs: nnU-Net's plans, dataset, fingerprint and each chosen fold's final
    checkpoint; a bundle's folder less its ``eval`` outputs."""
    if kind != "nnunet":
        shutil.copytree(source, copy, ignore=shutil.ignore_patterns("eval", "__pycache__"))
        return
    from pellucid.models.nnunet import CHECKPOINT

    folds = [source] if source.name.startswith("fold_") else sorted(source.glob("fold_*"))
    root = source.parent if source.name.startswith("fold_") else source
    copy.mkdir()
    for file in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
        if (root / file).is_file():
            shutil.copyfile(root / file, copy / file)
    for fold in folds:
        if (fold / CHECKPOINT).is_file():
            (copy / fold.name).mkdir()
            shutil.copyfile(fold / CHECKPOINT, copy / fold.name / CHECKPOINT)


def import_framework(source: Path, out: Path, name: str = "", version: str = "") -> Path:
    """Copy a results folder, fold or bundle into ``out`` and write its card; returns ``out``."""
    kind = framework_kind(source)
    if kind is None:
        raise ConfigError(f"{source}: neither an nnU-Net v2 results folder nor a MONAI bundle")
    copy = out / KINDS[kind]
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out}: not empty; import into a new folder")
    out.mkdir(parents=True, exist_ok=True)
    try:
        _copy_framework(source, copy, kind)
        _, card, _, _ = load_framework(copy)
    except BaseException:
        shutil.rmtree(copy, ignore_errors=True)  # nothing half-imported is left behind
        raise
    card.name = name or card.name
    card.version = version or card.version
    card.training["imported_from"] = str(source.resolve())
    card.training["weights_sha256"] = {str(p.relative_to(copy)): _sha256(p) for p in _weight_files(copy)}
    card.save(out / CARD)
    return out


def load_imported(folder: Path, card) -> tuple[nn.Module, Any, Any, Path | None]:
    """The framework copy of an imported folder, checked against its card: the weights' SHA-256
    and what the framework decides (classes, channels, activation, task)."""
    copy = folder / KINDS[card.arch]
    if not copy.is_dir():
        raise ModelError(f"{copy}: the card names a {card.arch} model and its copy is missing")
    for rel, expected in card.training.get("weights_sha256", {}).items():
        file = copy / rel
        if not file.is_file():
            raise ModelError(f"{file}: the card names this weights file and it is missing")
        if _sha256(file) != expected:
            raise ModelError(f"{file}: differs from the SHA-256 the model card recorded")
    module, derived, adapter, weights = load_framework(copy)
    for field in ("task", "class_names", "in_channels", "activation", "spatial_dims"):
        if getattr(card, field) != getattr(derived, field):
            raise ModelError(f"{folder / 'card.json'}: {field} {getattr(card, field)!r} differs from "
                             f"the {card.arch} model's own {getattr(derived, field)!r}")
    return module, card, adapter, weights
