"""`sync --once` and `retry-failed` on a Queue of hundreds of messages report progress lines."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from .daemonproc import run_cli
from .mailenv import MailUser, write_config

pytestmark = pytest.mark.dovecot

COUNT = 320  # above the 300 at which progress starts


def message(n: int) -> bytes:
    return (
        f"From: stranger{n}@example.org\r\nTo: agent@example.com\r\n"
        f"Subject: bulk {n}\r\nMessage-ID: <bulk{n}@example.org>\r\n"
        "Date: Mon, 30 Nov 2026 10:00:00 +0000\r\n\r\nhello\r\n"
    ).encode()


def test_sync_once_and_retry_failed_show_progress(user: MailUser, tmp_path: Path) -> None:
    config = write_config(tmp_path, [user])
    assert run_cli(config, "setup", user.address).returncode == 0
    client = user.client()
    try:
        client.multiappend("Rezi-Imported.Queue", [message(n) for n in range(COUNT)])
    finally:
        client.logout()

    # No groups: every message goes to Failed (the filing itself is tested elsewhere).
    result = run_cli(config, "sync", "--once", timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"filed {COUNT} (0 to Sent, 0 to Received, {COUNT} to Failed)" in result.stdout
    lines = re.findall(rf"^{re.escape(user.address)}: (\d+)/(\d+) messages", result.stderr, re.M)
    assert lines, result.stderr
    assert lines[-1] == (str(COUNT), str(COUNT))

    result = run_cli(config, "retry-failed", user.address, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"moved {COUNT} messages from Failed back to Queue" in result.stdout
    lines = re.findall(r"Failed → Queue: (\d+)/(\d+) messages", result.stderr)
    assert lines, result.stderr
    assert lines[-1] == (str(COUNT), str(COUNT))

    # Back in Queue: --dry-run --json is one decision per message, then the summary.
    result = run_cli(config, "sync", "--dry-run", "--json", timeout=120)
    assert result.returncode == 0, result.stderr
    objects = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(objects) == COUNT + 1
    assert {o["destination"] for o in objects[:-1]} == {"failed"}
    assert objects[-1] == {
        "mailbox": user.address,
        "dry_run": True,
        "messages": COUNT,
        "sent": 0,
        "received": 0,
        "failed": COUNT,
        "new_events": 0,
    }
