"""The served models as folders: each sub-folder of the models folder with a ``card.json`` is one
model, named by its folder. The server lists them without loading anything (it imports no torch);
the workers load them (``pellucid.service.jobs.Models``)."""

from __future__ import annotations

from pathlib import Path


class ModelFolders:
    """The model folders under ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def names(self) -> list[str]:
        return sorted(p.parent.name for p in self.folder.glob("*/card.json"))
