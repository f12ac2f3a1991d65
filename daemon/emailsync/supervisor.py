"""The supervisor: one worker per mailbox, signals, reload, scheduled jobs, systemd, shutdown.

Mailboxes come from the config file and from the store's registry (registered at run time
through the API or the self-service pages). Registering, changing or forgetting one starts,
restarts or stops just that worker; a reload (SIGHUP) only compares the config file's.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any

import structlog
from apscheduler.schedulers.background import BackgroundScheduler
from prometheus_client import CollectorRegistry

from emailsync.config import (
    OFFICE365_HOST,
    MailboxSettings,
    ServerSettings,
    Settings,
    load_settings,
)
from emailsync.control import control_token, stopped_marker
from emailsync.errors import (
    AuthError,
    ConfigError,
    ConnectionLostError,
    ControlError,
    MailboxError,
    RegistrationError,
)
from emailsync.imap.auth import (
    Authenticator,
    Office365Authenticator,
    PasswordAuthenticator,
    make_authenticator,
)
from emailsync.imap.session import ImapSession
from emailsync.metrics import Metrics
from emailsync.secret import Secret
from emailsync.store.base import RegisteredBranch, RegisteredMailbox, Registry, Store
from emailsync.systemd import Notifier
from emailsync.vault import Vault
from emailsync.web import WebServer
from emailsync.worker import MailboxWorker, WorkerStatus

log = structlog.get_logger(__name__)

TICK_SECONDS = 0.5
SHUTDOWN_SECONDS = 8.0  # SIGTERM must end the process within 10 s
GAUGE_SECONDS = 15.0
TOKEN_CHECK_SECONDS = 300.0
TOKEN_REFRESH_AHEAD_SECONDS = 900.0  # refresh an access token this long before it expires
OFFICE365_FLOW_SECONDS = 600.0  # a browser sign-in must come back within 10 minutes
SETUP_TIMEOUT_SECONDS = 4.0  # First Time Setup logs in while the caller waits: keep it short

AuthenticatorFactory = Callable[[MailboxSettings, Settings], Authenticator]


def credential_expiry(settings: Settings) -> datetime | None:
    """When the Office 365 app credential expires: the configured date, else the certificate's."""
    office365 = settings.office365
    if office365 is None:
        return None
    if office365.client_secret_expires is not None:
        return office365.client_secret_expires
    if office365.client_certificate is not None:
        with contextlib.suppress(ConfigError):  # check-config reports an unreadable file
            return office365.read_client_certificate().expires
    return None


@dataclass(frozen=True)
class _PendingSignIn:
    """An Office 365 browser sign-in under way: the mailbox, MSAL's flow, its deadline."""

    mailbox: MailboxSettings
    flow: dict[str, Any]
    expires_at: float  # time.monotonic()


class Supervisor:
    """Owns the workers, the HTTP listener and the scheduler; runs in the main thread."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        registry: CollectorRegistry | None = None,
        authenticator_factory: AuthenticatorFactory = make_authenticator,
        notifier: Notifier | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry)
        store.register_metrics(self.registry)
        self.authenticator_factory = authenticator_factory
        self.notifier = notifier or Notifier()
        self.workers: dict[str, MailboxWorker] = {}
        self._stopped: dict[str, WorkerStatus] = {}
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stop_requested = False
        self._reload_requested = False
        self._sync_all_requested = False
        self._ready_sent = False
        self._last_tick = time.monotonic()
        self._last_watchdog = 0.0
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self.web: WebServer | None = None
        self.mailbox_registry: Registry | None = store if isinstance(store, Registry) else None
        self.vault = Vault(settings.daemon.state_dir)
        # Mailboxes registered at run time, by address (the config file's win on a clash).
        self.registered: dict[str, MailboxSettings] = {}
        self._registered_loaded = False
        self._flows: dict[str, _PendingSignIn] = {}  # Office 365 sign-ins by OAuth state
        expiry = credential_expiry(settings)
        if expiry is not None:
            self.metrics.client_secret_expiry.set(expiry.timestamp())

    # -- Control (for the HTTP listener) ----------------------------------------------------

    def statuses(self) -> list[WorkerStatus]:
        """Every configured mailbox's status, running or stopped."""
        with self._lock:
            running = [w.snapshot() for w in self.workers.values()]
            return sorted([*running, *self._stopped.values()], key=lambda s: s.address)

    def start_sync(self, address: str | None, *, include_stuck: bool = False) -> bool:
        """Start Sync for one mailbox (False if unknown or stopped) or all.

        ``include_stuck``: the pass first releases the messages quarantined in Queue.
        """
        with self._lock:
            if address is None:
                for each in self.workers.values():
                    if include_stuck:
                        each.filer.release_stuck()
                    each.request_pass("start_sync")
                return True
            worker = self.workers.get(address.lower())
        if worker is None:
            return False
        if include_stuck:
            worker.filer.release_stuck()
        worker.request_pass("start_sync")
        return True

    def stop_mailbox(self, address: str) -> bool:
        """Stop Email Sync: stop the worker, forget its tokens, mark it stopped."""
        address = address.lower()
        if address in self._registered_mailboxes():
            return self.forget_mailbox(address)  # Stop Email Sync forgets a registered one
        mailbox = next((m for m in self.settings.mailboxes if m.address == address), None)
        if mailbox is None:
            return False
        marker = stopped_marker(self.settings, address)
        marker.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        marker.touch()
        with self._lock:
            worker = self.workers.pop(address, None)
        if worker is not None:
            worker.stop()
            worker.authenticator.forget()
            worker.join(SHUTDOWN_SECONDS)
        else:
            self.authenticator_factory(mailbox, self.settings).forget()
        self._mark_stopped(mailbox)
        log.info("mailbox_stopped", mailbox=address)
        return True

    def start_mailbox(self, address: str) -> bool:
        """Start a stopped mailbox again (``emailsync setup`` calls this)."""
        address = address.lower()
        registered = self._registered_mailboxes().get(address)
        if registered is not None:
            return self._start_registered(registered)
        mailbox = next((m for m in self.settings.mailboxes if m.address == address), None)
        if mailbox is None or not mailbox.enabled:
            return False
        stopped_marker(self.settings, address).unlink(missing_ok=True)
        with self._lock:
            if address not in self.workers:
                self._start_worker(mailbox)
        return True

    def check_agent_token(self, token: str) -> str | None:
        """The mailbox an agent token is for, or None (invalid, expired, revoked)."""
        try:
            granted = self.vault.check_token(token)
        except ConfigError as exc:
            log.error("agent_token_unchecked", problems=exc.problems)  # noqa: TRY400 -- no traceback needed
            return None
        return granted.address if granted is not None else None

    def issue_agent_token(self, address: str, days: int | None) -> str:
        """A token for one mailbox's set-up, Start Sync, Stop and status."""
        expires = datetime.now(UTC) + timedelta(days=days) if days else None
        log.info("agent_token_issued", mailbox=address, expires=expires and expires.isoformat())
        return self.vault.issue_token(address, expires)

    def healthy(self) -> bool:
        """The main loop ticked recently and every worker thread is alive."""
        with self._lock:
            alive = all(w.is_alive() for w in self.workers.values())
        return alive and time.monotonic() - self._last_tick < 10 * TICK_SECONDS + 5

    def ready(self) -> bool:
        """Every mailbox has had its first connect attempt."""
        with self._lock:
            return all(w.first_attempt_done.is_set() for w in self.workers.values())

    # -- lifetime -------------------------------------------------------------------------------

    def run(self) -> int:
        """Start everything, serve until SIGTERM/SIGINT, then shut down. Returns the exit code."""
        self._install_signals()
        token = control_token(self.settings, create=True)
        daemon = self.settings.daemon
        try:
            self.web = WebServer(
                daemon.listen_host,
                daemon.listen_port,
                self,
                self.registry,
                token,
                registrar=self,
                check_agent_token=self.check_agent_token,
                issue_agent_token=self.issue_agent_token,
            )
        except OSError as exc:
            where = f"{daemon.listen_host}:{daemon.listen_port}"
            raise ControlError(
                f"cannot listen on {where} (daemon.listen): {exc.strerror}"
            ) from None
        self.web.start()
        log.info("listening", address=f"{daemon.listen_host}:{self.web.port}")
        with self._lock:
            for mailbox in self.settings.mailboxes:
                self._start_or_mark(mailbox)
            for mailbox in self._registered_mailboxes().values():
                self._start_registered(mailbox)
        self._schedule_jobs()
        self.scheduler.start()
        try:
            while not self._stop_requested:
                self._tick()
                self._wake.wait(TICK_SECONDS)
                self._wake.clear()
        finally:
            self.shutdown()
        return 0

    def _tick(self) -> None:
        self._last_tick = time.monotonic()
        if self._reload_requested:
            self._reload_requested = False
            self.reload()
        if self._sync_all_requested:
            self._sync_all_requested = False
            self.start_sync(None)
        self._restart_dead_workers()
        if not self._ready_sent and self.ready():
            self._ready_sent = True
            self.notifier.ready(self.summary())
            log.info("ready", summary=self.summary())
        now = time.monotonic()
        interval = self.notifier.watchdog_seconds / 2 if self.notifier.watchdog_seconds else 0
        if interval and now - self._last_watchdog >= interval and self.healthy():
            self._last_watchdog = now
            self.notifier.watchdog()
            self.notifier.status(self.summary())

    def summary(self) -> str:
        """The one-line STATUS=: how many mailboxes are in which state, and the queue."""
        counts: dict[str, int] = {}
        queued = 0
        for status in self.statuses():
            counts[status.state] = counts.get(status.state, 0) + 1
            queued += status.queue
        states = ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "no mailboxes"
        return f"{states}; {queued} queued"

    def shutdown(self) -> None:
        """Stop workers (batch in flight finished, LOGOUT), the scheduler and the listener."""
        self.notifier.stopping()
        log.info("stopping")
        with contextlib.suppress(Exception):
            self.scheduler.shutdown(wait=False)
        with self._lock:
            workers = list(self.workers.values())
        for worker in workers:
            worker.stop()
        deadline = time.monotonic() + SHUTDOWN_SECONDS
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        if self.web is not None:
            self.web.stop()
        log.info("stopped")

    def request_stop(self) -> None:
        """Ask the main loop to shut down (what SIGTERM does)."""
        self._stop_requested = True
        self._wake.set()

    # -- reload ---------------------------------------------------------------------------------

    def reload(self) -> None:
        """Re-read the config: start new mailboxes, stop removed ones, restart changed ones."""
        self.notifier.reloading()
        try:
            new = load_settings(self.settings.path)
        except ConfigError as exc:
            log.error("reload_failed", problems=exc.problems)  # noqa: TRY400 -- no traceback needed
            self.notifier.ready(self.summary())
            return
        old = self.settings
        everything_changed = (
            new.daemon != old.daemon or new.folders != old.folders or new.office365 != old.office365
        )
        if new.crm != old.crm:
            # The store (the CRM connector) is opened once at start, with its secret.
            log.warning("crm_change_needs_restart", action="systemctl restart emailsync")
        old_by_address = {m.address: m for m in old.mailboxes}
        new_by_address = {m.address: m for m in new.mailboxes}
        self.settings = new
        with self._lock:
            for address, mailbox in old_by_address.items():
                if address not in new_by_address:
                    self._stop_worker(address)
                    self._stopped.pop(address, None)
                    self.metrics.forget_mailbox(address)
                    log.info("mailbox_removed", mailbox=address)
                elif everything_changed or new_by_address[address] != mailbox:
                    self._stop_worker(address)
                    self._stopped.pop(address, None)
                    self._start_or_mark(new_by_address[address])
                    log.info("mailbox_restarted", mailbox=address)
            for address, mailbox in new_by_address.items():
                if address not in old_by_address:
                    self._start_or_mark(mailbox)
                    log.info("mailbox_added", mailbox=address)
        self.notifier.ready(self.summary())

    # -- the registry (self-service) -------------------------------------------------------------

    def branches(self) -> list[dict[str, Any]]:
        """Every branch: the config file's (read-only) and the registered ones, by name."""
        found: dict[str, dict[str, Any]] = {}
        for branch in self._registry_or_none_branches():
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

        Mailboxes registered on it are restarted with the new server. A branch of the config
        file is read-only here (RegistrationError 409).
        """
        registry = self._registry()
        if name in self.settings.branches:
            raise RegistrationError(
                f"branch {name!r} is set in the config file; change it there", status=409
            )
        created = registry.put_branch(RegisteredBranch(name, host, port, security, ca_file))
        log.info("branch_registered", branch=name, host=host, port=port, security=security)
        with self._lock:
            self._registered_loaded = False
            for address, mailbox in list(self._registered_mailboxes().items()):
                if mailbox.branch == name and address in self.workers:
                    self._stop_worker(address)
                    self._start_worker(mailbox)
                    log.info("mailbox_restarted", mailbox=address, reason="branch changed")
        return created

    def setup_mailbox(self, address: str, branch: str, username: str, password: str) -> None:
        """First Time Setup (Basic): log in, create the folders, store the password, start.

        The login comes first: a refused one raises RegistrationError 422 with the server's
        answer in one line, and nothing is stored. A mailbox of the config file is read-only
        here (409).
        """
        registry = self._registry()
        if any(m.address == address for m in self.settings.mailboxes):
            raise RegistrationError(
                f"mailbox {address} is set in the config file; use `emailsync setup`",
                status=409,
            )
        mailbox = MailboxSettings(
            address=address,
            server=self._branch_server(branch),
            auth="password",
            username=username,
            branch=branch,
        )
        secret = Secret(password)
        authenticator = PasswordAuthenticator(mailbox, password=lambda: secret)
        try:
            session = ImapSession.open(
                mailbox,
                self.settings.folders,
                authenticator,
                timeout_seconds=min(self.settings.daemon.timeout_seconds, SETUP_TIMEOUT_SECONDS),
            )
            try:
                session.ensure_folders()
            finally:
                session.logout(SETUP_TIMEOUT_SECONDS)
        except AuthError as exc:
            raise RegistrationError(_one_line(str(exc)), status=422) from None
        except (ConnectionLostError, MailboxError) as exc:
            raise RegistrationError(_one_line(str(exc)), status=502) from None
        blob = self.vault.encrypt(password, address)
        record = RegisteredMailbox(address, branch, "password", username, True, False)
        with self._lock:
            self._stop_worker(address)
            registry.put_mailbox(record, blob)
            self.registered[address] = mailbox
            self._start_worker(mailbox)
        log.info("mailbox_registered", mailbox=address, branch=branch)

    def forget_mailbox(self, address: str) -> bool:
        """Stop Email Sync for a registered mailbox: stop its worker, forget it and its secret.

        The password (or the Office 365 tokens) is erased; the folders on the server and the
        timeline history stay, and First Time Setup registers it again. False when it is not
        registered; a mailbox of the config file is read-only here (RegistrationError 409:
        ``stop_mailbox`` stops it).
        """
        mailbox = self._registered_mailboxes().get(address)
        if mailbox is None:
            if any(m.address == address for m in self.settings.mailboxes):
                raise RegistrationError(
                    f"mailbox {address} is set in the config file; stop it with POST …/stop",
                    status=409,
                )
            return False
        with self._lock:
            worker = self.workers.pop(address, None)
        if worker is not None:
            worker.stop()
            worker.join(SHUTDOWN_SECONDS)
        self._registry().remove_mailbox(address)
        if mailbox.auth == "office365":
            with contextlib.suppress(ConfigError):
                self.authenticator_factory(mailbox, self.settings).forget()
        with self._lock:
            self.registered.pop(address, None)
            self._stopped.pop(address, None)
        self.metrics.forget_mailbox(address)
        log.info("mailbox_stopped", mailbox=address, credentials="erased")
        return True

    def mailbox_detail(self, address: str) -> dict[str, Any] | None:
        """Status, source, branch and the latest filed/failed messages of one mailbox."""
        registered = self._registered_mailboxes().get(address)
        configured = next((m for m in self.settings.mailboxes if m.address == address), None)
        mailbox = configured or registered
        if mailbox is None:
            return None
        with self._lock:
            worker = self.workers.get(address)
            status = worker.snapshot() if worker else self._stopped.get(address)
            recent = worker.report.recent() if worker else []
        if status is None:
            return None
        return {
            **asdict(status),
            "source": "config" if configured else "registry",
            "branch": mailbox.branch,
            "auth": mailbox.auth,
            "set_up": True,
            "recent": recent,
        }

    def office365_available(self) -> bool:
        """True when browser sign-in can be offered: ``[office365]`` in delegated mode."""
        return self.settings.office365 is not None and not self.settings.office365.app_only

    def office365_start(self, address: str, branch: str | None, redirect_uri: str) -> str:
        """First Time Setup (Office 365): the URL of the provider's sign-in page.

        The flow (PKCE verifier, nonce) stays here, keyed by its ``state``, bound to the
        mailbox, for ``OFFICE365_FLOW_SECONDS``. ``branch`` names the IMAP server; by default
        Exchange Online's.
        """
        if not self.office365_available():
            raise RegistrationError(
                "Office 365 sign-in is not set up here ([office365] in delegated mode)",
                status=409,
            )
        if any(m.address == address for m in self.settings.mailboxes):
            raise RegistrationError(
                f"mailbox {address} is set in the config file; use `emailsync auth login`",
                status=409,
            )
        server = (
            self._branch_server(branch)
            if branch
            else ServerSettings(host=OFFICE365_HOST, port=993, security="ssl")
        )
        mailbox = MailboxSettings(
            address=address, server=server, auth="office365", username=address, branch=branch
        )
        authenticator = self.authenticator_factory(mailbox, self.settings)
        if not isinstance(authenticator, Office365Authenticator):
            raise RegistrationError("Office 365 sign-in is not available", status=409)
        try:
            flow = authenticator.start_auth_code_flow(redirect_uri)
        except (AuthError, ConfigError) as exc:
            raise RegistrationError(_one_line(str(exc)), status=409) from None
        except ConnectionLostError as exc:
            raise RegistrationError(_one_line(str(exc)), status=502) from None
        now = time.monotonic()
        with self._lock:
            for state in [s for s, f in self._flows.items() if f.expires_at <= now]:
                del self._flows[state]
            self._flows[str(flow["state"])] = _PendingSignIn(
                mailbox, flow, now + OFFICE365_FLOW_SECONDS
            )
        log.info("office365_sign_in_started", mailbox=address)
        return str(flow["auth_uri"])

    def office365_finish(self, params: dict[str, str]) -> str:
        """The provider's callback: redeem the code, check the account, store, start.

        Returns the mailbox address. RegistrationError 400 for an unknown or expired state,
        422 when the provider refused or another account signed in (nothing is kept).
        """
        with self._lock:
            pending = self._flows.pop(params.get("state", ""), None)
        if pending is None or pending.expires_at <= time.monotonic():
            raise RegistrationError(
                "this sign-in expired or was already used; click Start Authentication again",
                status=400,
            )
        mailbox = pending.mailbox
        if "error" in params:
            reason = params.get("error_description") or params["error"]
            raise RegistrationError(_one_line(f"Microsoft refused: {reason}")[:300], status=422)
        authenticator = self.authenticator_factory(mailbox, self.settings)
        if not isinstance(authenticator, Office365Authenticator):
            raise RegistrationError("Office 365 sign-in is not available", status=409)
        try:
            authenticator.finish_auth_code_flow(
                pending.flow, params, allowed=mailbox.owner_addresses
            )
        except AuthError as exc:
            raise RegistrationError(_one_line(str(exc)), status=422) from None
        except ConnectionLostError as exc:
            raise RegistrationError(_one_line(str(exc)), status=502) from None
        record = RegisteredMailbox(
            mailbox.address, mailbox.branch or "", "office365", mailbox.address, False, False
        )
        with self._lock:
            self._stop_worker(mailbox.address)
            self._registry().put_mailbox(record, None)
            self.registered[mailbox.address] = mailbox
            self._start_worker(mailbox)
        log.info("mailbox_registered", mailbox=mailbox.address, auth="office365")
        return mailbox.address

    def _has_secret(self, address: str) -> bool:
        registry = self.mailbox_registry
        return registry is not None and registry.mailbox_secret(address) is not None

    def _registry(self) -> Registry:
        if self.mailbox_registry is None:
            raise RegistrationError(
                "this store keeps no registry of mailboxes (use the built-in SQLite store)",
                status=503,
            )
        return self.mailbox_registry

    def _registry_or_none_branches(self) -> list[RegisteredBranch]:
        return (
            self.mailbox_registry.registered_branches() if self.mailbox_registry is not None else []
        )

    def _branch_server(self, name: str) -> ServerSettings:
        if name in self.settings.branches:
            return self.settings.branches[name]
        for branch in self._registry_or_none_branches():
            if branch.name == name:
                return ServerSettings(
                    host=branch.host,
                    port=branch.port,
                    security=branch.security,
                    ca_file=Path(branch.ca_file) if branch.ca_file else None,
                    allow_insecure=branch.security == "none",
                )
        raise RegistrationError(f"no branch {name!r}; IT adds it first", status=422)

    def _registered_mailboxes(self) -> dict[str, MailboxSettings]:
        """The registry's mailboxes as settings (loaded once; re-read after a branch change)."""
        if self.mailbox_registry is None:
            return {}
        with self._lock:
            if not self._registered_loaded:
                configured = {m.address for m in self.settings.mailboxes}
                loaded: dict[str, MailboxSettings] = {}
                for record in self.mailbox_registry.registered_mailboxes():
                    if record.address in configured:
                        continue  # the config file's wins
                    try:
                        server = (
                            self._branch_server(record.branch)
                            if record.branch
                            else ServerSettings(host=OFFICE365_HOST, port=993, security="ssl")
                        )
                    except RegistrationError:
                        log.warning("mailbox_branch_missing", mailbox=record.address)
                        continue
                    loaded[record.address] = MailboxSettings(
                        address=record.address,
                        server=server,
                        auth=record.auth,
                        username=record.username,
                        branch=record.branch or None,
                    )
                self.registered = loaded
                self._registered_loaded = True
            return self.registered

    def _start_registered(self, mailbox: MailboxSettings) -> bool:
        """Start a registered mailbox that has its credentials; else show it stopped."""
        if mailbox.auth == "password" and not self._has_secret(mailbox.address):
            self._mark_stopped(mailbox)
            return False
        with self._lock:
            if mailbox.address not in self.workers:
                self._start_worker(mailbox)
        return True

    def _authenticator(self, mailbox: MailboxSettings) -> Authenticator:
        registry = self.mailbox_registry
        if (
            registry is not None
            and mailbox.auth == "password"
            and mailbox.address in self.registered
            and mailbox.password is None
        ):
            address = mailbox.address

            def read() -> Secret:
                blob = registry.mailbox_secret(address)
                if blob is None:
                    raise ConfigError([f"{address}: no stored password (Stop Email Sync)"])
                return self.vault.decrypt(blob, address)

            return PasswordAuthenticator(mailbox, password=read)
        return self.authenticator_factory(mailbox, self.settings)

    # -- internals ------------------------------------------------------------------------------

    def _start_or_mark(self, mailbox: MailboxSettings) -> None:
        if not mailbox.enabled or stopped_marker(self.settings, mailbox.address).exists():
            self._mark_stopped(mailbox)
        else:
            self._start_worker(mailbox)

    def _start_worker(self, mailbox: MailboxSettings) -> None:
        self._stopped.pop(mailbox.address, None)
        worker = MailboxWorker(
            mailbox,
            self.settings,
            self.store,
            self.metrics,
            self._authenticator(mailbox),
        )
        self.workers[mailbox.address] = worker
        worker.start()

    def _stop_worker(self, address: str) -> None:
        worker = self.workers.pop(address, None)
        if worker is not None:
            worker.stop()
            worker.join(SHUTDOWN_SECONDS)

    def _mark_stopped(self, mailbox: MailboxSettings) -> None:
        self.metrics.init_mailbox(mailbox.address)
        self.metrics.set_state(mailbox.address, "stopped")
        with self._lock:
            self._stopped[mailbox.address] = WorkerStatus(
                mailbox.address, "stopped", mailbox.trigger
            )

    def _restart_dead_workers(self) -> None:
        with self._lock:
            dead = [
                a
                for a, w in self.workers.items()
                if not w.is_alive() and w.first_attempt_done.is_set()
            ]
            for address in dead:
                log.error("worker_died", mailbox=address)
                mailbox = self.workers.pop(address).mailbox
                self._start_worker(mailbox)

    def _schedule_jobs(self) -> None:
        daemon = self.settings.daemon
        jobs = (
            (self._sweep, daemon.sweep_seconds, "sweep"),
            (self._refresh_gauges, GAUGE_SECONDS, "gauges"),
            (self._refresh_tokens, TOKEN_CHECK_SECONDS, "tokens"),
        )
        for job, seconds, name in jobs:
            self.scheduler.add_job(
                job, "interval", seconds=seconds, id=name, max_instances=1, coalesce=True
            )

    def _sweep(self) -> None:
        """Safety sweep: a pass over every Queue, for anything IDLE did not announce."""
        with self._lock:
            workers = list(self.workers.values())
        for worker in workers:
            worker.request_pass("sweep")

    def _refresh_gauges(self) -> None:
        with self._lock:
            workers = list(self.workers.values())
        for worker in workers:
            worker.refresh_gauges()

    def _refresh_tokens(self) -> None:
        """Refresh OAuth tokens ahead of expiry (and keep refresh tokens alive)."""
        with self._lock:
            workers = list(self.workers.values())
        for worker in workers:
            worker.refresh_token(TOKEN_REFRESH_AHEAD_SECONDS)

    def _install_signals(self) -> None:
        def on_stop(signum: int, _: FrameType | None) -> None:
            self._stop_requested = True
            self._wake.set()

        def on_reload(signum: int, _: FrameType | None) -> None:
            self._reload_requested = True
            self._wake.set()

        def on_sync(signum: int, _: FrameType | None) -> None:
            self._sync_all_requested = True
            self._wake.set()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_reload)
        signal.signal(signal.SIGUSR1, on_sync)


def _one_line(text: str) -> str:
    return " ".join(text.split())
