"""Export a model to ONNX once per weights, input shape and output, kept on disk.

The file's name is a digest of everything the exported graph depends on: the weights (SHA-256 of
the state dict, :func:`pellucid.models.store.weights_digest`), the module's class and ``repr`` (its
configuration), the input shape after the batch axis and its dtype, the output selector, and the
torch / ONNX opset versions. Changed weights give a new name, so a stale export is never loaded;
every loaded export is still verified against the model before use (:mod:`pellucid.inference.
select`). Each export is tagged when written (``<key>.onnx.tag``: an HMAC of its SHA-256 under
this installation's key, :mod:`pellucid.signing`); a file under an export's name without a valid
tag (planted, copied from elsewhere, damaged, unreadable) is never loaded: it is replaced by a
fresh export with one warning line. The batch axis is dynamic. Writes are atomic (a temporary
file renamed), so concurrent workers may export the same model; the oldest files go when the
folder passes ``$PELLUCID_CACHE_MB``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from pellucid.inference.settings import cache_dir, cache_limit_bytes
from pellucid.models.outputs import reduce_output, selected_output
from pellucid.models.store import weights_digest

OPSET = 17


class _Exportable(nn.Module):
    """The model with its output reduced to the one tensor pellucid explains."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.select = selected_output(model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return (out if isinstance(out, torch.Tensor) else reduce_output(out, self.select)).float()


def export_key(model: nn.Module, example: torch.Tensor) -> str:
    """Digest naming the export of ``model`` for inputs shaped like ``example``."""
    select = selected_output(model)
    parts = {"weights": weights_digest(model), "class": f"{type(model).__module__}."
             f"{type(model).__qualname__}", "repr": repr(model), "shape": list(example.shape[1:]),
             "dtype": str(example.dtype), "output": select if isinstance(select, (str, int)) else
             repr(select), "torch": torch.__version__, "opset": OPSET}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def export_path(key: str) -> Path:
    folder = cache_dir() / "exports"
    folder.mkdir(exist_ok=True, mode=0o700)
    return folder / f"{key}.onnx"


class PlantedExport(RuntimeWarning):
    """A file under an export's name that this installation did not write; it is replaced."""


def _tag_path(path: Path) -> Path:
    return path.with_name(path.name + ".tag")


def _tagged(path: Path, key: str) -> bool:
    """Whether ``path`` is the export this installation wrote for ``key`` (its tag verifies)."""
    from pellucid.signing import valid

    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        given = _tag_path(path).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return False
    return valid("onnx-export", f"{key}:{digest}".encode(), given)


def export_onnx(model: nn.Module, example: torch.Tensor, key: str, fresh: bool = False) -> Path:
    """The cached ONNX file of ``model`` (exported now when missing, untagged or ``fresh``).
    Export errors propagate (the caller falls back to torch)."""
    path = export_path(key)
    if (path.exists() or path.is_symlink()) and not fresh:
        if _tagged(path, key):
            os.utime(path)  # recently used: kept longest when the cache is pruned
            return path
        warnings.warn(f"pellucid: {path} was not written by this installation (no valid tag); "
                      f"replaced by a fresh export", PlantedExport, stacklevel=3)
    buffer = io.BytesIO()
    training = [m for m in model.modules() if m.training]
    try:  # exported in eval mode; the user's modes are restored
        wrapped = _Exportable(model).eval()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapped, (example[:1].float(),), buffer, dynamo=False,
                              opset_version=OPSET, input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    finally:
        for m in training:
            m.train()
    from pellucid.signing import tag

    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    for target, payload in ((path, data), (_tag_path(path), tag("onnx-export", f"{key}:{digest}"
                                                                .encode()).encode())):
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
        os.replace(tmp, target)  # replaces a planted file or link, never writes through it
    prune(path.parent, keep=path)
    return path


def prune(folder: Path, keep: Path) -> None:
    """Remove the least recently used exports until the folder fits the cache limit."""
    sizes = {}
    for p in folder.glob("*.onnx"):
        try:
            st = p.stat()
        except OSError:  # removed meanwhile by another process pruning the same folder
            continue
        sizes[p] = (st.st_mtime, st.st_size)
    total = sum(size for _, size in sizes.values())
    for p in sorted(sizes, key=lambda q: sizes[q][0]):
        if total <= cache_limit_bytes():
            break
        if p != keep:
            total -= sizes[p][1]
            p.unlink(missing_ok=True)
            _tag_path(p).unlink(missing_ok=True)
