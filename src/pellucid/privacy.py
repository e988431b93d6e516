"""Keeping patient data out of logs and the console.

DICOM libraries quote header values in their messages: highdicom warns with the patient's or
referring physician's name when it has a single component, pydicom quotes invalid values. Nothing
read from a DICOM header may reach a log, so :func:`redact_library_messages` routes Python warnings
into logging and gives the DICOM libraries' loggers a handler that writes only where a message
came from (logger, level, category, source line), never its text.
"""

from __future__ import annotations

import logging
import re
import sys

LIBRARIES = ("highdicom", "pydicom", "pynetdicom", "dicomweb_client", "nibabel", "py.warnings")
WITHHELD = "text withheld: it may quote DICOM header values"
_WARNING = re.compile(r"^(?P<file>[^\n]*?):(?P<line>\d+): (?P<category>\w+):")


class _Redact(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage() if record.name == "py.warnings" else ""
        found = _WARNING.match(text)
        where = (f"{found['category']} at {found['file'].rsplit('/', 1)[-1]}:{found['line']}"
                 if found else record.name)
        record.msg, record.args = f"{where} ({WITHHELD})", ()
        return True


def redact_library_messages(level: int = logging.WARNING, stream=None) -> None:
    """Route warnings to logging and redact every message of the DICOM libraries (idempotent)."""
    logging.captureWarnings(True)
    for name in LIBRARIES:
        logger = logging.getLogger(name)
        if any(getattr(h, "_pellucid_redact", False) for h in logger.handlers):
            continue
        handler = logging.StreamHandler(stream or sys.stderr)
        handler.setLevel(level)
        handler.addFilter(_Redact())
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler._pellucid_redact = True  # type: ignore[attr-defined]
        logger.handlers = [handler]
        logger.propagate = False
