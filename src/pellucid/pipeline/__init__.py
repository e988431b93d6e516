"""Explaining a case, one way for every entry point: :mod:`~pellucid.pipeline.resolve` (the model
card and a user's request to a Target), :mod:`~pellucid.pipeline.case` (read, normalise, explain),
:mod:`~pellucid.pipeline.outputs` (overlays, maps, DICOM objects, the case record) and
:mod:`~pellucid.pipeline.files` (many files into one folder with a grid and ``summary.json``)."""

from pellucid.pipeline.case import Case, CaseOptions, CaseResult, explain_case, prepare_model, read_case
from pellucid.pipeline.files import explain_files
from pellucid.pipeline.outputs import write_case
from pellucid.pipeline.resolve import REGIONS, card_target, class_index, load_mask

__all__ = ["REGIONS", "Case", "CaseOptions", "CaseResult", "card_target", "class_index",
           "explain_case", "explain_files", "load_mask", "prepare_model", "read_case", "write_case"]
