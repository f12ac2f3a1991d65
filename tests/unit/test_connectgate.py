"""The connect gate: turns first come, first served, a stop leaves the queue at once, and the
limit rises while logins stay fast and falls when they slow down or fail for load."""

from __future__ import annotations

import threading
import time

import pytest

from emailsync.runtime.connectgate import (
    BEST_OF_ROUNDS,
    FAST_FACTOR,
    SLOW_FLOOR_SECONDS,
    ConnectGate,
    Turn,
)

from .clocks import HandClock


def run_round(gate: ConnectGate, clock: HandClock, seconds: float, *, overloaded: int = 0) -> None:
    """As many connects as the limit, each taking ``seconds``; ``overloaded`` of them fail so."""
    turns = [gate.enter() for _ in range(gate.limit)]
    assert all(turn.wait(0) for turn in turns)
    clock.now += seconds
    for n, turn in enumerate(turns):
        if n < overloaded:
            gate.done(turn, ok=False, overloaded=True)
        else:
            gate.done(turn, ok=True)


def test_turns_are_granted_in_arrival_order_up_to_the_limit() -> None:
    gate = ConnectGate(2)
    turns = [gate.enter() for _ in range(4)]
    assert [t.wait(0) for t in turns] == [True, True, False, False]
    assert gate.in_flight == 2
    gate.done(turns[1], ok=False)  # a refused password: gives the turn back, says nothing
    assert turns[2].wait(0)
    assert not turns[3].wait(0)
    gate.done(turns[1], ok=False)  # twice changes nothing
    assert gate.in_flight == 2


def test_a_cancelled_turn_leaves_the_queue_and_is_never_granted() -> None:
    gate = ConnectGate(1)
    first, second, third = gate.enter(), gate.enter(), gate.enter()
    gate.cancel(second)
    assert not second.wait(0)
    assert second.cancelled
    gate.done(first, ok=True)
    assert third.wait(0)
    assert not second.granted
    gate.cancel(third)  # granted already: the holder gives it back with done()
    assert third.granted
    assert gate.in_flight == 1


def test_a_waiter_is_woken_by_its_grant_or_its_cancel_without_polling() -> None:
    gate = ConnectGate(1)
    holder = gate.enter()
    waiters = [gate.enter() for _ in range(2)]
    results: list[bool] = []

    def wait(turn: Turn) -> None:
        results.append(turn.wait(30))

    threads = [threading.Thread(target=wait, args=(t,)) for t in waiters]
    for thread in threads:
        thread.start()
    gate.cancel(waiters[1])
    threads[1].join(30)
    gate.done(holder, ok=True)
    threads[0].join(30)
    assert sorted(results) == [False, True]


def test_the_limit_rises_while_logins_stay_fast() -> None:
    clock = HandClock()
    gate = ConnectGate(8, clock=clock)
    run_round(gate, clock, 0.0625)
    assert gate.limit == 10
    run_round(gate, clock, 0.0625 * FAST_FACTOR)  # within the fast band of the best round
    assert gate.limit == 12
    for _ in range(20):
        run_round(gate, clock, 0.0625)
    assert gate.limit == gate.ceiling == 32


def test_the_limit_falls_when_logins_slow_down_and_stops_at_the_floor() -> None:
    clock = HandClock()
    gate = ConnectGate(32, clock=clock)
    run_round(gate, clock, 0.25)
    assert gate.limit == 40
    run_round(gate, clock, 0.625)  # 2.5 times the best round, and beyond the floor of "slow"
    assert gate.limit == 26
    run_round(gate, clock, 0.5)  # between fast and slow: kept
    assert gate.limit == 26
    for _ in range(5):
        run_round(gate, clock, 5.0)
    assert gate.limit == gate.floor == 8
    # A slowness that lasts BEST_OF_ROUNDS rounds is the new normal: the limit rises again.
    for _ in range(BEST_OF_ROUNDS):
        run_round(gate, clock, 5.0)
    assert gate.limit > gate.floor


def test_fast_logins_are_never_slow_below_the_floor_of_slow() -> None:
    """On loopback a login takes milliseconds; a few more are noise, not overload."""
    clock = HandClock()
    gate = ConnectGate(8, clock=clock)
    run_round(gate, clock, 0.001)
    limit = gate.limit
    run_round(gate, clock, SLOW_FLOOR_SECONDS / 2)  # 125 times the best, still fast enough
    assert gate.limit == limit


def test_failures_for_load_lower_the_limit_and_other_failures_do_not() -> None:
    clock = HandClock()
    gate = ConnectGate(16, clock=clock)
    run_round(gate, clock, 0.05, overloaded=1)
    assert gate.limit == 10
    turns = [gate.enter() for _ in range(gate.limit)]
    for turn in turns:
        gate.done(turn, ok=False)  # refused passwords, a closed port: not the server's load
    assert gate.limit == 10


def test_a_round_counts_only_connects_started_after_the_last_change() -> None:
    """Logins begun under the old limit say nothing about the new one."""
    clock = HandClock()
    gate = ConnectGate(4, clock=clock)
    a, b, c, d = (gate.enter() for _ in range(4))
    clock.now += 0.05
    for turn in (a, b, c):
        gate.done(turn, ok=True)
    early = gate.enter()  # granted before the round is judged
    assert early.wait(0)
    clock.now += 0.01
    gate.done(d, ok=True)  # the round's fourth: fast, so 5
    assert gate.limit == 5
    clock.now += 10.0
    gate.done(early, ok=True)  # slow, but begun under the old limit: not counted
    later = [gate.enter() for _ in range(4)]
    clock.now += 10.0
    for turn in later:
        gate.done(turn, ok=True)
    assert gate.limit == 5  # four of the five the round needs
    last = gate.enter()
    clock.now += 10.0
    gate.done(last, ok=True)
    assert gate.limit == 3


def test_connects_in_flight_never_exceed_the_limit_with_many_threads() -> None:
    gate = ConnectGate(4)
    lock = threading.Lock()
    in_flight = [0]
    worst: list[tuple[int, int]] = []

    def connect() -> None:
        turn = gate.enter()
        assert turn.wait(30)
        with lock:
            in_flight[0] += 1
            worst.append((in_flight[0], gate.limit))
        time.sleep(0.002)
        with lock:
            in_flight[0] -= 1
        gate.done(turn, ok=True)

    threads = [threading.Thread(target=connect) for _ in range(60)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(worst) == 60
    assert all(count <= gate.ceiling for count, _ in worst)
    assert max(count for count, _ in worst) <= max(limit for _, limit in worst)
    assert gate.in_flight == 0


def test_a_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ConnectGate(0)
