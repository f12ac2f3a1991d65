"""The daemon's open-files limit (issue 23): a mailbox costs three descriptors (its IMAP socket
and its worker's wake-up pipe), while systemd starts a service with a soft limit of 1,024."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest

from .conftest import MailUser
from .daemonproc import DaemonFactory

SYSTEMD_SOFT_LIMIT = 1024  # systemd's DefaultLimitNOFILE=1024:524288 (systemd.exec(5))


def open_files_limits(pid: int) -> tuple[int, int]:
    """A process's soft and hard RLIMIT_NOFILE, from /proc/PID/limits."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError(f"no open-files limit for {pid}")


def test_the_daemon_raises_its_open_files_soft_limit_to_the_hard_limit(
    user: MailUser, daemons: DaemonFactory
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= SYSTEMD_SOFT_LIMIT:
        pytest.skip(f"the hard limit here is {hard}: nothing to raise to")
    resource.setrlimit(resource.RLIMIT_NOFILE, (SYSTEMD_SOFT_LIMIT, hard))
    try:
        daemon = daemons.start([user])  # it inherits the soft limit as from systemd
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert open_files_limits(daemon.process.pid) == (hard, hard)
