"""SIGTERM and SIGINT while doctor runs: unwind, say nothing more on a connection mid-command.

The run then deletes its scratch folder from a fresh connection (see ``run.diagnose``).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

from emailsync.imap.session import ImapSession

# Signals that stop doctor after it has removed its scratch folder.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(BaseException):
    """SIGTERM or SIGINT arrived; like KeyboardInterrupt it unwinds past ``except Exception``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """While doctor runs, SIGTERM and SIGINT raise Stopped; a second one acts as it did before.

    Python lets only the main thread set handlers; elsewhere (a test's thread) nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)

    def stop(signum: int, _frame: FrameType | None) -> None:
        restore()  # a second signal while cleaning up is not held back
        raise Stopped(signum)

    for signum in STOP_SIGNALS:
        signal.signal(signum, stop)
    try:
        yield
    finally:
        restore()


@contextlib.contextmanager
def ending(session: ImapSession) -> Iterator[ImapSession]:
    """Yield ``session``, then LOGOUT; after a stop signal only close the socket.

    The signal may have come halfway through a command, so nothing more is said on it.
    """
    try:
        yield session
    except Stopped:
        session.close()
        raise
    except BaseException:
        session.logout()
        raise
    session.logout()
