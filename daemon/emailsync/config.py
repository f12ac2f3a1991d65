"""TOML configuration → validated, frozen settings; secrets are read only when asked for."""

from __future__ import annotations

import email.utils
import os
import re
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, TypeVar

from emailsync.errors import ConfigError
from emailsync.mail.address import mailbox_address_problem, normalise_address
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

T = TypeVar("T")

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
_INSTANCE_ID = re.compile(r"[A-Za-z0-9._@:-]{1,100}")
# Entra ID shows a certificate's SHA-1 thumbprint as 40 hex digits (openssl adds colons).
_THUMBPRINT = re.compile(r"[0-9A-Fa-f]{40}")


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


def default_config_path() -> Path:
    """``$EMAILSYNC_CONFIG``, else /etc/emailsync/emailsync.toml."""
    env = os.environ.get("EMAILSYNC_CONFIG")
    return Path(env) if env else DEFAULT_CONFIG_PATH


def load_settings(path: Path) -> Settings:
    """Read and validate a config file; raises ConfigError listing every problem found."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config: {exc.strerror}"]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: config is not UTF-8 text"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: invalid TOML: {exc}"]) from None
    return parse_settings(data, path)


def parse_settings(data: Mapping[str, Any], path: Path) -> Settings:
    """Validate parsed TOML; raises ConfigError listing every problem found."""
    problems: list[str] = []
    top = _Table(data, "", path, problems)
    # Relative paths in the config mean "next to the config file", whatever the cwd later is.
    base_dir = path.absolute().parent
    daemon = _parse_daemon(top.table("daemon"), base_dir)
    folders = _parse_folders(top.table("folders"))
    branches_table = top.table("branches")
    branches: dict[str, ServerSettings] = {}
    for name in branches_table.names():
        branches[name] = _parse_server(branches_table.table(name), base_dir)
    cluster_table = top.optional_table("cluster")
    cluster = ClusterSettings()
    if cluster_table is not None:
        cluster = _parse_cluster(cluster_table)
        if daemon.state.split(":", 1)[0] not in ("postgresql", "postgres"):
            cluster_table.problem(
                "instance_id" if cluster_table.has("instance_id") else "lease_seconds",
                '[cluster] needs daemon.state = "postgresql://…" (instances share through it)',
            )
    o365_table = top.optional_table("office365")
    office365 = _parse_office365(o365_table, base_dir) if o365_table is not None else None
    crm_table = top.optional_table("crm")
    # The timeline (where groups come from and events go) is the state database's built-in
    # tables, or the CRM: either combines with either state database (issue 20).
    crm = _parse_crm(crm_table, base_dir) if crm_table is not None else None
    mailboxes: list[MailboxSettings] = []
    seen: set[str] = set()
    for entry in top.array_of_tables("mailboxes"):
        mailbox = _parse_mailbox(entry, base_dir, branches, office365)
        if mailbox is None:
            continue
        if mailbox.address in seen:
            entry.problem("address", f"mailbox {mailbox.address} is listed twice")
            continue
        seen.add(mailbox.address)
        mailboxes.append(mailbox)
    top.finish()
    if problems:
        raise ConfigError(problems)
    return Settings(
        path=path,
        daemon=daemon,
        folders=folders,
        branches=branches,
        mailboxes=tuple(mailboxes),
        office365=office365,
        cluster=cluster,
        crm=crm,
    )


def check_secrets(settings: Settings) -> list[str]:
    """Problems with secrets that the config names but that cannot be read (values unseen)."""
    return mailbox_secret_problems(settings) + shared_secret_problems(settings)


def mailbox_secret_problems(settings: Settings) -> list[str]:
    """Unreadable mailbox passwords: each concerns one mailbox only."""
    problems: list[str] = []
    for index, mailbox in enumerate(settings.mailboxes):
        if mailbox.enabled and mailbox.password is not None:
            try:
                mailbox.password.read()
            except ConfigError as exc:
                key = f"mailboxes[{index}].{mailbox.password.key('password')}"
                problems.extend(
                    f"{settings.path}: {key}: mailbox {mailbox.address}: {p}" for p in exc.problems
                )
    return problems


def weak_token_problem(token: str) -> str | None:
    """Why ``token`` is unfit to guard the control API, or None when it will do.

    An empty file (a crash right after creating it) must never mean "any ``Bearer`` header
    goes": a token shorter than MIN_CONTROL_TOKEN_CHARS, or one built from fewer than
    MIN_CONTROL_TOKEN_DISTINCT different characters, is refused.
    """
    token = token.strip()
    if len(token) < MIN_CONTROL_TOKEN_CHARS:
        return (
            f"holds {len(token)} characters; a control token needs at least "
            f"{MIN_CONTROL_TOKEN_CHARS} (e.g. `openssl rand -base64 32`)"
        )
    if len(set(token)) < MIN_CONTROL_TOKEN_DISTINCT:
        return "is too repetitive to be a secret (e.g. `openssl rand -base64 32`)"
    if any(c.isspace() or not c.isprintable() for c in token):
        return "holds white space or control characters; a bearer token cannot"
    return None


def shared_secret_problems(settings: Settings) -> list[str]:
    """Unreadable secrets every mailbox or the daemon itself needs (token, Office 365 app)."""
    problems: list[str] = []
    if settings.daemon.control_token is not None:
        source = settings.daemon.control_token
        try:
            weak = weak_token_problem(source.read().reveal())
        except ConfigError as exc:
            problems.extend(
                f"{settings.path}: daemon.control_token_file: {p}" for p in exc.problems
            )
        else:
            if weak is not None:
                problems.append(
                    f"{settings.path}: daemon.control_token_file: {source.describe()} {weak}"
                )
    if settings.office365 is not None and settings.office365.client_secret is not None:
        source = settings.office365.client_secret
        try:
            source.read()
        except ConfigError as exc:
            key = f"office365.{source.key('client_secret')}"
            problems.extend(f"{settings.path}: {key}: {p}" for p in exc.problems)
    if settings.office365 is not None and settings.office365.client_certificate is not None:
        try:
            settings.office365.read_client_certificate()
        except ConfigError as exc:
            key = "office365.client_certificate_file"
            problems.extend(f"{settings.path}: {key}: {p}" for p in exc.problems)
    if settings.crm is not None:
        try:
            settings.crm.secret.read()
        except ConfigError as exc:
            key = f"crm.{settings.crm.secret.key('secret')}"
            problems.extend(f"{settings.path}: {key}: {p}" for p in exc.problems)
    return problems


class _Table:
    """A TOML table being validated: typed getters that record problems, unknown-key check."""

    def __init__(
        self, data: Mapping[str, Any], where: str, path: Path, problems: list[str]
    ) -> None:
        self.data = data
        self.where = where
        self.path = path
        self.problems = problems
        self.used: set[str] = set()
        self.children: list[_Table] = []

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def problem(self, name: str, what: str) -> None:
        self.problems.append(f"{self.path}: {self.key(name)}: {what}")

    def names(self) -> list[str]:
        self.used.update(self.data)
        return list(self.data)

    def has(self, name: str) -> bool:
        return name in self.data

    def get(
        self, name: str, kind: type[T], default: T, check: Callable[[T], str | None] | None = None
    ) -> T:
        self.used.add(name)
        if name not in self.data:
            return default
        value = self.data[name]
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            self.problem(
                name, f"must be {_KIND_NAMES.get(kind, kind.__name__)}, not {_describe(value)}"
            )
            return default
        if check is not None:
            error = check(value)
            if error:
                self.problem(name, error)
                return default
        return value  # type: ignore[no-any-return]

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        def check(value: str) -> str | None:
            return (
                None if value in choices else f"must be one of {', '.join(choices)}, not {value!r}"
            )

        return self.get(name, str, default, check)

    def path_value(self, name: str, base_dir: Path) -> Path | None:
        raw = self.get(name, str, "", lambda v: None if v.strip() else "must not be empty")
        if not raw:
            return None
        value = Path(raw)
        return value if value.is_absolute() else base_dir / value

    def table(self, name: str) -> _Table:
        found = self.optional_table(name)
        return found if found is not None else _Table({}, self.key(name), self.path, self.problems)

    def optional_table(self, name: str) -> _Table | None:
        self.used.add(name)
        value = self.data.get(name)
        if value is None:
            return None
        if not isinstance(value, dict):
            self.problem(name, f"must be a table, not {_describe(value)}")
            return None
        return self._child(value, self.key(name))

    def array_of_tables(self, name: str) -> list[_Table]:
        self.used.add(name)
        value = self.data.get(name, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            self.problem(name, "must be an array of tables ([[mailboxes]])")
            return []
        return [self._child(v, f"{self.key(name)}[{i}]") for i, v in enumerate(value)]

    def finish(self) -> None:
        for name in self.data:
            if name not in self.used:
                self.problem(name, "unknown key")
        for child in self.children:
            child.finish()

    def _child(self, data: Mapping[str, Any], where: str) -> _Table:
        child = _Table(data, where, self.path, self.problems)
        self.children.append(child)
        return child


_KIND_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    list: "an array",
}


def _describe(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


def _non_empty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _parse_listen(value: str) -> tuple[str, int] | None:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        return None
    return host.strip("[]"), int(port)


def _parse_daemon(table: _Table, base_dir: Path) -> DaemonSettings:
    env_state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    state_dir = table.path_value("state_dir", base_dir) or (
        Path(env_state) if env_state else DEFAULT_STATE_DIR
    )
    listen = table.get(
        "listen", str, DEFAULT_LISTEN, lambda v: None if _parse_listen(v) else "must be HOST:PORT"
    )
    host, port = _parse_listen(listen) or ("127.0.0.1", 9387)
    public_url = table.get("public_url", str, "", _check_public_url)
    token_file = table.path_value("control_token_file", base_dir)
    state = table.get("state", str, "", _check_state_url)
    # ``store`` is the key's old name (before the state/timeline split): still understood.
    old = table.get("store", str, "", _check_state_url)
    if old and state:
        table.problem("store", "is the old name of daemon.state: give daemon.state only")
    return DaemonSettings(
        state_dir=state_dir,
        state=state or old,
        listen_host=host,
        listen_port=port,
        public_url=public_url.rstrip("/") if _check_public_url(public_url) is None else "",
        control_token=SecretSource(file=token_file) if token_file else None,
        log_format=table.choice("log_format", LOG_FORMATS, "auto"),
        metrics_detail=table.choice("metrics_detail", METRICS_DETAIL, "summary"),
        log_level=table.choice("log_level", ("debug", "info", "warning", "error"), "info"),
        idle_renew_seconds=table.get(
            "idle_renew_seconds",
            float,
            float(IDLE_RENEW_SECONDS),
            # RFC 2177: the server may log the client out after 30 minutes of IDLE.
            lambda v: (
                None if 0 < v < 29 * 60 else "must be between 0 and 1740 (RFC 2177: < 29 min)"
            ),
        ),
        sweep_seconds=table.get("sweep_seconds", float, float(SWEEP_SECONDS), _positive),
        poll_seconds=table.get("poll_seconds", float, float(POLL_SECONDS), _positive),
        timeout_seconds=table.get("timeout_seconds", float, TIMEOUT_SECONDS, _positive),
        setup_timeout_seconds=table.get(
            "setup_timeout_seconds", float, SETUP_TIMEOUT_SECONDS, _positive
        ),
        fetch_batch=table.get("fetch_batch", int, FETCH_BATCH, _positive),
        refile_per_pass=table.get("refile_per_pass", int, REFILE_PER_PASS, _positive),
        refile_check_seconds=table.get(
            "refile_check_seconds",
            float,
            REFILE_CHECK_SECONDS,
            lambda v: None if v >= 0 else "must be 0 (no periodic re-check) or more",
        ),
        refile_check_per_minute=table.get(
            "refile_check_per_minute", int, REFILE_CHECK_PER_MINUTE, _positive
        ),
        max_backoff_seconds=table.get("max_backoff_seconds", float, 300.0, _positive),
        reauth_retry_seconds=table.get("reauth_retry_seconds", float, 1800.0, _positive),
        stuck_after_attempts=table.get(
            "stuck_after_attempts", int, STUCK_AFTER_ATTEMPTS, _positive
        ),
        connect_concurrency=table.get("connect_concurrency", int, CONNECT_CONCURRENCY, _positive),
        agent_token_days=table.get(
            "agent_token_days", int, AGENT_TOKEN_DAYS, _check_agent_token_days
        ),
    )


def _check_agent_token_days(value: int) -> str | None:
    if 0 <= value <= MAX_AGENT_TOKEN_DAYS:
        return None
    return f"must be 1 to {MAX_AGENT_TOKEN_DAYS} days, or 0 for links that never expire"


def _check_state_url(value: str) -> str | None:
    if value == "" or value.split(":", 1)[0] in ("sqlite", "postgresql", "postgres"):
        return None
    if value.split(":", 1)[0] in ("https", "http"):
        return "is emailsync's own database (sqlite:/// or postgresql://); a CRM goes in [crm] url"
    return "must be a sqlite:///… or postgresql://… URL"


def _check_instance_id(value: str) -> str | None:
    if _INSTANCE_ID.fullmatch(value):
        return None
    return "must be 1-100 letters, digits or . _ - @ : (it names this instance in the store)"


def _parse_cluster(table: _Table) -> ClusterSettings:
    return ClusterSettings(
        instance_id=table.get("instance_id", str, "", _check_instance_id),
        lease_seconds=table.get("lease_seconds", float, LEASE_SECONDS, _check_lease_seconds),
    )


def _check_lease_seconds(value: float) -> str | None:
    if value < MIN_LEASE_SECONDS:
        return (
            f"must be at least {MIN_LEASE_SECONDS:g}: a worker gets up to "
            f"{WORKER_STOP_SECONDS:g} s to stop (finish its batch, log out), and a shorter lease"
            " could expire under it, letting another instance connect the same mailbox"
        )
    if value > MAX_LEASE_SECONDS:
        return f"must be at most {MAX_LEASE_SECONDS:g}"
    return None


def _check_folder_name(value: str) -> str | None:
    if not value.strip():
        return "must not be empty"
    if any(c in value for c in '/.%*\r\n\\"') or not value.isprintable():
        return "must not contain / . % * \\ quotes or control characters"
    return None


def _parse_folders(table: _Table) -> FolderSettings:
    defaults = FolderSettings()
    values = {
        name: table.get(name, str, getattr(defaults, name), _check_folder_name)
        for name in ("root", "queue", "sent", "received", "failed")
    }
    children = [values[name].casefold() for name in ("queue", "sent", "received", "failed")]
    if len(set(children)) != len(children):
        table.problem("queue", "queue, sent, received and failed must be four different names")
    return FolderSettings(**values)


def _parse_server(table: _Table, base_dir: Path) -> ServerSettings:
    host = table.get("host", str, "", lambda v: None if v.strip() else "must not be empty")
    if not table.has("host"):
        table.problem("host", "is required")
    security = table.choice("security", SECURITIES, "ssl")
    default_port = 993 if security == "ssl" else 143
    port = table.get(
        "port", int, default_port, lambda v: None if 0 < v < 65536 else "must be 1-65535"
    )
    allow_insecure = table.get("allow_insecure", bool, False)
    if security == "none" and not allow_insecure:
        table.problem(
            "security",
            '"none" sends the password in clear text; set allow_insecure = true to accept that',
        )
    ca_file = table.path_value("ca_file", base_dir)
    if ca_file is not None and not ca_file.is_file():
        table.problem("ca_file", f"{ca_file} is not a readable file")
    return ServerSettings(
        host=host, port=port, security=security, ca_file=ca_file, allow_insecure=allow_insecure
    )


def _parse_secret(table: _Table, prefix: str, base_dir: Path) -> SecretSource | None:
    file_key, env_key, cred_key = f"{prefix}_file", f"{prefix}_env", f"{prefix}_credential"
    file = table.path_value(file_key, base_dir)
    env = table.get(env_key, str, "", _non_empty) or None
    credential = (
        table.get(
            cred_key,
            str,
            "",
            lambda v: _non_empty(v) or (None if "/" not in v else "must be a bare name"),
        )
        or None
    )
    given = [k for k, v in ((file_key, file), (env_key, env), (cred_key, credential)) if v]
    if len(given) > 1:
        table.problem(given[1], f"give only one of {file_key}, {env_key}, {cred_key}")
    if file is not None:
        return SecretSource(file=file)
    if env is not None:
        return SecretSource(env=env)
    if credential is not None:
        return SecretSource(credential=credential)
    return None


def _parse_office365(table: _Table, base_dir: Path) -> Office365Settings:
    tenant = table.get("tenant_id", str, "")
    client = table.get("client_id", str, "")
    for name, value in (("tenant_id", tenant), ("client_id", client)):
        if not value.strip():
            table.problem(name, "is required")
    expires_raw = table.data.get("client_secret_expires")
    table.used.add("client_secret_expires")
    expires: datetime | None = None
    if isinstance(expires_raw, datetime):
        expires = expires_raw if expires_raw.tzinfo else expires_raw.replace(tzinfo=UTC)
    elif isinstance(expires_raw, date):
        expires = datetime(expires_raw.year, expires_raw.month, expires_raw.day, tzinfo=UTC)
    elif expires_raw is not None:
        table.problem("client_secret_expires", "must be a TOML date, like 2027-06-30")
    authority = table.get(
        "authority",
        str,
        OFFICE365_AUTHORITY,
        lambda v: None if v.startswith("https://") else "must be an https:// URL",
    )
    secret = _parse_secret(table, "client_secret", base_dir)
    certificate = table.path_value("client_certificate_file", base_dir)
    if secret is not None and certificate is not None:
        table.problem(
            "client_certificate_file",
            f"give either {secret.key('client_secret')} or client_certificate_file, not both",
        )
    thumbprint = table.get("client_certificate_thumbprint", str, "", _check_thumbprint)
    if thumbprint and certificate is None:
        table.problem("client_certificate_thumbprint", "needs client_certificate_file")
    return Office365Settings(
        tenant_id=tenant,
        client_id=client,
        client_secret=secret,
        authority=authority.rstrip("/"),
        client_secret_expires=expires,
        ca_file=table.path_value("ca_file", base_dir),
        client_certificate=certificate,
        client_certificate_thumbprint=thumbprint.replace(":", "").upper() or None,
    )


def _parse_crm(table: _Table, base_dir: Path) -> CrmSettings | None:
    url = table.get("url", str, "", _check_crm_url)
    if not table.has("url"):
        table.problem("url", "is required (the CRM's base URL, https://…)")
    secret = _parse_secret(table, "secret", base_dir)
    if secret is None:
        table.problem(
            "secret_file", "is required: give one of secret_file, secret_env, secret_credential"
        )
    timeout = table.get("timeout_seconds", float, CRM_TIMEOUT_SECONDS, _positive)
    cache = table.get(
        "group_cache_seconds",
        float,
        CRM_GROUP_CACHE_SECONDS,
        lambda v: None if v >= 0 else "must be 0 (no cache) or more",
    )
    ca_file = table.path_value("ca_file", base_dir)
    if ca_file is not None and not ca_file.is_file():
        table.problem("ca_file", f"{ca_file} is not a readable file")
    window = table.get(
        "changed_window_seconds", float, CRM_CHANGED_WINDOW_SECONDS, _check_changed_window
    )
    if not url or secret is None:
        return None
    return CrmSettings(
        url=url.rstrip("/"),
        secret=secret,
        timeout_seconds=timeout,
        group_cache_seconds=cache,
        ca_file=ca_file,
        changed_window_seconds=window,
    )


def _check_changed_window(value: float) -> str | None:
    # Every call inside the window is remembered to refuse its replay: an hour bounds that.
    return None if 0 < value <= 3600 else "must be more than 0 and at most 3600"


def _check_crm_url(value: str) -> str | None:
    parts = urllib.parse.urlsplit(value.strip())
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return "must be an https:// URL"
    if parts.username or parts.password:
        return "must not carry credentials; the secret goes in secret_file/_env/_credential"
    if parts.query or parts.fragment:
        return "must not have a query or fragment"
    if parts.scheme == "http" and parts.hostname not in LOOPBACK_HOSTS:
        return f"must be https:// ({PLAIN_HTTP_HOSTS})"
    return None


def _check_public_url(value: str) -> str | None:
    # Never echoes the value: a URL with credentials in it would put them in the error.
    problem = (
        "must be an absolute https:// URL without query, fragment or credentials "
        f"({PLAIN_HTTP_HOSTS}), e.g. https://emailsync.example.com"
    )
    if value == "":
        return None
    try:
        parts = urllib.parse.urlsplit(value)
        hostname, _port = parts.hostname, parts.port
    except ValueError:  # a malformed [IPv6] or port
        return problem
    if (
        parts.scheme not in ("https", "http")
        or not hostname
        or parts.username is not None
        or parts.password is not None
        or parts.query
        or parts.fragment
        or "?" in value
        or "#" in value
        or any(c.isspace() or not c.isprintable() for c in value)
        or (parts.scheme == "http" and hostname not in LOOPBACK_HOSTS)
    ):
        return problem
    return None


def _check_thumbprint(value: str) -> str | None:
    if _THUMBPRINT.fullmatch(value.replace(":", "")):
        return None
    return "must be the certificate's SHA-1 thumbprint, 40 hex digits"


def _parse_mailbox(
    table: _Table,
    base_dir: Path,
    branches: Mapping[str, ServerSettings],
    office365: Office365Settings | None,
) -> MailboxSettings | None:
    raw_address = table.get("address", str, "")
    address = normalise_address(raw_address) if raw_address else None
    # The login name defaults to the address as written (case kept), without a display name.
    default_username = email.utils.parseaddr(raw_address)[1] or raw_address
    if not table.has("address"):
        table.problem("address", "is required")
    elif address is None and isinstance(table.data["address"], str):
        # (a non-string address was already reported by get())
        table.problem("address", f"{raw_address!r} is not an email address")
    elif address is not None and (problem := mailbox_address_problem(address)) is not None:
        # The address names files and URL paths; only RFC 5321 forms get that far.
        table.problem("address", f"{raw_address!r} {problem}")
        address = None
    auth = table.choice("auth", AUTHS, "password")
    branch = table.get("branch", str, "") or None
    aliases: list[str] = []
    for alias in table.get("aliases", list, []):
        normal = normalise_address(alias) if isinstance(alias, str) else None
        if normal is None:
            table.problem("aliases", f"{alias!r} is not an email address")
        else:
            aliases.append(normal)
    server: ServerSettings | None = None
    if branch is not None:
        server = branches.get(branch)
        if server is None:
            known = ", ".join(sorted(branches)) or "none defined"
            table.problem("branch", f"unknown branch {branch!r} (known: {known})")
    elif auth == "office365":
        server = ServerSettings(host=OFFICE365_HOST, port=993, security="ssl")
    else:
        table.problem("branch", 'is required for auth = "password" mailboxes')
    password = _parse_secret(table, "password", base_dir)
    if auth == "password" and password is None and address is not None:
        # With no explicit source, a systemd credential named after the address is used
        # (LoadCredential=agent1@example.com:/path in the unit).
        password = SecretSource(credential=address)
    if auth == "office365" and office365 is None:
        table.problem("auth", 'auth = "office365" needs an [office365] table')
    mailbox = MailboxSettings(
        address=address or "",
        server=server or ServerSettings(host="", port=993),
        auth=auth,
        username=table.get("username", str, default_username, _non_empty) or default_username,
        password=password if auth == "password" else None,
        aliases=tuple(a for a in dict.fromkeys(aliases) if a != address),
        trigger=table.choice("trigger", TRIGGERS, "auto"),
        enabled=table.get("enabled", bool, True),
        branch=branch,
    )
    return mailbox if address else None
