"""How many connects (TCP, TLS, login) a process has in flight: a limit that adapts (issue 23).

Every worker of the process takes a turn from one ``ConnectGate`` before it connects and gives
it back once logged in (or failed). Turns are handed out first come, first served, to the
waiter itself (its own event), so a stopped worker leaves the queue at once and nothing polls.

The limit starts at ``[daemon] connect_concurrency`` and moves between a quarter of it and four
times it, judged once per *round* (as many connects as the limit, all started after the last
change), in the spirit of TCP's congestion control:

* the round's logins were fast (median within ``FAST_FACTOR`` of the best round lately) and
  none failed for load: **raise** the limit by a quarter;
* they were slow (median beyond ``SLOW_FACTOR`` of the best round lately) or some failed for
  load (timeouts, BYE: an overloaded server's answers, not a wrong password or a refused
  port): **lower** it by a third;
* in between: keep it.

So a start or a reload of thousands of mailboxes opens as many connections at once as the
server and the host take without slowing down, and backs off when either struggles.
"""

from __future__ import annotations

import collections
import statistics
import threading
import time
from collections.abc import Callable

# A login this fast is never "slow", whatever the best round was (on loopback the best is a
# few milliseconds, and scheduling noise alone would double it).
SLOW_FLOOR_SECONDS = 0.25
SLOW_FACTOR = 2.0
FAST_FACTOR = 1.5
RAISE_FACTOR = 1.25
LOWER_FACTOR = 2 / 3
# Rounds remembered for "the best round lately": the best median of these.
BEST_OF_ROUNDS = 8
# The limit's range, as factors of the configured start.
FLOOR_FACTOR = 0.25
CEILING_FACTOR = 4.0


class Turn:
    """One waiter's place in the gate: waiting, then granted (and given back) or cancelled."""

    __slots__ = ("_event", "cancelled", "granted", "returned", "started")

    def __init__(self) -> None:
        self._event = threading.Event()
        self.granted = False
        self.cancelled = False
        self.returned = False  # granted and given back
        self.started = 0.0  # monotonic, when it was granted

    def wait(self, timeout: float | None = None) -> bool:
        """Block until granted (True) or cancelled (False); False too on timeout."""
        self._event.wait(timeout)
        return self.granted


class ConnectGate:
    """A first-come, first-served limit on connects in flight that adapts to how they go."""

    def __init__(
        self,
        start: int,
        *,
        floor: int | None = None,
        ceiling: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if start < 1:
            raise ValueError("a connect limit is at least 1")
        self.floor = max(1, int(start * FLOOR_FACTOR)) if floor is None else floor
        self.ceiling = max(start, int(start * CEILING_FACTOR)) if ceiling is None else ceiling
        self._limit = start
        self._clock = clock
        self._lock = threading.Lock()
        self._waiting: collections.deque[Turn] = collections.deque()
        self._in_flight = 0
        self._changed_at = clock()  # the current round counts connects granted after this
        self._round: list[float] = []  # login seconds of this round's successful connects
        self._round_overloaded = 0
        self._best: collections.deque[float] = collections.deque(maxlen=BEST_OF_ROUNDS)

    @property
    def limit(self) -> int:
        """The connects allowed in flight now."""
        return self._limit

    @property
    def in_flight(self) -> int:
        """The connects under way (granted, not yet done)."""
        return self._in_flight

    def enter(self) -> Turn:
        """Join the queue; the turn is granted at once when a connect may start now."""
        turn = Turn()
        with self._lock:
            self._waiting.append(turn)
            self._grant()
        return turn

    def cancel(self, turn: Turn) -> None:
        """Leave the queue (a stopped worker); its ``wait`` returns False. A granted turn is
        unaffected: its holder gives it back with ``done``."""
        with self._lock:
            if turn.granted or turn.cancelled:
                return
            turn.cancelled = True
            self._waiting.remove(turn)
            turn._event.set()

    def done(self, turn: Turn, *, ok: bool, overloaded: bool = False) -> None:
        """Give a granted turn back: ``ok`` when the login went through (its time counts),
        ``overloaded`` when it failed in a way that says the server or host struggles."""
        with self._lock:
            if not turn.granted or turn.returned:
                return
            turn.returned = True
            self._in_flight -= 1
            if turn.started >= self._changed_at:
                if ok:
                    self._round.append(self._clock() - turn.started)
                elif overloaded:
                    self._round_overloaded += 1
                if len(self._round) + self._round_overloaded >= self._limit:
                    self._judge_round()
            self._grant()

    def _judge_round(self) -> None:
        """Raise, lower or keep the limit from the round just completed (under the lock)."""
        median = statistics.median(self._round) if self._round else None
        if median is not None:
            self._best.append(median)
        best = min(self._best, default=None)
        slow = (
            median is not None
            and best is not None
            and median > max(SLOW_FLOOR_SECONDS, SLOW_FACTOR * best)
        )
        fast = median is not None and best is not None and median <= FAST_FACTOR * best
        if self._round_overloaded or slow:
            self._limit = max(self.floor, int(self._limit * LOWER_FACTOR))
        elif fast:
            self._limit = min(self.ceiling, max(self._limit + 1, int(self._limit * RAISE_FACTOR)))
        self._round = []
        self._round_overloaded = 0
        self._changed_at = self._clock()

    def _grant(self) -> None:
        """Hand free slots to the longest waiters (under the lock)."""
        while self._waiting and self._in_flight < self._limit:
            turn = self._waiting.popleft()
            turn.granted = True
            turn.started = self._clock()
            self._in_flight += 1
            turn._event.set()


_gates: dict[int, ConnectGate] = {}
_gates_lock = threading.Lock()


def connect_gate(start: int) -> ConnectGate:
    """The process-wide gate of every worker configured with this ``connect_concurrency``.

    One per distinct setting, shared by every worker of the process (a reload that keeps the
    setting keeps the gate and what it learnt): at start, 2,000 mailboxes take turns instead
    of 2,000 TLS handshakes and logins competing at once.
    """
    with _gates_lock:
        gate = _gates.get(start)
        if gate is None:
            gate = _gates[start] = ConnectGate(start)
        return gate
