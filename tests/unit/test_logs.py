"""Log set-up: formats, secret redaction, journal detection."""

from __future__ import annotations

import io
import json
import os

import pytest
import structlog

from emailsync.logs import configure_logging, redact_secrets, resolve_format, under_journal


def test_secret_looking_keys_are_redacted_whatever_their_case() -> None:
    event = {"event": "x", "password": "hunter2", "Access_Token": "abc", "mailbox": "a@b"}
    assert redact_secrets(None, "info", event) == {
        "event": "x",
        "password": "***",
        "Access_Token": "***",
        "mailbox": "a@b",
    }


def test_json_format_writes_one_object_per_line_without_secrets() -> None:
    out = io.StringIO()
    assert configure_logging("json", "info", stream=out) == "json"
    structlog.get_logger("t").info("login", mailbox="a@b.example", password="hunter2")
    line = json.loads(out.getvalue())
    assert line["event"] == "login"
    assert line["mailbox"] == "a@b.example"
    assert "hunter2" not in out.getvalue()


def test_level_filters_debug_lines() -> None:
    out = io.StringIO()
    configure_logging("json", "info", stream=out)
    structlog.get_logger("t").debug("noise")
    assert out.getvalue() == ""


def test_auto_is_json_when_not_a_terminal_and_not_the_journal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    assert resolve_format("auto", io.StringIO()) == "json"


def test_journal_is_detected_by_the_stream_device_and_inode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with open(os.devnull, "w") as stream:
        stat = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{stat.st_dev}:{stat.st_ino}")
        assert under_journal(stream)
        assert resolve_format("auto", stream) == "journal"
        monkeypatch.setenv("JOURNAL_STREAM", f"{stat.st_dev}:{stat.st_ino + 1}")
        assert not under_journal(stream)
