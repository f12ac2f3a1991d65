"""Time as the worker sees it: monotonic and wall clocks and interruptible waits, swappable."""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    """Where a state machine reads the time and waits (a fake one drives tests in virtual time)."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back, for deadlines."""
        ...

    def time(self) -> float:
        """Seconds since the epoch, for expiries and what status shows."""
        ...

    def wait(self, event: threading.Event, timeout: float) -> bool:
        """Wait until ``event`` is set or ``timeout`` seconds passed; True when it is set."""
        ...


class SystemClock:
    """The real clocks of the machine."""

    def monotonic(self) -> float:
        """``time.monotonic()``."""
        return time.monotonic()

    def time(self) -> float:
        """``time.time()``."""
        return time.time()

    def wait(self, event: threading.Event, timeout: float) -> bool:
        """``event.wait(timeout)``."""
        return event.wait(max(0.0, timeout))
