"""doctor's verdicts: which server it is, when the IDLE delay is the server's, TLS expiry."""

from __future__ import annotations

from datetime import UTC, datetime

from emailsync.doctor import (
    NOTE,
    OK,
    PROBLEM,
    Finding,
    capability_findings,
    exit_code,
    idle_verdict,
    server_software,
    tls_verdict,
)

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
    finding = idle_verdict(61.0, "Courier-IMAP", 75)
    assert finding.status == PROBLEM
    assert "61.0 s" in finding.detail
    assert finding.fix is not None
    assert "IMAP_ENHANCEDIDLE=1" in finding.fix


def test_slow_cyrus_names_idled() -> None:
    finding = idle_verdict(60.2, "Cyrus IMAP", 75)
    assert finding.status == PROBLEM
    assert finding.fix is not None
    assert "idled" in finding.fix


def test_no_notice_at_all_is_a_problem_and_fast_is_ok() -> None:
    assert idle_verdict(None, "Cyrus IMAP", 75).status == PROBLEM
    assert idle_verdict(0.4, "Dovecot", 75).status == OK
    assert idle_verdict(5.0, None, 75).status == OK
    assert idle_verdict(5.1, None, 75).status == PROBLEM


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
