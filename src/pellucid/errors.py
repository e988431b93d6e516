"""One error family for every user mistake pellucid can detect.

Messages say what was wrong (naming the file, key or parameter) and, where it helps, what to do.
The CLI prints ``error: <message>`` on one line and exits with status 2.
"""

from __future__ import annotations

from pathlib import Path


class PellucidError(Exception):
    """Base class: a mistake in the user's input, configuration or environment. The message is
    kept on one line (a library's multi-line text is joined) and at most 1000 characters."""

    def __init__(self, message: object = "") -> None:
        text = " ".join(str(message).split())
        super().__init__(text if len(text) <= 1000 else text[:997] + "...")


class DataError(PellucidError):
    """An input file or dataset folder that cannot be used as it is."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class ConfigError(PellucidError):
    """A parameter, option or configuration key with a value pellucid cannot use."""


class ModelError(PellucidError):
    """A model that cannot be loaded, built or run on the given input."""
