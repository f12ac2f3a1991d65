"""Progress of long CLI runs: a rich bar with rate and ETA on a terminal, plain lines elsewhere."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from rich.progress import Progress, Task

# Below this many messages a run takes seconds: no progress output at all.
PROGRESS_MIN_MESSAGES = 300
# Plain (non-terminal) output: at most one line per this many seconds, plus the last.
PLAIN_INTERVAL_SECONDS = 2.0

Report = Callable[[int, int], None]


def colour_allowed(stream: TextIO) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set (https://no-color.org)."""
    return stream.isatty() and not os.environ.get("NO_COLOR")


@contextlib.contextmanager
def progress(
    label: str,
    stream: TextIO,
    *,
    minimum: int = PROGRESS_MIN_MESSAGES,
    tty: bool | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[Report]:
    """Yield ``report(done, total)``; shows progress once ``total`` reaches ``minimum``."""
    on_tty = stream.isatty() if tty is None else tty
    reporter = _RichReporter(label, stream) if on_tty else _PlainReporter(label, stream, clock)
    shown = False

    def report(done: int, total: int) -> None:
        nonlocal shown
        if total < minimum and not shown:
            return
        shown = True
        reporter.update(done, total)

    try:
        yield report
    finally:
        reporter.close()


class _PlainReporter:
    """One line now and then: ``label: 400/1200 messages, 180/s, about 4 s left``."""

    def __init__(self, label: str, stream: TextIO, clock: Callable[[], float]) -> None:
        self.label = label
        self.stream = stream
        self.clock = clock
        self.started: float | None = None
        self.last_line: float | None = None

    def update(self, done: int, total: int) -> None:
        now = self.clock()
        if self.started is None:
            self.started = now
        finished = done >= total
        if (
            not finished
            and self.last_line is not None
            and now - self.last_line < PLAIN_INTERVAL_SECONDS
        ):
            return
        self.last_line = now
        elapsed = now - self.started
        rate = done / elapsed if elapsed > 0 else None
        text = f"{self.label}: {done}/{total} messages"
        if rate:
            text += f", {rate:.0f}/s"
            if not finished:
                text += f", about {(total - done) / rate:.0f} s left"
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        """Nothing to tear down for plain lines."""


class _RichReporter:
    """A rich progress bar: count, rate and ETA; started on the first update."""

    def __init__(self, label: str, stream: TextIO) -> None:
        self.label = label
        self.stream = stream
        self.bar: Progress | None = None
        self.task: Any = None

    def update(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = _rich_progress(self.stream)
            self.bar.start()
            self.task = self.bar.add_task(self.label, total=total)
        self.bar.update(self.task, completed=done, total=total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _rich_progress(stream: TextIO) -> Progress:
    # rich is imported only on a terminal, so plain runs and the daemon never pay for it.
    from rich.console import Console  # noqa: PLC0415
    from rich.progress import (  # noqa: PLC0415
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text  # noqa: PLC0415

    class RateColumn(ProgressColumn):
        """Messages per second."""

        def render(self, task: Task) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{speed:.0f} msg/s" if speed else "- msg/s")

    console = Console(file=stream, no_color=not colour_allowed(stream))
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
