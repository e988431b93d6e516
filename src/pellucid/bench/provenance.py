"""Whether a run folder's numbers came from this installation: each file that carries numbers is
tagged when pellucid writes it (:mod:`pellucid.signing`, an HMAC under a per-user key outside the
run folder), so a run rewritten by hand, with every manifest's SHA-256 recomputed, no longer
verifies. ``run.json`` and ``metric_trust.json`` carry a sidecar ``<name>.tag``; each result part
carries its tag in its manifest (:mod:`pellucid.bench.store`).

A run copied from a colleague's machine, or made before pellucid tagged runs, is data of unknown
origin: ``pellucid report`` still reads it and says so, ``explain --evidence`` refuses it unless
``--evidence-unverified`` asks to state its numbers marked unverified.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pellucid.signing import tag, valid

PURPOSE = "run-file"


def write_signed(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` and its tag to ``path.tag`` (each atomically)."""
    data = text.encode()
    for target, payload in ((path, data),
                            (path.with_name(path.name + ".tag"),
                             tag(PURPOSE, path.name.encode() + b"\x00" + data).encode())):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
        os.replace(tmp, target)


def signed(path: Path) -> bool:
    """Whether ``path`` holds exactly what this installation wrote there."""
    try:
        data = path.read_bytes()
        given = path.with_name(path.name + ".tag").read_text().strip()
    except (OSError, UnicodeDecodeError):
        return False
    return valid(PURPOSE, path.name.encode() + b"\x00" + data, given)


@dataclass(frozen=True)
class Provenance:
    """What of a run folder verifies: run.json, metric_trust.json (when present), result parts."""

    run_json: bool
    trust_json: bool
    parts_signed: int
    parts: int

    @property
    def verified(self) -> bool:
        return self.run_json and self.trust_json and self.parts_signed == self.parts > 0

    def why_not(self) -> str:
        """What does not verify, in words ('' when everything does)."""
        reasons = []
        if not self.run_json:
            reasons.append("run.json carries no valid tag")
        if not self.trust_json:
            reasons.append("metric_trust.json carries no valid tag")
        if self.parts_signed < self.parts:
            reasons.append(f"{self.parts - self.parts_signed} of {self.parts} result parts carry "
                           f"no valid tag")
        if self.parts == 0:
            reasons.append("it holds no result parts")
        return "; ".join(reasons)


def provenance(run: Path) -> Provenance:
    """Check every tagged file of the run folder ``run`` (nothing is moved or changed)."""
    from pellucid.bench.store import ResultStore

    trust = run / "metric_trust.json"
    signed_parts, total = ResultStore(run).signed_parts()
    return Provenance(signed(run / "run.json"), not trust.exists() or signed(trust), signed_parts,
                      total)
