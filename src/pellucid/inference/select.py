"""One forward-only interface over three backends: :func:`forward_only`.

Everything that needs forwards only (Score-CAM's masked inputs, occlusion, RISE, LIME, KernelSHAP,
Shapley values, the faithfulness metrics' perturbed inputs) calls ``forward_only(model, example)``
and gets a function from a batch shaped like ``example`` (any batch size) to the model's output
tensor, float32, on the input's device. Gradient methods never come here: they stay in torch.

- ``torch``: the optimised copy (:mod:`pellucid.inference.torch_copy`), or under a reduced precision
  (``pellucid.runtime.set_precision``) the module under autocast.
- ``onnxruntime`` / ``openvino``: the model exported to ONNX once per weights and input shape
  (:mod:`pellucid.inference.export`), run by the runtime (:mod:`pellucid.inference.runtimes`).
  Before first use each is verified on a probe batch against the model in torch (the example,
  variations of it, an all-zero and a constant input): per input, max |runtime - torch| <= 1e-5 x
  max |torch| (3e-2 under bf16, whose rounding is the point). A
  cached export that fails is exported again; an export or verification that fails falls back to
  torch with one line (a :class:`BackendFallback` warning) and the same values.
- ``auto`` (default): torch until forward-only work on the model and input shape has taken
  ``TRIAL_AFTER_S`` seconds in this process (so small jobs never pay for an export); then each
  available backend is timed once on a batch of eight (five interleaved rounds) and the fastest
  kept (another must take under 0.9 of torch's time to replace it). The choice is kept on disk
  per export key, precision, thread count and CPU, so the next process starts with it.

Inputs on a GPU, and black boxes (already a runtime: :mod:`pellucid.models.blackbox`), run as
they are.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import threading
import time
import warnings
import weakref
from collections.abc import Callable

import torch
from torch import nn

from pellucid.errors import ConfigError
from pellucid.inference.export import export_key, export_onnx
from pellucid.inference.runtimes import BUILDERS, available, supports
from pellucid.inference.settings import backend_setting, cache_dir
from pellucid.inference.torch_copy import first_tensor, probe_batch, torch_forward
from pellucid.runtime import model_precision, precision_name, reduced_precision

TRIAL_AFTER_S = 2.0
TOLERANCE = {"fp32": 1e-5, "bf16": 3e-2}
# the trial times each backend at a small and a larger batch and compares their best per-input
# times: at 8 inputs alone, ONNX Runtime beat the traced torch copy on the demo's ResNet-18
# (1.8 against 2.0 ms per input) and was chosen, while Score-CAM's chunks of 32 and more ran it
# slower than torch would have (1.2-1.3 against 0.9-1.0 ms per input)
TRIAL_BATCHES = (8, 32)
SWITCH_BELOW = 0.9  # another backend replaces torch only at under 0.9 of torch's time per input


class BackendFallback(RuntimeWarning):
    """A requested backend could not run a model; torch runs it instead."""


class BackendForward:
    """A forward-only function and the backend that runs it."""

    def __init__(self, backend: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.backend, self.fn = backend, fn

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def __repr__(self) -> str:
        return f"BackendForward({self.backend!r})"


_MEMO: dict[tuple, tuple[weakref.ref, tuple, BackendForward]] = {}
_SPENT: dict[tuple, float] = {}
_LOCK = threading.Lock()


def _fingerprint(model: nn.Module, example: torch.Tensor) -> tuple:
    params = tuple((p.data_ptr(), p._version) for p in model.parameters())
    buffers = tuple((b.data_ptr(), b._version) for b in model.buffers())
    return (params, buffers, tuple(example.shape[1:]), example.dtype, example.device)


def _precision() -> str:
    return "fp32" if reduced_precision() is None else precision_name()


def _torch(model: nn.Module, example: torch.Tensor, precision: str) -> BackendForward:
    if precision == "fp32":
        return BackendForward("torch", torch_forward(model, example))

    def mixed(x: torch.Tensor) -> torch.Tensor:
        with model_precision(x.device.type):
            return first_tensor(model(x)).float()
    return BackendForward("torch", mixed)


def _label(model: nn.Module, example: torch.Tensor) -> str:
    return f"{type(model).__name__} on input {tuple(example.shape[1:])}"


def _one_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text[:200]


PROBE_KINDS = ("an input like the example", "a variation of the example",
               "a variation of the example", "an all-zero input", "a constant input",
               "the example with a small window zeroed (occlusion)",
               "the example with a large window zeroed (occlusion)",
               "the example with a window set to its mean (a constant region)",
               "the example with half its pixels zeroed (RISE, LIME, deletion)",
               "the example with half its pixels set to its mean (ROAD, Shapley coalitions)")


def verification_batch(example: torch.Tensor) -> torch.Tensor:
    """The probe (:data:`PROBE_KINDS`): the example, two variations of it (a batch size the export
    did not see), an all-zero input, the example's channel means, and the perturbations the
    methods and metrics make: windows of zeros (occlusion) of a quarter and a half of each side,
    a window set to the channel means, and a seeded half of the pixels zeroed or set to the means
    (RISE, LIME, deletion, ROAD, Shapley coalitions)."""
    one = example[:1]
    spatial = list(one.shape[2:])
    means = one.flatten(2).mean(2).view(1, -1, *[1] * len(spatial)).expand_as(one)

    def window(fraction: float, offset: float) -> torch.Tensor:
        mask = torch.zeros((1, 1, *spatial), dtype=torch.bool, device=one.device)
        index = tuple(slice(int(s * offset), int(s * offset) + max(1, int(s * fraction)))
                      for s in spatial)
        mask[(0, 0, *index)] = True
        return mask

    gen = torch.Generator(device="cpu").manual_seed(1)
    half = (torch.rand((1, 1, *spatial), generator=gen) < 0.5).to(one.device)
    small, large, middle = window(0.25, 0.1), window(0.5, 0.25), window(0.3, 0.4)
    return torch.cat([probe_batch(example), torch.zeros_like(one), means,
                      one.masked_fill(small, 0.0), one.masked_fill(large, 0.0),
                      torch.where(middle, means, one), one.masked_fill(half, 0.0),
                      torch.where(half, means, one)])


def verify(model: nn.Module, example: torch.Tensor, forward: BackendForward, precision: str) -> None:
    """Raise RuntimeError unless ``forward`` gives the model's output on the probe
    (:func:`verification_batch`): per input, max |runtime - torch| <= tolerance x max |torch|.
    Constant inputs are where instance normalisation amplifies rounding (a constant feature map
    has no variance): torch gives them exactly, the runtimes up to a few per cent off, so a model
    with it fails here and runs in torch."""
    probe = verification_batch(example)
    with torch.no_grad():
        reference = first_tensor(model(probe)).float()
        got = forward(probe).float()
    if got.shape != reference.shape:
        raise RuntimeError(f"output shape {tuple(got.shape)} is not torch's {tuple(reference.shape)}")
    if not torch.isfinite(got[torch.isfinite(reference)]).all():
        raise RuntimeError("non-finite outputs where torch's are finite")
    ref = reference.flatten(1).abs().amax(1)
    scale = torch.maximum(ref, 1e-3 * ref.max()).clamp_min(1e-12)
    rel = (got - reference).flatten(1).abs().amax(1) / scale
    worst = int(rel.argmax())
    if rel[worst] > TOLERANCE[precision]:
        raise RuntimeError(f"on {PROBE_KINDS[worst]} its output differs from torch's by "
                           f"{float(rel[worst]):.1e} of the output's scale (allowed "
                           f"{TOLERANCE[precision]:.0e})")


def exported(model: nn.Module, example: torch.Tensor, backend: str, precision: str,
             key: str | None = None) -> BackendForward:
    """``backend`` running the cached export, verified; RuntimeError/ConfigError when it cannot."""
    if not available(backend):
        raise ConfigError(f"{backend} is not installed (pip install 'pellucid[runtimes]')")
    key = key or export_key(model, example)
    try:
        forward = BackendForward(backend, BUILDERS[backend](export_onnx(model, example, key),
                                                                     precision))
        verify(model, example, forward, precision)
    except Exception:  # a tagged file the runtime cannot load or that disagrees: export anew
        forward = BackendForward(backend, BUILDERS[backend](
            export_onnx(model, example, key, fresh=True), precision))
        verify(model, example, forward, precision)
    return forward


def _fallback(backend: str, model: nn.Module, example: torch.Tensor, exc: BaseException,
              precision: str) -> BackendForward:
    warnings.warn(f"pellucid: {backend} cannot run {_label(model, example)} ({_one_line(exc)}); "
                  f"running it in torch", BackendFallback, stacklevel=4)
    return _torch(model, example, precision)


def _choices_path():
    return cache_dir() / "backend-choices.json"


def _choice_key(key: str, precision: str) -> str:
    return f"{key}|{precision}|{torch.get_num_threads()}t|{platform.machine()}|{_cpu_name()}"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _read_choices() -> dict:
    """The recorded choices: data that can only pick among verified exports (every export is
    tagged and verified before use), never a path or code; anything malformed reads as none."""
    try:
        choices = json.loads(_choices_path().read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return choices if isinstance(choices, dict) else {}


def _write_choice(choice_key: str, record: dict) -> None:
    path = _choices_path()
    choices = _read_choices()
    choices[choice_key] = record
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
    with os.fdopen(fd, "w") as fh:
        json.dump(choices, fh, indent=1, sort_keys=True)
    os.replace(tmp, path)


def time_per_input(forwards: dict[str, BackendForward], batch: torch.Tensor, rounds: int = 5
                   ) -> dict[str, float]:
    """Median seconds per input of each forward on ``batch``: two warm-up calls each (TorchScript
    specialises on its first calls), then ``rounds`` rounds that call each in turn, so that a drift
    of the machine's speed, and one runtime's threads still spinning when the next starts (as
    happens between the forwards and torch's own work in a real run), hit every candidate alike."""
    times: dict[str, list[float]] = {name: [] for name in forwards}
    with torch.inference_mode():
        for forward in forwards.values():
            forward(batch)
            forward(batch)
        for _ in range(rounds):
            for name, forward in forwards.items():
                began = time.perf_counter()
                forward(batch)
                times[name].append(time.perf_counter() - began)
    return {name: statistics.median(t) / len(batch) for name, t in times.items()}


def trial(model: nn.Module, example: torch.Tensor, precision: str,
          torch_forward: BackendForward | None = None) -> tuple[BackendForward, dict]:
    """Time torch (``torch_forward`` when already built) and every available runtime once;
    return the fastest and the record kept."""
    key = export_key(model, example)
    candidates = {"torch": torch_forward or _torch(model, example, precision)}
    notes = {}
    for backend in ("onnxruntime", "openvino"):
        if available(backend) and supports(backend, precision):
            try:
                candidates[backend] = exported(model, example, backend, precision, key)
            except Exception as exc:  # recorded, torch stays the answer
                notes[backend] = _one_line(exc)
    ms: dict[str, float] = {}
    for size in TRIAL_BATCHES:
        for name, t in time_per_input(candidates, probe_batch(example, size)).items():
            ms[name] = min(ms.get(name, float("inf")), 1e3 * t)
    best = min(ms, key=ms.get)
    if ms[best] > SWITCH_BELOW * ms["torch"]:
        best = "torch"
    return candidates[best], {"backend": best, "ms_per_input": {k: round(v, 3) for k, v in ms.items()},
                              "not_usable": notes, "key": key}


_PENDING: dict[tuple, str] = {}  # models on trial (none recorded on disk): their export keys


class Pinned:
    """Backends fixed for a run (``pellucid bench``): ``choices`` maps ``export key|precision`` to
    a backend (and ``...|backend|batch`` to a chunk size), used as they are whatever the cache's
    records say; a model and shape not in it is decided at once (no trial period on torch) and
    ``on_decision(name, value)`` is called, so that the run records it and a resumed run computes
    with the same backend and chunks (bit-identical). A throwaway model (a randomised copy, marked
    ``pellucid_throwaway``) runs in torch in chunks of :data:`THROWAWAY_BATCH`."""

    def __init__(self, choices: dict[str, str | int],
                 on_decision: Callable[[str, str | int], None]) -> None:
        self.choices = {k: v for k, v in choices.items()
                        if (isinstance(v, int) and 1 <= v <= 4096 if k.endswith("|batch")
                            else v in ("on", "off") if k.endswith("|incremental")
                            else v in ("torch", *BUILDERS))}
        self.on_decision = on_decision
        self._keys: dict[tuple, tuple[weakref.ref, tuple, str]] = {}

    def key(self, model: nn.Module, example: torch.Tensor) -> str:
        """The export key of ``model`` on inputs like ``example`` (memoised per model object)."""
        memo = (id(model), tuple(example.shape[1:]), example.dtype)
        fingerprint = _fingerprint(model, example)
        found = self._keys.get(memo)
        if found is None or found[0]() is not model or found[1] != fingerprint:
            found = (weakref.ref(model), fingerprint, export_key(model, example))
            self._keys[memo] = found
        return found[2]


def pinned_batch(model: nn.Module, example: torch.Tensor, backend: str,
                 decide: Callable[[], int]) -> int | None:
    """In a run with pinned backends: the chunk size recorded for ``model`` on inputs like
    ``example`` under ``backend``, or ``decide()`` now (recorded at once); None outside a run."""
    if not _PIN or example.device.type != "cpu":
        return None
    if getattr(model, "pellucid_throwaway", False):
        return THROWAWAY_BATCH  # a randomised copy: fixed, never timed or recorded
    pinned = _PIN[0]
    key, precision = pinned.key(model, example[:1]), _precision()
    name = f"{key}|{precision}|{backend}|batch"
    size = pinned.choices.get(name)
    if not isinstance(size, int):
        disk = f"{_choice_key(key, precision)}|{backend}|batch"  # this machine's earlier choice
        record = _read_choices().get(disk)
        size = record.get("batch") if isinstance(record, dict) else None
        if not (isinstance(size, int) and 1 <= size <= 4096):
            size = int(decide())
            _write_choice(disk, {"batch": size})
        pinned.choices[name] = size
        pinned.on_decision(name, size)
    return size


def pinned_decision(model: nn.Module, example: torch.Tensor, detail: str,
                    decide: Callable[[], str]) -> str | None:
    """In a run with pinned backends: occlusion's choice of its incremental forward ("on" or
    "off") recorded for ``model`` on inputs like ``example`` and ``detail`` (window and batch), or
    ``decide()`` now (recorded at once); None outside a run. A throwaway model: "off"."""
    if not _PIN:
        return None
    if getattr(model, "pellucid_throwaway", False):
        return "off"
    pinned = _PIN[0]
    name = f"{pinned.key(model, example[:1])}|{_precision()}|{detail}|incremental"
    value = pinned.choices.get(name)
    if value not in ("on", "off"):
        value = decide()
        pinned.choices[name] = value
        pinned.on_decision(name, value)
    return value


_PIN: list[Pinned] = []
THROWAWAY_BATCH = 8  # chunk size of a throwaway model (a randomised copy) in a pinned run


def pin_backends(pinned: Pinned | None) -> None:
    """Fix backends for a run (see :class:`Pinned`); ``None`` ends it."""
    _PIN.clear()
    _MEMO.clear()
    if pinned is not None:
        _PIN.append(pinned)


def _pinned_auto(model: nn.Module, example: torch.Tensor, precision: str) -> BackendForward:
    pinned = _PIN[0]
    key = pinned.key(model, example)
    name = f"{key}|{precision}"
    backend = pinned.choices.get(name)
    if backend is None:
        record = _read_choices().get(_choice_key(key, precision))
        if isinstance(record, dict) and record.get("backend") in ("torch", *BUILDERS):
            backend = record["backend"]
        else:
            forward, record = trial(model, example, precision)
            _write_choice(_choice_key(key, precision), record)
            backend = forward.backend
        pinned.choices[name] = backend
        pinned.on_decision(name, backend)
    if backend == "torch":
        return _torch(model, example, precision)
    try:
        return exported(model, example, backend, precision, key)
    except Exception as exc:  # the runtime went away since the run began: torch, said once
        return _fallback(backend, model, example, exc, precision)


def _auto(model: nn.Module, example: torch.Tensor, precision: str, spent_key: tuple
          ) -> BackendForward | None:
    """The decided backend (from this process or the disk), or None while torch is on trial."""
    if precision == "fp16":
        return _torch(model, example, precision)
    key = _PENDING.get(spent_key)
    if key is None:
        key = export_key(model, example)
        record = _read_choices().get(_choice_key(key, precision))
        if record is not None and (not isinstance(record, dict)
                                   or record.get("backend") not in ("torch", *BUILDERS)):
            record = None  # a record pellucid did not write: decide again
        if record is not None:
            if record.get("backend") == "torch":
                return _torch(model, example, precision)
            try:
                return exported(model, example, record["backend"], precision, key)
            except Exception:  # the runtime changed since: decide again
                pass
        else:
            _PENDING[spent_key] = key
    if _SPENT.get(spent_key, 0.0) < TRIAL_AFTER_S and spent_key in _PENDING:
        return None
    _PENDING.pop(spent_key, None)
    with _LOCK:  # the copy that ran while on trial is timed as torch; its clock is done
        on_trial = _TORCH_MEMO.pop(spent_key, None)
        _SPENT.pop(spent_key, None)
    forward, record = trial(model, example, precision, on_trial)
    _write_choice(_choice_key(key, precision), record)
    return forward


def _counting(forward: BackendForward, spent_key: tuple) -> BackendForward:
    def counted(x: torch.Tensor) -> torch.Tensor:
        began = time.perf_counter()
        out = forward(x)
        _SPENT[spent_key] = _SPENT.get(spent_key, 0.0) + time.perf_counter() - began
        return out
    return BackendForward("torch", counted)


def forward_only(model: nn.Module, example: torch.Tensor) -> BackendForward:
    """A forward-only function equal to ``model`` (within the verification tolerance) for inputs
    shaped like ``example``, run by the backend in force (:func:`backend_setting`)."""
    precision = _precision()
    if getattr(model, "forward_only", False):
        return BackendForward("blackbox", lambda x: first_tensor(model(x)))
    if example.device.type != "cpu":
        return _torch(model, example, precision)
    setting = backend_setting()
    fingerprint = (_fingerprint(model, example), setting, precision, torch.get_num_threads())
    memo_key = (id(model), tuple(example.shape[1:]), example.dtype)
    with _LOCK:
        cached = _MEMO.get(memo_key)
    if cached is not None and cached[0]() is model and cached[1] == fingerprint:
        return cached[2]
    spent_key = (id(model), fingerprint)
    if setting == "torch":
        forward = _torch(model, example, precision)
    elif _PIN and getattr(model, "pellucid_throwaway", False):
        forward = _torch(model, example, precision)  # a randomised copy in a run: never exported
    elif setting == "auto" and _PIN and precision != "fp16":
        try:
            forward = _pinned_auto(model, example, precision)
        except Exception as exc:  # e.g. an unreadable cache folder
            forward = _fallback("auto", model, example, exc, precision)
    elif setting == "auto":
        try:
            decided = _auto(model, example, precision, spent_key)
        except Exception as exc:  # e.g. an unreadable cache folder
            decided = _fallback("auto", model, example, exc, precision)
        if decided is None:  # on trial: not memoised, so the next call looks again
            return _counting(_torch_memo(model, example, precision, spent_key), spent_key)
        forward = decided
    else:
        if precision != "fp32" and not supports(setting, precision):
            raise ConfigError(f"--backend {setting} does not run precision {precision} here; use "
                              f"torch{' or openvino' if precision == 'bf16' else ''}")
        try:
            forward = exported(model, example, setting, precision)
        except Exception as exc:  # any export or runtime failure: torch is correct
            forward = _fallback(setting, model, example, exc, precision)
    with _LOCK:
        for stale in [k for k, v in _MEMO.items() if v[0]() is None]:
            del _MEMO[stale]  # models that were garbage-collected
        _MEMO[memo_key] = (weakref.ref(model), fingerprint, forward)
    return forward


_TORCH_MEMO: dict[tuple, BackendForward] = {}


def _torch_memo(model: nn.Module, example: torch.Tensor, precision: str, spent_key: tuple
                ) -> BackendForward:
    """The torch forward used while ``auto`` is on trial, built once per model and shape."""
    with _LOCK:
        found = _TORCH_MEMO.get(spent_key)
    if found is None:
        found = _torch(model, example, precision)
        with _LOCK:
            if len(_TORCH_MEMO) > 8:  # models on trial at once; each holds a traced copy
                _TORCH_MEMO.clear()
            _TORCH_MEMO[spent_key] = found
    return found


def current_backend(model: nn.Module, example: torch.Tensor) -> str:
    """The backend chosen for ``model`` on inputs like ``example`` in this process (``torch``
    before any choice)."""
    cached = _MEMO.get((id(model), tuple(example.shape[1:]), example.dtype))
    return cached[2].backend if cached is not None and cached[0]() is model else "torch"
