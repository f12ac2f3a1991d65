"""A clock for unit tests: seconds that move only when the test moves them."""

from __future__ import annotations


class HandClock:
    """Monotonic seconds, read by calling it, that change only when the test sets ``now``."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
