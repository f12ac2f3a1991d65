"""Time in unit tests: a clock that moves only when the test moves it, and waiting (in real
time) for what other threads do."""

from __future__ import annotations

import time
from collections.abc import Callable


class HandClock:
    """Monotonic seconds, read by calling it, that change only when the test sets ``now``."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def wait_for(condition: Callable[[], object], timeout: float = 10.0) -> None:
    """Poll ``condition`` until it is true; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s")
        time.sleep(0.02)
