"""HttpStore: the Store protocol over a CRM's HTTP API (config/crm-api.yaml is the contract)."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import CollectorRegistry

from emailsync.config import CrmSettings
from emailsync.errors import StoreError, StoreUnavailableError
from emailsync.mail.address import normalise_address
from emailsync.mail.message import MAX_BODY_CHARS
from emailsync.model import Group, TimelineEvent
from emailsync.state.base import Recorded
from emailsync.state.sqlite import SqliteStore
from emailsync.telemetry.metrics import CrmMetrics
from emailsync.timeline.crm.cache import LookupCache
from emailsync.timeline.crm.client import EVENTS_PATH, LOOKUP_PATH, CrmClient

if TYPE_CHECKING:
    from emailsync.state import StateStore

log = structlog.get_logger(__name__)

# The document's maxItems per request; a bigger batch goes in several requests.
MAX_ADDRESSES_PER_LOOKUP = 1000
MAX_EVENTS_PER_REQUEST = 1000
_MAX_AGE = re.compile(r"(?:^|,)\s*(?:s-)?max-age\s*=\s*\"?(\d+)")
_NO_CACHE = re.compile(r"(?:^|,)\s*(?:no-store|no-cache|private)\b")

# The start-up probe is an ordinary lookup (the document has no separate health endpoint) of
# an address no CRM links: ".invalid" is reserved and never resolves (RFC 2606 §2).
PROBE_ADDRESS = "emailsync-probe@example.invalid"
# Until the CRM answered a request (the probe's or a worker's), the probe asks again this often.
PROBE_RETRY_SECONDS = 30.0

OWNED_BY_CRM = "a [crm] is configured: the CRM owns groups and timeline events; manage them there"


def idempotency_key(group: str, message_key: str) -> str:
    """The event's idempotency key: the CRM's group id and the message key (DESIGN.md §1)."""
    return f"{group}:{message_key}"


class HttpStore:
    """Groups from the CRM (batched lookups, cached), timeline events delivered to it.

    A lookup that fails raises ``StoreUnavailableError``: it is never read as "no group".
    ``record_events_checked`` returns only when the CRM acknowledged every event (created,
    already there, or rejected), so filing moves nothing the CRM has not accepted.
    """

    def __init__(
        self,
        settings: CrmSettings,
        *,
        client: CrmClient | None = None,
        state_path: Path | None = None,
        state: StateStore | None = None,
        owns_state: bool = False,
    ) -> None:
        self.settings = settings
        self.client = client or CrmClient(settings, settings.secret.read())
        self.cache = LookupCache(settings.group_cache_seconds)
        self.metrics: CrmMetrics | None = None
        self._closed = threading.Event()
        # emailsync's own data beside the CRM's (the Failed-for-no-group index, issue 22):
        # the state database the daemon opened (``state``: its owner closes it), or the
        # built-in SQLite file at ``state_path``, opened when first needed and closed here.
        self._state_path = state_path
        self._given_state = state
        self._owns_state = owns_state
        self._state: StateStore | None = None
        self._state_lock = threading.Lock()

    def state(self) -> StateStore | None:
        """The state database (opened on first use); None when this store was given none."""
        if self._given_state is not None:
            return self._given_state
        if self._state_path is None:
            return None
        with self._state_lock:
            if self._state is None:
                self._state = SqliteStore(self._state_path)
            return self._state

    def links_changed(self, addresses: Iterable[str]) -> None:
        """The CRM said these addresses' links changed: ask it again on the next lookup."""
        self.cache.forget(a for a in (normalise_address(x) for x in addresses) if a)

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """Register the CRM metrics on the daemon's registry and start the start-up probe.

        ``emailsync_crm_up`` reads 0 until the CRM answered a request. The probe (a thread)
        looks up ``PROBE_ADDRESS`` at once and again every ``PROBE_RETRY_SECONDS`` until the
        CRM answered one, its own or a worker's, so a daemon with no mail to file still says
        whether its CRM is reachable, and an idle CRM that comes back reads 1 again.
        """
        self.metrics = CrmMetrics(registry)
        self.client.metrics = self.metrics
        threading.Thread(target=self._probe_until_answered, name="crm-probe", daemon=True).start()

    def probe(self) -> bool:
        """One uncached lookup of ``PROBE_ADDRESS``; True when the CRM answered it."""
        try:
            self._lookup([PROBE_ADDRESS], cache=False)
        except StoreError as exc:
            log.warning("crm_probe_failed", error=str(exc))
        return self.client.answered is True

    def _probe_until_answered(self) -> None:
        while not self._closed.is_set():
            if self.client.answered or self.probe():
                log.info("crm_reachable")
                return
            self._closed.wait(PROBE_RETRY_SECONDS)

    # -- Store protocol -------------------------------------------------------------------------

    def groups_for_addresses(self, addresses: Iterable[str]) -> list[Group]:
        """Groups linked to any address; ``Group.addresses`` are the asked ones linked to it."""
        wanted = list(dict.fromkeys(a for a in (normalise_address(x) for x in addresses) if a))
        found, missing = self.cache.get_many(wanted)
        if self.metrics is not None:
            self.metrics.cache.labels(result="hit").inc(len(found))
            self.metrics.cache.labels(result="miss").inc(len(missing))
        for start in range(0, len(missing), MAX_ADDRESSES_PER_LOOKUP):
            found.update(self._lookup(missing[start : start + MAX_ADDRESSES_PER_LOOKUP]))
        return _merge_groups(found)

    def lookup(self, addresses: Sequence[str]) -> dict[str, tuple[Group, ...]]:
        """Ask the CRM now (no cache) for each address's groups; for ``emailsync crm check``."""
        return self._lookup(list(addresses), cache=False)

    def record_events(self, events: Sequence[TimelineEvent]) -> int:
        """Deliver the events; ``StoreError`` naming the reasons if the CRM refused any."""
        recorded = self.record_events_checked(events)
        if recorded.rejected:
            reasons = "; ".join(sorted(set(recorded.rejected.values())))
            raise StoreError(f"the CRM rejected {len(recorded.rejected)} event(s): {reasons}")
        return recorded.new

    def record_events_checked(self, events: Sequence[TimelineEvent]) -> Recorded:
        """Deliver the events, batched; the CRM's per-event answers.

        Two events with the same key (one message in Queue twice) go as one, with every
        mailbox that filed it, when they have the same direction: an event's ``direction`` is
        the one seen from each of its ``mailboxes`` (the CRM keeps it per mailbox in its
        via). The same key with the other direction goes in a later request. A retry sends
        the same keys, so nothing is doubled.
        """
        rounds: list[dict[str, tuple[TimelineEvent, list[str]]]] = []
        for event in events:
            key = idempotency_key(event.group, event.message_key)
            for merged in rounds:
                known = merged.get(key)
                if known is None:
                    merged[key] = (event, [event.mailbox])
                    break
                if known[0].direction is event.direction:
                    if event.mailbox not in known[1]:
                        known[1].append(event.mailbox)
                    break
            else:
                rounds.append({key: (event, [event.mailbox])})
        new = 0
        rejected: dict[tuple[str, str], str] = {}
        for merged in rounds:
            recorded = self._deliver(list(merged.items()))
            new += recorded.new
            rejected.update(recorded.rejected)
        return Recorded(new=new, rejected=rejected)

    def _deliver(self, items: list[tuple[str, tuple[TimelineEvent, list[str]]]]) -> Recorded:
        """POST events with distinct keys, MAX_EVENTS_PER_REQUEST a request."""
        new = 0
        rejected: dict[tuple[str, str], str] = {}
        for start in range(0, len(items), MAX_EVENTS_PER_REQUEST):
            chunk = items[start : start + MAX_EVENTS_PER_REQUEST]
            payload = {"events": [_event_json(key, e, via) for key, (e, via) in chunk]}
            answer, _ = self.client.post(EVENTS_PATH, payload)
            statuses = _event_statuses(answer, [key for key, _ in chunk])
            for key, (event, _via) in chunk:
                status, reason = statuses[key]
                if status == "created":
                    new += 1
                elif status == "rejected":
                    rejected[(event.group, event.message_key)] = reason or "no reason given"
        return Recorded(new=new, rejected=rejected)

    def add_group(self, name: str, addresses: Iterable[str]) -> Group:
        """Not here: the CRM owns groups."""
        raise StoreError(OWNED_BY_CRM)

    def import_groups(self, rows: Iterable[tuple[str, str]]) -> int:
        """Not here: the CRM owns groups."""
        raise StoreError(OWNED_BY_CRM)

    def list_groups(self) -> list[Group]:
        """Not here: the CRM owns groups."""
        raise StoreError(OWNED_BY_CRM)

    def list_events(
        self, *, group: str | None = None, mailbox: str | None = None, limit: int | None = None
    ) -> list[TimelineEvent]:
        """Not here: the CRM owns timeline events."""
        raise StoreError(OWNED_BY_CRM)

    def close(self) -> None:
        """Stop the probe, close the HTTP connections and the state database."""
        self._closed.set()
        self.client.close()
        with self._state_lock:
            state, self._state = self._state, None
        if state is not None:
            state.close()
        if self._owns_state and self._given_state is not None:
            self._given_state.close()

    # -- helpers --------------------------------------------------------------------------------

    def _lookup(self, addresses: list[str], *, cache: bool = True) -> dict[str, tuple[Group, ...]]:
        try:
            answer, response = self.client.post(LOOKUP_PATH, {"addresses": addresses})
        except StoreUnavailableError:
            raise
        except StoreError as exc:
            # A refused lookup (400, 413…) must not decide anything: the batch waits in Queue.
            raise StoreUnavailableError(str(exc)) from exc
        results = answer.get("results")
        if not isinstance(results, list):
            raise StoreUnavailableError("CRM groups_lookup: answer has no results list")
        by_address: dict[str, tuple[Group, ...]] = {}
        for item in results:
            address = (
                normalise_address(str(item.get("address", ""))) if isinstance(item, dict) else None
            )
            groups = item.get("groups") if isinstance(item, dict) else None
            if address is None or not isinstance(groups, list):
                raise StoreUnavailableError("CRM groups_lookup: malformed result in answer")
            by_address[address] = tuple(_group(g, address) for g in groups)
        left_out = [a for a in addresses if a not in by_address]
        if left_out:
            # Never "no group": an address the CRM did not answer for is not known to be unlinked.
            raise StoreUnavailableError(
                f"CRM groups_lookup: answer left out {len(left_out)} of {len(addresses)} addresses"
            )
        if cache:
            self.cache.put_many(
                {a: by_address[a] for a in addresses},
                ttl_seconds=cache_seconds(response.headers.get("Cache-Control")),
            )
        return {a: by_address[a] for a in addresses}


def cache_seconds(cache_control: str | None) -> float | None:
    """The TTL a ``Cache-Control`` header allows (RFC 9111 §5.2.2): max-age, or 0 for no-store."""
    if not cache_control:
        return None
    lowered = cache_control.lower()
    if _NO_CACHE.search(lowered):
        return 0.0
    match = _MAX_AGE.search(lowered)
    return float(match.group(1)) if match else None


def _group(value: Any, address: str) -> Group:
    if not isinstance(value, dict) or not value.get("id") or not isinstance(value.get("id"), str):
        raise StoreUnavailableError("CRM groups_lookup: a group has no string id")
    name = value.get("name")
    return Group(
        name=name if isinstance(name, str) and name else value["id"],
        addresses=(address,),
        id=value["id"],
    )


def _merge_groups(answers: dict[str, tuple[Group, ...]]) -> list[Group]:
    merged: dict[str, Group] = {}
    for address, groups in answers.items():
        for group in groups:
            known = merged.get(group.id)
            addresses = (*known.addresses, address) if known else (address,)
            merged[group.id] = Group(name=group.name, addresses=addresses, id=group.id)
    return sorted(merged.values(), key=lambda g: (g.name, g.id))


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _event_json(key: str, event: TimelineEvent, via: list[str]) -> dict[str, Any]:
    # Capped when the message was parsed (MAX_BODY_CHARS is the document's maxLength); cut
    # again here only so that no event can break the contract.
    body = event.body_text
    return {
        "key": key,
        "group_id": event.group,
        "message_key": event.message_key,
        "direction": event.direction.value,
        "mailboxes": via,
        "message_id": event.message_id,
        "date": _iso(event.date),
        "from": event.from_,
        "to": event.to,
        "cc": event.cc,
        "subject": event.subject,
        "body_text": body[:MAX_BODY_CHARS],
        "body_truncated": event.body_truncated or len(body) > MAX_BODY_CHARS,
        "attachments": [
            {"filename": a.filename, "content_type": a.content_type, "size": a.size}
            for a in event.attachments
        ],
        "size": event.size,
        "filed_at": _iso(event.filed_at),
    }


def _event_statuses(answer: dict[str, Any], keys: list[str]) -> dict[str, tuple[str, str]]:
    results = answer.get("results")
    if not isinstance(results, list):
        raise StoreUnavailableError("CRM timeline_events: answer has no results list")
    statuses: dict[str, tuple[str, str]] = {}
    for item in results:
        if not isinstance(item, dict) or item.get("status") not in (
            "created",
            "exists",
            "rejected",
        ):
            raise StoreUnavailableError("CRM timeline_events: malformed result in answer")
        reason = item.get("reason")
        statuses[str(item.get("key"))] = (item["status"], reason if isinstance(reason, str) else "")
    missing = [k for k in keys if k not in statuses]
    if missing:
        # Unknown is not rejected: the batch is retried with the same keys, which is safe.
        raise StoreUnavailableError(
            f"CRM timeline_events: answer left out {len(missing)} of {len(keys)} events"
        )
    return statuses
