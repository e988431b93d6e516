"""Clinical input and output: ``read`` DICOM / NIfTI / PNG, and write standard DICOM objects
(Parametric Map, Segmentation, Secondary Capture, Comprehensive 3D SR) with highdicom.

``read`` and ``MedicalImage`` are imported on first use, so that the header checks
(:mod:`pellucid.io.headers`, :mod:`pellucid.io.codestreams`) load without torch (the service's
server process uses them)."""

from __future__ import annotations

from typing import Any

__all__ = ["MedicalImage", "read"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from pellucid.io import reading

        return getattr(reading, name)
    raise AttributeError(f"module 'pellucid.io' has no attribute {name!r}")
