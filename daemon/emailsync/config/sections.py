"""Each config table's keys read and validated into its settings dataclass."""

from __future__ import annotations

import email.utils
import os
from collections.abc import Mapping
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from emailsync.config.checks import (
    _check_agent_token_days,
    _check_changed_window,
    _check_crm_url,
    _check_folder_name,
    _check_instance_id,
    _check_lease_seconds,
    _check_public_url,
    _check_state_url,
    _check_thumbprint,
    _non_empty,
    _positive,
)
from emailsync.config.settings import (
    AGENT_TOKEN_DAYS,
    AUTHS,
    CONNECT_CONCURRENCY,
    CRM_CHANGED_WINDOW_SECONDS,
    CRM_GROUP_CACHE_SECONDS,
    CRM_TIMEOUT_SECONDS,
    DEFAULT_LISTEN,
    DEFAULT_STATE_DIR,
    FETCH_BATCH,
    IDLE_RENEW_SECONDS,
    LEASE_SECONDS,
    LOG_FORMATS,
    METRICS_DETAIL,
    OFFICE365_AUTHORITY,
    OFFICE365_HOST,
    POLL_SECONDS,
    REFILE_CHECK_PER_MINUTE,
    REFILE_CHECK_SECONDS,
    REFILE_PER_PASS,
    SECURITIES,
    SETUP_TIMEOUT_SECONDS,
    STUCK_AFTER_ATTEMPTS,
    SWEEP_SECONDS,
    TIMEOUT_SECONDS,
    TRIGGERS,
    ClusterSettings,
    CrmSettings,
    DaemonSettings,
    FolderSettings,
    MailboxSettings,
    Office365Settings,
    ServerSettings,
)
from emailsync.mail.address import mailbox_address_problem, normalise_address
from emailsync.secret import SecretSource

if TYPE_CHECKING:
    from emailsync.config.loader import _Table


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


def _parse_cluster(table: _Table) -> ClusterSettings:
    return ClusterSettings(
        instance_id=table.get("instance_id", str, "", _check_instance_id),
        lease_seconds=table.get("lease_seconds", float, LEASE_SECONDS, _check_lease_seconds),
    )


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
