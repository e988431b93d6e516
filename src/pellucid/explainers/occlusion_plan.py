"""Whether and how occlusion runs its occluded copies through the exact incremental forward
(:mod:`pellucid.inference.incremental`): the engine is traced once per model and checked on every
call; the choice between it and the full forward is made once per model, input shape and window.

Per call, before any copy counts: the engine's clean pass must reproduce the model's output on
each input (else the engine is traced again: the weights may have changed), and its first
:data:`CHECK_COPIES` copies (the windows nearest the centre) must equal the full forward's within
:data:`TOLERANCE` of the output's scale; those copies take the full forward's values.

The choice (``incremental="auto"``), in this order: a benchmark run's recorded choice
(``backends.json``, so a resumed run computes the same way); this process's earlier choice for the
model, input shape, window and batch; off where the boxes need over 90 % of the full work, on
where they need at most :data:`SURE_GAIN`; otherwise a batch timed each way after a warm-up one,
on where a copy takes under :data:`GAIN_NEEDED` of the full forward's time. In a benchmark run
those batches are throwaway copies and the choice is recorded before any value is computed;
elsewhere they are the call's own (kept), so a process's first call may round differently from
its later ones, as :class:`pellucid.explainers.accelerate.AutoBatch`'s trial chunk sizes do.
"""

from __future__ import annotations

import math
import time
import weakref

import torch

from pellucid.errors import ConfigError, ModelError
from pellucid.explainers.accelerate import activation_bytes
from pellucid.runtime import memory_limit_bytes

# per model object: its engine, or (the error incremental=True raises, why it cannot have one)
_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
TOLERANCE = 1e-5  # of the output's scale (its largest |value|, at least 1)
CHECK_COPIES = 4  # occluded copies run both ways on every call
GAIN_NEEDED = 0.85  # "auto" keeps the incremental forward where a copy takes under 85 % as long
SURE_GAIN = 0.35  # or, without timing, where it needs at most 35 % of the full forward's MACs
CLEAN_PASS_BYTES = 2 * 2**30


class IncrementalPlan:
    """Occlusion's incremental forward for one call (see the module): ``note`` says what ran and
    why; :meth:`run` adds a sample's score drops, or returns False where the full forward must."""

    def __init__(self, setting, runner, model, inputs, output, batch_size, windows: int,
                 window: tuple[int, ...]) -> None:
        from pellucid.inference.incremental import IncrementalForward

        self.runner, self.model, self.inputs, self.output = runner, model, inputs, output
        self.engine = self.held = None
        self.state, self.share = "check", 1.0
        self.trial: list[str] = []
        self.timed: dict[str, float] = {}
        self.setting = setting
        self.size = batch_size or (32 if inputs.device.type == "cpu" else 128)
        self.key = (tuple(inputs.shape[1:]), tuple(window), self.size)
        if setting is False:
            self.note = "off (incremental=False)"
            return
        if getattr(model, "forward_only", False) or getattr(model, "runs_per_patch", False) or \
                isinstance(model, torch.jit.ScriptModule):
            self.note = "off: the model is not a traceable PyTorch module"
            return
        if getattr(model, "pellucid_throwaway", False) and setting == "auto":
            self.note = "off: a randomised copy of the model (a sanity check), used once"
            return
        if setting == "auto" and inputs.shape[0] * math.ceil(windows / self.size) < 4:
            self.note = "off: too few copies to gain from it"
            return
        # the clean pass keeps one input's activations (and a padded copy) while a batch of copies
        # runs: within the memory limit, or within CLEAN_PASS_BYTES without one
        per_input = activation_bytes(model, inputs[:1])
        limit = memory_limit_bytes()
        if 3 * per_input > (limit or CLEAN_PASS_BYTES):
            self.note = f"off: the clean pass's activations ({per_input / 2**20:.0f} MiB and a " \
                        f"padded copy, beside a batch) would not fit " \
                        f"{'the memory limit' if limit else 'in 2 GiB'}"
            if setting is True:
                raise ConfigError(f"occlusion: incremental=True, but {self.note[5:]}")
            return
        if limit:
            self.size = max(1, min(self.size, (limit - 2 * per_input) // per_input))
        found = _ENGINES.get(model)
        if found is None:
            try:
                found = IncrementalForward(model)
            except RuntimeError as exc:
                found = (ConfigError, str(exc))
            _ENGINES[model] = found
        if isinstance(found, tuple):  # (the error incremental=True raises, why)
            self.note = f"off: {found[1]}"
        elif setting == "auto" and found.decisions.get(self.key, {}).get("state") == "off":
            self.note = f"off: {found.decisions[self.key]['why']}"  # chosen on an earlier call
        elif not found.lock.acquire(blocking=False):  # its clean pass is one caller's at a time
            self.note = "off: in use by another explanation in this process"
        else:
            self.engine, self.held, self.note = found, found, "on"
        if setting is True and self.engine is None:
            error = found[0] if isinstance(found, tuple) else ConfigError
            raise error(f"occlusion: incremental=True, but {self.note[5:]}")

    def close(self) -> None:
        """Free the clean pass's values and the engine for the next caller."""
        if self.held is not None:
            self.held.release()
            self.held.lock.release()
            self.held = None

    def _rebuild(self) -> None:
        """A new engine where the cached one no longer matches the model (its weights changed
        since it was traced)."""
        from pellucid.inference.incremental import IncrementalForward

        try:
            fresh = IncrementalForward(self.model)
        except RuntimeError:
            return
        fresh.lock.acquire()
        self.close()
        _ENGINES[self.model] = self.engine = self.held = fresh

    def _off(self, why: str) -> None:
        if self.setting is True:
            raise ModelError(f"occlusion: the incremental forward {why}")
        self.engine, self.note = None, f"off: {why}"

    def _engine(self, patches: torch.Tensor, corners: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The engine's output on these boxes and its seconds; counted as forwards, with the
        MACs it did not need to do."""
        engine, before = self.engine, self.engine.macs
        self.runner.count(self.inputs[:1].expand(len(patches), *self.inputs.shape[1:]))
        began = time.perf_counter()
        out = engine(patches, corners).float()
        seconds = time.perf_counter() - began
        self.share = (engine.macs - before) / max(1, len(patches) * engine.full_macs_per_row)
        self.runner.saved_macs += len(patches) * engine.full_macs_per_row - (engine.macs - before)
        return out, seconds

    def _full(self, x, base, m) -> tuple[torch.Tensor, float]:
        began = time.perf_counter()
        out = self.runner.fast_forward(x * (1 - m) + base * m).float()
        return out, time.perf_counter() - began

    def _verdict(self, inc: float, full: float) -> None:
        """Keep the engine where a copy took under GAIN_NEEDED of the full forward's time."""
        decided = self.engine.decisions.setdefault(self.key, {})
        times = f"{inc * 1e3:.1f} ms a copy against {full * 1e3:.1f} ms for the full forward"
        on = inc < GAIN_NEEDED * full
        decided.update(state="on" if on else "off",
                       why=f"on ({times})" if on else f"no faster here ({times})")

    def _choose(self, x, base, masks, patches, corners) -> str:
        """"on", "off" or "trial" (time the call's next batches) for "auto" (see the module)."""
        from pellucid.inference.select import pinned_decision

        decided = self.engine.decisions.setdefault(self.key, {})

        def by_share() -> str | None:
            if "state" not in decided and self.share > 0.9:
                decided.update(state="off", why=f"no faster here (the boxes need "
                                                f"{self.share:.0%} of the full work)")
            elif "state" not in decided and self.share <= SURE_GAIN:
                decided.update(state="on", why=f"on (the boxes need {self.share:.0%} of the "
                                                f"full work)")
            return decided.get("state")

        def throwaway() -> str:  # a benchmark run: timed on copies whose values are not kept
            if by_share() is None:
                rows = slice(0, min(len(patches), self.size))
                inc = full = math.inf
                for _ in range(2):  # the faster of two: the first meets new shapes
                    inc = min(inc, self._engine(patches[rows], corners[rows])[1])
                    full = min(full, self._full(x, base, masks[rows][:, None])[1])
                self._verdict(inc / len(patches[rows]), full / len(patches[rows]))
            return decided["state"]

        detail = f"{'x'.join(map(str, self.key[1]))}:{self.key[2]}"
        state = pinned_decision(self.model, x, detail, throwaway) or by_share() or "trial"
        if state in ("on", "off") and "state" not in decided:  # the run's record, kept for later
            decided.update(state=state, why="on (chosen for this benchmark run, backends.json)"
                           if state == "on" else "chosen for this benchmark run (backends.json)")
        if state == "off":
            self._off(decided["why"])
        elif state == "on":
            self.note = decided["why"]
        return state

    def run(self, i, corners, window, base, masks, bound, clean, total) -> bool:
        """Add sample ``i``'s score drops to ``total``; False where the full forward must."""
        if self.engine is None:
            return False
        x, engine = self.inputs[i:i + 1], self.engine
        reference = self.output[i:i + 1].float()
        tol = TOLERANCE * reference.abs().max().clamp_min(1.0)
        got = engine.prepare(x).float()
        if got.shape != reference.shape or (got - reference).abs().max() > tol:
            self._rebuild()  # the weights may have changed since the engine was traced
            engine = self.engine
            got = engine.prepare(x).float()
            if got.shape != reference.shape or (got - reference).abs().max() > tol:
                why = "disagrees with the model on the clean input"
                self.close()
                _ENGINES[self.model] = (ModelError, why)  # not traced again for this model
                self._off(why)
                return False
        # windows nearest the centre first: the check's copies have unclipped boxes, so the share
        # of the work they measure is what the others need
        centre = torch.tensor(x.shape[2:], device=corners.device) / 2
        middle = corners.float() + torch.tensor(window, device=corners.device) / 2
        order = torch.argsort((middle - centre).abs().amax(1), stable=True)
        corners, masks = corners[order], masks[order.to(masks.device)]
        boxes = [(slice(None), *[slice(c, c + w) for c, w in zip(corner, window, strict=True)])
                 for corner in corners.tolist()]
        patches = torch.stack([base[i][box] for box in boxes])  # (W, C, *window)
        rows_all = torch.full((len(masks),), i, dtype=torch.long, device=x.device)
        nd, start, here = x.ndim - 2, 0, base[i:i + 1]

        def add(out: torch.Tensor, start: int, stop: int) -> None:
            rows = rows_all[start:stop]
            drop = clean[rows] - bound.score(out, rows).float()
            total.index_add_(0, rows, drop.view(-1, 1, *([1] * nd)) * masks[start:stop, None])

        if self.state == "check":  # the first copies both ways: the full forward's values count
            stop = min(len(masks), CHECK_COPIES)
            out, _ = self._full(x, here, masks[:stop][:, None])
            got, _ = self._engine(patches[:stop], corners[:stop])
            add(out, 0, stop)
            start = stop
            diff = float((got - out).abs().max()) if got.shape == out.shape else math.inf
            self.state = "chosen"
            if diff > TOLERANCE * float(out.abs().max().clamp_min(1.0)):
                self._off(f"disagrees with the full forward on the first copies (max |diff| "
                          f"{diff:.1e})")
            elif self.setting == "auto" and start < len(masks):
                self.state = self._choose(x, here, masks[start:], patches[start:], corners[start:])
                self.trial = ["engine", "engine", "full", "full"]  # warm and timed, each way
        for begin in range(start, len(masks), self.size):
            stop = min(len(masks), begin + self.size)
            m = masks[begin:stop][:, None]
            if self.engine is not None and self.state == "trial":
                # outside a benchmark run "auto" times this call's own batches (their values are
                # kept: the first call may round differently from later ones, as AutoBatch's trials)
                step = self.trial.pop(0)
                out, seconds = self._engine(patches[begin:stop], corners[begin:stop]) \
                    if step == "engine" else self._full(x, here, m)
                self.timed[step] = seconds / (stop - begin)  # the second (warm) one stays
                if not self.trial:
                    self._verdict(self.timed["engine"], self.timed["full"])
                    self.state = self._choose(x, here, masks, patches, corners)
            elif self.engine is None:
                out, _ = self._full(x, here, m)
            else:
                out, _ = self._engine(patches[begin:stop], corners[begin:stop])
            add(out, begin, stop)
        return True
