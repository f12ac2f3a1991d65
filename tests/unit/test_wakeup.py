"""Wakeup: triggers and stop from other threads, consumed at once, never lost."""

from __future__ import annotations

import os
import select
import threading
import time

from emailsync.runtime.wakeup import Trigger, Wakeup
from emailsync.telemetry.metrics import TRIGGERS


def readable(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def test_consume_returns_each_pending_trigger_once_and_clears_event_and_pipe() -> None:
    wakeup = Wakeup()
    wakeup.post(Trigger.SWEEP)
    wakeup.post(Trigger.START_SYNC)
    wakeup.post(Trigger.START_SYNC)
    assert readable(wakeup.fileno())
    assert wakeup.wait(0)
    assert wakeup.consume() == {Trigger.SWEEP, Trigger.START_SYNC}
    assert wakeup.consume() == frozenset()
    assert not readable(wakeup.fileno())
    assert not wakeup.wait(0)
    wakeup.close()


def test_a_post_between_consume_and_wait_ends_the_wait_at_once() -> None:
    wakeup = Wakeup()
    assert wakeup.consume() == frozenset()
    wakeup.post(Trigger.POLL)  # lands after the consume, before the wait
    started = time.monotonic()
    assert wakeup.wait(10)
    assert time.monotonic() - started < 1
    wakeup.close()


def test_stop_is_sticky_across_consume() -> None:
    """Lost wake-up (issue 7, defect 6): a stop() that lands just before the worker's
    consume() must still end its next wait at once, on the event and on the pipe."""
    wakeup = Wakeup()
    wakeup.post(Trigger.SWEEP)
    wakeup.stop()
    assert wakeup.consume() == {Trigger.SWEEP}
    started = time.monotonic()
    assert wakeup.wait(10)
    assert time.monotonic() - started < 1
    assert readable(wakeup.fileno())
    assert wakeup.stopping
    wakeup.close()


def test_a_post_from_another_thread_wakes_a_waiter() -> None:
    wakeup = Wakeup()
    threading.Timer(0.05, wakeup.post, args=(Trigger.START_SYNC,)).start()
    started = time.monotonic()
    assert wakeup.wait(5)
    assert time.monotonic() - started < 2
    assert wakeup.consume() == {Trigger.START_SYNC}
    wakeup.close()


def test_posting_after_close_is_harmless() -> None:
    wakeup = Wakeup()
    wakeup.close()
    wakeup.post(Trigger.SWEEP)
    wakeup.stop()
    wakeup.close()
    assert wakeup.consume() == {Trigger.SWEEP}


def test_trigger_values_are_the_metric_labels() -> None:
    """Every trigger of a Queue pass is a sync_passes label; REFILE asks for no Queue pass."""
    passes = {t.value for t in Trigger if t is not Trigger.REFILE}
    assert passes == set(TRIGGERS) == {"idle", "start_sync", "poll", "sweep", "startup"}
    assert Trigger("start_sync") is Trigger.START_SYNC
    assert Trigger("refile") is Trigger.REFILE


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_wakeup_holds_one_descriptor_and_gives_it_back() -> None:
    # Three a mailbox (socket, pipe's two ends) was a third of the open-files limit's reach.
    before = open_descriptors()
    wakeups = [Wakeup() for _ in range(10)]
    assert open_descriptors() - before == 10
    for wakeup in wakeups:
        wakeup.post(Trigger.SWEEP)
        wakeup.post(Trigger.SWEEP)  # a second signal before the read: one read clears both
        assert readable(wakeup.fileno())
        assert wakeup.consume() == {Trigger.SWEEP}
        assert not readable(wakeup.fileno())
        wakeup.close()
    assert open_descriptors() == before
