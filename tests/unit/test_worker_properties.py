"""Properties of the worker's state machine for any mix of triggers, failures and stops.

Hypothesis draws a script — what the next logins do (refused, connection refused,
throttled with a hint), what happens at which virtual second (Start Sync, sweep, new mail,
a dropped connection with or without a retry hint, Exchange's AccessTokenExpired BYE, the
store going down and up) and when stop() comes — and runs the worker against the fake
server of ``fakeserver.py`` in virtual time. For every script:

- no login happens before the back-off last drawn has passed (one login per back-off slot,
  whatever the Start Syncs say);
- once the failures are over, every trigger is served by a pass that started after it,
  and every message that landed is filed;
- stop() ends the worker at once (in virtual time), and no login follows it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from .fakeserver import LOGIN_SECONDS, Rig, quiet_logs, rig

EVENTS = (
    "start_sync",
    "sweep",
    "mail",
    "drop",
    "drop_with_hint",
    "bye_token_expired",
    "store_down",
    "store_up",
)
FAULTS_END_SECONDS = 200.0  # every scripted event happens before this
HEALTHY_BY_SECONDS = 1000.0  # by then the longest scripted trouble is over
RUN_SECONDS = 1200.0
STATE_DIR = Path(tempfile.gettempdir()) / "emailsync-worker-properties"

login_outcomes = st.lists(
    st.sampled_from(["ok", "refused", "lost", ("throttled", 30.0)]), max_size=6
)
timed_events = st.lists(
    st.tuples(st.floats(0, FAULTS_END_SECONDS, allow_nan=False), st.sampled_from(EVENTS)),
    max_size=25,
)


@pytest.fixture(autouse=True)
def _quiet_logs() -> Iterator[None]:
    yield from quiet_logs()


def script(r: Rig, outcomes: list[object], events: list[tuple[float, str]]) -> list[float]:
    """Schedule the events; returns when each trigger was posted."""
    r.server.outcomes.extend(outcomes)  # type: ignore[arg-type]
    posted: list[float] = []
    actions = {
        "start_sync": lambda: r.worker.request_pass("start_sync"),
        "sweep": lambda: r.worker.request_pass("sweep"),
        "mail": r.server.deliver,
        "drop": r.server.drop,
        "drop_with_hint": lambda: r.server.drop(
            "BYE Request is throttled. Suggested Backoff Time: 40000 milliseconds", 40.0
        ),
        "bye_token_expired": lambda: r.server.drop("BYE Session invalidated - AccessTokenExpired"),
        "store_down": lambda: setattr(r.store, "down", True),
        "store_up": lambda: setattr(r.store, "down", False),
    }
    for when, name in events:
        r.clock.at(when, actions[name])
        if name in ("start_sync", "sweep"):
            posted.append(when)
    r.clock.at(FAULTS_END_SECONDS + 1, lambda: setattr(r.store, "down", False))
    return posted


def assert_one_login_per_backoff_slot(r: Rig) -> None:
    for login in r.server.logins:
        started = login.at - LOGIN_SECONDS
        drawn = [(at, delay) for at, delay in r.delays if at <= started]
        if drawn:
            at, delay = drawn[-1]
            assert started >= at + delay - 1e-6, (login, drawn[-1])


@settings(max_examples=200, deadline=None)
@given(outcomes=login_outcomes, events=timed_events, has_idle=st.booleans(), seed=st.integers(0, 9))
def test_every_trigger_is_served_within_the_backoff_budget(
    outcomes: list[object], events: list[tuple[float, str]], has_idle: bool, seed: int
) -> None:
    r = rig(
        STATE_DIR,
        has_idle=has_idle,
        seed=seed,
        reauth_retry_seconds=100,
        max_backoff_seconds=16,
        poll_seconds=30,
    )
    posted = script(r, outcomes, events)
    r.run_until(RUN_SECONDS)

    assert_one_login_per_backoff_slot(r)
    # A pass of the filer, or one counted without it (a sweep of an empty Queue: issue 23).
    completed = sorted([started for started, done in r.passes if done is not None] + r.counted)
    for when in posted:
        served_by = [started for started in completed if started >= when]
        assert served_by, (when, r.passes[-3:])
        assert served_by[0] < HEALTHY_BY_SECONDS  # soon, not by luck at the end
    assert r.server.queue == []  # every message that landed was filed
    assert r.worker.snapshot().state == "stopped"


@settings(max_examples=150, deadline=None)
@given(
    outcomes=login_outcomes,
    events=timed_events,
    has_idle=st.booleans(),
    trigger=st.sampled_from(["auto", "manual"]),
    stop_at=st.floats(0, FAULTS_END_SECONDS + 50, allow_nan=False),
)
def test_stop_ends_the_worker_at_once_in_any_state(
    outcomes: list[object],
    events: list[tuple[float, str]],
    has_idle: bool,
    trigger: str,
    stop_at: float,
) -> None:
    r = rig(
        STATE_DIR,
        trigger=trigger,
        has_idle=has_idle,
        reauth_retry_seconds=100,
        max_backoff_seconds=16,
        poll_seconds=30,
    )
    script(r, outcomes, events)
    r.run_until(stop_at)

    # Only a login already under way may finish after the stop; nothing waits on.
    assert r.clock.now <= stop_at + LOGIN_SECONDS + 1e-6
    assert all(login.at <= stop_at + LOGIN_SECONDS + 1e-6 for login in r.server.logins)
    assert_one_login_per_backoff_slot(r)
    assert all(s.closed for s in r.server.sessions)
    assert r.worker.snapshot().state == "stopped"
    if trigger == "manual":
        assert r.passes_total("idle") == r.passes_total("sweep") == 0
