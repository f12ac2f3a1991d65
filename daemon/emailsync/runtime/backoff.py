"""Reconnect back-off: exponential from 1 s with full jitter, capped; reset on progress only."""

from __future__ import annotations

import random

BACKOFF_START_SECONDS = 1.0


def full_jitter_backoff(failures: int, cap: float, rng: random.Random) -> float:
    """Exponential back-off with full jitter: uniform in [0, min(cap, 1 s · 2^failures)]."""
    ceiling = min(cap, BACKOFF_START_SECONDS * (2 ** min(failures, 30)))
    return rng.uniform(0, ceiling)


_SHARED_RNG = random.Random()  # noqa: S311 -- jitter, not cryptography


class Backoff:
    """How long to wait before the next attempt after failures in a row (DESIGN.md §2).

    Full jitter spreads many mailboxes apart after a server restart; the ceiling doubles
    per failure up to ``cap_seconds``. Only ``progress()`` (a completed pass, not a
    successful login) starts the sequence again, so a failure right after login cannot
    turn into a reconnect every second.
    """

    def __init__(self, cap_seconds: float, *, rng: random.Random | None = None) -> None:
        self.cap_seconds = cap_seconds
        # The module's shared generator by default: a Random of its own is 2.5 KB per mailbox
        # (issue 10), and jitter needs no independent streams.
        self.rng = rng or _SHARED_RNG
        self.failures = 0

    def next_delay(self, suggested: float | None = None) -> float:
        """Count one more failure and return the seconds to wait before the next attempt.

        A server's suggested back-off (Exchange throttling) wins when it is longer: the
        server knows its own load best.
        """
        self.failures += 1
        delay = full_jitter_backoff(self.failures, self.cap_seconds, self.rng)
        if suggested is not None:
            delay = max(delay, suggested)
        return delay

    def progress(self) -> None:
        """The work went through: the next failure starts again from the shortest delay."""
        self.failures = 0
