"""When a message landed in Queue, estimated from SAVEDATE's whole seconds and first sight."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from emailsync.filing.decision import landed_at

T0 = datetime(2026, 11, 27, 7, 0, 0, tzinfo=UTC)


def test_without_savedate_the_first_sighting_is_used() -> None:
    assert landed_at(None, T0) == T0


def test_a_late_sighting_gives_the_middle_of_the_savedate_second() -> None:
    assert landed_at(T0, T0 + timedelta(seconds=3)) == T0 + timedelta(milliseconds=500)


def test_an_early_sighting_narrows_the_second() -> None:
    assert landed_at(T0, T0 + timedelta(milliseconds=400)) == T0 + timedelta(milliseconds=200)


def test_a_sighting_before_savedate_means_clock_skew_and_our_clock_wins() -> None:
    seen = T0 - timedelta(seconds=2)
    assert landed_at(T0, seen) == seen
