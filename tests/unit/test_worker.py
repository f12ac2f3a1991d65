"""The mailbox worker's state machine against a scripted server, in virtual time.

Each test states one rule of worker.py's docstring: how often it may log in, what a trigger
does in each state, what a failure after login costs, when it reconnects for a token.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from emailsync.errors import ConnectionLostError
from emailsync.runtime.clock import SystemClock
from emailsync.runtime.connectgate import connect_gate
from emailsync.runtime.report import State
from emailsync.runtime.wakeup import Trigger
from emailsync.runtime.worker import (
    TOKEN_RECONNECT_FLOOR_SECONDS,
    token_reconnect_delay,
)

from .fakeserver import ADDRESS, Rig, quiet_logs, rig


@pytest.fixture(autouse=True)
def _quiet_logs() -> Iterator[None]:
    yield from quiet_logs()


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


# -- defect 1: Start Sync never turns a refused login into a login storm -----------------------


def test_a_start_sync_burst_in_needs_reauth_causes_one_login_after_the_backoff_slot(
    tmp_path: Path,
) -> None:
    """A refused login waits reauth_retry_seconds; a burst of Start Syncs brings one login
    forward, no sooner than the back-off slot drawn after the refusal; the rest change
    nothing, even after that login is refused again."""
    r = rig(tmp_path, reauth_retry_seconds=1800, max_backoff_seconds=8)
    r.server.outcomes.extend(["refused"] * 50)
    for i in range(10):
        r.clock.at(5 + i * 0.1, lambda: r.worker.request_pass("start_sync"))
    for i in range(5):  # and again right after that one login was refused
        r.clock.at(20 + i, lambda: r.worker.request_pass(Trigger.START_SYNC))
    r.run_until(120)

    logins = [login.at for login in r.server.logins]
    assert len(logins) == 2, logins
    slot_after_first = r.delays[0][1]
    assert logins[1] >= logins[0] + slot_after_first - 1e-9
    assert logins[1] >= 5  # not before the first Start Sync
    assert r.auth_failures() == 2
    assert r.worker.state is State.STOPPED


def test_the_slow_reauth_retry_fires_and_restores_the_start_sync_shortcut(tmp_path: Path) -> None:
    """needs_reauth retries by itself every reauth_retry_seconds; after a slow retry a Start
    Sync may bring one login forward again."""
    r = rig(tmp_path, reauth_retry_seconds=100, max_backoff_seconds=4)
    r.server.outcomes.extend(["refused"] * 50)
    r.clock.at(10, lambda: r.worker.request_pass("start_sync"))  # used: login at ~10
    r.clock.at(30, lambda: r.worker.request_pass("start_sync"))  # waits for the slow retry
    r.clock.at(150, lambda: r.worker.request_pass("start_sync"))  # after it: brought forward
    r.run_until(200)

    logins = [round(login.at) for login in r.server.logins]
    assert logins == [0, 10, 110, 150], logins


def test_start_sync_during_backoff_waits_for_the_servers_hint(tmp_path: Path) -> None:
    """A throttled login's suggested back-off is never cut short, Start Sync or not; the
    Start Sync is served by the first pass after the next login."""
    r = rig(tmp_path, trigger="manual", max_backoff_seconds=8)
    r.server.outcomes.extend([("throttled", 120.0)])
    r.server.deliver()
    for i in range(5):
        r.clock.at(5 + i, lambda: r.worker.request_pass("start_sync"))
    r.run_until(300)

    logins = [login.at for login in r.server.logins]
    assert len(logins) == 2
    assert logins[1] - logins[0] >= 120
    assert r.passes_total("start_sync") == 1  # owed, then served once
    assert r.server.queue == []


def test_a_start_sync_consumed_while_disconnected_is_served_after_login(tmp_path: Path) -> None:
    """A manual mailbox files only on Start Sync: one that came during needs_reauth still
    files once the login works, labelled start_sync, and only once."""
    r = rig(tmp_path, trigger="manual", reauth_retry_seconds=60, max_backoff_seconds=4)
    r.server.outcomes.extend(["refused", "refused"])
    r.server.deliver()
    r.clock.at(1, lambda: r.worker.request_pass("start_sync"))
    r.run_until(200)

    assert [login.outcome for login in r.server.logins] == ["refused", "refused", "ok"]
    assert r.server.queue == []
    assert r.passes_total("start_sync") == 1
    assert r.passes_total("startup") == 0


# -- defect 2: back-off resets on progress, not on login ----------------------------------------


def test_backoff_grows_when_every_pass_fails_after_login(tmp_path: Path) -> None:
    """A failure after login (a SEARCH of Queue that gets BYE, every time) backs off
    exponentially: the login alone does not count as progress. (Not a FETCH: a message whose
    FETCH fails every time is quarantined after stuck_after_attempts, and passes go on.)"""
    r = rig(tmp_path, max_backoff_seconds=300, seed=3)
    r.server.deliver()
    r.server.failing["search"] = ConnectionLostError("search: BYE internal error", kind="bye")
    r.run_until(600)

    assert r.server.successful_logins()[0] == pytest.approx(0.01)
    assert r.passes == [(s, None) for s, _ in r.passes]  # no pass ever completed
    assert len(r.server.logins) <= 12, len(r.server.logins)  # 0-2 s each would be > 300
    assert r.worker._backoff.failures == len(r.server.logins)  # never reset


def test_backoff_resets_after_a_completed_pass(tmp_path: Path) -> None:
    """Once a pass completes, the next loss starts again from the shortest delay."""
    r = rig(tmp_path, max_backoff_seconds=300)
    r.server.deliver()  # a real startup pass (an empty Queue's is skipped, see below)
    r.server.outcomes.extend(["lost"] * 6)
    r.clock.at(1000, r.server.drop)
    r.run_until(1010)

    assert [login.outcome for login in r.server.logins] == ["lost"] * 6 + ["ok", "ok"]
    assert r.passes[-1][1] is not None
    assert r.worker._backoff.failures <= 1
    assert r.delays[-1][1] <= 2.0  # the drop at 1000 s: first failure after progress


def test_a_store_outage_keeps_the_session_and_retries_the_pass(tmp_path: Path) -> None:
    """Store down: the message stays in Queue, the IMAP session stays logged in, the pass is
    retried with back-off, and the message is filed once the store is back."""
    r = rig(tmp_path, max_backoff_seconds=8)
    r.server.deliver()
    r.store.down = True
    r.clock.at(30, lambda: setattr(r.store, "down", False))
    states: list[State] = []
    set_state = r.worker.report.set_state

    def record(state: State, *, error: str | None = None) -> None:
        states.append(state)
        set_state(state, error=error)

    r.worker.report.set_state = record  # type: ignore[method-assign]
    r.run_until(60)

    assert len(r.server.logins) == 1
    assert r.server.queue == []
    assert r.store.lookups >= 3  # tried during the outage, with back-off in between
    assert State.BACKOFF in states
    assert not r.server.sessions[0].closed or r.server.sessions[0].logged_out
    assert r.worker.snapshot().last_error is not None


def test_a_lost_lease_parks_the_worker_until_stop(tmp_path: Path) -> None:
    """LeaseLostError is a StoreUnavailableError, but retrying cannot help: the worker drops
    the connection (no LOGOUT), moves nothing, reports stopped and waits for stop() without
    logging in again or asking the store again, whatever triggers come."""
    r = rig(tmp_path, max_backoff_seconds=8)
    r.server.deliver()
    r.store.lease_lost = True
    r.clock.at(20, r.server.deliver)
    r.clock.at(30, lambda: r.worker.request_pass("start_sync"))
    r.clock.at(40, lambda: r.worker.request_pass("sweep"))
    r.run_until(600)

    assert r.clock.now == 600  # parked until the stop, not ended early
    assert len(r.server.logins) == 1
    assert r.store.lookups == 1  # the pass asked the store once: the positive signal
    assert r.server.queue == [1, 2]
    assert r.server.filed == []
    session = r.server.sessions[0]
    assert session.closed
    assert not session.logged_out
    assert r.delays == []  # no back-off was drawn: not the store-outage retry
    status = r.worker.snapshot()
    assert status.state == "stopped"
    assert "lease" in (status.last_error or "")


def test_access_token_expired_bye_reconnects_at_once_only_once_in_a_row(tmp_path: Path) -> None:
    """Exchange's AccessTokenExpired BYE: the first reconnect is immediate, the next ones
    within TOKEN_RECONNECT_FLOOR_SECONDS back off like any other loss."""
    r = rig(tmp_path, max_backoff_seconds=16, seed=5)

    def expire_soon(session: object) -> None:
        r.clock.at(
            r.clock.now + 1, lambda: r.server.drop("BYE Session invalidated - AccessTokenExpired")
        )

    r.server.on_login = expire_soon
    r.run_until(120)

    logins = [login.at for login in r.server.logins]
    drawn = [at for at, _ in r.delays]
    # An immediate reconnect is one with no back-off drawn since the login before it.
    immediate = [b for a, b in itertools.pairwise(logins) if not any(a < t < b for t in drawn)]
    assert immediate, "the first AccessTokenExpired reconnects at once"
    assert immediate[0] == pytest.approx(logins[0] + 1 + 0.01)
    assert all(b - a >= TOKEN_RECONNECT_FLOOR_SECONDS for a, b in itertools.pairwise(immediate))
    assert len(immediate) <= 120 / TOKEN_RECONNECT_FLOOR_SECONDS + 1


# -- defect 9: short-lived access tokens ---------------------------------------------------------


@pytest.mark.parametrize(
    ("left", "since", "expected"),
    [
        (3600.0, None, 3360.0),  # 4 min ahead of a 1 h token
        (600.0, None, 540.0),  # 10 % of a 10 min token
        (60.0, None, 54.0),
        (60.0, 10.0, 54.0),
        (10.0, 5.0, 25.0),  # the floor: 30 s after the previous token reconnect
        (-5.0, None, 0.0),  # already expired: once at once…
        (-5.0, 0.0, 30.0),  # …then not again within the floor
    ],
)
def test_token_reconnect_delay(left: float, since: float | None, expected: float) -> None:
    assert token_reconnect_delay(left, since) == pytest.approx(expected)


def test_a_token_shorter_than_four_minutes_never_causes_a_reconnect_loop(tmp_path: Path) -> None:
    """Tokens that live 60 s: reconnect about every 54 s, never in a loop."""
    r = rig(tmp_path, token_seconds=60)
    r.run_until(600)

    logins = r.server.successful_logins()
    assert 9 <= len(logins) <= 12, logins
    assert all(gap >= 50 for gap in gaps(logins)), gaps(logins)
    assert all(s.logged_out for s in r.server.sessions[:-1])  # LOGOUT before each new login


def test_an_expired_token_reconnects_no_more_than_once_per_floor(tmp_path: Path) -> None:
    """A token that is already expired when the login is done (a clock skew, a bad IdP):
    one reconnect at once, then one per TOKEN_RECONNECT_FLOOR_SECONDS at most."""
    r = rig(tmp_path, token_seconds=-10)
    r.run_until(300)

    logins = r.server.successful_logins()
    assert len(logins) <= 300 / TOKEN_RECONNECT_FLOOR_SECONDS + 2, logins
    later = gaps(logins)[1:]
    assert all(gap >= TOKEN_RECONNECT_FLOOR_SECONDS - 1e-6 for gap in later), later


# -- defect 6 and stop ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scenario", "n"),
    [
        ("needs_reauth", 1),
        ("needs_reauth", 2),
        ("needs_reauth", 3),
        ("idle", 1),
        ("idle", 2),
        ("poll", 1),
        ("poll", 2),
        ("backoff", 1),
        ("backoff", 2),
    ],
)
def test_a_stop_between_consume_and_wait_ends_the_worker_at_once(
    tmp_path: Path, scenario: str, n: int
) -> None:
    """Lost wake-up (issue 7, defect 6): a stop() that lands right after the worker took
    its pending triggers, before it waits, must still end the wait at once. The worker runs
    in its own thread with the real clock; every wait here would otherwise last 60 s or more.
    """
    r = rig(
        tmp_path,
        worker_clock=SystemClock(),
        has_idle=scenario != "poll",
        reauth_retry_seconds=60,
        poll_seconds=60,
        max_backoff_seconds=60,
        seed=2,
    )
    if scenario == "needs_reauth":
        r.server.outcomes.extend(["refused"] * 10)
    if scenario == "backoff":
        r.server.outcomes.extend([("throttled", 60.0)] * 10)
    wakeup = r.worker._wakeup
    consume = wakeup.consume
    calls = 0

    def consume_then_stop() -> frozenset[Trigger]:
        nonlocal calls
        taken = consume()
        calls += 1
        if calls == n:
            wakeup.stop()  # as if another thread's stop() came in this instant
        return taken

    wakeup.consume = consume_then_stop  # type: ignore[method-assign]
    started = time.monotonic()
    r.worker.start()
    r.worker.join(5)
    assert not r.worker.is_alive()
    assert time.monotonic() - started < 1.0
    assert calls >= n  # the stop really was injected
    assert r.worker.state is State.STOPPED


def test_stop_ends_a_worker_thread_in_idle_quickly(tmp_path: Path) -> None:
    """A real thread with the real clock in IDLE: stop() ends it and LOGOUT is sent."""
    r: Rig = rig(tmp_path, worker_clock=SystemClock())
    r.worker.start()
    deadline = time.monotonic() + 5
    while r.worker.state is not State.IDLE and time.monotonic() < deadline:
        time.sleep(0.01)
    assert r.worker.state is State.IDLE
    r.worker.stop()
    r.worker.join(2)
    assert not r.worker.is_alive()
    assert r.server.sessions[-1].logged_out
    assert r.worker.snapshot().state == "stopped"


def test_a_worker_waiting_for_its_turn_to_connect_leaves_the_queue_on_stop(
    tmp_path: Path,
) -> None:
    """A stopped worker that waits for a connect turn (all taken) ends at once, never logs in,
    and takes no turn when they are given back (issue 23: no polling for the stop)."""
    r = rig(tmp_path, worker_clock=SystemClock(), connect_concurrency=1)
    gate = connect_gate(1)
    held = []
    while (turn := gate.enter()).wait(0):  # take every turn the gate has
        held.append(turn)
    gate.cancel(turn)
    r.worker.start()
    deadline = time.monotonic() + 5
    while r.worker._turn is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert r.worker._turn is not None  # waiting in the gate
    r.worker.stop()
    r.worker.join(2)
    assert not r.worker.is_alive()
    for turn in held:
        gate.done(turn, ok=False)
    assert gate.in_flight == 0
    assert r.server.logins == []
    assert r.worker.snapshot().state == "stopped"


def test_request_pass_accepts_the_enum_and_its_label(tmp_path: Path) -> None:
    r = rig(tmp_path)
    r.clock.at(5, lambda: r.worker.request_pass("sweep"))
    r.clock.at(6, lambda: r.worker.request_pass(Trigger.SWEEP))
    r.run_until(10)
    assert r.passes_total("sweep") == 2
    assert r.passes_total("startup") == 1
    with pytest.raises(ValueError, match="bogus"):
        r.worker.request_pass("bogus")


def test_mail_announced_in_idle_is_filed_and_labelled_idle(tmp_path: Path) -> None:
    r = rig(tmp_path)
    r.clock.at(5, r.server.deliver)
    r.run_until(10)
    assert r.server.filed == [1]
    assert r.passes_total("idle") == 1
    assert r.worker.snapshot().address == ADDRESS


# -- issue 10: the startup pass of an empty Queue costs no command -----------------------------


def test_an_empty_queue_goes_from_select_to_idle_and_still_files_what_lands(
    tmp_path: Path,
) -> None:
    """EXISTS 0 on the login's SELECT: no pass, no re-SELECT, no SEARCH before IDLE; the
    startup pass counts as done (an empty one), and mail that lands later is filed."""
    r = rig(tmp_path)
    r.clock.at(5, r.server.deliver)
    r.run_until(10)

    session = r.server.sessions[0]
    assert session.commands[:3] == ["ensure_folders", "select", "idle"]
    assert r.passes_total("startup") == 1
    assert r.passes_total("idle") == 1  # the message at 5 s: the worker was watching
    assert len(r.passes) == 1  # only that one ran the filer
    assert r.server.queue == []


# -- issue 23: a sweep of an empty Queue is one SELECT ------------------------------------------


def test_a_sweep_of_an_empty_queue_is_one_select_and_counts_as_a_sweep_pass(
    tmp_path: Path,
) -> None:
    """At rest every mailbox gets a sweep every sweep_seconds: on an empty Queue the SELECT
    that says EXISTS 0 is all it asks (no pass, no SEARCH), and it counts as a sweep pass."""
    r = rig(tmp_path)
    r.clock.at(5, lambda: r.worker.request_pass("sweep"))
    r.run_until(10)
    session = r.server.sessions[0]
    after_first_idle = session.commands[session.commands.index("idle") + 1 :]
    assert "search" not in after_first_idle, session.commands
    assert after_first_idle.count("select") == 1, session.commands
    assert r.passes_total("sweep") == 1
    assert r.passes == []  # the filer never ran


def test_a_sweep_finds_what_idle_did_not_announce(tmp_path: Path) -> None:
    """Mail the server never announced (it landed unseen) is there on the sweep's SELECT: the
    sweep then runs a real pass and files it."""
    r = rig(tmp_path)
    r.clock.at(4, lambda: r.server.queue.append(1))  # in Queue, no EXISTS sent
    r.clock.at(5, lambda: r.worker.request_pass("sweep"))
    r.run_until(10)
    assert r.server.filed == [1]
    assert r.passes_total("sweep") == 1


def test_a_manual_mailbox_skips_too_and_counts_no_startup_pass(tmp_path: Path) -> None:
    r = rig(tmp_path, trigger="manual")
    r.run_until(10)
    assert r.server.sessions[0].commands[:3] == ["ensure_folders", "select", "idle"]
    assert r.passes_total("startup") == 0
    assert r.worker.snapshot().queue == 0


def test_a_start_sync_owed_at_login_runs_a_real_pass_on_an_empty_queue(tmp_path: Path) -> None:
    """A Start Sync is answered by a completed pass, never by the skip."""
    r = rig(tmp_path)
    r.worker.request_pass("start_sync")  # before the login: owed to its first pass
    r.run_until(10)
    assert "search" in r.server.sessions[0].commands[:4]
    assert len(r.passes) == 1
    assert r.passes[0][1] is not None
    assert r.passes_total("start_sync") == 1
    assert r.passes_total("startup") == 0


def test_a_requested_release_runs_a_real_pass_on_an_empty_queue(tmp_path: Path) -> None:
    r = rig(tmp_path)
    r.worker.release_stuck()
    r.run_until(10)
    assert len(r.passes) == 1
    assert not r.worker.filer.release_requested
