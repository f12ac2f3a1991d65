"""The listener's HTML: the status page and the self-service pages (login, Email Sync, IT).

``PageRoutes`` is the request handler's half that serves pages; ``emailsync.web.server`` builds the
handler on it and adds the control API (``/v1``), health and metrics. Sessions, CSRF tokens
and templates live in ``emailsync.web.pages``. What both halves check a request with
(``RefusedError``, ``mailbox_address``, the branch and host patterns) lives here, so that
``web`` imports this module and never the other way round.
"""

from __future__ import annotations

import hmac
import html
import re
from collections import Counter
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, quote, unquote

from emailsync.config import MAX_AGENT_TOKEN_DAYS, SECURITIES
from emailsync.errors import RegistrationError
from emailsync.mail.address import mailbox_address_problem, normalise_address
from emailsync.runtime.worker import WorkerStatus
from emailsync.state.vault import LEGACY_TOKEN_PREFIX, TOKEN_PREFIX
from emailsync.web.pages import STATIC_FILES, Pages, Principal, Session

if TYPE_CHECKING:
    from emailsync.web.ports import Control, Registrar, SelfService

EMAIL_SYNC_PAGE = "/email-sync/"
OFFICE365_CALLBACK = "/oauth/office365/callback"
FAVICON = "/favicon.ico"
FAVICON_CACHE_SECONDS = 24 * 3600
PAGE_GET_PATHS = frozenset(
    {"/login", "/it", OFFICE365_CALLBACK, FAVICON, *(f"/static/{name}" for name in STATIC_FILES)}
)
PAGE_POST_PATHS = frozenset(
    {"/login", "/logout", "/it/branches", "/it/tokens", "/it/tokens/revoke"}
)
# What an agent token starts with (es1: issued before tokens had ids, still accepted).
AGENT_TOKEN_PREFIXES = (f"{TOKEN_PREFIX}.", f"{LEGACY_TOKEN_PREFIX}.")
PAGE_ACTIONS = ("setup", "sync", "stop", "office365")
BRANCH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
# A DNS name or an IPv4 address; no URL, no spaces, no path.
HOST_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
# Every page: nothing but our own stylesheet and script, no framing, no referrer (a login
# link carries a token), no sniffing. https://www.w3.org/TR/CSP3/
PAGE_HEADERS = (
    (
        "Content-Security-Policy",
        "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
)


class RefusedError(Exception):
    """An answer decided part-way through a route: status and JSON error."""

    def __init__(
        self, status: HTTPStatus | int, error: str, *, retry_after: int | None = None
    ) -> None:
        super().__init__(error)
        self.status = HTTPStatus(status)
        self.error = error
        self.retry_after = retry_after  # seconds: a Retry-After header (429)


def page_allowed_method(path: str) -> str | None:
    """The methods a page path answers (the Allow header), or None for a path that is no page."""
    if path in PAGE_GET_PATHS and path not in PAGE_POST_PATHS:
        return "GET"
    if path == "/login":
        return "GET, POST"
    if path in PAGE_POST_PATHS:
        return "POST"
    if path.startswith(EMAIL_SYNC_PAGE):
        rest = path[len(EMAIL_SYNC_PAGE) :]
        if rest and "/" not in rest:
            return "GET"
        if rest.rpartition("/")[2] in PAGE_ACTIONS:
            return "POST"
    return None


def mailbox_address(raw: str) -> str | None:
    """The normalised address from a URL path segment, or None when it is not a mailbox's."""
    address = normalise_address(raw) if raw and raw == raw.strip() else None
    if address is None or mailbox_address_problem(address) is not None:
        return None
    return address


class PageRoutes(BaseHTTPRequestHandler):
    """The page routes of the request handler (``web``'s handler class derives from this).

    The handler sets the four objects below as class attributes and provides the hooks it
    shares with the control API.
    """

    _control: Control
    _pages: Pages
    _selfservice: SelfService
    _token: str  # the admin's control token
    body: bytes

    # -- the handler's (emailsync.web.server), shared with the control API ----------------------

    def _registrar(self) -> Registrar:
        raise NotImplementedError

    def _office365_start(self, address: str, branch: str | None, trigger: str = "auto") -> str:
        raise NotImplementedError

    def _base_url(self) -> str:
        raise NotImplementedError

    def _login_link(self, token: str) -> str:
        raise NotImplementedError

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        raise NotImplementedError

    # -- pages --------------------------------------------------------------------------

    def _page_get(self, path: str, query: str) -> None:
        if path == FAVICON:
            # Browsers ask every origin for it; a 404 is an error in the console of every page
            # (issue 19). No icon, no error, and asked again at most once a day.
            self.send_response(HTTPStatus.NO_CONTENT)
            self.send_header("Cache-Control", f"max-age={FAVICON_CACHE_SECONDS}")
            self.end_headers()
            return
        params = {k: v[-1] for k, v in parse_qs(query).items()}
        if path.startswith("/static/"):
            body, content_type = self._pages.static(path.removeprefix("/static/"))
            self._send(HTTPStatus.OK, body, content_type)
            return
        if path == OFFICE365_CALLBACK:
            # No session needed (the cookie is SameSite=Strict, and this is a cross-site
            # redirect): the unguessable, single-use state binds it to the mailbox.
            try:
                signed_in = self._registrar().office365_finish(params)
            except RegistrationError as exc:
                self._html(
                    HTTPStatus(exc.status),
                    self._pages.render("signed_in.html", None, address=None, error=str(exc)),
                )
                return
            self._html(
                HTTPStatus.OK,
                self._pages.render("signed_in.html", None, address=signed_in, error=None),
            )
            return
        # Read from the state database: after the static files and the callback, which need none.
        session = self._session()
        if path == "/login":
            given = params.get("token", "")
            principal = self._principal_for(given) if given else None
            if principal is not None:
                session = self._pages.login(principal, token=given)
                self._html(
                    HTTPStatus.OK,
                    self._pages.render(
                        "continue.html", session, target=self._pages.home(principal)
                    ),
                    cookie=self._pages.cookie(session),
                )
                return
            session = session or self._pages.anonymous()
            status = HTTPStatus.UNAUTHORIZED if given else HTTPStatus.OK
            error = "That link is not valid: it expired or was revoked." if given else None
            self._html(
                status,
                self._pages.render("login.html", session, error=error),
                cookie=self._pages.cookie(session),
            )
            return
        if session is None or session.principal is None:
            self._redirect("/login")
            return
        if path == "/it":
            if session.principal != Principal.ADMIN:
                self._html(HTTPStatus.FORBIDDEN, self._pages.render("forbidden.html", session))
                return
            registrar = self._registrar()
            details = [registrar.mailbox_detail(s.address) for s in self._control.statuses()]
            listing = self._selfservice.list_agent_tokens
            now = datetime.now(UTC)
            # Links that still work; the revoked and expired ones are in `token list`.
            tokens = [t for t in (listing() if listing else []) if t.state(now) == "active"]
            self._html(
                HTTPStatus.OK,
                self._pages.render(
                    "it.html",
                    session,
                    branches=registrar.branches(),
                    mailboxes=[d for d in details if d is not None],
                    securities=SECURITIES,
                    token_link=session.pop_flash("token_link"),
                    tokens=tokens,
                    max_token_days=MAX_AGENT_TOKEN_DAYS,
                ),
            )
            return
        address = mailbox_address(unquote(path[len(EMAIL_SYNC_PAGE) :]))
        if address is None or not session.principal.may_see(address):
            self._html(HTTPStatus.NOT_FOUND, self._pages.render("forbidden.html", session))
            return
        registrar = self._registrar()
        self._html(
            HTTPStatus.OK,
            self._pages.render(
                "email_sync.html",
                session,
                address=address,
                detail=registrar.mailbox_detail(address),
                branches=registrar.branches(),
                office365=registrar.office365_available(),
            ),
        )

    def _page_post(self) -> None:
        path = self.path.split("?", 1)[0]
        form = {k: v[-1] for k, v in parse_qs(self.body.decode("utf-8", "replace")).items()}
        session = self._session()
        if session is None or not self._pages.csrf_ok(session, form.get("csrf", "")):
            self._html(HTTPStatus.FORBIDDEN, self._pages.render("expired.html", None))
            return
        if path == "/login":
            given = form.get("token", "").strip()
            principal = self._principal_for(given)
            if principal is None:
                self._html(
                    HTTPStatus.UNAUTHORIZED,
                    self._pages.render("login.html", session, error="That token is not valid."),
                )
                return
            session = self._pages.login(principal, token=given, replacing=session)
            self._redirect(self._pages.home(principal), cookie=self._pages.cookie(session))
            return
        if path == "/logout":
            self._pages.logout(session)
            self._redirect("/login", cookie=self._pages.cookie(None))
            return
        principal = session.principal
        if principal is None:
            self._redirect("/login")
            return
        if path.startswith("/it/"):
            if principal != Principal.ADMIN:
                self._html(HTTPStatus.FORBIDDEN, self._pages.render("forbidden.html", session))
                return
            self._it_post(path, form, session)
            return
        rest = path[len(EMAIL_SYNC_PAGE) :]
        raw, _, action = rest.rpartition("/")
        address = mailbox_address(unquote(raw))
        if address is None or not principal.may_see(address):
            self._html(HTTPStatus.NOT_FOUND, self._pages.render("forbidden.html", session))
            return
        registrar = self._registrar()
        page = f"{EMAIL_SYNC_PAGE}{quote(address, safe='@')}"
        # Only the form's two choices; anything else (a hand-made post) is the default.
        trigger = "manual" if form.get("trigger") == "manual" else "auto"
        if action == "setup":
            try:
                registrar.setup_mailbox(
                    address,
                    form.get("branch", ""),
                    form.get("username", "").strip(),
                    form.get("password", ""),
                    trigger,
                    agent=principal != Principal.ADMIN,
                    client=self.client_address[0],
                )
                session.flash("notice", "Authenticated: your folders are ready.")
            except RegistrationError as exc:
                session.flash("error", str(exc))
        elif action == "sync":
            if self._control.start_sync(address):
                session.flash("notice", "Sync started.")
            else:
                session.flash("error", "Email Sync is not running for this mailbox.")
        elif action == "office365":
            try:
                url = self._office365_start(address, form.get("branch") or None, trigger)
            except RefusedError as exc:
                session.flash("error", exc.error)
            else:
                # A page, not a 303: the CSP's form-action 'self' also covers redirects.
                self._html(HTTPStatus.OK, self._pages.render("continue.html", session, target=url))
                return
        elif action == "stop":
            try:
                registrar.forget_mailbox(address)
                session.flash("notice", "Email Sync stopped and your credentials forgotten.")
            except RegistrationError:
                # A mailbox of the config file: stopped (tokens forgotten) until `setup`.
                self._control.stop_mailbox(address)
                session.flash("notice", "Email Sync stopped until IT runs `emailsync setup`.")
        self._redirect(page)

    def _it_post(self, path: str, form: dict[str, str], session: Session) -> None:
        registrar = self._registrar()
        if path == "/it/branches":
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
        elif path == "/it/tokens":
            address = mailbox_address(form.get("address", "").strip())
            issue = self._selfservice.issue_agent_token
            days_text = form.get("days", "").strip()
            days = int(days_text) if days_text.isdigit() else None  # empty: the default
            if address is None or issue is None:
                session.flash("error", "Not a mailbox address.")
            elif days_text and (days is None or not 1 <= days <= MAX_AGENT_TOKEN_DAYS):
                session.flash("error", f"Valid for: 1 to {MAX_AGENT_TOKEN_DAYS} days.")
            else:
                token, _ = issue(address, days, "page")
                session.flash("token_link", self._login_link(token))
        elif path == "/it/tokens/revoke":
            revoke = self._selfservice.revoke_agent_tokens
            token_id = form.get("id", "")
            try:
                revoked = revoke(token_id) if revoke is not None and "@" not in token_id else []
            except ValueError:
                revoked = []
            if revoked:
                session.flash("notice", f"Link revoked: {revoked[0].address} ({token_id}).")
            else:
                session.flash("error", "No such link.")
        self._redirect("/it")

    def _session(self) -> Session | None:
        """The request's session, while the token it was opened with is still valid.

        An agent's session ends with its token: its revocation (``emailsync token revoke``,
        ``DELETE /v1/tokens/{id}``, the IT page), ``emailsync keys rotate`` or its expiry logs
        the agent out at once, not after ``SESSION_SECONDS``.
        """
        session = self._pages.session(self.headers.get("Cookie"))
        if (
            session is not None
            and session.principal is not None
            and self._principal_for(session.token) != session.principal
        ):
            self._pages.logout(session)
            return None
        return session

    def _principal_for(self, given: str) -> Principal | None:
        if hmac.compare_digest(given.encode("utf-8", "replace"), self._token.encode()):
            return Principal.ADMIN
        check = self._selfservice.check_agent_token
        agent = given.startswith(AGENT_TOKEN_PREFIXES)
        address = check(given) if check is not None and agent else None
        return Principal(address) if address is not None else None

    def _html(self, status: HTTPStatus, text: str, *, cookie: str | None = None) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self._page_headers(cookie)
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str, *, cookie: str | None = None) -> None:
        # 303: the browser follows with GET (POST-redirect-GET; a reload resends nothing).
        self.send_response(HTTPStatus.SEE_OTHER)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self._page_headers(cookie)
        self.end_headers()

    def _page_headers(self, cookie: str | None) -> None:
        for name, value in PAGE_HEADERS:
            self.send_header(name, value)
        if cookie is not None:
            self.send_header("Set-Cookie", cookie)


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
