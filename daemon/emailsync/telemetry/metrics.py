"""Every Prometheus metric of the daemon, registered on an injected registry.

``exposition(registry)`` is what ``/metrics`` answers: the same text as prometheus_client's
``generate_latest``, but a mailbox's lines are written again only when its numbers changed
since the last scrape (issue 23: a scrape of 2,000 idle mailboxes re-joins cached text).
"""

from __future__ import annotations

import bisect
import contextvars
import itertools
import math
import threading
import time
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import metrics as prometheus_metrics
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from emailsync import __version__
from emailsync.config import METRICS_DETAIL

STATES = ("connecting", "idle", "syncing", "backoff", "needs_reauth", "stopped")
TRIGGERS = ("idle", "start_sync", "poll", "sweep", "startup")
CONNECTION_ERROR_KINDS = ("timeout", "refused", "tls", "bye", "protocol")
FAIL_REASONS = ("no_group", "unparseable", "rejected")
# Filing happens within a second of arrival when IDLE works; minutes when it falls back.
LATENCY_BUCKETS_SECONDS = (0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60, 300, 900, 3600)
PASS_BUCKETS_SECONDS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
# ``[daemon] metrics_detail``: "summary" (the default) keeps a mailbox to at most 12 series;
# "mailbox" is the full detail, ~60 series a mailbox (issue 23: 120,000 series and 10 MB a
# scrape at 2,000 mailboxes).
# In "summary", these families are summed over mailboxes (no ``mailbox`` label): a histogram
# or a breakdown per mailbox multiplies its series by the number of mailboxes.
_AGGREGATED = frozenset({"sync_passes", "sync_pass_seconds", "connection_errors"})


# The per-mailbox families, in the order they are exposed: (name, type, help, extra label).
# One registered collector yields them from a small record per mailbox (``MailboxSeries``):
# a prometheus_client label child per series (30-odd a mailbox, each with its own lock and
# value objects) cost ~20 KB a mailbox, 40 MB at 2,000 mailboxes (issue 10).
_FAMILIES: tuple[tuple[str, str, str, str | None], ...] = (
    ("messages_synced", "counter", "Outbound messages filed to Sent with events.", None),
    ("messages_received", "counter", "Inbound messages filed to Received with events.", None),
    (
        "messages_failed",
        "counter",
        "Messages filed to Failed (by reason with metrics_detail mailbox).",
        "reason",
    ),
    ("timeline_events", "counter", "Timeline events recorded (new ones, not de-duplicated).", None),
    (
        "refiled",
        "counter",
        "Messages filed from Failed to Sent or Received once their group appeared (they count"
        " in messages_synced/messages_received too).",
        None,
    ),
    ("sync_passes", "counter", "Sync passes run, by what triggered them.", "trigger"),
    ("sync_pass_seconds", "histogram", "Duration of a sync pass.", None),
    ("filing_latency_seconds", "", "", None),  # unlabelled: a plain Histogram
    ("queue_messages", "gauge", "Messages waiting in Queue.", None),
    (
        "messages_stuck",
        "gauge",
        "Messages quarantined in Queue (keyword $EmailSyncStuck) after repeated refusals.",
        None,
    ),
    (
        "queue_oldest_message_age_seconds",
        "gauge",
        "Age of the oldest message waiting in Queue (0 when it is empty).",
        None,
    ),
    ("mailbox_state", "gauge", "1 for the mailbox's current state.", "state"),
    ("last_sync_timestamp_seconds", "gauge", "End of the last successful sync pass.", None),
    ("connection_errors", "counter", "Connection errors, by kind.", "kind"),
    ("auth_failures", "counter", "Failed logins.", None),
    ("token_expiry_timestamp_seconds", "gauge", "Office 365 access-token expiry.", None),
    ("client_secret_expiry_timestamp_seconds", "", "", None),  # unlabelled: a plain Gauge
    ("build_info", "", "", None),  # a plain Gauge
)
_PASS_BOUNDS = (*PASS_BUCKETS_SECONDS, math.inf)
# The ``le`` label as prometheus_client writes it (Go's float format: 0.01, 2.5, +Inf).
_PASS_LE = tuple(
    floatToGoString(bound)  # type: ignore[no-untyped-call]  # untyped in prometheus_client
    for bound in _PASS_BOUNDS
)
# Every change to a mailbox's numbers takes a new stamp (itertools.count: one step is atomic
# under the GIL), so a scrape tells a changed record from one it already wrote out.
_STAMPS = itertools.count(1)
# Set while exposition() collects: Metrics.collect() then yields its per-mailbox families as
# text (_Rendered) instead of samples. A context variable, so another thread reading samples
# (get_sample_value, a test) meanwhile still gets samples.
_RENDERING: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "emailsync_metrics_rendering", default=False
)


class MailboxSeries:
    """One mailbox's series as plain numbers; every method is safe to call from any thread.

    Counters are ints or floats, the state is an index into STATES, and the series created
    only when first set (the pass histogram, last sync, token expiry) are None until then.
    A record that ``forget_mailbox`` dropped takes updates but is no longer exposed, so a
    worker still ending cannot bring a removed mailbox's series back.
    """

    __slots__ = (
        "_lock",
        "auth_failures",
        "connection_errors",
        "created",
        "extra",
        "failed",
        "last_sync",
        "later",
        "oldest_age",
        "pass_buckets",
        "pass_created",
        "pass_sum",
        "passes",
        "queue",
        "received",
        "stamp",
        "state",
        "stuck",
        "synced",
        "timeline",
        "token_expiry",
        "total",
    )

    def __init__(
        self, lock: threading.Lock, created: float, total: MailboxSeries | None = None
    ) -> None:
        self._lock = lock
        self.created = created
        self.stamp = next(_STAMPS)
        # The instance's sums of the families "summary" aggregates over mailboxes (kept as
        # counts come in, so a scrape reads them instead of adding up every mailbox, and a
        # removed mailbox's counts stay in them: a summed counter never goes down).
        self.total = total
        self.synced: float = 0
        self.received: float = 0
        self.failed: list[float] = [0] * len(FAIL_REASONS)
        self.timeline: float = 0
        self.later: float = 0  # re-filed from Failed (emailsync_refiled_total)
        self.passes: list[float] = [0] * len(TRIGGERS)
        self.pass_buckets: list[int] | None = None  # per bucket, not cumulative
        self.pass_sum = 0.0
        self.pass_created = 0.0
        self.queue: float = 0
        self.stuck: float = 0
        self.oldest_age: float = 0
        self.state: int | None = None  # index into STATES; -1: none of them; None: not set
        self.last_sync: float | None = None
        self.connection_errors: list[float] = [0] * len(CONNECTION_ERROR_KINDS)
        self.auth_failures: float = 0
        self.token_expiry: float | None = None
        # Label values outside the known tuples: (family, value) -> [value, created].
        self.extra: dict[tuple[str, str], list[float]] | None = None

    def filed(self, outcome: str) -> None:
        """Count one filed message: ``sent``, ``received`` or a Failed reason."""
        with self._lock:
            if outcome == "sent":
                self.synced += 1
            elif outcome == "received":
                self.received += 1
            else:
                self._inc(self.failed, FAIL_REASONS, "messages_failed", outcome, 1)
            self.stamp = next(_STAMPS)

    def timeline_events(self, count: float) -> None:
        """Count timeline events the store took as new."""
        with self._lock:
            self.timeline += count
            self.stamp = next(_STAMPS)

    def refiled(self, count: float) -> None:
        """Count messages filed from Failed once their group appeared."""
        with self._lock:
            self.later += count
            self.stamp = next(_STAMPS)

    def pass_done(self, trigger: str, seconds: float, now: float) -> None:
        """Count a completed pass, observe its duration and set the last-sync time."""
        bucket = bisect.bisect_left(_PASS_BOUNDS, seconds)
        with self._lock:
            for record in (self, self.total) if self.total is not None else (self,):
                record._inc(record.passes, TRIGGERS, "sync_passes", trigger, 1)
                if record.pass_buckets is None:
                    record.pass_buckets = [0] * len(_PASS_BOUNDS)
                    record.pass_created = time.time()
                record.pass_buckets[bucket] += 1
                record.pass_sum += seconds
            self.last_sync = float(now)
            self.stamp = next(_STAMPS)

    def connection_error(self, kind: str) -> None:
        """Count a lost or refused connection by kind."""
        with self._lock:
            for record in (self, self.total) if self.total is not None else (self,):
                record._inc(
                    record.connection_errors, CONNECTION_ERROR_KINDS, "connection_errors", kind, 1
                )
            self.stamp = next(_STAMPS)

    def auth_failure(self) -> None:
        """Count a refused login."""
        with self._lock:
            self.auth_failures += 1
            self.stamp = next(_STAMPS)

    # The gauges take a new stamp only when their value changes: a worker sets them on every
    # IDLE wake-up and the gauges job every 15 s, mostly to the same value.

    def set_queue(self, depth: float) -> None:
        """Messages waiting in Queue."""
        if self.queue != depth:
            self.queue = depth
            self.stamp = next(_STAMPS)

    def set_stuck(self, count: float) -> None:
        """Messages quarantined in Queue."""
        if self.stuck != count:
            self.stuck = count
            self.stamp = next(_STAMPS)

    def set_oldest_age(self, seconds: float) -> None:
        """Age of the oldest waiting message."""
        if self.oldest_age != seconds:
            self.oldest_age = seconds
            self.stamp = next(_STAMPS)

    def set_token_expiry(self, timestamp: float) -> None:
        """The access token's expiry."""
        if self.token_expiry != float(timestamp):
            self.token_expiry = float(timestamp)
            self.stamp = next(_STAMPS)

    def set_state(self, state: str) -> None:
        """The current state (1 for it, 0 for the others; all 0 for a state not in STATES)."""
        index = STATES.index(state) if state in STATES else -1
        if self.state != index:
            self.state = index
            self.stamp = next(_STAMPS)

    def _inc(
        self, values: list[float], known: tuple[str, ...], family: str, label: str, amount: float
    ) -> None:
        # Under self._lock.
        if label in known:
            values[known.index(label)] += amount
            return
        if self.extra is None:
            self.extra = {}
        entry = self.extra.setdefault((family, label), [0, time.time()])
        entry[0] += amount

    def copy(self) -> MailboxSeries:
        """A consistent copy of the numbers (taken under the lock)."""
        other = MailboxSeries.__new__(MailboxSeries)
        with self._lock:
            for name in MailboxSeries.__slots__:
                value = getattr(self, name)
                setattr(other, name, value.copy() if isinstance(value, list) else value)
            if self.extra is not None:
                other.extra = {key: list(entry) for key, entry in self.extra.items()}
        return other


class Metrics:
    """The daemon's metrics (prefix ``emailsync_``; label ``mailbox`` is the address).

    The per-mailbox families come from ``collect()`` (this object is the registered
    collector); the unlabelled ones are plain prometheus_client metrics it yields in place.
    """

    def __init__(self, registry: CollectorRegistry, detail: str = "summary") -> None:
        if detail not in METRICS_DETAIL:
            raise ValueError(f"metrics detail must be one of {METRICS_DETAIL}, not {detail!r}")
        self.registry = registry
        self.detail = detail
        self._lock = threading.Lock()
        self._mailboxes: dict[str, MailboxSeries] = {}
        # The aggregated families summed over every mailbox ever known: a sum over mailboxes
        # must not go down when one is removed (Prometheus would read a counter reset).
        self._totals = MailboxSeries(self._lock, time.time())
        self._totals.pass_buckets = [0] * len(_PASS_BOUNDS)
        self._totals.pass_created = self._totals.created
        # exposition(): each mailbox's text per per-mailbox family, as of its record's stamp.
        self._texts: dict[str, _MailboxText] = {}
        self._texts_lock = threading.Lock()
        ns = "emailsync"
        self.filing_latency_seconds = Histogram(
            "filing_latency_seconds",
            "Time from a message landing in Queue to it being filed.",
            buckets=LATENCY_BUCKETS_SECONDS,
            namespace=ns,
            registry=None,
        )
        self.client_secret_expiry = Gauge(
            "client_secret_expiry_timestamp_seconds",
            "Configured expiry of the Office 365 client secret.",
            namespace=ns,
            registry=None,
        )
        self.build_info = Gauge(
            "build_info",
            "Always 1; the version label says which build runs.",
            ["version"],
            namespace=ns,
            registry=None,
        )
        self.build_info.labels(version=__version__).set(1)
        self._plain: dict[str, Histogram | Gauge] = {
            "filing_latency_seconds": self.filing_latency_seconds,
            "client_secret_expiry_timestamp_seconds": self.client_secret_expiry,
            "build_info": self.build_info,
        }
        registry.register(self)

    def init_mailbox(self, mailbox: str) -> MailboxSeries:
        """Create every labelled series of a mailbox at 0, so rates and alerts see them.

        Called again for a known mailbox, it keeps the counters and sets the queue gauges
        to 0. Returns the mailbox's record, which the worker's report updates.
        """
        with self._lock:
            series = self._mailboxes.get(mailbox)
            if series is None:
                series = self._mailboxes[mailbox] = MailboxSeries(
                    self._lock, time.time(), self._totals
                )
            series.queue = series.oldest_age = series.stuck = 0
            series.stamp = next(_STAMPS)
            return series

    def set_state(self, mailbox: str, state: str) -> None:
        """Set the state gauge: 1 for ``state``, 0 for the others (a known mailbox only)."""
        series = self._mailboxes.get(mailbox)
        if series is not None:
            series.set_state(state)

    def forget_mailbox(self, mailbox: str) -> None:
        """Remove a mailbox's series (it was taken out of the config)."""
        with self._lock:
            self._mailboxes.pop(mailbox, None)

    def reference(self) -> list[tuple[str, str, tuple[str, ...], str]]:
        """Every metric in exposition order: name, type, label names, help (for docgen)."""
        rows: list[tuple[str, str, tuple[str, ...], str]] = []
        for name, kind, documentation, label in _FAMILIES:
            plain = self._plain.get(name)
            if plain is not None:
                # reason: prometheus_client keeps these on the wrapper only
                rows.append(
                    (plain._name, plain._type, tuple(plain._labelnames), plain._documentation)
                )
            else:
                rows.append(
                    (f"emailsync_{name}", kind, self._labelnames(name, label), documentation)
                )
        return rows

    def _labelnames(self, name: str, label: str | None) -> tuple[str, ...]:
        if self.detail == "summary" and name in _AGGREGATED:
            return () if label is None else (label,)
        if label is None or (self.detail == "summary" and name == "messages_failed"):
            return ("mailbox",)
        return ("mailbox", label)

    def describe(self) -> list[Metric]:
        """The families, without samples (the registry checks names with these)."""
        families: list[Metric] = []
        for name, kind, documentation, _ in _FAMILIES:
            plain = self._plain.get(name)
            if plain is not None:
                families.extend(plain.describe())
            else:
                families.append(Metric(f"emailsync_{name}", documentation, kind))
        return families

    def collect(self) -> Iterator[Metric]:
        """Every family with its samples, the same as a label child per series would give.

        One family at a time, as prometheus_client's own metrics do: a scrape of 2,000
        mailboxes is ~120,000 samples, and holding them all at once doubled its peak memory.
        """
        if _RENDERING.get():
            yield from self._rendered()
            return
        with self._lock:
            rows = list(self._mailboxes.items())
        snapshot = [(address, {"mailbox": address}, series.copy()) for address, series in rows]
        summary = self.detail == "summary"
        total = self._totals.copy() if summary else None
        for name, kind, documentation, label in _FAMILIES:
            plain = self._plain.get(name)
            if plain is not None:
                yield from plain.collect()
                continue
            family = Metric(f"emailsync_{name}", documentation, kind)
            if total is not None and name in _AGGREGATED:
                _aggregate_samples(family, name, label, total)
            elif summary:
                for address, one, series in snapshot:
                    _summary_samples(family, name, address, one, series)
            else:
                for address, one, series in snapshot:
                    _samples(family, name, label, address, one, series)
            yield family

    def _rendered(self) -> Iterator[Metric]:
        """collect() for exposition(): the per-mailbox families as text, the others as usual.

        A mailbox's lines are written again only when its record took a new stamp since the
        last scrape; a removed mailbox's text is dropped. One exposition at a time writes the
        cache (the lock), so two scrapes at once cannot interleave their updates.
        """
        with self._lock:
            rows = list(self._mailboxes.items())
        summary = self.detail == "summary"
        with self._texts_lock:
            texts: dict[str, _MailboxText] = {}
            old = self._texts
            for address, series in rows:
                text = old.get(address)
                if text is None or text.stamp != series.stamp:
                    text = self._mailbox_text(address, series.copy())
                texts[address] = text
            self._texts = texts
        entries = list(texts.values())
        index = 0
        for name, kind, documentation, label in _FAMILIES:
            plain = self._plain.get(name)
            if plain is not None:
                yield from plain.collect()
                continue
            if summary and name in _AGGREGATED:
                family = Metric(f"emailsync_{name}", documentation, kind)
                _aggregate_samples(family, name, label, self._totals.copy())
                yield family
                continue
            family = Metric(f"emailsync_{name}", documentation, kind)
            yield _Rendered(
                family,
                "".join(entry.lines[index] for entry in entries),
                "".join(entry.created[index] for entry in entries),
            )
            index += 1

    def _mailbox_text(self, address: str, s: MailboxSeries) -> _MailboxText:
        """One mailbox's exposition lines, per per-mailbox family in order (from a copy)."""
        if self.detail == "summary":
            return _MailboxText(s.stamp, _summary_lines(address, s), _NO_CREATED)
        one = {"mailbox": address}
        lines: list[str] = []
        created: list[str] = []
        for name, kind, documentation, label in _FAMILIES:
            if name in self._plain:
                continue
            family = Metric(f"emailsync_{name}", documentation, kind)
            _samples(family, name, label, address, one, s)
            main, late = _sample_lines(family)
            lines.append(main)
            created.append(late)
        return _MailboxText(s.stamp, tuple(lines), tuple(created))


class _MailboxText:
    """A mailbox's exposition lines per per-mailbox family, as of its record's ``stamp``."""

    __slots__ = ("created", "lines", "stamp")

    def __init__(self, stamp: int, lines: tuple[str, ...], created: tuple[str, ...]) -> None:
        self.stamp = stamp
        self.lines = lines  # the family's own samples
        self.created = created  # its ``_created`` samples (exposed after the others)


class _Rendered(Metric):
    """A family whose samples are already text: ``lines``, then the ``_created`` ones."""

    def __init__(self, family: Metric, lines: str, created: str) -> None:
        super().__init__(family.name, family.documentation, family.type)
        self.lines = lines
        self.created = created


class _Families(Collector):
    """A collector of families already collected (for prometheus_client's writer)."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry's text exposition (format 0.0.4), as ``generate_latest`` writes it.

    Families ``Metrics`` has as text already are joined in; every other family goes through
    prometheus_client's own writer, one at a time.
    """
    parts: list[str] = []
    token = _RENDERING.set(True)
    try:
        for family in registry.collect():
            if isinstance(family, _Rendered):
                parts.append(_header(family.name, family.type, family.documentation))
                parts.append(family.lines)
                if family.created:
                    parts.append(_header(f"{family.name}_created", "gauge", family.documentation))
                    parts.append(family.created)
            else:
                parts.append(generate_latest(_Families([family])).decode())
    finally:
        _RENDERING.reset(token)
    return "".join(parts).encode()


def _header(name: str, kind: str, documentation: str) -> str:
    """``# HELP`` and ``# TYPE`` as generate_latest writes them (counters named ``_total``)."""
    if kind == "counter":
        name += "_total"
    doc = documentation.replace("\\", r"\\").replace("\n", r"\n")
    return f"# HELP {name} {doc}\n# TYPE {name} {kind}\n"


# At "summary": each per-mailbox family's name and the name of its one sample a mailbox.
_SUMMARY_LINES = tuple(
    (name, f"emailsync_{name}_total" if kind == "counter" else f"emailsync_{name}")
    for name, kind, _, _ in _FAMILIES
    if kind and name not in _AGGREGATED
)
_NO_CREATED = ("",) * len(_SUMMARY_LINES)


def _sample_lines(family: Metric) -> tuple[str, str]:
    """A family's samples as exposition lines: its own, and its ``_created`` ones apart."""
    main: list[str] = []
    created: list[str] = []
    created_name = f"{family.name}_created"
    for sample in family.samples:
        labels = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(sample.labels.items()))
        value = floatToGoString(sample.value)  # type: ignore[no-untyped-call]  # untyped upstream
        line = f"{sample.name}{{{labels}}} {value}\n" if labels else f"{sample.name} {value}\n"
        (created if sample.name == created_name else main).append(line)
    return "".join(main), "".join(created)


def _escape(value: str) -> str:
    """A label value escaped as the text format asks (backslash, double quote, newline)."""
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return value


def _samples(  # noqa: PLR0917 -- a private helper of collect(), called in one place
    family: Metric,
    name: str,
    label: str | None,
    address: str,
    one: dict[str, str],
    s: MailboxSeries,
) -> None:
    """Add one mailbox's samples of one family, as prometheus_client's children name them.

    ``one`` is the ``{"mailbox": address}`` label set, shared by the samples that have no
    other label (the exposition only reads it).
    """
    full = family.name
    if name == "sync_pass_seconds":
        if s.pass_buckets is None:
            return
        acc = 0.0
        for le, count in zip(_PASS_LE, s.pass_buckets, strict=True):
            acc += count
            family.add_sample(f"{full}_bucket", {"mailbox": address, "le": le}, acc)
        family.add_sample(f"{full}_count", one, acc)
        family.add_sample(f"{full}_sum", one, s.pass_sum)
        if _use_created():
            family.add_sample(f"{full}_created", one, s.pass_created)
        return
    if label is None:
        value = _scalar(name, s)
        if value is not None:
            _add(family, one, value, s.created)
        return
    if name == "mailbox_state":
        if s.state is not None:
            for index, state in enumerate(STATES):
                family.add_sample(
                    full, {"mailbox": address, "state": state}, 1.0 if index == s.state else 0.0
                )
        return
    known, values = {
        "messages_failed": (FAIL_REASONS, s.failed),
        "sync_passes": (TRIGGERS, s.passes),
        "connection_errors": (CONNECTION_ERROR_KINDS, s.connection_errors),
    }[name]
    for value_label, value in zip(known, values, strict=True):
        _add(family, {"mailbox": address, label: value_label}, value, s.created)
    for (extra_family, value_label), (value, created) in (s.extra or {}).items():
        if extra_family == name:
            _add(family, {"mailbox": address, label: value_label}, value, created)


def _summary_samples(
    family: Metric, name: str, address: str, one: dict[str, str], s: MailboxSeries
) -> None:
    """One mailbox's samples of a per-mailbox family at the "summary" detail.

    No ``_created`` series (they would double the counters' series; Prometheus reads a
    counter's start from its first sample), the Failed reasons folded into one series and the
    state gauge only for the current state (``sum by (state)`` and ``state="x"`` read the same).
    """
    full = family.name
    if name == "mailbox_state":
        if s.state is not None and s.state >= 0:
            family.add_sample(full, {"mailbox": address, "state": STATES[s.state]}, 1.0)
        return
    if name == "messages_failed":
        extra = sum(v for (f, _), (v, _) in (s.extra or {}).items() if f == name)
        family.add_sample(f"{full}_total", one, float(sum(s.failed) + extra))
        return
    value = _scalar(name, s)
    if value is not None:
        family.add_sample(f"{full}_total" if family.type == "counter" else full, one, float(value))


def _scalar(name: str, s: MailboxSeries) -> float | None:
    """The value of one of a mailbox's unlabelled families (None: not known yet)."""
    return _scalars(s)[name]


def _scalars(s: MailboxSeries) -> dict[str, float | None]:
    """A mailbox's unlabelled families' values by family (None: not known yet)."""
    return {
        "messages_synced": s.synced,
        "messages_received": s.received,
        "timeline_events": s.timeline,
        "refiled": s.later,
        "auth_failures": s.auth_failures,
        "queue_messages": s.queue,
        "messages_stuck": s.stuck,
        "queue_oldest_message_age_seconds": s.oldest_age,
        "last_sync_timestamp_seconds": s.last_sync,
        "token_expiry_timestamp_seconds": s.token_expiry,
    }


def _summary_lines(address: str, s: MailboxSeries) -> tuple[str, ...]:
    """One mailbox's lines per per-mailbox family at "summary", written directly.

    The same lines as _summary_samples and prometheus_client's writer give (the scrape tests
    compare them), without a sample object each: a scrape in which every mailbox changed
    (the start of 2,000) then costs a fraction of building and writing 22,000 samples.
    """
    one = f'{{mailbox="{_escape(address)}"}} '
    values = _scalars(s)
    lines: list[str] = []
    for name, sample in _SUMMARY_LINES:
        if name == "mailbox_state":
            state = s.state
            lines.append(
                f'{sample}{{mailbox="{_escape(address)}",state="{STATES[state]}"}} 1.0\n'
                if state is not None and state >= 0
                else ""
            )
            continue
        if name == "messages_failed":
            extra = sum(v for (f, _), (v, _) in (s.extra or {}).items() if f == name)
            value: float | None = float(sum(s.failed) + extra)
        else:
            value = values[name]
        lines.append(
            "" if value is None else f"{sample}{one}{floatToGoString(value)}\n"  # type: ignore[no-untyped-call]  # untyped upstream
        )
    return tuple(lines)


def _aggregate_samples(family: Metric, name: str, label: str | None, s: MailboxSeries) -> None:
    """An aggregated family's samples (no ``mailbox`` label) from the summed record."""
    full = family.name
    if name == "sync_pass_seconds":
        acc = 0.0
        for le, count in zip(_PASS_LE, s.pass_buckets or [], strict=True):
            acc += count
            family.add_sample(f"{full}_bucket", {"le": le}, acc)
        family.add_sample(f"{full}_count", {}, acc)
        family.add_sample(f"{full}_sum", {}, s.pass_sum)
        if _use_created():
            family.add_sample(f"{full}_created", {}, s.pass_created)
        return
    label = label or ""  # sync_passes and connection_errors have one
    known, values = (
        (TRIGGERS, s.passes)
        if name == "sync_passes"
        else (CONNECTION_ERROR_KINDS, s.connection_errors)
    )
    for value_label, value in zip(known, values, strict=True):
        _add(family, {label: value_label}, value, s.created)
    for (extra_family, value_label), (value, created) in (s.extra or {}).items():
        if extra_family == name:
            _add(family, {label: value_label}, value, created)


def _add(family: Metric, labels: dict[str, str], value: float, created: float) -> None:
    if family.type == "counter":
        family.add_sample(f"{family.name}_total", labels, float(value))
        if _use_created():
            family.add_sample(f"{family.name}_created", labels, created)
    else:
        family.add_sample(family.name, labels, float(value))


def _use_created() -> bool:
    # prometheus_client's switch (PROMETHEUS_DISABLE_CREATED_SERIES, disable_created_metrics()).
    return bool(prometheus_metrics._use_created)  # the library's own switch


class ClusterMetrics:
    """Metrics of an instance sharing mailboxes through PostgreSQL (``emailsync.cluster.lease``)."""

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
