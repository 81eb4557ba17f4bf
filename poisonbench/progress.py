"""Progress bars that nest: a long step (crafting, training epochs) shows its own bar
under the bar of the run that started it (``poisonbench run``'s trials), or a bar of its
own when nothing is showing one.

rich allows one live display at a time, so a step never opens a second ``Progress``
while one is live: ``shared(progress)`` makes the run's the one every step adds its
task to.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator

from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

_SHARED: contextvars.ContextVar[Progress | None] = contextvars.ContextVar("poisonbench_progress", default=None)


@contextlib.contextmanager
def shared(progress: Progress) -> Iterator[Progress]:
    """Within this block, ``bar`` adds its tasks to ``progress``."""
    token = _SHARED.set(progress)
    try:
        yield progress
    finally:
        _SHARED.reset(token)


def active() -> bool:
    """Whether a run's progress display is live (a step should show its bar in it)."""
    return _SHARED.get() is not None


@contextlib.contextmanager
def bar(description: str, total: int, **fields: Any) -> Iterator[Callable[..., None]]:
    """``update(advance=1, **fields)`` of a task in the shared display, removed at the end,
    or in a transient display of its own. ``fields`` (e.g. ``loss``) are shown after the
    bar and can change with each update."""
    extra = [TextColumn(f"{name} {{task.fields[{name}]}}") for name in fields]
    progress = _SHARED.get()
    own = progress is None
    if own:
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), *extra,
                            TimeElapsedColumn(), TimeRemainingColumn(), transient=True)
        progress.start()
    task = progress.add_task(description, total=total, **fields)

    def update(advance: int = 1, **values: Any) -> None:
        progress.update(task, advance=advance, **values)

    try:
        yield update
    finally:
        progress.remove_task(task)
        if own:
            progress.stop()
