"""The benchmark's explanation cache, kept without any unpickling.

A cached explanation is one ``.safetensors`` file: the tensors (attributions, raw map, the bound
target's tensors, tensor-valued extras and options) as safetensors blobs, and everything else as
JSON in the file's metadata, with the unit's identity text (what the explanation depends on) and a
BLAKE2b digest of every tensor's bytes. Reading parses only that JSON header and raw arrays: a
file planted in a run folder can be wrong or unreadable but can never execute. A file whose
identity, digest or structure does not match is discarded (moved aside) and the explanation
recomputed. The bound target is rebuilt only as one of pellucid's own ``Bound*Target`` classes,
named in the metadata and looked up in a fixed table, never imported by name.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pellucid.explainers.base import Cost, Explanation
from pellucid.targets import (
    BoundClassTarget,
    BoundRegressionTarget,
    BoundSegmentationTarget,
    BoundTarget,
)

FORMAT = "pellucid-explanation/1"
TARGETS: dict[str, type[BoundTarget]] = {c.__name__: c for c in (
    BoundClassTarget, BoundSegmentationTarget, BoundRegressionTarget)}


class CacheError(Exception):
    """A cache file that cannot be used (wrong key, digest, format or content)."""


def _encode(value: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """JSON for ``value``; tensors go to ``tensors`` under a key and are referenced by it."""
    if isinstance(value, np.ndarray) and value.dtype != object:
        value = torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, torch.Tensor):
        key = prefix
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(value, dict):
        return {"__dict__": {str(k): _encode(v, tensors, f"{prefix}.{k}") for k, v in value.items()}}
    if isinstance(value, (list, tuple)):
        return [_encode(v, tensors, f"{prefix}.{i}") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item") and hasattr(value, "dtype"):  # a numpy scalar
        return value.item()
    raise CacheError(f"cannot cache a value of type {type(value).__name__}")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            key = value["__tensor__"]
            if key not in tensors:
                raise CacheError(f"tensor {key!r} is missing")
            return tensors[key]
        if set(value) == {"__dict__"} and isinstance(value["__dict__"], dict):
            return {k: _decode(v, tensors) for k, v in value["__dict__"].items()}
        raise CacheError("unexpected object in the metadata")
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise CacheError(f"unexpected {type(value).__name__} in the metadata")


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.blake2b(digest_size=20)
    for key in sorted(tensors):
        t = tensors[key]
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_explanation(path: Path, explanation: Explanation, key: str) -> None:
    """Write ``explanation`` (its output tensor is not kept) atomically to ``path`` under ``key``,
    the identity text of what it explains."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    target = explanation.target
    if type(target).__name__ not in TARGETS:
        raise CacheError(f"cannot cache a target of type {type(target).__name__}")
    fields = {k: _encode(v, tensors, f"target.{k}") for k, v in vars(target).items()}
    meta = {"format": FORMAT, "key": key, "method": explanation.method, "layer": explanation.layer,
            "cost": explanation.cost.as_dict(),
            "target": {"class": type(target).__name__, "fields": fields},
            "attributions": _encode(explanation.attributions, tensors, "attributions"),
            "raw": _encode(explanation.raw, tensors, "raw"),
            "extras": _encode(explanation.extras, tensors, "extras"),
            "options": _encode(explanation.options, tensors, "options")}
    meta["digest"] = _digest(tensors)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        save_file(tensors, str(tmp), metadata={"pellucid": json.dumps(meta)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_explanation(path: Path, key: str) -> Explanation:
    """The explanation cached at ``path`` for the unit ``key``; CacheError if it is not usable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta_text = (fh.metadata() or {}).get("pellucid")
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (not a dict)
    except Exception as exc:  # the safetensors parser raises several types for broken files
        raise CacheError(f"not a readable safetensors file ({type(exc).__name__})") from None
    if not meta_text:
        raise CacheError("no pellucid metadata")
    try:
        meta = json.loads(meta_text)
    except ValueError:
        raise CacheError("metadata is not JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CacheError("unknown cache format")
    if meta.get("key") != key:
        raise CacheError("cached for another unit")
    if meta.get("digest") != _digest(tensors):
        raise CacheError("tensor digest does not match")
    target_meta = meta.get("target") or {}
    cls = TARGETS.get(str(target_meta.get("class")))
    if cls is None:
        raise CacheError("unknown target class")
    try:
        target = cls(**{k: _decode(v, tensors) for k, v in dict(target_meta["fields"]).items()})
        attributions = _decode(meta["attributions"], tensors)
        raw = _decode(meta["raw"], tensors)
        cost = Cost(**{k: meta["cost"][k] for k in Cost().as_dict()})
        explanation = Explanation(attributions, str(meta["method"]), target, meta.get("layer"), raw,
                                  cost, None, _decode(meta["extras"], tensors),
                                  _decode(meta["options"], tensors))
    except (KeyError, TypeError, ValueError) as exc:
        raise CacheError(f"incomplete cache entry ({type(exc).__name__}: {exc})") from None
    if not isinstance(attributions, torch.Tensor) or not isinstance(explanation.extras, dict):
        raise CacheError("incomplete cache entry")
    return explanation
