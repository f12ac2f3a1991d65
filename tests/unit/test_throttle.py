"""LoginThrottle: refused logins per mailbox and per client in a sliding window."""

from __future__ import annotations

import threading

import pytest

from emailsync.errors import TooManyLoginsError
from emailsync.runtime.throttle import LoginThrottle

from .clocks import HandClock

MAILBOX = "agent@example.com"


@pytest.fixture
def clock() -> HandClock:
    return HandClock()


def test_the_sixth_refused_login_of_a_mailbox_in_the_window_is_throttled_until_the_first_leaves(
    clock: HandClock,
) -> None:
    throttle = LoginThrottle(clock=clock)
    for _ in range(5):
        throttle.attempt(MAILBOX, "192.0.2.1")  # refused: kept
        clock.now += 60
    with pytest.raises(TooManyLoginsError, match="5 refused logins in 15 minutes") as raised:
        throttle.attempt(MAILBOX, "192.0.2.2")  # another client, the same mailbox
    assert raised.value.retry_after == 900 - 300
    clock.now += 900 - 300
    throttle.attempt(MAILBOX, "192.0.2.2")  # the first has left the window


def test_a_client_is_throttled_over_all_mailboxes(clock: HandClock) -> None:
    throttle = LoginThrottle(clock=clock)
    for n in range(20):
        throttle.attempt(f"agent{n % 4}@example.com", "192.0.2.1")
    with pytest.raises(TooManyLoginsError, match="from this address") as raised:
        throttle.attempt("fresh@example.com", "192.0.2.1")
    assert raised.value.retry_after == 900
    throttle.attempt("fresh@example.com", "192.0.2.9")  # another client is not


def test_a_success_or_a_login_never_sent_gives_its_place_back_and_a_success_clears_the_mailbox(
    clock: HandClock,
) -> None:
    throttle = LoginThrottle(clock=clock)
    for _ in range(4):
        throttle.attempt(MAILBOX, "192.0.2.1")
    throttle.attempt(MAILBOX, "192.0.2.1").not_tried()  # connection refused: no LOGIN
    throttle.attempt(MAILBOX, "192.0.2.1").succeeded()  # the 5th place, given back
    for _ in range(5):  # and the four refused before count no more
        throttle.attempt(MAILBOX, "192.0.2.1")
    with pytest.raises(TooManyLoginsError):
        throttle.attempt(MAILBOX, "192.0.2.1")


def test_a_workers_refused_logins_share_the_mailboxs_budget_and_its_successes_clear_nothing(
    clock: HandClock,
) -> None:
    throttle = LoginThrottle(clock=clock)
    throttle.refused(MAILBOX)
    throttle.refused(MAILBOX)
    assert throttle.exhausted(MAILBOX) is None
    for _ in range(3):
        throttle.attempt(MAILBOX, None)
    exhausted = throttle.exhausted(MAILBOX)
    assert exhausted is not None
    assert exhausted.retry_after == 900
    with pytest.raises(TooManyLoginsError):
        throttle.attempt(MAILBOX, None)


def test_parallel_attempts_cannot_all_slip_through(clock: HandClock) -> None:
    throttle = LoginThrottle(clock=clock)
    start = threading.Barrier(20)
    taken: list[bool] = []

    def one() -> None:
        start.wait()
        try:
            throttle.attempt(MAILBOX, None)
            taken.append(True)
        except TooManyLoginsError:
            taken.append(False)

    threads = [threading.Thread(target=one) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(taken) == [False] * 15 + [True] * 5
