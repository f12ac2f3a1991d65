"""The CRM connector against the reference CRM (a real HTTP server) and a real Dovecot.

Every test ends by checking each request and answer it saw against config/crm-api.yaml with
openapi-core, so the reference, the client and the document cannot drift apart.
"""

from __future__ import annotations

import io
import json
import secrets
import signal
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import requests
import trustme
from openapi_core import OpenAPI
from openapi_core.datatypes import RequestParameters
from prometheus_client import CollectorRegistry
from werkzeug.datastructures import Headers, ImmutableMultiDict

from emailsync.config import Settings, load_settings
from emailsync.dev import crm as devcrm
from emailsync.dev.crm import EVENTS_PATH, LOOKUP_PATH, DevCrm, Exchange
from emailsync.dev.demo import run_demo
from emailsync.errors import StoreUnavailableError
from emailsync.filing.queuepass import Filer
from emailsync.model import Direction, TimelineEvent
from emailsync.state.base import Store
from emailsync.timeline import open_store
from emailsync.timeline.crm import signing
from emailsync.timeline.crm import store as crm_store_module
from emailsync.timeline.crm.store import PROBE_ADDRESS, HttpStore

from .conftest import MailUser, new_user, write_config
from .daemonproc import RunningDaemon, daemon_config_extra, new_port, run_cli, wait_until
from .test_filing import build_message, folder_subjects, make_folders, opened, queue

pytestmark = pytest.mark.dovecot

REPO = Path(__file__).resolve().parents[2]
API_DOCUMENT = REPO / "config" / "crm-api.yaml"
SECRET = "reference-crm-shared-secret"
CLIENT_A = "alice@clients.example"
CLIENT_B = "bob@clients.example"
STRANGER = "nobody@elsewhere.example"


@pytest.fixture
def crm() -> Iterator[DevCrm]:
    """The reference CRM with two groups: g-smith (Alice), g-jones and g-both (Bob)."""
    server = DevCrm(SECRET.encode()).start()
    server.link("g-smith", "Smith", [CLIENT_A])
    server.link("g-jones", "Jones", [CLIENT_B])
    server.link("g-both", "Both", [CLIENT_B])
    yield server
    server.close()


def crm_table(tmp_path: Path, crm: DevCrm, **keys: object) -> str:
    secret = tmp_path / "crm-secret"
    secret.write_text(SECRET + "\n", encoding="utf-8")
    values: dict[str, object] = {"url": crm.url, "secret_file": str(secret), **keys}
    return "\n[crm]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items()) + "\n"


def crm_settings(tmp_path: Path, users: list[MailUser], crm: DevCrm, **keys: object) -> Settings:
    config = write_config(
        tmp_path, users, extra="timeout_seconds = 10\n" + crm_table(tmp_path, crm, **keys)
    )
    return load_settings(config)


def crm_store(settings: Settings) -> Store:
    return open_store(settings.store_url, settings.daemon.state_dir, settings.crm)


@contextmanager
def filing(
    tmp_path: Path, users: list[MailUser], crm: DevCrm, **keys: object
) -> Iterator[tuple[Settings, Store]]:
    """Settings and a store for ``users``' mailboxes against the CRM, their folders made;
    after the body, the store is closed and what the CRM saw is checked against its API."""
    settings = crm_settings(tmp_path, users, crm, **keys)
    store = crm_store(settings)
    for user in users:
        make_folders(settings, user.address)
    yield settings, store
    store.close()
    assert_conforms(crm)


def one_pass(settings: Settings, store: Store, address: str) -> Filer:
    filer = Filer(settings.mailbox(address), store)
    with opened(settings, address) as session:
        filer.run_pass(session)
    return filer


@pytest.fixture
def launched() -> Iterator[list[RunningDaemon]]:
    """Daemons a test started; each is stopped at the end, even when the test failed."""
    daemons: list[RunningDaemon] = []
    yield daemons
    for daemon in daemons:
        daemon.stop()


def start_daemon(
    tmp_path: Path,
    users: list[MailUser],
    crm: DevCrm,
    launched: list[RunningDaemon],
    *,
    run: str = "run",
    daemon_keys: dict[str, object] | None = None,
    **keys: object,
) -> RunningDaemon:
    """A daemon filing to ``crm``; ``keys`` go to its [crm] table, ``daemon_keys`` to [daemon]."""
    port = new_port()
    token = secrets.token_urlsafe(24)  # the daemon refuses tokens under 22 characters
    token_file = tmp_path / "control-token"
    token_file.write_text(token + "\n")
    extra = daemon_config_extra(
        port, token_file, max_backoff_seconds=1, **(daemon_keys or {})
    ) + crm_table(tmp_path, crm, **keys)
    config = write_config(tmp_path, users, extra=extra)
    workdir = tmp_path / run  # its own log and notify socket
    workdir.mkdir()
    daemon = RunningDaemon(config, port, token, workdir)
    launched.append(daemon)
    daemon.wait_ready()
    return daemon


def events_by_subject(crm: DevCrm) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for event in crm.events():
        found.setdefault(event["subject"], []).append(event)
    return found


def answered_statuses(crm: DevCrm) -> list[str]:
    """Every per-event status the CRM answered, in order."""
    return [
        result["status"]
        for x in crm.exchanges
        if x.path.endswith(EVENTS_PATH) and x.status == 200
        for result in json.loads(x.response_body)["results"]
    ]


# -- OpenAPI conformance ---------------------------------------------------------------------


class _Request:
    """An exchange's request, as openapi-core reads one, on the document's server URL."""

    def __init__(self, exchange: Exchange) -> None:
        self.host_url = "https://crm.example.com"
        self.path = "/emailsync/v1" + exchange.path.removeprefix("/crm/v1")
        self.method = "post"
        self.body = exchange.request_body
        self.content_type = exchange.request_headers.get("Content-Type", "")
        self.parameters = RequestParameters(
            query=ImmutableMultiDict(),
            header=Headers(exchange.request_headers),
            cookie=ImmutableMultiDict(),
        )


class _Response:
    def __init__(self, exchange: Exchange) -> None:
        self.data = exchange.response_body
        self.status_code = exchange.status
        self.content_type = exchange.response_headers.get("Content-Type", "")
        self.headers = Headers(exchange.response_headers)


def assert_conforms(crm: DevCrm) -> None:
    """Every request and answer the reference CRM saw matches config/crm-api.yaml."""
    api = OpenAPI.from_file_path(str(API_DOCUMENT))
    assert crm.exchanges, "the CRM saw no request"
    for exchange in crm.exchanges:
        if exchange.status == 401:
            continue  # forged on purpose by the test
        request = _Request(exchange)
        api.validate_request(request)
        api.validate_response(request, _Response(exchange))


# -- delivery --------------------------------------------------------------------------------


def test_events_are_delivered_once_with_the_crms_groups_and_directions(
    user: MailUser, tmp_path: Path, crm: DevCrm
) -> None:
    with filing(tmp_path, [user], crm) as (settings, store):
        queue(
            user,
            build_message(user.address, CLIENT_A, "offer to alice"),
            build_message(CLIENT_B, user.address, "question from bob"),
            build_message(STRANGER, user.address, "spam"),
        )
        one_pass(settings, store, user.address)
        events = events_by_subject(crm)
        assert set(events) == {"offer to alice", "question from bob"}
        assert [(e["group_id"], e["direction"]) for e in events["offer to alice"]] == [
            ("g-smith", "outbound")
        ]
        assert sorted((e["group_id"], e["direction"]) for e in events["question from bob"]) == [
            ("g-both", "inbound"),
            ("g-jones", "inbound"),
        ]
        assert all(
            e["via"] == [{"mailbox": user.address, "direction": e["direction"]}]
            for e in crm.events()
        )
        assert folder_subjects(user, "Sent") == {"offer to alice": set()}
        assert folder_subjects(user, "Received") == {"question from bob": set()}
        assert folder_subjects(user, "Failed") == {"spam": {"$EmailSyncNoGroup"}}
        # The same message again: the CRM answers "exists", nothing is doubled.
        queue(user, build_message(user.address, CLIENT_A, "offer to alice", message_id="<x@t>"))
        queue(user, build_message(user.address, CLIENT_A, "offer to alice", message_id="<x@t>"))
        one_pass(settings, store, user.address)
        assert len(events_by_subject(crm)["offer to alice"]) == 2  # the first, and <x@t> once
        assert crm.calls[EVENTS_PATH] == 2  # one request per batch, not per message


def test_the_same_message_in_two_mailboxes_is_one_event_via_both(
    user: MailUser, tmp_path: Path, crm: DevCrm
) -> None:
    second = new_user(user.server)
    with filing(tmp_path, [user, second], crm) as (settings, store):
        raw = build_message(CLIENT_A, f"{user.address}, {second.address}", "to both agents")
        for agent in (user, second):
            queue(agent, raw)
            one_pass(settings, store, agent.address)
        [event] = crm.events()
        assert sorted(v["mailbox"] for v in event["via"]) == sorted([user.address, second.address])
        assert answered_statuses(crm) == ["created", "exists"]


def test_one_message_filed_by_its_sender_and_its_recipient_is_one_event_with_each_direction(
    user: MailUser, tmp_path: Path, crm: DevCrm
) -> None:
    """Issue 19 defect 15: the CRM keeps the direction per mailbox in the event's via:
    outbound via the sender's mailbox, inbound via the recipient's, whichever filed first."""
    sender, recipient = user, new_user(user.server)
    crm.link("g-smith", "Smith", [sender.address])  # the recipient's counterpart
    with filing(tmp_path, [sender, recipient], crm) as (settings, store):
        raw = build_message(sender.address, CLIENT_A, "copied to a colleague", cc=recipient.address)
        for agent in (recipient, sender):  # the recipient first: the event is created inbound
            queue(agent, raw)
            one_pass(settings, store, agent.address)
        [event] = crm.events()
        assert event["group_id"] == "g-smith"
        assert {v["mailbox"]: v["direction"] for v in event["via"]} == {
            sender.address: "outbound",
            recipient.address: "inbound",
        }
        assert answered_statuses(crm) == ["created", "exists"]


def test_one_batch_holding_a_message_seen_both_ways_keeps_each_direction(
    user: MailUser, tmp_path: Path, crm: DevCrm
) -> None:
    """An event's direction is the one seen from each of its mailboxes: the same key seen
    the other way goes in a request of its own, so the CRM can keep both."""
    store = crm_store(crm_settings(tmp_path, [user], crm))
    sent = TimelineEvent(
        group="g-smith",
        direction=Direction.OUTBOUND,
        mailbox="sender@example.com",
        message_key="ab" * 32,
        message_id="<m@x>",
        subject="seen both ways",
        from_="sender@example.com",
        to=CLIENT_A,
        cc="recipient@example.com",
        date=None,
        body_text="Hello",
        attachments=(),
        size=100,
        filed_at=datetime.now(UTC),
    )
    received = replace(sent, direction=Direction.INBOUND, mailbox="recipient@example.com")
    copy = replace(sent, mailbox="other.sender@example.com")
    assert store.record_events_checked([received, sent, copy]).new == 1
    [event] = crm.events()
    assert {v["mailbox"]: v["direction"] for v in event["via"]} == {
        "sender@example.com": "outbound",
        "other.sender@example.com": "outbound",
        "recipient@example.com": "inbound",
    }
    assert crm.calls[EVENTS_PATH] == 2
    store.close()
    assert_conforms(crm)


def with_body(frm: str, to: str, subject: str, body: str, cte: str) -> bytes:
    """A message with one text/plain part in UTF-8, in the given transfer encoding."""
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = frm, to, subject
    msg["Message-ID"] = f"<{secrets.token_hex(8)}@test.example>"
    msg.set_content(body, charset="utf-8", cte=cte)
    return msg.as_bytes()


def lines_of(unit: str, chars: int) -> str:
    """``chars`` characters: ``unit`` repeated, every 65th a line end (short lines on the wire)."""
    return "".join("\n" if i % 65 == 64 else unit[i % len(unit)] for i in range(chars))


BODY_CASES = {
    # name: (body, transfer encoding, body_text expected, body_truncated expected)
    "148000_chars": (lines_of("The quick brown fox. ", 148_000), "7bit", 100_000, True),
    "99000_chars": (lines_of("The quick brown fox. ", 99_000), "7bit", 99_000, False),
    # 100,000 characters exactly, 1 to 4 bytes each in UTF-8: whole, not cut.
    "100000_multibyte": (lines_of("aü€🚀", 100_000), "base64", 100_000, False),
    # Two characters over, the last ones 2 and 4 bytes long: cut between characters.
    "100002_multibyte": ("a" * 99_998 + "é🚀中文", "base64", 100_000, True),
    # 95,000 emoji in quoted-printable are 1.2 MB: the text FETCH is cut at its byte cap
    # (BODY_FETCH_CAP), so fewer than 100,000 characters arrive, and that is a cut too.
    "fetch_cap": (lines_of("🚀", 95_000), "quoted-printable", None, True),
}


@pytest.mark.parametrize("case", list(BODY_CASES))
def test_a_text_body_reaches_the_crm_up_to_100000_characters_flagged_when_cut(
    case: str, user: MailUser, tmp_path: Path, crm: DevCrm
) -> None:
    """Issue 19 defect 14: the contract's cap is 100,000 characters, and body_truncated says
    whether the text was cut, by that cap or by the fetch's byte cap."""
    body, cte, length, truncated = BODY_CASES[case]
    with filing(tmp_path, [user], crm) as (settings, store):
        queue(user, with_body(CLIENT_A, user.address, case, body, cte))
        one_pass(settings, store, user.address)
        [event] = crm.events()
        text = event["body_text"]
        assert (len(text), event["body_truncated"]) == (length or len(text), truncated)
        assert body.startswith(text)  # a prefix, cut between characters
        if length is None:
            assert len(text) < 100_000


def test_a_failed_lookup_is_never_read_as_no_group(
    user: MailUser, tmp_path: Path, crm: DevCrm
) -> None:
    with filing(tmp_path, [user], crm) as (settings, store):
        queue(user, build_message(CLIENT_A, user.address, "waits"))
        crm.faults.status, crm.faults.status_paths = 503, {LOOKUP_PATH}
        with opened(settings, user.address) as session, pytest.raises(StoreUnavailableError):
            Filer(settings.mailbox(user.address), store).run_pass(session)
        assert crm.calls[LOOKUP_PATH] == 1  # it did ask
        assert folder_subjects(user, "Queue") == {"waits": set()}
        assert folder_subjects(user, "Failed") == {}
        crm.faults.status = None
        one_pass(settings, store, user.address)
        assert folder_subjects(user, "Received") == {"waits": set()}


def test_commit_then_dropped_connection_is_retried_with_the_same_key(
    user: MailUser, tmp_path: Path, crm: DevCrm
) -> None:
    with filing(tmp_path, [user], crm) as (settings, store):
        queue(user, build_message(CLIENT_A, user.address, "answer lost"))
        crm.faults.drop_after_commit = 1
        with opened(settings, user.address) as session, pytest.raises(StoreUnavailableError):
            Filer(settings.mailbox(user.address), store).run_pass(session)
        assert len(crm.events()) == 1  # committed on the CRM side …
        assert folder_subjects(user, "Queue") == {"answer lost": set()}  # … but not moved
        one_pass(settings, store, user.address)
        assert folder_subjects(user, "Received") == {"answer lost": set()}
        assert len(crm.events()) == 1
        assert answered_statuses(crm) == ["exists"]  # the retry carried the committed key


def test_the_lookup_cache_saves_calls_and_zero_turns_it_off(
    user: MailUser, tmp_path: Path, crm: DevCrm
) -> None:
    with filing(tmp_path, [user], crm) as (settings, store):
        for subject in ("one", "two"):
            queue(user, build_message(CLIENT_A, user.address, subject))
            queue(user, build_message(STRANGER, user.address, f"stranger {subject}"))
            one_pass(settings, store, user.address)
        assert crm.calls[LOOKUP_PATH] == 1  # the second pass's answers (negative too) were cached
        assert folder_subjects(user, "Failed").keys() == {"stranger one", "stranger two"}
    with filing(tmp_path, [user], crm, group_cache_seconds=0) as (uncached, store):
        queue(user, build_message(CLIENT_A, user.address, "three"))
        one_pass(uncached, store, user.address)
        queue(user, build_message(CLIENT_A, user.address, "four"))
        one_pass(uncached, store, user.address)
        assert crm.calls[LOOKUP_PATH] == 3


# -- signatures ------------------------------------------------------------------------------


def post_signed(crm: DevCrm, body: bytes, header: str, path: str = LOOKUP_PATH) -> int:
    response = requests.post(
        crm.url + path,
        data=body,
        headers={"Content-Type": "application/json", signing.HEADER: header},
        timeout=5,
    )
    return response.status_code


def test_the_reference_crm_refuses_forged_and_stale_signatures(crm: DevCrm) -> None:
    body = json.dumps({"addresses": [CLIENT_A]}).encode()
    secret = SECRET.encode()
    path = crm.base_path + LOOKUP_PATH

    def signed(key: bytes, *, now: float | None = None) -> str:
        return signing.sign(key, "POST", path, body, now=now)

    assert post_signed(crm, body, signed(secret)) == 200
    assert post_signed(crm, body, signed(b"not the secret")) == 401
    assert post_signed(crm, body + b" ", signed(secret)) == 401  # altered body
    assert post_signed(crm, body, signed(secret, now=time.time() - 301)) == 401
    assert post_signed(crm, body, "") == 401
    assert len(crm.refused) == 4
    assert crm.calls[LOOKUP_PATH] == 1  # refused requests never reach the endpoint


def test_the_reference_crm_keeps_only_its_latest_exchanges(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A demo or bench CRM that runs for hours keeps a bounded window of requests for tests
    to read, not every event body it was ever sent."""
    monkeypatch.setattr(devcrm, "EXCHANGES_KEPT", 3)
    with DevCrm(SECRET.encode()) as small:
        path = small.base_path + LOOKUP_PATH
        for n in range(5):
            body = json.dumps({"addresses": [f"c{n}@clients.example"]}).encode()
            assert (
                post_signed(small, body, signing.sign(SECRET.encode(), "POST", path, body)) == 200
            )
        assert [json.loads(e.request_body)["addresses"] for e in small.exchanges] == [
            [f"c{n}@clients.example"] for n in (2, 3, 4)
        ]


def test_a_lookup_replayed_to_the_events_endpoint_is_refused_by_its_signature(
    user: MailUser, tmp_path: Path, crm: DevCrm
) -> None:
    """A request the daemon's client sent to /groups:lookup, replayed verbatim (headers, body,
    inside the window) to /timeline-events, is refused as a signature that does not match."""
    settings = crm_settings(tmp_path, [user], crm)
    assert settings.crm is not None
    store = HttpStore(settings.crm)
    try:
        assert store.lookup([CLIENT_A])[CLIENT_A]  # a real signed request, captured by the CRM
    finally:
        store.close()
    captured = next(e for e in crm.exchanges if e.path.endswith(LOOKUP_PATH))
    assert captured.status == 200
    header = captured.request_headers[signing.HEADER]
    replayed = post_signed(crm, captured.request_body, header, EVENTS_PATH)
    assert replayed == 401
    assert crm.refused[-1] == "signature does not match"
    assert crm.calls[EVENTS_PATH] == 0


def test_crm_check_says_in_one_line_whether_the_crm_accepts_us(
    user: MailUser, tmp_path: Path, crm: DevCrm
) -> None:
    settings = crm_settings(tmp_path, [user], crm)
    ok = run_cli(settings.path, "crm", "check", "--address", CLIENT_B)
    assert ok.returncode == 0, ok.stderr
    assert "ok" in ok.stdout
    assert "2 group(s)" in ok.stdout
    (tmp_path / "crm-secret").write_text("wrong secret\n")
    bad = run_cli(settings.path, "crm", "check")
    assert bad.returncode == 69
    assert len(bad.stderr.strip().splitlines()) == 1
    assert "401" in bad.stderr
    assert "wrong secret" not in bad.stderr
    owned = run_cli(settings.path, "groups", "add", "Smith", CLIENT_A)
    assert owned.returncode == 64
    assert "the CRM" in owned.stderr
    assert run_cli(settings.path, "timeline").returncode == 64


# -- the daemon ------------------------------------------------------------------------------


def test_crm_down_moves_nothing_and_back_up_files_everything_once(
    user: MailUser, tmp_path: Path, crm: DevCrm, launched: list[RunningDaemon]
) -> None:
    crm.faults.status, crm.faults.retry_after = 429, "1"
    make_folders(load_settings(write_config(tmp_path, [user])), user.address)
    subjects = {f"message {n}" for n in range(5)}
    queue(user, *(build_message(CLIENT_A, user.address, s) for s in sorted(subjects)))
    daemon = start_daemon(tmp_path, [user], crm, launched)
    wait_until(lambda: crm.calls[LOOKUP_PATH] >= 2, 20)  # it tried, and tried again
    assert daemon.metric("emailsync_crm_up") == 0
    assert (
        daemon.metric("emailsync_crm_requests_total", endpoint="groups_lookup", status="429") or 0
    ) >= 2
    assert folder_subjects(user, "Queue").keys() == subjects
    assert folder_subjects(user, "Failed") == {}
    assert crm.events() == []
    crm.faults.status = None
    wait_until(lambda: folder_subjects(user, "Received").keys() == subjects, 20)
    assert sorted(e["subject"] for e in crm.events()) == sorted(subjects)
    assert daemon.metric("emailsync_crm_up") == 1
    assert daemon.stop() == 0
    assert_conforms(crm)


def test_crm_up_reads_0_for_a_crm_never_reached_and_1_once_the_start_up_probe_answered(
    user: MailUser, tmp_path: Path, crm: DevCrm, launched: list[RunningDaemon]
) -> None:
    """No mail at all, so no worker asks the CRM: the daemon probes it at start-up. Nothing
    listening at the URL reads 0 (the probe's failed request counted), never 1; the reference
    CRM up reads 1 after exactly one lookup, of an address no CRM links."""
    gone = DevCrm(SECRET.encode()).start()
    gone.close()  # nothing listens at its URL any more
    make_folders(load_settings(write_config(tmp_path, [user])), user.address)
    down = start_daemon(tmp_path, [user], gone, launched, run="down")
    assert down.metric("emailsync_crm_up") == 0
    failed = {"endpoint": "groups_lookup", "status": "error"}  # no answer at all
    wait_until(lambda: down.metric("emailsync_crm_requests_total", **failed), 10)
    assert down.metric("emailsync_crm_up") == 0
    assert down.stop() == 0

    up = start_daemon(tmp_path, [user], crm, launched, run="up")
    wait_until(lambda: up.metric("emailsync_crm_up") == 1, 10)
    assert up.metric("emailsync_crm_requests_total", endpoint="groups_lookup", status="200") == 1
    assert crm.calls[LOOKUP_PATH] == 1
    [probe] = [e for e in crm.exchanges if e.path.endswith(LOOKUP_PATH)]
    assert json.loads(probe.request_body) == {"addresses": [PROBE_ADDRESS]}
    assert up.stop() == 0
    assert_conforms(crm)


def test_the_probe_asks_again_until_the_crm_answers_then_stops(
    user: MailUser, tmp_path: Path, crm: DevCrm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CRM answering 503 at start-up reads 0 and is asked again; once it answers, 1, and the
    probe asks no more (workers' requests keep the gauge current from then on)."""
    monkeypatch.setattr(crm_store_module, "PROBE_RETRY_SECONDS", 0.2)
    crm.faults.status = 503
    settings = crm_settings(tmp_path, [user], crm)
    assert settings.crm is not None
    store = HttpStore(settings.crm)
    registry = CollectorRegistry()
    try:
        store.register_metrics(registry)
        wait_until(lambda: crm.calls[LOOKUP_PATH] >= 2, 10)
        assert registry.get_sample_value("emailsync_crm_up") == 0
        crm.faults.status = None
        wait_until(lambda: registry.get_sample_value("emailsync_crm_up") == 1, 10)
        # The probe ends once the CRM answered: a probe that kept asking would keep its thread.
        wait_until(lambda: not any(t.name == "crm-probe" for t in threading.enumerate()), 10)
    finally:
        store.close()
    assert_conforms(crm)


def test_a_rejected_event_sends_only_its_message_to_failed_with_the_reason(
    user: MailUser, tmp_path: Path, crm: DevCrm, launched: list[RunningDaemon]
) -> None:
    crm.faults.reject_subjects = {"bad one"}
    crm.faults.reject_reason = "group g-smith is archived"
    make_folders(load_settings(write_config(tmp_path, [user])), user.address)
    queue(
        user,
        build_message(CLIENT_A, user.address, "good one"),
        build_message(CLIENT_A, user.address, "bad one"),
        build_message(CLIENT_B, user.address, "good two"),
    )
    daemon = start_daemon(tmp_path, [user], crm, launched)
    wait_until(lambda: folder_subjects(user, "Queue") == {}, 20)
    assert folder_subjects(user, "Failed") == {"bad one": {"$EmailSyncRejected"}}
    assert folder_subjects(user, "Received").keys() == {"good one", "good two"}
    assert (
        daemon.metric("emailsync_messages_failed_total", mailbox=user.address, reason="rejected")
        == 1
    )
    status = daemon.mailboxes()[user.address]
    assert "group g-smith is archived" in status["last_error"]
    assert "group g-smith is archived" in daemon.log()
    assert daemon.stop() == 0
    assert_conforms(crm)


def test_kill_9_during_delivery_then_restart_files_each_event_exactly_once(
    user: MailUser, tmp_path: Path, crm: DevCrm, launched: list[RunningDaemon]
) -> None:
    make_folders(load_settings(write_config(tmp_path, [user])), user.address)
    subjects = {f"killed {n}" for n in range(6)}
    queue(user, *(build_message(CLIENT_A, user.address, s) for s in sorted(subjects)))
    crm.faults.delay_seconds = 2.0  # the delivery is in flight when the daemon dies
    daemon = start_daemon(tmp_path, [user], crm, launched)
    # The delivery request has reached the CRM, which sleeps before committing it.
    wait_until(lambda: crm.arrived[EVENTS_PATH] >= 1, 30, 0.02)
    daemon.process.send_signal(signal.SIGKILL)
    daemon.process.wait(5)
    daemon.stop()
    wait_until(lambda: len(crm.events()) == len(subjects), 10)  # the CRM committed it all
    assert folder_subjects(user, "Queue").keys() == subjects  # nothing moved
    crm.faults.delay_seconds = 0
    restarted = start_daemon(tmp_path, [user], crm, launched, run="restart")
    wait_until(lambda: folder_subjects(user, "Received").keys() == subjects, 20)
    assert sorted(e["subject"] for e in crm.events()) == sorted(subjects)
    assert answered_statuses(crm).count("exists") == len(subjects)  # same keys, no doubles
    assert restarted.stop() == 0
    assert_conforms(crm)


def test_the_crm_demo_shows_the_events_arriving_in_the_reference_crm(tmp_path: Path) -> None:
    out = io.StringIO()
    assert run_demo(tmp_path / "demo", once=True, out=out, crm=True) == 0, out.getvalue()
    text = out.getvalue()
    assert "Timeline events as the CRM received them" in text
    # The message both agents got is one event, via both.
    assert "'Re: offer on 4 Privet Drive' via agent1@example.com, agent2@example.com" in text
    assert "'Live: can we move the viewing?' via agent2@example.com" in text


def test_tls_to_the_crm_is_verified_and_a_private_ca_is_trusted_via_ca_file(
    user: MailUser, tmp_path: Path
) -> None:
    authority = trustme.CA()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    authority.issue_cert("127.0.0.1").configure_cert(context)
    ca_file = tmp_path / "crm-ca.pem"
    authority.cert_pem.write_to_path(str(ca_file))
    with DevCrm(SECRET.encode(), ssl_context=context) as server:
        server.link("g-smith", "Smith", [CLIENT_A])
        assert server.url.startswith("https://")
        untrusted = crm_settings(tmp_path, [user], server)
        refused = run_cli(untrusted.path, "crm", "check", "--address", CLIENT_A)
        assert refused.returncode == 69
        assert "CERTIFICATE_VERIFY_FAILED" in refused.stderr
        assert server.calls[LOOKUP_PATH] == 0
        trusted = crm_settings(tmp_path, [user], server, ca_file=str(ca_file))
        ok = run_cli(trusted.path, "crm", "check", "--address", CLIENT_A)
        assert ok.returncode == 0, ok.stderr
        assert "1 group(s)" in ok.stdout
        assert server.calls[LOOKUP_PATH] == 1
