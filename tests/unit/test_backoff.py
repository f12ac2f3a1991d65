"""Reconnect back-off: exponential from 1 s, full jitter, capped (DESIGN.md §2)."""

from __future__ import annotations

import random

from emailsync.runtime.backoff import Backoff, full_jitter_backoff


def test_delays_stay_within_the_exponential_ceiling() -> None:
    rng = random.Random(7)
    for failures in range(1, 12):
        ceiling = min(300.0, 2.0**failures)
        delays = [full_jitter_backoff(failures, 300.0, rng) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8  # full jitter spreads over the whole range


def test_the_cap_holds_after_very_many_failures() -> None:
    rng = random.Random(3)
    assert all(full_jitter_backoff(10_000, 300.0, rng) <= 300.0 for _ in range(100))


def test_jitter_spreads_many_mailboxes_apart() -> None:
    rng = random.Random(11)
    delays = {round(full_jitter_backoff(5, 300.0, rng), 3) for _ in range(100)}
    assert len(delays) > 90  # a server restart does not bring every mailbox back at once


def test_backoff_grows_per_failure_and_resets_only_on_progress() -> None:
    backoff = Backoff(300.0, rng=random.Random(5))
    ceilings = []
    for failures in range(1, 10):
        delay = backoff.next_delay()
        ceilings.append(min(300.0, 2.0**failures))
        assert 0 <= delay <= ceilings[-1]
    assert backoff.failures == 9
    backoff.progress()
    assert backoff.failures == 0
    assert backoff.next_delay() <= 2.0


def test_a_servers_suggested_backoff_wins_when_longer() -> None:
    backoff = Backoff(300.0, rng=random.Random(1))
    assert backoff.next_delay(suggested=299.961) >= 299.961
    assert backoff.next_delay(suggested=0.001) <= 4.0  # a shorter hint does not shorten it
