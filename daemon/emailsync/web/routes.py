"""The one route table of the listener, and what comes of it: matching, Allow and 405, who may call.

Each ``Route`` is a method, a path (``{name}`` stands for one path segment), who may call it
(``Access``) and the handler. ``dispatch`` finds the route, answers 405 with the ``Allow`` header
the table gives for the path, checks the caller (``admit``: the bearer token for the API, the
session and its CSRF token for the pages), then runs the handler. The API's routes are the
operations of ``config/control-api.yaml`` (tests/unit/test_web.py compares the two).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote

from emailsync.timeline.crm.callback import GROUPS_CHANGED_PATH
from emailsync.web import api, pageroutes
from emailsync.web.call import (
    FORBIDDEN_FOR_AGENT,
    NO_SUCH_MAILBOX,
    Access,
    Call,
    RefusedError,
    bearer_principal,
    mailbox_address,
    principal_for,
)
from emailsync.web.pages import STATIC_FILES, Principal, Session

if TYPE_CHECKING:
    from emailsync.web.handler import RequestHandler
    from emailsync.web.ports import App

METHODS = ("GET", "POST", "PUT", "DELETE")  # the order of the Allow header
NOT_ROUTED_ALLOW = "GET, POST"
TOKEN_NEEDED = frozenset(
    {Access.ADMIN, Access.CALLER, Access.MAILBOX}
)  # else a 401  # the Allow header of a path the table does not have
_SEGMENT = re.compile(r"\{([a-z]+)\}")

Handler = Callable[["RequestHandler", Call], None]


@dataclass(frozen=True)
class Route:
    """One method on one path: who may call it and what answers."""

    method: str
    # "/v1/mailboxes/{address}/sync": a {name} is one path segment, empty or not (an empty
    # address is answered like an unknown one)
    path: str
    access: Access
    handler: Handler
    pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        parts = _SEGMENT.split(self.path)  # literal, name, literal, name, …
        regex = "".join(
            re.escape(part) if i % 2 == 0 else f"(?P<{part}>[^/]*)" for i, part in enumerate(parts)
        )
        object.__setattr__(self, "pattern", re.compile(regex))


ROUTES: tuple[Route, ...] = (
    # Health, metrics, the status page: config/control-api.yaml documents them with the API.
    Route("GET", "/healthz", Access.ANYONE, api.healthz),
    Route("GET", "/readyz", Access.ANYONE, api.readyz),
    Route("GET", "/metrics", Access.METRICS, api.metrics),
    Route("GET", "/", Access.OPTIONAL, api.status),
    # The control API (/v1).
    Route("GET", "/v1/mailboxes", Access.CALLER, api.list_mailboxes),
    Route("POST", "/v1/sync", Access.ADMIN, api.sync_all),
    Route("GET", "/v1/branches", Access.ADMIN, api.list_branches),
    Route("PUT", "/v1/branches/{name}", Access.ADMIN, api.put_branch),
    Route("GET", "/v1/mailboxes/{address}", Access.MAILBOX, api.mailbox_detail),
    Route("PUT", "/v1/mailboxes/{address}", Access.MAILBOX, api.put_mailbox),
    Route("DELETE", "/v1/mailboxes/{address}", Access.MAILBOX, api.forget_mailbox),
    Route("GET", "/v1/tokens", Access.ADMIN, api.list_tokens),
    Route("POST", "/v1/tokens", Access.ADMIN, api.issue_token),
    Route("DELETE", "/v1/tokens/{id}", Access.ADMIN, api.revoke_tokens),
    Route("POST", "/v1/mailboxes/{address}/office365/start", Access.MAILBOX, api.office365_start),
    Route("POST", "/v1/mailboxes/{address}/sync", Access.MAILBOX, api.sync_mailbox),
    Route("POST", "/v1/mailboxes/{address}/stop", Access.MAILBOX, api.stop_mailbox),
    Route("POST", "/v1/mailboxes/{address}/start", Access.MAILBOX, api.start_mailbox),
    Route("POST", GROUPS_CHANGED_PATH, Access.SIGNED, api.groups_changed),
    # The pages (HTML).
    Route("GET", pageroutes.FAVICON, Access.PAGE, pageroutes.favicon),
    *(Route("GET", f"/static/{name}", Access.PAGE, pageroutes.static) for name in STATIC_FILES),
    Route("GET", pageroutes.OFFICE365_CALLBACK, Access.PAGE, pageroutes.office365_callback),
    Route("GET", "/login", Access.VISITOR, pageroutes.login_page),
    Route("POST", "/login", Access.VISITOR, pageroutes.login),
    Route("POST", "/logout", Access.VISITOR, pageroutes.logout),
    Route("GET", "/it", Access.IT, pageroutes.it_page),
    Route("POST", "/it/branches", Access.IT, pageroutes.it_branch),
    Route("POST", "/it/tokens", Access.IT, pageroutes.it_issue_token),
    Route("POST", "/it/tokens/revoke", Access.IT, pageroutes.it_revoke_token),
    Route("GET", "/email-sync/{address}", Access.AGENT, pageroutes.email_sync_page),
    *(
        Route("POST", f"/email-sync/{{address}}/{action}", Access.AGENT, handler)
        for action, handler in pageroutes.EMAIL_SYNC_ACTIONS.items()
    ),
)


def find(method: str, path: str) -> tuple[Route, dict[str, str]] | None:
    """The route of ``method`` on ``path`` and the path's parameters (percent-decoded); None
    when there is none."""
    for route in ROUTES:
        if route.method == method:
            found = route.pattern.fullmatch(path)
            if found is not None:
                return route, {k: unquote(v) for k, v in found.groupdict().items()}
    return None


def allowed(path: str) -> str | None:
    """The ``Allow`` header of ``path`` (the methods the table has on it), None for no route."""
    methods = {r.method for r in ROUTES if r.pattern.fullmatch(path)}
    return ", ".join(m for m in METHODS if m in methods) or None


def dispatch(request: RequestHandler, method: str) -> None:
    """Answer a request (its body already read): 405, 404, or the route's handler if admitted."""
    path, _, query = request.path.partition("?")
    found = find(method, path)
    if found is None:
        allow = allowed(path)
        if allow is not None or method not in ("GET", "POST"):
            # RFC 9110 §15.5.6: 405 with Allow, for a method we know but this path has not.
            request.method_not_allowed(allow or NOT_ROUTED_ALLOW)
            return
        raise RefusedError(HTTPStatus.NOT_FOUND, "not found")
    route, args = found
    call = admit(request, route, Call(args, query))
    if call is not None:
        route.handler(request, call)


def admit(request: RequestHandler, route: Route, call: Call) -> Call | None:
    """``call`` with who asks when the route's ``Access`` lets them; else answer and None."""
    access = route.access
    app = request.app
    if access is Access.METRICS:
        access = Access.ADMIN if app.metrics_token else Access.ANYONE
    if access is Access.OPTIONAL or access in TOKEN_NEEDED:
        call.principal = bearer_principal(app, request.headers.get("Authorization"))
    if access in TOKEN_NEEDED:
        if call.principal is None:
            request.unauthorised()
            return None
        if access is Access.ADMIN and call.principal != Principal.ADMIN:
            raise RefusedError(HTTPStatus.FORBIDDEN, FORBIDDEN_FOR_AGENT)
        if access is Access.MAILBOX:
            # An invalid address answers exactly like an unknown one, and like another
            # agent's: an agent's token sees no mailbox but its own.
            address = mailbox_address(call.args["address"])
            if address is None or not call.principal.may_see(address):
                raise RefusedError(HTTPStatus.NOT_FOUND, NO_SUCH_MAILBOX)
            call.args["address"] = address
    if access in (Access.VISITOR, Access.AGENT, Access.IT):
        return _admit_page(request, route, access, call)
    return call


def _admit_page(request: RequestHandler, route: Route, access: Access, call: Call) -> Call | None:
    pages = request.app.pages
    call.session = session = page_session(request.app, request.headers.get("Cookie"))
    if route.method == "POST":
        body = request.body.decode("utf-8", "replace")
        call.form = {k: v[-1] for k, v in parse_qs(body).items()}
        if session is None or not pages.csrf_ok(session, call.form.get("csrf", "")):
            request.html(HTTPStatus.FORBIDDEN, pages.render("expired.html", None))
            return None
    if access is Access.VISITOR:
        return call
    if session is None or session.principal is None:
        request.redirect("/login")
        return None
    principal = session.principal
    if access is Access.IT and principal != Principal.ADMIN:
        request.html(HTTPStatus.FORBIDDEN, pages.render("forbidden.html", session))
        return None
    if access is Access.AGENT:
        address = mailbox_address(call.args["address"])
        if address is None or not principal.may_see(address):
            request.html(HTTPStatus.NOT_FOUND, pages.render("forbidden.html", session))
            return None
        call.args["address"] = address
    return call


# -- who is asking -------------------------------------------------------------------------


def page_session(app: App, cookie: str | None) -> Session | None:
    """The request's session, while the token it was opened with is still valid.

    An agent's session ends with its token: its revocation (``emailsync token revoke``,
    ``DELETE /v1/tokens/{id}``, the IT page), ``emailsync keys rotate`` or its expiry logs
    the agent out at once, not after ``SESSION_SECONDS``.
    """
    session = app.pages.session(cookie)
    if (
        session is not None
        and session.principal is not None
        and principal_for(app, session.token) != session.principal
    ):
        app.pages.logout(session)
        return None
    return session
