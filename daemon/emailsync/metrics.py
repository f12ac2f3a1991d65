"""Every Prometheus metric of the daemon, registered on an injected registry."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from emailsync import __version__

STATES = ("connecting", "idle", "syncing", "backoff", "needs_reauth", "stopped")
TRIGGERS = ("idle", "start_sync", "poll", "sweep", "startup")
CONNECTION_ERROR_KINDS = ("timeout", "refused", "tls", "bye", "protocol")
FAIL_REASONS = ("no_group", "unparseable", "rejected")
# Filing happens within a second of arrival when IDLE works; minutes when it falls back.
LATENCY_BUCKETS_SECONDS = (0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60, 300, 900, 3600)
PASS_BUCKETS_SECONDS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class Metrics:
    """The daemon's metrics (prefix ``emailsync_``; label ``mailbox`` is the address)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        ns = "emailsync"
        self.messages_synced = Counter(
            "messages_synced",
            "Outbound messages filed to Sent with events.",
            ["mailbox"],
            namespace=ns,
            registry=registry,
        )
        self.messages_received = Counter(
            "messages_received",
            "Inbound messages filed to Received with events.",
            ["mailbox"],
            namespace=ns,
            registry=registry,
        )
        self.messages_failed = Counter(
            "messages_failed",
            "Messages filed to Failed, by reason.",
            ["mailbox", "reason"],
            namespace=ns,
            registry=registry,
        )
        self.timeline_events = Counter(
            "timeline_events",
            "Timeline events recorded (new ones, not de-duplicated).",
            ["mailbox"],
            namespace=ns,
            registry=registry,
        )
        self.sync_passes = Counter(
            "sync_passes",
            "Sync passes run, by what triggered them.",
            ["mailbox", "trigger"],
            namespace=ns,
            registry=registry,
        )
        self.sync_pass_seconds = Histogram(
            "sync_pass_seconds",
            "Duration of a sync pass.",
            ["mailbox"],
            buckets=PASS_BUCKETS_SECONDS,
            namespace=ns,
            registry=registry,
        )
        self.filing_latency_seconds = Histogram(
            "filing_latency_seconds",
            "Time from a message landing in Queue to it being filed.",
            buckets=LATENCY_BUCKETS_SECONDS,
            namespace=ns,
            registry=registry,
        )
        self.queue_messages = Gauge(
            "queue_messages",
            "Messages waiting in Queue.",
            ["mailbox"],
            namespace=ns,
            registry=registry,
        )
        self.messages_stuck = Gauge(
            "messages_stuck",
            "Messages quarantined in Queue (keyword $EmailSyncStuck) after repeated refusals.",
            ["mailbox"],
            namespace=ns,
            registry=registry,
        )
        self.queue_oldest_age = Gauge(
            "queue_oldest_message_age_seconds",
            "Age of the oldest message waiting in Queue (0 when it is empty).",
            ["mailbox"],
            namespace=ns,
            registry=registry,
        )
        self.mailbox_state = Gauge(
            "mailbox_state",
            "1 for the mailbox's current state.",
            ["mailbox", "state"],
            namespace=ns,
            registry=registry,
        )
        self.last_sync = Gauge(
            "last_sync_timestamp_seconds",
            "End of the last successful sync pass.",
            ["mailbox"],
            namespace=ns,
            registry=registry,
        )
        self.connection_errors = Counter(
            "connection_errors",
            "Connection errors, by kind.",
            ["mailbox", "kind"],
            namespace=ns,
            registry=registry,
        )
        self.auth_failures = Counter(
            "auth_failures",
            "Failed logins.",
            ["mailbox"],
            namespace=ns,
            registry=registry,
        )
        self.token_expiry = Gauge(
            "token_expiry_timestamp_seconds",
            "Office 365 access-token expiry.",
            ["mailbox"],
            namespace=ns,
            registry=registry,
        )
        self.client_secret_expiry = Gauge(
            "client_secret_expiry_timestamp_seconds",
            "Configured expiry of the Office 365 client secret.",
            namespace=ns,
            registry=registry,
        )
        self.build_info = Gauge(
            "build_info",
            "Always 1; the version label says which build runs.",
            ["version"],
            namespace=ns,
            registry=registry,
        )
        self.build_info.labels(version=__version__).set(1)

    def init_mailbox(self, mailbox: str) -> None:
        """Create every labelled series of a mailbox at 0, so rates and alerts see them."""
        self.messages_synced.labels(mailbox=mailbox)
        self.messages_received.labels(mailbox=mailbox)
        for reason in FAIL_REASONS:
            self.messages_failed.labels(mailbox=mailbox, reason=reason)
        self.timeline_events.labels(mailbox=mailbox)
        for trigger in TRIGGERS:
            self.sync_passes.labels(mailbox=mailbox, trigger=trigger)
        for kind in CONNECTION_ERROR_KINDS:
            self.connection_errors.labels(mailbox=mailbox, kind=kind)
        self.auth_failures.labels(mailbox=mailbox)
        self.queue_messages.labels(mailbox=mailbox).set(0)
        self.queue_oldest_age.labels(mailbox=mailbox).set(0)
        self.messages_stuck.labels(mailbox=mailbox).set(0)

    def set_state(self, mailbox: str, state: str) -> None:
        """Set the state gauge: 1 for ``state``, 0 for the others."""
        for name in STATES:
            self.mailbox_state.labels(mailbox=mailbox, state=name).set(1 if name == state else 0)

    def forget_mailbox(self, mailbox: str) -> None:
        """Remove a mailbox's series (it was taken out of the config)."""
        for metric in (
            self.messages_synced,
            self.messages_received,
            self.timeline_events,
            self.sync_pass_seconds,
            self.queue_messages,
            self.queue_oldest_age,
            self.messages_stuck,
            self.last_sync,
            self.auth_failures,
            self.token_expiry,
        ):
            _remove(metric, mailbox)
        for reason in FAIL_REASONS:
            _remove(self.messages_failed, mailbox, reason)
        for trigger in TRIGGERS:
            _remove(self.sync_passes, mailbox, trigger)
        for kind in CONNECTION_ERROR_KINDS:
            _remove(self.connection_errors, mailbox, kind)
        for state in STATES:
            _remove(self.mailbox_state, mailbox, state)


def _remove(metric: Counter | Gauge | Histogram, *labels: str) -> None:
    with contextlib.suppress(KeyError):  # never created
        metric.remove(*labels)


class ClusterMetrics:
    """Metrics of an instance that shares mailboxes through PostgreSQL (``emailsync.lease``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        ns = "emailsync"
        self.owned_mailboxes = Gauge(
            "owned_mailboxes",
            "Mailboxes whose lease this instance holds (it runs their workers).",
            namespace=ns,
            registry=registry,
        )
        self.lease_losses = Counter(
            "lease_losses",
            "Leases this instance lost without releasing them (expired or taken over).",
            namespace=ns,
            registry=registry,
        )


CRM_ENDPOINTS = ("groups_lookup", "timeline_events")
# Loopback answers in milliseconds; a remote CRM in tens to hundreds; the timeout is seconds.
CRM_BUCKETS_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class CrmMetrics:
    """The CRM connector's metrics; registered only when a ``[crm]`` is configured."""

    def __init__(self, registry: CollectorRegistry) -> None:
        ns = "emailsync"
        self.requests = Counter(
            "crm_requests",
            "Requests to the CRM, by endpoint and HTTP status (error/timeout: no answer).",
            ["endpoint", "status"],
            namespace=ns,
            registry=registry,
        )
        self.request_seconds = Histogram(
            "crm_request_seconds",
            "Duration of a request to the CRM.",
            ["endpoint"],
            buckets=CRM_BUCKETS_SECONDS,
            namespace=ns,
            registry=registry,
        )
        self.cache = Counter(
            "crm_cache",
            "Group lookups per address answered from the cache (hit) or asked of the CRM (miss).",
            ["result"],
            namespace=ns,
            registry=registry,
        )
        self.up = Gauge(
            "crm_up",
            "1 when the last request to the CRM (the start-up probe's included) was answered;"
            " 0 when it could not be, and before the CRM first answered.",
            namespace=ns,
            registry=registry,
        )
        for endpoint in CRM_ENDPOINTS:
            self.request_seconds.labels(endpoint=endpoint)
            self.requests.labels(endpoint=endpoint, status="200")
        for result in ("hit", "miss"):
            self.cache.labels(result=result)
        # Not 1 until the CRM answered: a dashboard must not say "up" for a CRM never reached.
        self.up.set(0)
