"""Clinical input and output: ``read`` DICOM / NIfTI / PNG, and write standard DICOM objects
(Parametric Map, Segmentation, Secondary Capture, Comprehensive 3D SR) with highdicom."""

from pellucid.io.reading import MedicalImage, read

__all__ = ["MedicalImage", "read"]
