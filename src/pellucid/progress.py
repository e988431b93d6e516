"""Progress of long work: a rich bar in a terminal; elsewhere (a log file, CI, a pipe) one plain
line per finished item with the count, the elapsed time and an estimate of the rest (at most one
line a second, and always the last); silent when ``enabled`` is False."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")


def track(items: Iterable[T], description: str, total: int | None = None,
          enabled: bool = True) -> Iterator[T]:
    """Iterate over ``items`` showing a progress bar with count, elapsed and remaining time."""
    if not enabled:
        yield from items
        return
    from rich.console import Console

    count = total if total is not None else len(items)  # type: ignore[arg-type]
    if not Console().is_terminal:
        yield from _lines(items, description, count)
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(description, total=count)
        for item in items:
            yield item
            bar.advance(task)


def _clock(seconds: float) -> str:
    whole = round(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def _lines(items: Iterable[T], description: str, total: int, every: float = 1.0) -> Iterator[T]:
    """``items``, printing "description: i/total done, elapsed H:MM:SS, about H:MM:SS left"."""
    start = last = time.perf_counter()
    for done, item in enumerate(items, start=1):
        yield item
        now = time.perf_counter()
        if now - last >= every or done == total:
            left = (now - start) / done * (total - done) if total else 0.0
            print(f"{description}: {done}/{total} done, elapsed {_clock(now - start)}, about "
                  f"{_clock(left)} left", flush=True)
            last = now


_quiet = threading.local()


@contextmanager
def quiet(enabled: bool = True) -> Iterator[None]:
    """No ``warning:`` lines from this thread inside the block (work on perturbed copies whose
    warnings would describe a model or input the user never gave)."""
    before = getattr(_quiet, "on", False)
    _quiet.on = before or enabled
    try:
        yield
    finally:
        _quiet.on = before


def warn(message: str) -> None:
    """One ``warning:`` line on stderr: something was skipped or repaired and the run goes on."""
    if not getattr(_quiet, "on", False):
        print(f"warning: {message}", file=sys.stderr, flush=True)
