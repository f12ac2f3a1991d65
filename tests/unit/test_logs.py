"""Log set-up: formats, secret redaction, journal detection."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator

import pytest
import structlog

from emailsync.telemetry.logs import (
    configure_logging,
    redact_secrets,
    redact_text,
    resolve_format,
    under_journal,
)


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


# A JWT-shaped access token, a refresh token and a password, as libraries might log them.
JWT = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhZ2VudCJ9.c2lnbmF0dXJlLXNlY3JldA"
REFRESH = "0.AAAArefresh-token-secret-value"
PASSWORD = "hunter2-password-secret"
SECRETS = (JWT, REFRESH, PASSWORD, "c2lnbmF0dXJlLXNlY3JldA", "refresh-token-secret")


def log_like_the_libraries() -> None:
    """What msal, urllib3 and requests could log: dicts, query strings, headers."""
    logging.getLogger("msal.application").warning(
        "token response: %s", {"access_token": JWT, "refresh_token": REFRESH, "expires_in": 3599}
    )
    logging.getLogger("urllib3.connectionpool").warning(
        "retrying POST with body client_id=x&password=%s&grant_type=password", PASSWORD
    )
    logging.getLogger("requests").error("headers: {'Authorization': 'Bearer %s'}", JWT)
    logging.getLogger("apscheduler.executors.default").warning("job failed: token=%s", REFRESH)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_stdlib_loggers_go_through_the_same_redaction(fmt: str, restore_logging: None) -> None:
    out = io.StringIO()
    configure_logging(fmt, "info", stream=out)
    log_like_the_libraries()
    text = out.getvalue()
    assert "msal.application" in text  # the lines did arrive, through our renderer
    assert "urllib3.connectionpool" in text
    assert "apscheduler.executors.default" in text
    assert "expires_in" in text  # only the secrets are gone
    assert text.count("***") >= 5
    for secret in SECRETS:
        assert secret not in text
    if fmt == "json":
        assert [json.loads(line)["logger"] for line in text.splitlines()] == [
            "msal.application",
            "urllib3.connectionpool",
            "requests",
            "apscheduler.executors.default",
        ]


def test_stdlib_loggers_go_through_the_same_redaction_in_the_journal(
    monkeypatch: pytest.MonkeyPatch, restore_logging: None
) -> None:
    from systemd import journal  # noqa: PLC0415 -- the journal renderer's own import

    sent: list[tuple[str, dict[str, str]]] = []
    monkeypatch.setattr(journal, "send", lambda message, **fields: sent.append((message, fields)))
    configure_logging("journal", "info", stream=io.StringIO())
    log_like_the_libraries()
    assert [fields["LOGGER"] for _, fields in sent] == [
        "msal.application",
        "urllib3.connectionpool",
        "requests",
        "apscheduler.executors.default",
    ]
    text = repr(sent)
    for secret in SECRETS:
        assert secret not in text


def test_secrets_inside_our_own_values_and_nested_data_are_redacted(
    restore_logging: None,
) -> None:
    out = io.StringIO()
    configure_logging("json", "info", stream=out)
    structlog.get_logger("t").warning(
        "token_refresh_failed",
        error=f"server said: invalid grant for refresh_token={REFRESH}",
        response={
            "body": {"id_token": JWT, "ok": True},
            "headers": [f"Authorization: Bearer {JWT}"],
        },
        mailbox="a@b.example",
    )
    line = json.loads(out.getvalue())
    assert line["mailbox"] == "a@b.example"
    assert line["response"]["body"] == {"id_token": "***", "ok": True}
    for secret in SECRETS:
        assert secret not in out.getvalue()


def test_console_tracebacks_never_show_local_variables(restore_logging: None) -> None:
    """With rich installed, structlog's default console traceback prints locals: not ours."""
    out = io.StringIO()
    configure_logging("console", "info", stream=out)

    def login(password: str) -> None:
        access_token = password.upper()  # a local holding a secret, as MSAL code has
        raise RuntimeError(f"login refused ({len(access_token)} chars)")

    secret = "-".join(("local", "variable", "secret"))  # so no source line shows it
    try:
        login(secret)
    except RuntimeError:
        structlog.get_logger("t").exception("login_failed")
    text = out.getvalue()
    assert "RuntimeError: login refused (21 chars)" in text  # the traceback is there
    assert "local-variable-secret" not in text
    assert "LOCAL-VARIABLE-SECRET" not in text


@pytest.mark.parametrize(
    "prose",
    [
        "the server refused the Office 365 token: AUTHENTICATE failed",
        "token refresh failed: invalid_client",
        "wrong password: LOGIN failed",
        "event=token_refreshed_ahead refresh_token_stale=False",
    ],
)
def test_prose_about_tokens_is_not_redacted(prose: str) -> None:
    assert redact_text(prose) == prose
