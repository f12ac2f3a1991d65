"""doctor's verdicts: which server it is, when the IDLE delay is the server's, TLS expiry."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from emailsync.config import MailboxSettings, ServerSettings
from emailsync.ops.doctor import (
    IDLE_PROBES,
    NOTE,
    OK,
    PROBLEM,
    Finding,
    PortAnswer,
    capability_findings,
    connection_verdict,
    exit_code,
    idle_delays,
    idle_verdict,
    login_verdict,
    scratch_leaf,
    server_software,
    sort_scratch_folders,
    tls_verdict,
)
from emailsync.secret import SecretSource

NOW = datetime(2026, 12, 1, tzinfo=UTC)


def test_server_software_from_greeting_or_id() -> None:
    assert server_software("[CAPABILITY IMAP4rev1] Dovecot (Debian) ready.") == "Dovecot"
    assert server_software("[CAPABILITY IMAP4rev1] Courier-IMAP ready. Copyright") == (
        "Courier-IMAP"
    )
    assert server_software("host Cyrus IMAP 3.6.1-Debian server ready") == "Cyrus IMAP"
    assert server_software("The Microsoft Exchange IMAP4 service is ready.") == "Exchange"
    assert server_software("Gimap ready for requests from 192.0.2.1") == "Gmail"
    assert server_software("IMAP4rev1 ready", "name Cyrus IMAP version 3.6") == "Cyrus IMAP"
    assert server_software("IMAP4rev1 ready") is None


def test_slow_courier_names_enhanced_idle() -> None:
    finding = idle_verdict([61.0], "Courier-IMAP", 75)
    assert finding.status == PROBLEM
    assert "61.0 s" in finding.detail
    assert finding.fix is not None
    assert "IMAP_ENHANCEDIDLE=1" in finding.fix


def test_slow_cyrus_names_idled() -> None:
    finding = idle_verdict([60.2], "Cyrus IMAP", 75)
    assert finding.status == PROBLEM
    assert finding.fix is not None
    assert "idled" in finding.fix


def test_no_notice_at_all_is_a_problem_and_fast_is_ok() -> None:
    assert idle_verdict([None], "Cyrus IMAP", 75).status == PROBLEM
    assert idle_verdict([0.4, 0.3, 0.2], "Dovecot", 75).status == OK
    assert idle_verdict([5.0], None, 75).status == OK
    assert idle_verdict([5.1], None, 75).status == PROBLEM


def cert(not_after: str) -> dict[str, object]:
    return {"subject": ((("commonName", "imap.example.com"),),), "notAfter": not_after}


def test_tls_certificate_expiring_soon_is_a_problem() -> None:
    good = tls_verdict("ssl", "TLSv1.3", cert("Jun  1 00:00:00 2027 GMT"), now=NOW)
    assert good.status == OK
    assert good.detail == (
        "ssl TLSv1.3, certificate commonName=imap.example.com, expires 2027-06-01 (182 days)"
    )
    soon = tls_verdict("starttls", "TLSv1.2", cert("Dec 10 00:00:00 2026 GMT"), now=NOW)
    assert soon.status == PROBLEM
    assert tls_verdict("none", None, None, now=NOW).status == NOTE


def test_missing_capabilities() -> None:
    found = {f.check: f for f in capability_findings(frozenset({"IDLE"}), False)}
    assert found["IDLE"].status == OK
    assert found["MOVE"].status == NOTE
    assert found["UIDPLUS"].status == NOTE
    assert found["keywords"].status == NOTE
    assert exit_code(list(found.values())) == 0
    assert exit_code([Finding("x", PROBLEM, "")]) == 1


def test_a_fast_first_idle_notice_does_not_hide_a_slow_later_one() -> None:
    """Courier with enhanced IDLE announces the first probe at once; the slowest one counts."""
    finding = idle_verdict([0.3, 0.2, 61.0], "Courier-IMAP", 75)
    assert finding.status == PROBLEM
    assert "61.0 s" in finding.detail
    assert "probe 3" in finding.detail
    assert finding.fix is not None
    assert "IMAP_ENHANCEDIDLE=1" in finding.fix
    fast = idle_verdict([0.3, 0.4, 0.2], "Dovecot", 75)
    assert fast.status == OK
    assert "0.4 s" in fast.detail
    assert "3 probes" in fast.detail


def test_a_missing_later_idle_notice_is_a_problem() -> None:
    finding = idle_verdict([0.3, None], "Courier-IMAP", 75)
    assert finding.status == PROBLEM
    assert "probe 2" in finding.detail
    assert finding.fix is not None


def test_idle_delays_measure_up_to_three_probes_and_stop_at_the_first_slow_one() -> None:
    """Three probes when each is fast; no more once one is slow or unannounced."""
    asked: list[int] = []

    def measure(answers: list[float | None]) -> list[float | None]:
        asked.clear()

        def one(number: int) -> float | None:
            asked.append(number)
            return answers[number - 1]

        return idle_delays(one)

    assert IDLE_PROBES == 3
    assert measure([0.1, 0.2, 0.3, 0.4]) == [0.1, 0.2, 0.3]
    assert asked == [1, 2, 3]
    assert measure([60.0, 0.1, 0.1]) == [60.0]
    assert measure([0.1, None, 0.1]) == [0.1, None]
    assert asked == [1, 2]


def mailbox(**server: object) -> MailboxSettings:
    settings = {"host": "imap.example.com", "port": 993, "security": "ssl", **server}
    return MailboxSettings(
        address="agent1@example.com",
        server=ServerSettings(**settings),  # type: ignore[arg-type]
        username="agent1@example.com",
        password=SecretSource(file=Path("/etc/emailsync/secrets/agent1")),
        branch="berlin",
    )


def test_a_refused_password_names_its_source_the_account_and_the_lockout_risk() -> None:
    finding = login_verdict(
        mailbox(),
        "agent1@example.com: login: login refused by the server: [AUTHENTICATIONFAILED]",
        reauth_retry_seconds=1800,
    )
    assert finding.status == PROBLEM
    assert finding.fix is not None
    assert "file /etc/emailsync/secrets/agent1" in finding.fix
    assert "agent1@example.com" in finding.fix
    assert "lock" in finding.fix
    assert "30 min" in finding.fix  # the daemon's needs_reauth retry
    env = login_verdict(
        MailboxSettings(
            address="a@example.com",
            server=ServerSettings("imap.example.com", 993),
            username="a",
            password=SecretSource(env="A_PASSWORD"),
        ),
        "refused",
        reauth_retry_seconds=1800,
    )
    assert env.fix is not None
    assert "environment variable A_PASSWORD" in env.fix


def test_an_unreadable_password_and_logindisabled_have_their_own_fix() -> None:
    unreadable = login_verdict(
        mailbox(), "secret: cannot read file x", reauth_retry_seconds=60, secret_unreadable=True
    )
    assert unreadable.fix is not None
    assert "readable" in unreadable.fix
    assert "lock" not in unreadable.fix
    disabled = login_verdict(
        mailbox(security="none", port=143), "refuses LOGIN (LOGINDISABLED)", reauth_retry_seconds=60
    )
    assert disabled.fix is not None
    assert 'security = "starttls"' in disabled.fix


def test_a_refused_connection_names_host_port_and_security() -> None:
    finding = connection_verdict(
        mailbox().server,
        "berlin",
        "refused",
        "connect: connection refused",
        PortAnswer("refused"),
        timeout=10,
    )
    assert finding.check == "login"
    assert finding.status == PROBLEM
    assert finding.fix is not None
    assert "imap.example.com" in finding.fix
    assert "993" in finding.fix
    assert "nothing listens" in finding.fix
    assert "[branches.berlin]" in finding.fix


def test_ssl_against_a_plain_text_port_suggests_starttls_or_none() -> None:
    finding = connection_verdict(
        mailbox(port=143).server,
        "berlin",
        "tls",
        "TLS failed: [SSL] record layer failure",
        PortAnswer("imap", "* OK [CAPABILITY IMAP4rev1] Dovecot ready."),
        timeout=10,
    )
    assert finding.fix is not None
    assert "plain text" in finding.fix
    assert 'security = "starttls"' in finding.fix
    assert '"none" with allow_insecure = true' in finding.fix


def test_plain_text_against_a_tls_port_suggests_ssl() -> None:
    for security in ("none", "starttls"):
        finding = connection_verdict(
            mailbox(security=security).server,
            "berlin",
            "timeout",
            "connect: timed out",
            PortAnswer("tls"),
            timeout=10,
        )
        assert finding.fix is not None
        assert 'security = "ssl"' in finding.fix


@pytest.mark.parametrize(
    ("kind", "error", "answer", "words"),
    [
        ("timeout", "connect: timed out", PortAnswer("unreachable"), ("firewall", "10 s")),
        ("bye", "connect: Name or service not known", PortAnswer("unresolved"), ("resolve",)),
        (
            "tls",
            "TLS failed: CERTIFICATE_VERIFY_FAILED unable to get local issuer",
            PortAnswer("silent"),
            ("ca_file",),
        ),
        (
            "tls",
            "TLS failed: CERTIFICATE_VERIFY_FAILED Hostname mismatch",
            PortAnswer("silent"),
            ("not valid for imap.example.com",),
        ),
        (
            "protocol",
            "connect: Server does not support STARTTLS",
            PortAnswer("imap", "* OK"),
            ("no STARTTLS", 'security = "ssl"'),
        ),
        ("bye", "connect: EOF", PortAnswer("other", "SSH-2.0-OpenSSH_9.2"), ("not IMAP",)),
        ("bye", "connect: EOF", PortAnswer("closed"), ("closed",)),
    ],
)
def test_every_connection_failure_has_a_fix_naming_the_server(
    kind: str, error: str, answer: PortAnswer, words: tuple[str, ...]
) -> None:
    security = "starttls" if "STARTTLS" in error else "ssl"
    server = mailbox(security=security).server
    finding = connection_verdict(server, "berlin", kind, error, answer, timeout=10)
    assert finding.status == PROBLEM
    assert finding.fix is not None
    assert "imap.example.com" in finding.fix
    for word in words:
        assert word in finding.fix


def test_every_note_and_problem_line_carries_a_fix() -> None:
    findings = [
        *capability_findings(frozenset(), False),
        *capability_findings(frozenset(), None),
        tls_verdict("none", None, None, now=NOW),
        tls_verdict("ssl", "TLSv1.3", None, now=NOW),
        tls_verdict("ssl", "TLSv1.3", cert("Dec  2 00:00:00 2026 GMT"), now=NOW),
        idle_verdict([None], None, 75),
        idle_verdict([9.0], "Dovecot", 75),
    ]
    for finding in findings:
        assert finding.status != OK
        assert finding.fix, finding


def test_scratch_folders_of_earlier_runs_are_told_from_a_running_one() -> None:
    """Old (or timestamp-less) scratch folders are leftovers; a recent one may be live."""
    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    mine = scratch_leaf(now)
    assert mine.startswith("emailsync-doctor-20261201T120000Z-")
    old = scratch_leaf(now - timedelta(hours=2))
    recent = scratch_leaf(now - timedelta(seconds=30))
    stale, live = sort_scratch_folders(
        [
            f"Rezi-Imported.{old}",
            recent,
            "emailsync-doctor-1a2b3c4d",  # an earlier version's name
            "INBOX",
            "Rezi-Imported.Queue",
            "Projects.emailsync-doctor-notes",  # someone's own folder
        ],
        ".",
        now=now,
    )
    assert stale == [f"Rezi-Imported.{old}", "emailsync-doctor-1a2b3c4d"]
    assert live == [recent]
