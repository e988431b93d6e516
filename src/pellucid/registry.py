"""One registry mechanism for explainers and metrics: classes registered by a unique name,
looked up by that name written with any case, spaces, hyphens or underscores ("Grad-CAM" finds
"gradcam", "pointing-game" finds "pointing_game"; two names that differ only so are refused), and
built with their options checked against the dataclass fields. Each registry checks the class
attributes its kind declares (a family, a category, the closed vocabulary of what a metric needs or
a method requires) when the class is registered, not when it is first used."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from pellucid.errors import ConfigError

T = TypeVar("T")


def normalise(name: str) -> str:
    """The lookup key of a name: lower case without spaces, hyphens or underscores."""
    return "".join(ch for ch in str(name).strip().lower() if ch not in " -_")


class Registry(Generic[T]):
    """Classes of one kind (``kind`` names it in errors: "method", "metric")."""

    def __init__(self, kind: str, check: Callable[[type], None]) -> None:
        self.kind, self._check = kind, check
        self._classes: dict[str, type[T]] = {}

    def register(self, cls: type[T]) -> type[T]:
        """Class decorator; a duplicate name (after normalising) or a bad declaration is an error."""
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise ValueError(f"{cls.__name__}: name must be lower-case letters, digits and "
                             f"underscores, got {name!r}")
        key = normalise(name)
        if key in self._classes and self._classes[key] is not cls:
            raise ValueError(f"{self.kind} {name!r} registered twice ({self._classes[key].__name__} "
                             f"and {cls.__name__})")
        self._check(cls)
        self._classes[key] = cls
        return cls

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a throw-away class of a test)."""
        self._classes.pop(normalise(name), None)

    def names(self) -> list[str]:
        return sorted(c.name for c in self._classes.values())  # type: ignore[attr-defined]

    def items(self) -> list[tuple[str, type[T]]]:
        return sorted((c.name, c) for c in self._classes.values())  # type: ignore[attr-defined]

    def get(self, name: str) -> type[T]:
        key = normalise(name)
        if key not in self._classes:
            raise ConfigError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}")
        return self._classes[key]

    def create(self, name: str, **options: Any) -> T:
        """An instance of ``name`` with ``options``; unknown option names are errors."""
        cls = self.get(name)
        valid = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
        unknown = sorted(set(options) - valid)
        if unknown:
            raise ConfigError(f"{self.kind} {cls.name!r} has no option {unknown[0]!r}; options: "  # type: ignore[attr-defined]
                              f"{', '.join(sorted(valid)) or 'none'}")
        return cls(**options)
