"""The listener's HTML: the status page and the self-service pages (login, Email Sync, IT).

Each handler takes the request and its ``Call``; the route table (``emailsync.web.routes``)
has already read the session, checked a form's CSRF token and who may open the page. Sessions,
CSRF tokens and templates live in ``emailsync.web.pages``.
"""

from __future__ import annotations

import html
from collections import Counter
from datetime import UTC, datetime
from http import HTTPStatus
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, quote

from emailsync.config import MAX_AGENT_TOKEN_DAYS, SECURITIES
from emailsync.errors import RegistrationError
from emailsync.runtime.worker import WorkerStatus
from emailsync.web.call import (
    BRANCH_NAME,
    HOST_NAME,
    Call,
    RefusedError,
    mailbox_address,
    principal_for,
)
from emailsync.web.pages import Principal

if TYPE_CHECKING:
    from collections.abc import Callable

    from emailsync.web.handler import RequestHandler

EMAIL_SYNC_PAGE = "/email-sync/"
OFFICE365_CALLBACK = "/oauth/office365/callback"
FAVICON = "/favicon.ico"
FAVICON_CACHE_SECONDS = 24 * 3600

# -- pages anyone opens (no session read: they answer while the state database is down) -----


def favicon(request: RequestHandler, call: Call) -> None:
    # Browsers ask every origin for it; a 404 is an error in the console of every page
    # (issue 19). No icon, no error, and asked again at most once a day.
    request.send_response(HTTPStatus.NO_CONTENT)
    request.send_header("Cache-Control", f"max-age={FAVICON_CACHE_SECONDS}")
    request.end_headers()


def static(request: RequestHandler, call: Call) -> None:
    path = request.path.split("?", 1)[0]
    body, content_type = request.app.pages.static(path.removeprefix("/static/"))
    request.send(HTTPStatus.OK, body, content_type)


def office365_callback(request: RequestHandler, call: Call) -> None:
    # No session needed (the cookie is SameSite=Strict, and this is a cross-site redirect):
    # the unguessable, single-use state binds it to the mailbox.
    pages = request.app.pages
    params = {k: v[-1] for k, v in parse_qs(call.query).items()}
    try:
        signed_in = request.app.require_signins().finish(params)
    except RegistrationError as exc:
        page = pages.render("signed_in.html", None, address=None, error=str(exc))
        request.html(HTTPStatus(exc.status), page)
        return
    page = pages.render("signed_in.html", None, address=signed_in, error=None)
    request.html(HTTPStatus.OK, page)


# -- logging in and out ----------------------------------------------------------------------


def login_page(request: RequestHandler, call: Call) -> None:
    """``/login``, and ``/login?token=…``: the link an agent (or IT) was given logs in."""
    pages = request.app.pages
    given = {k: v[-1] for k, v in parse_qs(call.query).items()}.get("token", "")
    principal = principal_for(request.app, given) if given else None
    if principal is not None:
        session = pages.login(principal, token=given)
        page = pages.render("continue.html", session, target=pages.home(principal))
        request.html(HTTPStatus.OK, page, cookie=pages.cookie(session))
        return
    session = call.session or pages.anonymous()
    status = HTTPStatus.UNAUTHORIZED if given else HTTPStatus.OK
    error = "That link is not valid: it expired or was revoked." if given else None
    page = pages.render("login.html", session, error=error)
    request.html(status, page, cookie=pages.cookie(session))


def login(request: RequestHandler, call: Call) -> None:
    pages = request.app.pages
    given = call.form.get("token", "").strip()
    principal = principal_for(request.app, given)
    if principal is None:
        error = "That token is not valid."
        request.html(HTTPStatus.UNAUTHORIZED, pages.render("login.html", call.session, error=error))
        return
    session = pages.login(principal, token=given, replacing=call.session)
    request.redirect(pages.home(principal), cookie=pages.cookie(session))


def logout(request: RequestHandler, call: Call) -> None:
    if call.session is not None:  # (always: admitted with its CSRF token)
        request.app.pages.logout(call.session)
    request.redirect("/login", cookie=request.app.pages.cookie(None))


# -- IT's page --------------------------------------------------------------------------------


def it_page(request: RequestHandler, call: Call) -> None:
    session, _ = call.signed_in
    app = request.app
    registrar = app.require_registrar()
    details = [registrar.mailbox_detail(s.address) for s in app.control.statuses()]
    listing = app.list_agent_tokens
    now = datetime.now(UTC)
    # Links that still work; the revoked and expired ones are in `token list`.
    tokens = [t for t in (listing() if listing else []) if t.state(now) == "active"]
    page = app.pages.render(
        "it.html",
        session,
        branches=registrar.branches(),
        mailboxes=[d for d in details if d is not None],
        securities=SECURITIES,
        token_link=session.pop_flash("token_link"),
        tokens=tokens,
        max_token_days=MAX_AGENT_TOKEN_DAYS,
    )
    request.html(HTTPStatus.OK, page)


def it_branch(request: RequestHandler, call: Call) -> None:
    session, _ = call.signed_in
    form = call.form
    registrar = request.app.require_registrar()
    try:
        port = int(form.get("port", ""))
    except ValueError:
        port = 0
    name, host = form.get("name", "").strip(), form.get("host", "").strip()
    security = form.get("security", "")
    if (
        not BRANCH_NAME.fullmatch(name)
        or not HOST_NAME.fullmatch(host)
        or not 1 <= port <= 65535
        or security not in SECURITIES
    ):
        session.flash("error", "Branch: a name, a host, a port 1-65535, a security.")
    else:
        try:
            registrar.put_branch(name, host, port, security)
            session.flash("notice", f"Branch {name} saved.")
        except RegistrationError as exc:
            session.flash("error", str(exc))
    request.redirect("/it")


def it_issue_token(request: RequestHandler, call: Call) -> None:
    session, _ = call.signed_in
    request.app.require_registrar()  # (as every IT form: a 503 without self-service)
    address = mailbox_address(call.form.get("address", "").strip())
    issue = request.app.issue_agent_token
    days_text = call.form.get("days", "").strip()
    days = int(days_text) if days_text.isdigit() else None  # empty: the default
    if address is None or issue is None:
        session.flash("error", "Not a mailbox address.")
    elif days_text and (days is None or not 1 <= days <= MAX_AGENT_TOKEN_DAYS):
        session.flash("error", f"Valid for: 1 to {MAX_AGENT_TOKEN_DAYS} days.")
    else:
        token, _ = issue(address, days, "page")
        session.flash("token_link", request.login_link(token))
    request.redirect("/it")


def it_revoke_token(request: RequestHandler, call: Call) -> None:
    session, _ = call.signed_in
    request.app.require_registrar()  # (as every IT form: a 503 without self-service)
    revoke = request.app.revoke_agent_tokens
    token_id = call.form.get("id", "")
    try:
        revoked = revoke(token_id) if revoke is not None and "@" not in token_id else []
    except ValueError:
        revoked = []
    if revoked:
        session.flash("notice", f"Link revoked: {revoked[0].address} ({token_id}).")
    else:
        session.flash("error", "No such link.")
    request.redirect("/it")


# -- an agent's Email Sync page ----------------------------------------------------------------


def email_sync_page(request: RequestHandler, call: Call) -> None:
    session, _ = call.signed_in
    app = request.app
    registrar = app.require_registrar()
    page = app.pages.render(
        "email_sync.html",
        session,
        address=call.address,
        detail=registrar.mailbox_detail(call.address),
        branches=registrar.branches(),
        office365=app.signins is not None and app.signins.available(),
    )
    request.html(HTTPStatus.OK, page)


def _trigger(call: Call) -> str:
    # Only the form's two choices; anything else (a hand-made post) is the default.
    return "manual" if call.form.get("trigger") == "manual" else "auto"


def setup_action(request: RequestHandler, call: Call) -> None:
    session, principal = call.signed_in
    form = call.form
    try:
        request.app.require_registrar().setup_mailbox(
            call.address,
            form.get("branch", ""),
            form.get("username", "").strip(),
            form.get("password", ""),
            _trigger(call),
            agent=principal != Principal.ADMIN,
            client=request.client_address[0],
        )
        session.flash("notice", "Authenticated: your folders are ready.")
    except RegistrationError as exc:
        session.flash("error", str(exc))
    _back_to_page(request, call)


def sync_action(request: RequestHandler, call: Call) -> None:
    session, _ = call.signed_in
    request.app.require_registrar()  # (as every Email Sync form: a 503 without self-service)
    if request.app.control.start_sync(call.address):
        session.flash("notice", "Sync started.")
    else:
        session.flash("error", "Email Sync is not running for this mailbox.")
    _back_to_page(request, call)


def office365_action(request: RequestHandler, call: Call) -> None:
    session, _ = call.signed_in
    request.app.require_registrar()  # (as every Email Sync form: a 503 without self-service)
    branch = call.form.get("branch") or None
    try:
        url = start_office365(request, call.address, branch, _trigger(call))
    except RefusedError as exc:
        session.flash("error", exc.error)
        _back_to_page(request, call)
        return
    # A page, not a 303: the CSP's form-action 'self' also covers redirects.
    request.html(HTTPStatus.OK, request.app.pages.render("continue.html", session, target=url))


def stop_action(request: RequestHandler, call: Call) -> None:
    session, _ = call.signed_in
    try:
        request.app.require_registrar().forget_mailbox(call.address)
        session.flash("notice", "Email Sync stopped and your credentials forgotten.")
    except RegistrationError:
        # A mailbox of the config file: stopped (tokens forgotten) until `setup`.
        request.app.control.stop_mailbox(call.address)
        session.flash("notice", "Email Sync stopped until IT runs `emailsync setup`.")
    _back_to_page(request, call)


def start_office365(request: RequestHandler, address: str, branch: str | None, trigger: str) -> str:
    """The provider's sign-in page for ``address``; it sends the browser back to
    ``OFFICE365_CALLBACK`` on this listener (the page and the API both start sign-ins)."""
    redirect_uri = request.base_url() + OFFICE365_CALLBACK
    try:
        return request.app.require_signins().start(address, branch, redirect_uri, trigger)
    except RegistrationError as exc:
        raise RefusedError(exc.status, str(exc)) from None


def _back_to_page(request: RequestHandler, call: Call) -> None:
    request.redirect(f"{EMAIL_SYNC_PAGE}{quote(call.address, safe='@')}")


# The forms of the Email Sync page: POST /email-sync/{address}/{action}.
EMAIL_SYNC_ACTIONS: dict[str, Callable[[RequestHandler, Call], None]] = {
    "setup": setup_action,
    "sync": sync_action,
    "stop": stop_action,
    "office365": office365_action,
}


def status_page(statuses: list[WorkerStatus], *, detailed: bool) -> str:
    """The status page at ``/``: every mailbox (``detailed``, for the token holder) or counts by
    state (anyone)."""
    if detailed:
        head = (
            "<tr><th>mailbox</th><th>state</th><th>trigger</th><th>queue</th><th>stuck</th>"
            "<th>last sync</th><th>filed</th><th>last error</th></tr>"
        )
        cells: list[tuple[object, ...]] = [
            (
                s.address,
                s.state,
                s.trigger,
                s.queue,
                s.stuck,
                s.last_sync or "never",
                ", ".join(f"{k}: {n}" for k, n in sorted(s.filed.items())) or "-",
                s.last_error or "",
            )
            for s in statuses
        ]
        note = ""
    else:
        head = "<tr><th>state</th><th>mailboxes</th></tr>"
        cells = sorted(Counter(s.state for s in statuses).items())
        note = (
            "<p>Counts only: addresses and errors are shown with the control token "
            "(<code>emailsync status</code>, or an <code>Authorization: Bearer</code> header)."
            "</p>"
        )
    rows = "\n".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in cells
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="10">
<title>emailsync</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:.3em .8em;text-align:left}}
tr:nth-child(even){{background:#f3f3f3}}</style></head>
<body><h1>emailsync</h1>
<table>{head}
{rows}
</table>{note}<p><a href="/metrics">/metrics</a></p></body></html>
"""
