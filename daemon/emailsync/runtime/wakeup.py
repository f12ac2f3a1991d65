"""What wakes a mailbox worker: pass triggers and stop, on one event and one descriptor.

Other threads ``post()`` a trigger or ``stop()``; the worker ``consume()``s them. Posting and
consuming happen under one lock, and the event and descriptor are cleared only by ``consume()``
together with the pending set, so a wake-up can never be lost between "is there anything?"
and "then wait". Stop is sticky: once asked, every wait returns at once.
"""

from __future__ import annotations

import contextlib
import enum
import os
import sys
import threading

from emailsync.runtime.clock import Clock, SystemClock


class Trigger(enum.Enum):
    """Why a sync pass runs; the value is the ``sync_passes_total`` trigger label.

    REFILE is no Queue pass: it asks for a re-file pass over Failed (emailsync.filing.refile)
    and is never counted as a sync pass.
    """

    IDLE = "idle"
    START_SYNC = "start_sync"
    POLL = "poll"
    SWEEP = "sweep"
    STARTUP = "startup"
    REFILE = "refile"


class Wakeup:
    """Pending triggers plus the event and descriptor that wake the worker when one is posted."""

    def __init__(self, clock: Clock | None = None) -> None:
        self._clock = clock or SystemClock()
        self._lock = threading.Lock()
        self._pending: set[Trigger] = set()
        self._event = threading.Event()
        self._stopping = False
        self._closed = False
        # The descriptor lets the worker poll() the IMAP socket and wake-ups together in IDLE:
        # an eventfd(2) where there is one (one descriptor a mailbox), else a pipe (two).
        self._read_fd, self._write_fd = _wake_descriptors()

    @property
    def stopping(self) -> bool:
        """True once ``stop()`` was called."""
        return self._stopping

    def post(self, trigger: Trigger) -> None:
        """Ask for a pass; returns at once. Repeats before the next ``consume()`` merge."""
        with self._lock:
            self._pending.add(trigger)
            self._signal()

    def stop(self) -> None:
        """Ask the worker to end; every wait from now on returns at once."""
        with self._lock:
            self._stopping = True
            self._signal()

    def consume(self) -> frozenset[Trigger]:
        """Take and clear the pending triggers, and with them the wake-up signal, atomically."""
        with self._lock:
            taken = frozenset(self._pending)
            self._pending.clear()
            if not self._stopping:
                self._event.clear()
                self._drain()
            return taken

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a trigger or stop; True when one is pending.

        Anything posted since the last ``consume()`` makes this return at once.
        """
        return self._clock.wait(self._event, timeout)

    def fileno(self) -> int:
        """The eventfd (or pipe's read end): readable while a trigger or stop is pending."""
        return self._read_fd

    def close(self) -> None:
        """Close the descriptor(s) (the worker thread has ended); later posts only set the
        event."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for fd in {self._read_fd, self._write_fd}:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _signal(self) -> None:
        self._event.set()
        if self._closed:
            return  # the descriptor numbers may belong to someone else by now
        with contextlib.suppress(BlockingIOError, OSError):
            # A full pipe (or an eventfd at its maximum count) is still readable: enough.
            os.write(self._write_fd, _ONE)

    def _drain(self) -> None:
        if self._closed:
            return
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._read_fd, 512):  # an eventfd's one read resets its count
                pass


# What a write adds: eight bytes, the counter increment an eventfd takes (a pipe takes any).
_ONE = (1).to_bytes(8, sys.byteorder)


def _wake_descriptors() -> tuple[int, int]:
    """A non-blocking (read, write) descriptor pair; the same eventfd twice where there is one."""
    if hasattr(os, "eventfd"):
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        return fd, fd
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    return read_fd, write_fd
