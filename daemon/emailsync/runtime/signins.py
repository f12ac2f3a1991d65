"""Office 365 browser sign-ins (First Time Setup): start on one instance, finish on any.

``start`` asks MSAL for an authorization-code flow with PKCE (RFC 7636) and keeps it in a
``SignInFlows`` store, keyed by its OAuth ``state``, bound to the mailbox (its branch and
trigger), for ``FLOW_SECONDS``; the browser goes to the provider. ``finish`` is the provider's
redirect back: it *takes* the flow (single use: a replayed callback, or one after the flow
expired, is refused with 400), redeems the code, keeps the tokens only when the mailbox's own
account signed in, and registers the mailbox (its worker starts on whichever instance runs it).

Where flows are kept: the state database's ``signin_flows`` (``SqlSignInFlows``: behind a load
balancer the callback may reach another instance than the start) or, with no SQL state, this
process's memory (``MemorySignInFlows``). The tokens go to the daemon's ``TokenCacheStore``
through the authenticator (the state database in a cluster): the instance that finished the
sign-in is seldom the one whose worker logs in with it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import KW_ONLY, dataclass
from typing import Any, Protocol

import structlog

from emailsync.config import OFFICE365_HOST, MailboxSettings, ServerSettings, Settings
from emailsync.errors import AuthError, ConfigError, ConnectionLostError, RegistrationError
from emailsync.imap.auth import Authenticator, Office365Authenticator

log = structlog.get_logger(__name__)

FLOW_SECONDS = 600.0  # a browser sign-in must come back within 10 minutes
# Pending sign-ins kept at most; beyond, the ones closest to expiry are dropped (starting one
# takes a token, but an agent's script must not grow the table without bound).
MAX_FLOWS = 1000
ERROR_CHARS = 300


class SignInFlows(Protocol):
    """Pending sign-ins by OAuth state; each one taken at most once."""

    def put(
        self, state: str, address: str, payload: Mapping[str, Any], expires_at: float, now: float
    ) -> None:
        """Keep a flow until ``expires_at`` (Unix seconds)."""
        ...

    def take(self, state: str, now: float) -> tuple[str, dict[str, Any]] | None:
        """The flow (address, payload), gone from the store; None when none or expired."""
        ...


class MemorySignInFlows:
    """Pending sign-ins in this process's memory (no SQL state: one process, one host)."""

    def __init__(self, *, max_flows: int = MAX_FLOWS) -> None:
        self.max_flows = max_flows
        self._flows: dict[str, tuple[str, dict[str, Any], float]] = {}
        self._lock = threading.Lock()

    def put(
        self, state: str, address: str, payload: Mapping[str, Any], expires_at: float, now: float
    ) -> None:
        """Keep a flow; expired ones go, and the closest to expiry beyond ``max_flows``."""
        with self._lock:
            for key in [k for k, (_, _, at) in self._flows.items() if at <= now]:
                del self._flows[key]
            while len(self._flows) >= self.max_flows:
                del self._flows[min(self._flows, key=lambda k: self._flows[k][2])]
            self._flows[state] = (address, dict(payload), expires_at)

    def take(self, state: str, now: float) -> tuple[str, dict[str, Any]] | None:
        """The flow, removed; None when there is none or it expired."""
        with self._lock:
            found = self._flows.pop(state, None)
        if found is None or found[2] <= now:
            return None
        return found[0], found[1]


def _no_lock(address: str) -> AbstractContextManager[None]:
    return contextlib.nullcontext()


@dataclass(eq=False)
class SignIns:
    """Office 365 browser sign-ins of the self-service pages and API (owned by the Supervisor).

    ``settings``: the daemon's current settings; ``authenticator``: a mailbox's authenticator
    (with the daemon's token caches); ``branch_server``: a branch's IMAP server
    (RegistrationError 422 when unknown); ``register``: store the signed-in mailbox in the
    registry and start its worker; ``mailbox_lock``: the registrar's per-mailbox lock, held
    while a finish redeems and registers (see ``finish``).
    """

    settings: Callable[[], Settings]
    authenticator: Callable[[MailboxSettings], Authenticator]
    branch_server: Callable[[str], ServerSettings]
    register: Callable[[MailboxSettings], None]
    flows: SignInFlows
    _: KW_ONLY
    mailbox_lock: Callable[[str], AbstractContextManager[None]] = _no_lock
    clock: Callable[[], float] = time.time

    def available(self) -> bool:
        """True when browser sign-in can be offered: ``[office365]`` in delegated mode."""
        office365 = self.settings().office365
        return office365 is not None and not office365.app_only

    def start(
        self, address: str, branch: str | None, redirect_uri: str, trigger: str = "auto"
    ) -> str:
        """First Time Setup (Office 365): the URL of the provider's sign-in page.

        The flow (PKCE verifier, nonce) is kept by its ``state``, bound to the mailbox (its
        branch and ``trigger``), for ``FLOW_SECONDS``. ``branch`` names the IMAP server; by
        default Exchange Online's.
        """
        if not self.available():
            raise RegistrationError(
                "Office 365 sign-in is not set up here ([office365] in delegated mode)",
                status=409,
            )
        if any(m.address == address for m in self.settings().mailboxes):
            raise RegistrationError(
                f"mailbox {address} is set in the config file; use `emailsync auth login`",
                status=409,
            )
        mailbox = self._mailbox(address, branch, trigger)
        authenticator = self._office365(mailbox)
        try:
            flow = authenticator.start_auth_code_flow(redirect_uri)
        except (AuthError, ConfigError) as exc:
            raise RegistrationError(_one_line(str(exc)), status=409) from None
        except ConnectionLostError as exc:
            raise RegistrationError(_one_line(str(exc)), status=502) from None
        now = self.clock()
        payload = {"flow": flow, "branch": branch, "trigger": trigger}
        self.flows.put(str(flow["state"]), address, payload, now + FLOW_SECONDS, now)
        log.info("office365_sign_in_started", mailbox=address)
        return str(flow["auth_uri"])

    def finish(self, params: Mapping[str, str]) -> str:
        """The provider's callback: take the flow, redeem the code, check the account, register.

        Returns the mailbox address. RegistrationError 400 for an unknown, used or expired
        state, 422 when the provider refused or another account signed in (nothing is kept).
        """
        taken = self.flows.take(params.get("state", ""), self.clock())
        if taken is None:
            raise RegistrationError(
                "this sign-in expired or was already used; click Start Authentication again",
                status=400,
            )
        address, payload = taken
        if "error" in params:
            reason = params.get("error_description") or params["error"]
            raise RegistrationError(
                _one_line(f"Microsoft refused: {reason}")[:ERROR_CHARS], status=422
            )
        mailbox = self._mailbox(address, payload.get("branch"), str(payload["trigger"]))
        # REGISTRAR LOCK (issue 20): the registrar's per-mailbox lock, so that a set-up or a
        # Stop Email Sync of this mailbox never interleaves with its sign-in's redeem and
        # registration. The one place it is taken; the Supervisor passes it as mailbox_lock.
        with self.mailbox_lock(address):
            authenticator = self._office365(mailbox)
            try:
                authenticator.finish_auth_code_flow(
                    dict(payload["flow"]), params, allowed=mailbox.owner_addresses
                )
            except AuthError as exc:
                raise RegistrationError(_one_line(str(exc)), status=422) from None
            except ConnectionLostError as exc:
                raise RegistrationError(_one_line(str(exc)), status=502) from None
            self.register(mailbox)
        log.info("mailbox_registered", mailbox=address, auth="office365")
        return address

    def _mailbox(self, address: str, branch: str | None, trigger: str) -> MailboxSettings:
        server = (
            self.branch_server(branch)
            if branch
            else ServerSettings(host=OFFICE365_HOST, port=993, security="ssl")
        )
        return MailboxSettings(
            address=address,
            server=server,
            auth="office365",
            username=address,
            branch=branch,
            trigger=trigger,
        )

    def _office365(self, mailbox: MailboxSettings) -> Office365Authenticator:
        authenticator = self.authenticator(mailbox)
        if not isinstance(authenticator, Office365Authenticator):
            raise RegistrationError("Office 365 sign-in is not available", status=409)
        return authenticator


def _one_line(text: str) -> str:
    return " ".join(text.split())
