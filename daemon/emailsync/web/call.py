"""What a route is given and may answer with: the ``Call``, ``Access`` levels, ``RefusedError``.

Shared by the route table (``emailsync.web.routes``), the control API (``emailsync.web.api``)
and the pages (``emailsync.web.pageroutes``); it imports none of them.
"""

from __future__ import annotations

import enum
import hmac
import re
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING

from emailsync.mail.address import mailbox_address_problem, normalise_address
from emailsync.state.vault import LEGACY_TOKEN_PREFIX, TOKEN_PREFIX
from emailsync.web.pages import Principal, Session

if TYPE_CHECKING:
    from emailsync.web.ports import App

NO_SUCH_MAILBOX = "no such mailbox"
# What an agent token starts with (es1: issued before tokens had ids, still accepted).
AGENT_TOKEN_PREFIXES = (f"{TOKEN_PREFIX}.", f"{LEGACY_TOKEN_PREFIX}.")
FORBIDDEN_FOR_AGENT = "this token is for one mailbox only"
BRANCH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
# A DNS name or an IPv4 address; no URL, no spaces, no path.
HOST_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")


class Access(enum.Enum):
    """Who may call a route; ``emailsync.web.routes.admit`` checks it before the handler runs."""

    ANYONE = "anyone"  # no credentials (health)
    OPTIONAL = "optional"  # anyone; the control token shows more (the status page)
    METRICS = "metrics"  # ANYONE on a loopback listener, else ADMIN (server.metrics_need_token)
    ADMIN = "admin"  # the control token: 401 without a valid token, 403 for an agent's
    CALLER = "caller"  # the control token or any agent's; the route shows what it may see
    MAILBOX = "mailbox"  # the control token or the agent token of the path's {address} (404)
    SIGNED = "signed"  # no bearer token: the CRM's signature, which the handler checks
    PAGE = "page"  # a page anyone opens, without reading the session (static files)
    VISITOR = "visitor"  # a page with its session, logged in or not; a form needs its CSRF
    AGENT = "agent"  # a logged-in session of the path's {address}, or IT's; CSRF on forms
    IT = "it"  # IT's logged-in session; CSRF on forms

    @property
    def page(self) -> bool:
        """True for the HTML pages (a session cookie), False for the API (a bearer token)."""
        return self in (Access.PAGE, Access.VISITOR, Access.AGENT, Access.IT)


@dataclass
class Call:
    """One admitted request: the path's parameters (``address`` normalised) and who asks."""

    args: dict[str, str]
    query: str = ""
    principal: Principal | None = None  # (API routes) who the bearer token names
    session: Session | None = None  # (page routes) the browser's session
    form: dict[str, str] = field(default_factory=dict)  # (page POST) the form's fields

    @property
    def address(self) -> str:
        """The mailbox of an ``{address}`` route (checked visible to the caller)."""
        return self.args["address"]

    @property
    def signed_in(self) -> tuple[Session, Principal]:
        """The session and its principal of an AGENT or IT page (``admit`` made sure)."""
        session = self.session
        if session is None or session.principal is None:
            raise RuntimeError("a page route for the logged in was admitted without a login")
        return session, session.principal

    @property
    def caller(self) -> Principal:
        """Who the bearer token names, on a route that needs one (``admit`` made sure)."""
        if self.principal is None:
            raise RuntimeError("a route that needs a token was admitted without one")
        return self.principal


class RefusedError(Exception):
    """An answer decided part-way through a route: status and JSON error."""

    def __init__(
        self, status: HTTPStatus | int, error: str, *, retry_after: int | None = None
    ) -> None:
        super().__init__(error)
        self.status = HTTPStatus(status)
        self.error = error
        self.retry_after = retry_after  # seconds: a Retry-After header (429)


def mailbox_address(raw: str) -> str | None:
    """The normalised address from a URL path segment, or None when it is not a mailbox's."""
    address = normalise_address(raw) if raw and raw == raw.strip() else None
    if address is None or mailbox_address_problem(address) is not None:
        return None
    return address


# -- who is asking -------------------------------------------------------------------------


def principal_for(app: App, given: str) -> Principal | None:
    """Who a token names: the admin (the control token), an agent (its token), or nobody."""
    if hmac.compare_digest(given.encode("utf-8", "replace"), app.token.encode()):
        return Principal.ADMIN
    check = app.check_agent_token
    address = check(given) if check is not None and given.startswith(AGENT_TOKEN_PREFIXES) else None
    return Principal(address) if address is not None else None


def bearer_principal(app: App, authorization: str | None) -> Principal | None:
    """Who an ``Authorization: Bearer`` header names (see ``principal_for``)."""
    given = authorization or ""
    bearer = given.removeprefix("Bearer ")
    return principal_for(app, bearer) if bearer != given else None
