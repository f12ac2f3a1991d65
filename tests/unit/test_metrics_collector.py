"""The per-mailbox metrics collector: at ``metrics_detail = "mailbox"`` exactly what one label
child per series did; at the default "summary" at most 12 series a mailbox."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from emailsync import __version__
from emailsync.telemetry.metrics import (
    CONNECTION_ERROR_KINDS,
    FAIL_REASONS,
    LATENCY_BUCKETS_SECONDS,
    PASS_BUCKETS_SECONDS,
    STATES,
    TRIGGERS,
    MailboxSeries,
    Metrics,
)
from emailsync.telemetry.metrics import exposition as scrape_text

# -- the reference: the implementation before the collector (one label child per series) --------


class LabelChildMetrics:
    """emailsync.telemetry.metrics.Metrics as it was: a prometheus_client label child per series."""

    def __init__(self, registry: CollectorRegistry) -> None:
        ns = "emailsync"

        def counter(name: str, doc: str, labels: list[str]) -> Counter:
            return Counter(name, doc, labels, namespace=ns, registry=registry)

        def gauge(name: str, doc: str, labels: list[str]) -> Gauge:
            return Gauge(name, doc, labels, namespace=ns, registry=registry)

        def histogram(
            name: str, doc: str, labels: list[str], buckets: Sequence[float]
        ) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, namespace=ns, registry=registry)

        self.messages_synced = counter(
            "messages_synced", "Outbound messages filed to Sent with events.", ["mailbox"]
        )
        self.messages_received = counter(
            "messages_received", "Inbound messages filed to Received with events.", ["mailbox"]
        )
        self.messages_failed = counter(
            "messages_failed",
            "Messages filed to Failed (by reason with metrics_detail mailbox).",
            ["mailbox", "reason"],
        )
        self.timeline_events = counter(
            "timeline_events",
            "Timeline events recorded (new ones, not de-duplicated).",
            ["mailbox"],
        )
        self.refiled = counter(
            "refiled",
            "Messages filed from Failed to Sent or Received once their group appeared (they"
            " count in messages_synced/messages_received too).",
            ["mailbox"],
        )
        self.sync_passes = counter(
            "sync_passes", "Sync passes run, by what triggered them.", ["mailbox", "trigger"]
        )
        self.sync_pass_seconds = histogram(
            "sync_pass_seconds", "Duration of a sync pass.", ["mailbox"], PASS_BUCKETS_SECONDS
        )
        self.filing_latency_seconds = histogram(
            "filing_latency_seconds",
            "Time from a message landing in Queue to it being filed.",
            [],
            LATENCY_BUCKETS_SECONDS,
        )
        self.queue_messages = gauge("queue_messages", "Messages waiting in Queue.", ["mailbox"])
        self.messages_stuck = gauge(
            "messages_stuck",
            "Messages quarantined in Queue (keyword $EmailSyncStuck) after repeated refusals.",
            ["mailbox"],
        )
        self.queue_oldest_age = gauge(
            "queue_oldest_message_age_seconds",
            "Age of the oldest message waiting in Queue (0 when it is empty).",
            ["mailbox"],
        )
        self.mailbox_state = gauge(
            "mailbox_state", "1 for the mailbox's current state.", ["mailbox", "state"]
        )
        self.last_sync = gauge(
            "last_sync_timestamp_seconds", "End of the last successful sync pass.", ["mailbox"]
        )
        self.connection_errors = counter(
            "connection_errors", "Connection errors, by kind.", ["mailbox", "kind"]
        )
        self.auth_failures = counter("auth_failures", "Failed logins.", ["mailbox"])
        self.token_expiry = gauge(
            "token_expiry_timestamp_seconds", "Office 365 access-token expiry.", ["mailbox"]
        )
        self.client_secret_expiry = gauge(
            "client_secret_expiry_timestamp_seconds",
            "Configured expiry of the Office 365 client secret.",
            [],
        )
        self.build_info = gauge(
            "build_info", "Always 1; the version label says which build runs.", ["version"]
        )
        self.build_info.labels(version=__version__).set(1)

    def init_mailbox(self, mailbox: str) -> None:
        self.messages_synced.labels(mailbox=mailbox)
        self.messages_received.labels(mailbox=mailbox)
        for reason in FAIL_REASONS:
            self.messages_failed.labels(mailbox=mailbox, reason=reason)
        self.timeline_events.labels(mailbox=mailbox)
        self.refiled.labels(mailbox=mailbox)
        for trigger in TRIGGERS:
            self.sync_passes.labels(mailbox=mailbox, trigger=trigger)
        for kind in CONNECTION_ERROR_KINDS:
            self.connection_errors.labels(mailbox=mailbox, kind=kind)
        self.auth_failures.labels(mailbox=mailbox)
        self.queue_messages.labels(mailbox=mailbox).set(0)
        self.queue_oldest_age.labels(mailbox=mailbox).set(0)
        self.messages_stuck.labels(mailbox=mailbox).set(0)

    def set_state(self, mailbox: str, state: str) -> None:
        for name in STATES:
            self.mailbox_state.labels(mailbox=mailbox, state=name).set(1 if name == state else 0)

    def forget_mailbox(self, mailbox: str) -> None:
        for metric in (
            self.messages_synced,
            self.messages_received,
            self.timeline_events,
            self.refiled,
            self.sync_pass_seconds,
            self.queue_messages,
            self.queue_oldest_age,
            self.messages_stuck,
            self.last_sync,
            self.auth_failures,
            self.token_expiry,
        ):
            with contextlib.suppress(KeyError):
                metric.remove(mailbox)
        for family, values in (
            (self.messages_failed, FAIL_REASONS),
            (self.sync_passes, TRIGGERS),
            (self.connection_errors, CONNECTION_ERROR_KINDS),
            (self.mailbox_state, STATES),
        ):
            for value in values:
                with contextlib.suppress(KeyError):
                    family.remove(mailbox, value)


# -- the same operations on both -----------------------------------------------------------------


@dataclass
class Pair:
    """The reference and the collector, each on its own fresh registry."""

    old: LabelChildMetrics
    new: Metrics
    old_registry: CollectorRegistry
    new_registry: CollectorRegistry
    series: dict[str, MailboxSeries]

    def init(self, mailbox: str) -> None:
        self.old.init_mailbox(mailbox)
        self.series[mailbox] = self.new.init_mailbox(mailbox)

    def state(self, mailbox: str, state: str) -> None:
        self.old.set_state(mailbox, state)
        self.new.set_state(mailbox, state)

    def forget(self, mailbox: str) -> None:
        self.old.forget_mailbox(mailbox)
        self.new.forget_mailbox(mailbox)

    def filed(self, mailbox: str, outcome: str) -> None:
        if outcome == "sent":
            self.old.messages_synced.labels(mailbox=mailbox).inc()
        elif outcome == "received":
            self.old.messages_received.labels(mailbox=mailbox).inc()
        else:
            self.old.messages_failed.labels(mailbox=mailbox, reason=outcome).inc()
        self.series[mailbox].filed(outcome)

    def pass_done(self, mailbox: str, trigger: str, seconds: float, now: float) -> None:
        self.old.sync_passes.labels(mailbox=mailbox, trigger=trigger).inc()
        self.old.sync_pass_seconds.labels(mailbox=mailbox).observe(seconds)
        self.old.last_sync.labels(mailbox=mailbox).set(now)
        self.series[mailbox].pass_done(trigger, seconds, now)

    def gauges(self, mailbox: str, queue: int, stuck: int, age: float) -> None:
        self.old.queue_messages.labels(mailbox=mailbox).set(queue)
        self.old.messages_stuck.labels(mailbox=mailbox).set(stuck)
        self.old.queue_oldest_age.labels(mailbox=mailbox).set(age)
        series = self.series[mailbox]
        series.set_queue(queue)
        series.set_stuck(stuck)
        series.set_oldest_age(age)

    def other(self, mailbox: str) -> None:
        self.old.timeline_events.labels(mailbox=mailbox).inc(3)
        self.old.refiled.labels(mailbox=mailbox).inc(2)
        self.old.connection_errors.labels(mailbox=mailbox, kind="timeout").inc()
        self.old.connection_errors.labels(mailbox=mailbox, kind="bye").inc()
        self.old.auth_failures.labels(mailbox=mailbox).inc()
        self.old.token_expiry.labels(mailbox=mailbox).set(1_900_000_000.5)
        series = self.series[mailbox]
        series.timeline_events(3)
        series.refiled(2)
        series.connection_error("timeout")
        series.connection_error("bye")
        series.auth_failure()
        series.set_token_expiry(1_900_000_000.5)

    def unlabelled(self) -> None:
        for metrics in (self.old, self.new):
            metrics.filing_latency_seconds.observe(0.3)
            metrics.filing_latency_seconds.observe(7)
            metrics.client_secret_expiry.set(1_800_000_000)


def pair() -> Pair:
    old_registry, new_registry = CollectorRegistry(), CollectorRegistry()
    return Pair(
        LabelChildMetrics(old_registry),
        Metrics(new_registry, detail="mailbox"),
        old_registry,
        new_registry,
        {},
    )


_CREATED = re.compile(rb"^(\S+_created(?:\{[^}]*\})?) \S+$", re.MULTILINE)


def exposition(registry: CollectorRegistry) -> bytes:
    """The text exposition with the creation times (wall clock, per series) blanked."""
    return _CREATED.sub(rb"\1 T", generate_latest(registry))


def assert_same(p: Pair) -> None:
    old, new = exposition(p.old_registry), exposition(p.new_registry)
    assert new.decode().splitlines() == old.decode().splitlines()
    assert_scrape_is_generate_latest(p.new_registry)


def assert_scrape_is_generate_latest(registry: CollectorRegistry) -> None:
    """What /metrics answers (cached text per mailbox) is prometheus_client's text exactly."""
    assert scrape_text(registry).decode().splitlines() == (
        generate_latest(registry).decode().splitlines()
    )
    assert scrape_text(registry) == generate_latest(registry)


def scenario(p: Pair, steps: list[Callable[[Pair], None]]) -> None:
    for step in steps:
        step(p)
        assert_same(p)


def test_fresh_registry_exposes_the_same_families() -> None:
    p = pair()
    assert_same(p)
    assert b"# TYPE emailsync_sync_pass_seconds histogram" in exposition(p.new_registry)


def test_three_mailboxes_through_their_lives_expose_the_same_text() -> None:
    a, b, c = "a@example.com", "b@example.com", "c@example.com"
    scenario(
        pair(),
        [
            lambda p: p.init(a),
            lambda p: p.state(a, "connecting"),
            lambda p: p.init(b),
            lambda p: p.state(b, "connecting"),
            lambda p: p.pass_done(a, "startup", 0.003, 1_700_000_000.25),
            lambda p: p.state(a, "idle"),
            lambda p: p.filed(b, "sent"),
            lambda p: p.filed(b, "received"),
            lambda p: p.filed(b, "no_group"),
            lambda p: p.filed(b, "rejected"),
            lambda p: p.pass_done(b, "start_sync", 42.0, 1_700_000_100.0),
            lambda p: p.pass_done(b, "idle", 400.0, 1_700_000_200.0),  # over the last bucket
            lambda p: p.pass_done(b, "idle", 0.05, 1_700_000_300.0),  # on a bucket's bound
            lambda p: p.gauges(b, 7, 2, 12.5),
            lambda p: p.other(a),
            lambda p: p.unlabelled(),
            lambda p: p.init(c),
            lambda p: p.state(c, "needs_reauth"),
            lambda p: p.init(b),  # again (the supervisor does): counters kept, gauges to 0
            lambda p: p.forget(a),
            lambda p: p.forget("nobody@example.com"),
            lambda p: p.init(a),  # back (a reload): after the others, from 0
            lambda p: p.state(a, "stopped"),
        ],
    )


def test_get_sample_value_sees_the_collector() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, detail="mailbox")
    series = metrics.init_mailbox("a@example.com")
    series.pass_done("sweep", 0.2, 1_700_000_000.0)
    labels = {"mailbox": "a@example.com", "trigger": "sweep"}
    assert registry.get_sample_value("emailsync_sync_passes_total", labels) == 1
    assert (
        registry.get_sample_value(
            "emailsync_sync_pass_seconds_bucket", {"mailbox": "a@example.com", "le": "0.25"}
        )
        == 1
    )
    metrics.forget_mailbox("a@example.com")
    series.pass_done("sweep", 0.2, 1_700_000_001.0)  # a worker still ending
    assert registry.get_sample_value("emailsync_sync_passes_total", labels) is None


def test_a_collector_is_a_fraction_of_the_label_children() -> None:
    """The point of it (issue 10): a mailbox's series cost far less than ~20 KB."""
    import tracemalloc  # noqa: PLC0415 -- only here

    def cost(build: Callable[[CollectorRegistry], object], init: str) -> float:
        registry = CollectorRegistry()
        metrics = build(registry)
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for n in range(200):
            getattr(metrics, init)(f"m{n}@example.com")
            metrics.set_state(f"m{n}@example.com", "idle")  # type: ignore[attr-defined]
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        return (after - before) / 200

    old = cost(LabelChildMetrics, "init_mailbox")
    new = cost(Metrics, "init_mailbox")
    assert new < old / 5, (old, new)


# -- the default detail: "summary" ---------------------------------------------------------------


def series_by_mailbox(registry: CollectorRegistry) -> dict[str, int]:
    """Series (samples) per value of the ``mailbox`` label, and "" for those without it."""
    counts: dict[str, int] = {}
    for family in registry.collect():
        for sample in family.samples:
            key = sample.labels.get("mailbox", "")
            counts[key] = counts.get(key, 0) + 1
    return counts


def busy_mailbox(metrics: Metrics, address: str) -> MailboxSeries:
    """A mailbox that has done everything a worker reports, Office 365 token included."""
    series = metrics.init_mailbox(address)
    metrics.set_state(address, "connecting")
    metrics.set_state(address, "idle")
    for outcome in ("sent", "received", *FAIL_REASONS, "some_new_reason"):
        series.filed(outcome)
    for trigger in (*TRIGGERS, "some_new_trigger"):
        series.pass_done(trigger, 0.2, 1_700_000_000.0)
    for kind in (*CONNECTION_ERROR_KINDS, "some_new_kind"):
        series.connection_error(kind)
    series.timeline_events(3)
    series.refiled(1)
    series.auth_failure()
    series.set_queue(2)
    series.set_stuck(1)
    series.set_oldest_age(30)
    series.set_token_expiry(1_900_000_000)
    return series


def test_the_default_keeps_a_mailbox_to_at_most_12_series() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    for n in range(3):
        busy_mailbox(metrics, f"m{n}@example.com")
    counts = series_by_mailbox(registry)
    for n in range(3):
        assert counts[f"m{n}@example.com"] <= 12, counts
    # The instance's own series do not grow with the mailboxes.
    alone = CollectorRegistry()
    busy_mailbox(Metrics(alone), "m0@example.com")
    assert counts[""] == series_by_mailbox(alone)[""]


def test_the_mailbox_detail_keeps_every_breakdown_per_mailbox() -> None:
    registry = CollectorRegistry()
    busy_mailbox(Metrics(registry, detail="mailbox"), "m0@example.com")
    assert series_by_mailbox(registry)["m0@example.com"] > 50
    labels = {"mailbox": "m0@example.com", "kind": "tls"}
    assert registry.get_sample_value("emailsync_connection_errors_total", labels) == 1


def test_the_summary_sums_breakdowns_over_mailboxes_and_keeps_them_when_one_goes() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    busy_mailbox(metrics, "a@example.com")
    busy_mailbox(metrics, "b@example.com")
    value = registry.get_sample_value
    assert value("emailsync_connection_errors_total", {"kind": "tls"}) == 2
    assert value("emailsync_connection_errors_total", {"kind": "some_new_kind"}) == 2
    assert value("emailsync_sync_passes_total", {"trigger": "idle"}) == 2
    assert value("emailsync_sync_pass_seconds_bucket", {"le": "0.25"}) == 2 * (len(TRIGGERS) + 1)
    assert value("emailsync_messages_failed_total", {"mailbox": "a@example.com"}) == 4
    assert value("emailsync_mailbox_state", {"mailbox": "a@example.com", "state": "idle"}) == 1
    assert (
        value("emailsync_mailbox_state", {"mailbox": "a@example.com", "state": "connecting"})
        is None
    )
    metrics.forget_mailbox("a@example.com")
    busy_mailbox(metrics, "a@example.com")  # back after a reload: its record starts at 0
    # A counter summed over mailboxes never goes down (Prometheus would read a reset).
    assert value("emailsync_connection_errors_total", {"kind": "tls"}) == 3
    assert value("emailsync_sync_pass_seconds_count", {}) == 3 * (len(TRIGGERS) + 1)
    assert value("emailsync_messages_failed_total", {"mailbox": "a@example.com"}) == 4


def test_an_unknown_detail_is_refused() -> None:
    with pytest.raises(ValueError, match="metrics detail"):
        Metrics(CollectorRegistry(), detail="everything")


# -- the scrape's text cache (issue 23: a scrape re-writes only the mailboxes that changed) ------


def test_the_scrape_text_follows_every_change_at_the_default_detail() -> None:
    """Each kind of change between two scrapes shows in the next one, as generate_latest has it."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    odd = 'we"ird\\name@example.com'  # a label value the text format must escape

    def auth_failure_of_b() -> None:
        metrics._mailboxes["b@example.com"].auth_failure()

    steps: list[Callable[[], object]] = [
        lambda: busy_mailbox(metrics, "a@example.com"),
        lambda: busy_mailbox(metrics, odd),
        lambda: metrics.set_state("a@example.com", "backoff"),
        lambda: metrics.init_mailbox("b@example.com"),
        lambda: metrics.set_state("b@example.com", "no_such_state"),
        lambda: metrics.init_mailbox("a@example.com"),  # again: its queue gauges back to 0
        lambda: metrics._mailboxes[odd].set_queue(9),
        lambda: metrics._mailboxes[odd].set_oldest_age(12.5),
        lambda: metrics._mailboxes[odd].set_stuck(3),
        lambda: metrics._mailboxes[odd].set_token_expiry(1_900_000_001),
        lambda: metrics._mailboxes["b@example.com"].filed("rejected"),
        lambda: metrics._mailboxes["b@example.com"].filed("some_new_reason"),
        lambda: metrics._mailboxes["b@example.com"].pass_done("idle", 3.0, 1_700_000_001.0),
        lambda: metrics._mailboxes["b@example.com"].connection_error("tls"),
        auth_failure_of_b,
        lambda: metrics._mailboxes["b@example.com"].timeline_events(4),
        lambda: metrics._mailboxes["b@example.com"].refiled(1),
        lambda: metrics.filing_latency_seconds.observe(2),
        lambda: metrics.forget_mailbox("a@example.com"),
        lambda: metrics.init_mailbox("a@example.com"),
    ]
    assert_scrape_is_generate_latest(registry)
    for step in steps:
        step()
        assert_scrape_is_generate_latest(registry)


def test_a_scrape_writes_again_only_the_mailboxes_that_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    for n in range(20):
        busy_mailbox(metrics, f"m{n}@example.com")
    written: list[str] = []
    original = Metrics._mailbox_text

    def counting(self: Metrics, address: str, series: MailboxSeries) -> object:
        written.append(address)
        return original(self, address, series)

    monkeypatch.setattr(Metrics, "_mailbox_text", counting)
    scrape_text(registry)
    assert len(written) == 20
    written.clear()
    # The same values again (the gauges job, IDLE wake-ups) are no change.
    metrics._mailboxes["m3@example.com"].set_queue(2)
    metrics.set_state("m3@example.com", "idle")
    scrape_text(registry)
    assert written == []
    metrics._mailboxes["m3@example.com"].set_queue(5)
    metrics._mailboxes["m7@example.com"].pass_done("sweep", 0.1, 1_700_000_002.0)
    scrape_text(registry)
    assert sorted(written) == ["m3@example.com", "m7@example.com"]
    assert_scrape_is_generate_latest(registry)
