"""The self-service registrar: branches and mailboxes registered at run time, Stop Email Sync.

The registry lives in the state database (``emailsync.state.registry_sql``): the SQLite file
of one host, or the PostgreSQL database a cluster shares. The registrar checks a set-up's
login, stores its (vault-encrypted) secret, forgets a mailbox with its secret, keeps Stop
Email Sync of the config file's mailboxes (``mailbox_stops``), and tells the supervisor's
worker lifecycle (``Workers``, a narrow interface) which worker to (re)start or end.
Set-up, forget and an Office 365 sign-in's finish of one mailbox hold its lock
(``locked``) for their whole run, so they never interleave (a ``PUT`` that answers 200
leaves its mailbox set up; a ``DELETE`` that answers leaves it forgotten).

Every instance of a cluster keeps the same view: each change is a row and a ``NOTIFY``
(``emailsync_registry``, payload the address), and the cluster's listener calls ``refresh``
with the address (``refresh_all`` after a reconnect; the lease keeper's heartbeat reads
everything too, ``wanted``). A mailbox is acted on only when what was set up differs from
what this instance last acted on (its settings, whether it can log in, when it was set up),
so an instance's own notification does not restart the worker it has just restarted. In a
cluster a worker runs only under its lease: ``Workers.replace_worker`` restarts one only
where the lease is held, and the lease keeper starts the others.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog

from emailsync.config import OFFICE365_HOST, MailboxSettings, ServerSettings, Settings
from emailsync.errors import (
    AuthError,
    ConfigError,
    ConnectionLostError,
    MailboxError,
    RegistrationError,
    StoreError,
    TooManyLoginsError,
)
from emailsync.imap.auth import Authenticator, PasswordAuthenticator
from emailsync.imap.session import ImapSession
from emailsync.runtime.throttle import LoginThrottle
from emailsync.runtime.worker import WorkerStatus
from emailsync.secret import Secret
from emailsync.state.base import RegisteredBranch, RegisteredMailbox, Registry
from emailsync.state.legacystop import take_legacy_stop
from emailsync.state.registry_sql import EVERYTHING
from emailsync.state.vault import Vault

log = structlog.get_logger(__name__)

SETUP_LOGOUT_SECONDS = 4.0  # First Time Setup's LOGOUT: the work is done, do not wait long

# What a registered mailbox was when this instance last acted on it: its settings, whether
# it can log in (a password stored, or Office 365), and when it was set up.
_Fingerprint = tuple[MailboxSettings, bool, str]


class Workers(Protocol):
    """What the registrar asks of the supervisor's worker lifecycle."""

    @property
    def settings(self) -> Settings:
        """The current configuration (the config file's mailboxes win on a clash)."""
        ...

    def replace_worker(self, mailbox: MailboxSettings) -> bool:
        """(Re)start the mailbox's worker with these settings (in a cluster: only where its
        lease is held); the old worker ends first. True when one was queued."""
        ...

    def queue_worker(self, mailbox: MailboxSettings) -> bool:
        """Start the mailbox's worker unless one runs or is starting."""
        ...

    def end_worker(self, address: str, *, forget: bool, wait: bool) -> None:
        """Stop the mailbox's worker; ``forget``: the mailbox is gone (status, metrics);
        ``wait``: until its LOGOUT (bounded), for a caller that answers a person."""
        ...

    def mark_stopped(self, mailbox: MailboxSettings) -> None:
        """Show the mailbox stopped (no worker)."""
        ...

    def stop_configured(self, mailbox: MailboxSettings) -> None:
        """Stop Email Sync of a config file's mailbox recorded elsewhere: end its worker."""
        ...

    def resume_configured(self, mailbox: MailboxSettings) -> None:
        """A config file's mailbox may run again: start it (in a cluster, under its lease)."""
        ...

    def status_of(self, address: str) -> WorkerStatus | None:
        """The mailbox's status as ``statuses`` lists it, or None."""
        ...

    def recent_outcomes(self, address: str) -> list[dict[str, str | None]]:
        """The latest filed and failed messages of the mailbox's running worker."""
        ...


@dataclass(eq=False)
class MailboxRegistrar:
    """The registry's mailboxes and branches, their secrets, and Stop Email Sync."""

    workers: Workers
    registry: Registry | None
    vault: Vault
    throttle: LoginThrottle
    authenticator_factory: Callable[[MailboxSettings, Settings], Authenticator]
    # The caches below.
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    # Reading a row and acting on it, one change at a time, so a stale read never acts after
    # a newer one (the listener, the keeper's heartbeat and requests all refresh).
    _apply_lock: threading.RLock = field(default_factory=threading.RLock, init=False)
    # Mailboxes registered at run time, by address (the config file's win on a clash).
    registered: dict[str, MailboxSettings] = field(default_factory=dict, init=False)
    _acted: dict[str, _Fingerprint] = field(default_factory=dict, init=False)
    _loaded: bool = field(default=False, init=False)
    # The config file's mailboxes Stop Email Sync holds stopped.
    _stops: set[str] = field(default_factory=set, init=False)

    @property
    def settings(self) -> Settings:
        return self.workers.settings

    # -- loading and the cluster's view --------------------------------------------------------

    def load(self) -> None:
        """Read the registry and the stops (an older version's stop markers become rows)."""
        self._stops = self._read_stops()
        self.registered_mailboxes()

    def _read_stops(self) -> set[str]:
        stops = set(self.registry.stopped_mailboxes()) if self.registry is not None else set()
        for mailbox in self.settings.mailboxes:
            if mailbox.address in stops:
                continue
            if self.registry is None:
                if take_legacy_stop(self.settings, mailbox.address, remove=False):
                    stops.add(mailbox.address)
            elif take_legacy_stop(self.settings, mailbox.address, remove=False):
                self.registry.record_stop(mailbox.address)  # the file goes once this holds
                take_legacy_stop(self.settings, mailbox.address, remove=True)
                stops.add(mailbox.address)
                log.info("mailbox_stop_moved", mailbox=mailbox.address, to="state database")
        return stops

    def is_stopped(self, address: str) -> bool:
        """Whether Stop Email Sync holds a config file's mailbox stopped (as last read)."""
        with self._lock:
            return address in self._stops

    def stopped(self) -> set[str]:
        """The config file's mailboxes Stop Email Sync holds stopped (as last read)."""
        with self._lock:
            return set(self._stops)

    def wanted(self) -> list[str]:
        """The mailboxes a cluster shares: the config file's enabled ones not stopped, and the
        registered ones that can log in. Read afresh (the lease keeper's heartbeat: a missed
        notification is made up for here); on a store error, as last read."""
        with contextlib.suppress(StoreError):
            self.refresh_all()
        with self._lock:
            stops = set(self._stops)
            runnable = [a for a, (_, can, _) in self._acted.items() if can]
        configured = [m.address for m in self.settings.mailboxes if m.enabled]
        return [a for a in configured if a not in stops] + runnable

    def runnable(self) -> list[MailboxSettings]:
        """The registered mailboxes that can log in (as last read)."""
        with self._lock:
            return [m for a, (m, can, _) in self._acted.items() if can and a in self.registered]

    def refresh(self, address: str) -> None:
        """A registry row of ``address`` changed (``EVERYTHING``: any): re-read it, act."""
        if address == EVERYTHING:
            self.refresh_all()
            return
        if self.registry is None:
            return
        with self._apply_lock:
            configured = self._configured(address)
            if configured is not None:
                self._apply_stop(configured, self.registry.is_stopped(address))
            else:
                self._apply(address, self.registry.registered_mailbox(address))

    def refresh_all(self) -> None:
        """Re-read every registered mailbox and stop and act on what changed."""
        if self.registry is None:
            return
        with self._apply_lock:
            configured = {m.address: m for m in self.settings.mailboxes}
            records = {
                r.address: r
                for r in self.registry.registered_mailboxes()
                if r.address not in configured
            }
            stops = self.registry.stopped_mailboxes()
            branches = {b.name: b for b in self.registry.registered_branches()}
            with self._lock:
                known = set(self._acted)
            for address in sorted(known | set(records)):
                self._apply(address, records.get(address), branches)
            for address, mailbox in configured.items():
                self._apply_stop(mailbox, address in stops)
            with self._lock:
                self._loaded = True

    def _apply_stop(self, mailbox: MailboxSettings, stopped: bool) -> None:
        with self._lock:
            was = mailbox.address in self._stops
            if stopped:
                self._stops.add(mailbox.address)
            else:
                self._stops.discard(mailbox.address)
        if stopped and not was:
            log.info("mailbox_stopped", mailbox=mailbox.address, by="another instance")
            self.workers.stop_configured(mailbox)
        elif was and not stopped and mailbox.enabled:
            self.workers.resume_configured(mailbox)

    def _apply(
        self,
        address: str,
        record: RegisteredMailbox | None,
        branches: Mapping[str, RegisteredBranch] | None = None,
    ) -> None:
        """Act on a registered mailbox's row as read (None: gone), if it changed."""
        mailbox = self._settings_of(record, branches) if record is not None else None
        fingerprint: _Fingerprint | None = None
        if mailbox is not None and record is not None:
            can = record.auth != "password" or record.has_secret
            fingerprint = (mailbox, can, record.updated_at)
        with self._lock:
            before = self._acted.get(address)
            if fingerprint == before:
                return
            if fingerprint is None or mailbox is None:
                self._acted.pop(address, None)
                self.registered.pop(address, None)
            else:
                self._acted[address] = fingerprint
                self.registered[address] = mailbox
        if fingerprint is None or mailbox is None:
            if before is not None:
                log.info("mailbox_forgotten", mailbox=address)
                self.workers.end_worker(address, forget=True, wait=False)
        elif fingerprint[1]:
            self.workers.replace_worker(mailbox)
        else:
            self.workers.end_worker(address, forget=False, wait=False)
            self.workers.mark_stopped(mailbox)

    # -- Stop Email Sync of the config file's mailboxes -----------------------------------------

    def record_stop(self, address: str) -> None:
        """Stop Email Sync for a config file's mailbox, on every instance and across restarts."""
        with self._lock:
            self._stops.add(address)
        if self.registry is not None:
            self.registry.record_stop(address)

    def clear_stop(self, address: str) -> None:
        """A config file's mailbox may run again (``emailsync setup``)."""
        with self._lock:
            self._stops.discard(address)
        if self.registry is not None:
            self.registry.clear_stop(address)
        take_legacy_stop(self.settings, address, remove=True)

    # -- the per-mailbox lock -----------------------------------------------------------------

    def locked(self, address: str) -> AbstractContextManager[None]:
        """Hold the mailbox's lock for the block (set-up, forget, a sign-in's finish).

        In PostgreSQL its ``mailbox_locks`` row, for every instance of the cluster; in SQLite a
        lock of this process, the only one that registers mailboxes in that file.
        """
        if self.registry is None:
            return contextlib.nullcontext()
        return self.registry.mailbox_lock(address)

    # -- branches ------------------------------------------------------------------------------

    def branches(self) -> list[dict[str, Any]]:
        """Every branch: the config file's (read-only) and the registered ones, by name."""
        found: dict[str, dict[str, Any]] = {}
        for branch in self._registered_branches():
            found[branch.name] = {
                "name": branch.name,
                "host": branch.host,
                "port": branch.port,
                "security": branch.security,
                "source": "registry",
            }
        for name, server in self.settings.branches.items():
            found[name] = {
                "name": name,
                "host": server.host,
                "port": server.port,
                "security": server.security,
                "source": "config",
            }
        return [found[name] for name in sorted(found)]

    def put_branch(
        self, name: str, host: str, port: int, security: str, ca_file: str | None = None
    ) -> bool:
        """Register (or change) a branch's IMAP server; True when new.

        Mailboxes registered on it are restarted with the new server (on every instance). A
        branch of the config file is read-only here (RegistrationError 409).
        """
        registry = self.require_registry()
        if name in self.settings.branches:
            raise RegistrationError(
                f"branch {name!r} is set in the config file; change it there", status=409
            )
        created = registry.put_branch(RegisteredBranch(name, host, port, security, ca_file))
        log.info("branch_registered", branch=name, host=host, port=port, security=security)
        self.refresh_all()
        return created

    def branch_server(
        self, name: str, registered: Mapping[str, RegisteredBranch] | None = None
    ) -> ServerSettings:
        """The IMAP server of a branch of the config file or of the registry (``registered``:
        its branches as read already)."""
        if name in self.settings.branches:
            return self.settings.branches[name]
        if registered is None:
            registered = {b.name: b for b in self._registered_branches()}
        branch = registered.get(name)
        if branch is not None:
            return ServerSettings(
                host=branch.host,
                port=branch.port,
                security=branch.security,
                ca_file=Path(branch.ca_file) if branch.ca_file else None,
                allow_insecure=branch.security == "none",
            )
        raise RegistrationError(f"no branch {name!r}; IT adds it first", status=422)

    def _registered_branches(self) -> list[RegisteredBranch]:
        return self.registry.registered_branches() if self.registry is not None else []

    # -- mailboxes -----------------------------------------------------------------------------

    def setup_mailbox(
        self,
        address: str,
        branch: str,
        username: str,
        password: str,
        trigger: str = "auto",
        *,
        agent: bool,
        client: str | None,
    ) -> None:
        """First Time Setup (Basic): log in, create the folders, store the password, start.

        The login comes first: a refused one raises RegistrationError 422 with the server's
        answer in one line, and nothing is stored. A mailbox of the config file is read-only
        here (409). ``trigger`` is the agent's choice, stored with the mailbox.

        ``agent``: an agent token asks, which may only log in as the mailbox's own address
        (or the username IT set for it): 403 otherwise. Refused logins are limited per mailbox
        and per ``client`` (``throttle``): beyond, 429 with ``retry_after`` and no LOGIN.
        Holds the mailbox's lock throughout: a forget waits for it, or it for a forget.
        """
        registry = self.require_registry()
        if self._configured(address) is not None:
            raise RegistrationError(
                f"mailbox {address} is set in the config file; use `emailsync setup`",
                status=409,
            )
        with self.locked(address):
            if agent:
                self._check_agent_username(address, username)
            mailbox = MailboxSettings(
                address=address,
                server=self.branch_server(branch),
                auth="password",
                username=username,
                branch=branch,
                trigger=trigger,
            )
            self._log_in(mailbox, password, client)
            record = RegisteredMailbox(address, branch, "password", username, True, False, trigger)
            # Through the vault: a `keys rotate` running meanwhile must not strand the secret
            # under the generation it drops.
            self.vault.store_secret(
                password, address, lambda blob: registry.put_mailbox(record, blob)
            )
            self.refresh(address)
        log.info("mailbox_registered", mailbox=address, branch=branch)

    def _log_in(self, mailbox: MailboxSettings, password: str, client: str | None) -> None:
        """Set-up's login and folders; RegistrationError (422, 429, 502, 504) when refused."""
        address = mailbox.address
        try:
            attempt = self.throttle.attempt(address, client)
        except TooManyLoginsError as exc:
            log.warning("setup_throttled", mailbox=address, client=client, retry_in=exc.retry_after)
            raise RegistrationError(
                f"{exc} (try again in {exc.retry_after} s)", status=429, retry_after=exc.retry_after
            ) from None
        secret = Secret(password)
        authenticator = PasswordAuthenticator(mailbox, password=lambda: secret)
        timeout = self.settings.daemon.setup_timeout_seconds
        try:
            session = ImapSession.open(
                mailbox, self.settings.folders, authenticator, timeout_seconds=timeout
            )
            try:
                session.ensure_folders()
            finally:
                session.logout(SETUP_LOGOUT_SECONDS)
        except AuthError as exc:
            raise RegistrationError(one_line(str(exc)), status=422) from None
        except ConnectionLostError as exc:
            if exc.kind in ("refused", "tls"):
                attempt.not_tried()  # no LOGIN reached the server: it costs nothing
            if exc.kind == "timeout":  # it may answer later: a gateway timeout, not a refusal
                what = f"the server did not answer in {timeout:g} s ({one_line(str(exc))})"
                raise RegistrationError(what, status=504) from None
            raise RegistrationError(one_line(str(exc)), status=502) from None
        except MailboxError as exc:
            raise RegistrationError(one_line(str(exc)), status=502) from None
        attempt.succeeded()

    def _check_agent_username(self, address: str, username: str) -> None:
        """An agent logs in as its mailbox's address, or as the username IT set for it.

        Otherwise an agent token would bind its mailbox to any account whose password the
        agent knows or guesses. The admin token (IT) may set any username.
        """
        allowed = {address.casefold()}
        registered = self.registered_mailboxes().get(address)
        if registered is not None:
            allowed.add(registered.username.casefold())
        if username.strip().casefold() not in allowed:
            raise RegistrationError(
                f"an agent's username must be the mailbox's address ({address}) or the one IT "
                "set for it; IT can set another",
                status=403,
            )

    def forget_mailbox(self, address: str) -> bool:
        """Stop Email Sync for a registered mailbox: stop its worker, forget it and its secret.

        The password (or the Office 365 tokens) is erased; the folders on the server and the
        timeline history stay, and First Time Setup registers it again. False when it is not
        registered; a mailbox of the config file is read-only here (RegistrationError 409:
        ``stop_mailbox`` stops it). Waits for the LOGOUT of a worker that runs here; the
        lease's owner elsewhere ends its own on the row's notification.
        """
        if self._configured(address) is not None:
            raise RegistrationError(
                f"mailbox {address} is set in the config file; stop it with POST …/stop",
                status=409,
            )
        registry = self.require_registry()
        with self.locked(address):
            record = registry.registered_mailbox(address)
            if record is None:
                return False
            # The row (and the secret) first: every instance then ends its worker, and a
            # refresh meanwhile cannot start one again from it.
            registry.remove_mailbox(address)
            self.refresh(address)
            self.workers.end_worker(address, forget=True, wait=True)
            mailbox = self._settings_of(record)
            if record.auth == "office365" and mailbox is not None:
                with contextlib.suppress(ConfigError):
                    self.authenticator_factory(mailbox, self.settings).forget()
        log.info("mailbox_stopped", mailbox=address, credentials="erased")
        return True

    def mailbox_detail(self, address: str) -> dict[str, Any] | None:
        """Status, source, branch and the latest filed/failed messages of one mailbox."""
        configured = self._configured(address)
        mailbox = configured or self.registered_mailboxes().get(address)
        if mailbox is None:
            return None
        status = self.workers.status_of(address)
        if status is None:
            return None
        return {
            **asdict(status),
            "source": "config" if configured else "registry",
            "branch": mailbox.branch,
            "auth": mailbox.auth,
            "set_up": True,
            "recent": self.workers.recent_outcomes(address),
        }

    def has_secret(self, address: str) -> bool:
        """Whether a registered mailbox has its password stored."""
        return self.registry is not None and self.registry.mailbox_secret(address) is not None

    def require_registry(self) -> Registry:
        """The registry, or RegistrationError 503 when the state database keeps none."""
        if self.registry is None:
            raise RegistrationError(
                "this state database keeps no registry of mailboxes", status=503
            )
        return self.registry

    def registered_mailboxes(self) -> dict[str, MailboxSettings]:
        """The registry's mailboxes as settings (read on first use; kept by ``refresh``)."""
        if self.registry is None:
            return {}
        with self._lock:
            if self._loaded:
                return dict(self.registered)
        self.refresh_all()
        with self._lock:
            return dict(self.registered)

    def is_registered(self, address: str) -> bool:
        """Whether the registry has the mailbox (its row, read now: another instance may have
        set it up a moment ago)."""
        if self._configured(address) is not None or self.registry is None:
            return False
        return self.registry.registered_mailbox(address) is not None

    def start_registered(self, mailbox: MailboxSettings) -> bool:
        """Start a registered mailbox that has its credentials; else show it stopped."""
        if mailbox.auth == "password" and not self.has_secret(mailbox.address):
            self.workers.mark_stopped(mailbox)
            return False
        return self.workers.queue_worker(mailbox)

    def _configured(self, address: str) -> MailboxSettings | None:
        return next((m for m in self.settings.mailboxes if m.address == address), None)

    def _settings_of(
        self, record: RegisteredMailbox, branches: Mapping[str, RegisteredBranch] | None = None
    ) -> MailboxSettings | None:
        """A registered mailbox's settings; None (and a warning) when its branch is gone."""
        try:
            server = (
                self.branch_server(record.branch, branches)
                if record.branch
                else ServerSettings(host=OFFICE365_HOST, port=993, security="ssl")
            )
        except RegistrationError:
            log.warning("mailbox_branch_missing", mailbox=record.address)
            return None
        return MailboxSettings(
            address=record.address,
            server=server,
            auth=record.auth,
            username=record.username,
            branch=record.branch or None,
            trigger=record.trigger,
        )


def one_line(text: str) -> str:
    """A server's answer on one line."""
    return " ".join(text.split())
