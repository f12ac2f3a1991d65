"""The validated, frozen settings (one dataclass a config table) and their defaults."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from emailsync.errors import ConfigError
from emailsync.mail.address import normalise_address
from emailsync.model import FolderRole
from emailsync.secret import ClientCertificate, SecretSource, read_client_certificate

DEFAULT_CONFIG_PATH = Path("/etc/emailsync/emailsync.toml")
DEFAULT_STATE_DIR = Path("/var/lib/emailsync")
DEFAULT_LISTEN = "127.0.0.1:9387"
# A control token of 22 URL-safe characters carries 128 bits (``secrets.token_urlsafe(16)``).
MIN_CONTROL_TOKEN_CHARS = 22
MIN_CONTROL_TOKEN_DISTINCT = 8
OFFICE365_HOST = "outlook.office365.com"
OFFICE365_AUTHORITY = "https://login.microsoftonline.com"
# RFC 2177: servers may drop an IDLE client after 30 minutes, so renew well before.
IDLE_RENEW_SECONDS = 23 * 60
SWEEP_SECONDS = 10 * 60
POLL_SECONDS = 60
TIMEOUT_SECONDS = 30.0
# First Time Setup's login waits this long for each answer: servers hold a refused login
# (Dovecot's auth_failure_delay, 2 s by default) and the next one from the same address (its
# auth penalty, Exchange longer), so a short wait reads a typo or its correction as a timeout.
SETUP_TIMEOUT_SECONDS = 30.0
FETCH_BATCH = 500  # the server floor of issue 23 is per 500: fewer round trips and commits
STUCK_AFTER_ATTEMPTS = 5
# Connects (TCP, TLS, login) in flight at once across all mailboxes: 2,000 mailboxes starting
# together must not make 2,000 handshakes compete for the CPU and the server (issue 10).
CONNECT_CONCURRENCY = 32
# Agents' links (tokens) expire after this many days unless issued with their own; 0, set on
# purpose, issues links that never expire (issue 19: links must not live for ever by default).
AGENT_TOKEN_DAYS = 90
MAX_AGENT_TOKEN_DAYS = 3660
CRM_TIMEOUT_SECONDS = 10.0
CRM_GROUP_CACHE_SECONDS = 60.0
# A CRM's signed POST /v1/groups:changed is refused when its time is this far from ours.
CRM_CHANGED_WINDOW_SECONDS = 300.0
# Failed mail comes back by itself (issue 22): a re-file pass takes at most this many
# messages before the mailbox goes back to its Queue; the periodic re-check of Failed mail
# (for CRMs that cannot call back) starts a walk of the index this often (0: never) and
# looks up at most this many addresses a minute.
REFILE_PER_PASS = 500
REFILE_CHECK_SECONDS = 24 * 3600.0
REFILE_CHECK_PER_MINUTE = 1000
# Plain http:// is accepted only to these hosts (a CRM on the same machine, the demo's).
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
# How errors and docs (config/crm-api.yaml) name them; a test keeps the two in step.
PLAIN_HTTP_HOSTS = "plain http:// only to localhost, 127.0.0.1 or [::1]"

SECURITIES = ("ssl", "starttls", "none")
AUTHS = ("password", "office365")
TRIGGERS = ("auto", "manual")
LOG_FORMATS = ("auto", "json", "console", "journal")
# [daemon] metrics_detail: emailsync.telemetry.metrics' series a mailbox (summary: at most 12).
METRICS_DETAIL = ("summary", "mailbox")

# RFC 7468 textual encoding: one labelled block per key or certificate in a PEM file.
# [cluster]: a dead instance's mailboxes wait up to this long for a new owner; heartbeats
# come every third of it, so shorter leases cost store round-trips, longer ones failover time.
LEASE_SECONDS = 30.0
# A worker asked to stop finishes the batch in flight and logs out within this long: the
# shutdown budget (SIGTERM must end the process within 10 s), also given to a worker whose
# lease is handed back before the lease is released.
WORKER_STOP_SECONDS = 8.0
# A lease must outlast a worker's stop even when no renewal gets through once it began (the
# store is unreachable, the daemon is shutting down): renewed every third of it, at least two
# thirds are left at any time, and those must cover WORKER_STOP_SECONDS.
MIN_LEASE_SECONDS = WORKER_STOP_SECONDS * 3 / 2
MAX_LEASE_SECONDS = 3600.0


@dataclass(frozen=True)
class DaemonSettings:
    """The ``[daemon]`` table."""

    state_dir: Path = DEFAULT_STATE_DIR
    # The state database's URL (``[daemon] state``; ``store`` is its old name). Empty: the
    # built-in SQLite file in state_dir.
    state: str = ""
    listen_host: str = "127.0.0.1"
    listen_port: int = 9387
    # Where browsers reach the listener (a TLS proxy's https:// URL), without a trailing "/";
    # empty: links and the OAuth redirect are built from each request's Host header.
    public_url: str = ""
    control_token: SecretSource | None = None
    log_format: str = "auto"
    metrics_detail: str = "summary"
    log_level: str = "info"
    idle_renew_seconds: float = IDLE_RENEW_SECONDS
    sweep_seconds: float = SWEEP_SECONDS
    poll_seconds: float = POLL_SECONDS
    timeout_seconds: float = TIMEOUT_SECONDS
    setup_timeout_seconds: float = SETUP_TIMEOUT_SECONDS
    fetch_batch: int = FETCH_BATCH
    refile_per_pass: int = REFILE_PER_PASS
    refile_check_seconds: float = REFILE_CHECK_SECONDS  # 0: no periodic re-check
    refile_check_per_minute: int = REFILE_CHECK_PER_MINUTE
    max_backoff_seconds: float = 300.0
    reauth_retry_seconds: float = 30 * 60.0
    stuck_after_attempts: int = STUCK_AFTER_ATTEMPTS
    connect_concurrency: int = CONNECT_CONCURRENCY
    agent_token_days: int = AGENT_TOKEN_DAYS  # 0: no expiry


@dataclass(frozen=True)
class FolderSettings:
    """The ``[folders]`` table: the root folder and the names of its four children."""

    root: str = "Rezi-Imported"
    queue: str = "Queue"
    sent: str = "Sent"
    received: str = "Received"
    failed: str = "Failed"

    def name(self, role: FolderRole) -> str:
        """The child folder's name (below root) for a role."""
        return str(getattr(self, role.value))


@dataclass(frozen=True)
class ServerSettings:
    """Where and how to reach an IMAP server."""

    host: str
    port: int
    security: str = "ssl"
    ca_file: Path | None = None
    allow_insecure: bool = False


@dataclass(frozen=True)
class Office365Settings:
    """The ``[office365]`` table, for ``auth = "office365"`` mailboxes."""

    tenant_id: str
    client_id: str
    client_secret: SecretSource | None = None
    authority: str = OFFICE365_AUTHORITY
    client_secret_expires: datetime | None = None
    ca_file: Path | None = None
    client_certificate: Path | None = None  # PEM: private key and certificate
    client_certificate_thumbprint: str | None = None  # upper-case hex; None: from the file

    @property
    def app_only(self) -> bool:
        """True for client-credentials (app-only) sign-in, False for delegated."""
        return self.credential is not None

    @property
    def credential(self) -> str | None:
        """The app-only credential kind, ``"secret"`` or ``"certificate"``; None for delegated."""
        if self.client_certificate is not None:
            return "certificate"
        return "secret" if self.client_secret is not None else None

    def read_client_certificate(self) -> ClientCertificate:
        """Read the app's certificate credential now; ConfigError if there is none or it is bad."""
        if self.client_certificate is None:
            raise ConfigError(["office365: no client_certificate_file is configured"])
        return read_client_certificate(self.client_certificate, self.client_certificate_thumbprint)


@dataclass(frozen=True)
class CrmSettings:
    """The ``[crm]`` table: the CRM that owns groups and receives timeline events."""

    url: str
    secret: SecretSource
    timeout_seconds: float = CRM_TIMEOUT_SECONDS
    group_cache_seconds: float = CRM_GROUP_CACHE_SECONDS
    ca_file: Path | None = None
    changed_window_seconds: float = CRM_CHANGED_WINDOW_SECONDS  # POST /v1/groups:changed


@dataclass(frozen=True)
class MailboxSettings:
    """One ``[[mailboxes]]`` entry, with its branch's server settings resolved."""

    address: str
    server: ServerSettings
    auth: str = "password"
    username: str = ""
    password: SecretSource | None = None
    aliases: tuple[str, ...] = ()
    trigger: str = "auto"
    enabled: bool = True
    branch: str | None = None

    @property
    def owner_addresses(self) -> frozenset[str]:
        """The mailbox address and its aliases: mail From these is outbound."""
        return frozenset((self.address, *self.aliases))


@dataclass(frozen=True)
class ClusterSettings:
    """The ``[cluster]`` table: how an instance shares mailboxes through a PostgreSQL store.

    Used whenever ``store`` is ``postgresql://…``. An empty ``instance_id`` means the
    hostname plus a random suffix, chosen at start
    (``emailsync.cluster.lease.default_instance_id``).
    """

    instance_id: str = ""
    lease_seconds: float = LEASE_SECONDS


@dataclass(frozen=True)
class Settings:
    """The whole validated configuration."""

    path: Path
    daemon: DaemonSettings
    folders: FolderSettings
    branches: Mapping[str, ServerSettings]
    mailboxes: tuple[MailboxSettings, ...]
    office365: Office365Settings | None = None
    crm: CrmSettings | None = None
    extra_problems: tuple[str, ...] = field(default=())
    cluster: ClusterSettings = field(default=ClusterSettings())

    def mailbox(self, address: str) -> MailboxSettings:
        """The mailbox with this address (any case); ConfigError when there is none."""
        wanted = normalise_address(address) or address.lower()
        for mailbox in self.mailboxes:
            if mailbox.address == wanted:
                return mailbox
        raise ConfigError([f"{self.path}: no mailbox {address!r} in mailboxes"])

    @property
    def state_url(self) -> str:
        """The state database's URL; the built-in SQLite file in state_dir by default."""
        database = (self.daemon.state_dir / "emailsync.db").absolute()
        return self.daemon.state or f"sqlite://{database}"

    @property
    def store_url(self) -> str:
        """``state_url`` by its old name: the state database also holds the built-in timeline."""
        return self.state_url

    @property
    def shared_state(self) -> bool:
        """True when the state database is PostgreSQL, which several instances share."""
        return self.daemon.state.split(":", 1)[0] in ("postgresql", "postgres")
