"""``POST /v1/groups:changed`` checks: signature, window, replay, body (timeline.crm.callback)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from http import HTTPStatus

from emailsync.errors import StoreUnavailableError
from emailsync.timeline.crm import signing
from emailsync.timeline.crm.callback import GROUPS_CHANGED_PATH, MAX_ADDRESSES, ChangeReceiver

SECRET = b"shared"
NOW = 1_800_000_000.0


class Changes:
    """Records the addresses handed on; can fail like a store that is down."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.down = False

    def __call__(self, addresses: Sequence[str]) -> None:
        if self.down:
            raise StoreUnavailableError("state database is locked")
        self.calls.append(list(addresses))


def receiver(changes: Changes, now: float = NOW) -> ChangeReceiver:
    return ChangeReceiver(SECRET, changes, window_seconds=60, clock=lambda: now)


def body(*addresses: object) -> bytes:
    return json.dumps({"addresses": list(addresses)}).encode()


def signed(payload: bytes, *, at: float = NOW, path: str = GROUPS_CHANGED_PATH) -> str:
    return signing.sign(SECRET, "POST", path, payload, now=at)


def test_a_signed_call_hands_on_its_normalised_addresses_and_answers_202() -> None:
    changes = Changes()
    payload = body("Alice@Clients.Example", "alice@clients.example", "bob@clients.example")
    status, answer, _ = receiver(changes).receive(signed(payload), GROUPS_CHANGED_PATH, payload)
    assert (status, answer) == (HTTPStatus.ACCEPTED, {"accepted": 2})
    assert changes.calls == [["alice@clients.example", "bob@clients.example"]]


def test_the_same_call_again_inside_the_window_is_a_replay_even_with_its_fields_reordered() -> None:
    changes = Changes()
    accept = receiver(changes)
    payload = body("alice@clients.example")
    header = signed(payload)
    assert accept.receive(header, GROUPS_CHANGED_PATH, payload)[0] == HTTPStatus.ACCEPTED
    reordered = ",".join(reversed(header.split(",")))
    for again in (header, reordered):
        status, answer, _ = accept.receive(again, GROUPS_CHANGED_PATH, payload)
        assert (status, answer) == (
            HTTPStatus.UNAUTHORIZED,
            {"error": "signature refused: replayed request"},
        )
    assert len(changes.calls) == 1
    # Signed anew (another second), the same addresses are a new call.
    fresh = signed(payload, at=NOW + 1)
    assert accept.receive(fresh, GROUPS_CHANGED_PATH, payload)[0] == HTTPStatus.ACCEPTED


def test_outside_the_window_another_path_or_another_secret_is_refused() -> None:
    changes = Changes()
    accept = receiver(changes)
    payload = body("alice@clients.example")
    for header in (
        signed(payload, at=NOW - 61),
        signed(payload, at=NOW + 61),
        signed(payload, path="/crm/v1/groups:lookup"),
        signing.sign(b"other", "POST", GROUPS_CHANGED_PATH, payload, now=NOW),
        None,
    ):
        assert accept.receive(header, GROUPS_CHANGED_PATH, payload)[0] == HTTPStatus.UNAUTHORIZED
    assert changes.calls == []


def test_a_body_that_is_not_one_to_1000_addresses_is_a_bad_request() -> None:
    changes = Changes()
    accept = receiver(changes)
    for payload in (
        b"not json",
        b"[]",
        body(),
        body("not an address"),
        body(7),
        json.dumps({"addresses": ["a@b.example"], "more": 1}).encode(),
        body(*(f"a{n}@b.example" for n in range(MAX_ADDRESSES + 1))),
    ):
        status, _, _ = accept.receive(signed(payload), GROUPS_CHANGED_PATH, payload)
        assert status == HTTPStatus.BAD_REQUEST, payload[:40]
    assert changes.calls == []


def test_a_call_the_store_cannot_take_is_503_and_may_come_again() -> None:
    changes = Changes()
    accept = receiver(changes)
    payload = body("alice@clients.example")
    header = signed(payload)
    changes.down = True
    status, _, headers = accept.receive(header, GROUPS_CHANGED_PATH, payload)
    assert (status, headers) == (HTTPStatus.SERVICE_UNAVAILABLE, {"Retry-After": "5"})
    changes.down = False
    assert accept.receive(header, GROUPS_CHANGED_PATH, payload)[0] == HTTPStatus.ACCEPTED
    assert changes.calls == [["alice@clients.example"]]
