"""The self-service pages: sessions, CSRF tokens and the Jinja2 templates they render.

A visitor logs in with a token (the admin's control token, or an agent's mailbox token from
``emailsync token issue``); the session lives in memory, behind an HttpOnly, SameSite=Strict
cookie, and ends with the daemon. Every form carries the session's CSRF token, compared in
constant time; a form without it is refused.

A visitor who has not logged in yet stores nothing: their cookie holds a random nonce and the
login form's CSRF token is an HMAC of it under a key of this process (a signed double-submit
token). Only logins take one of the ``MAX_SESSIONS`` slots, so a flood of anonymous visits
cannot push a logged-in admin or agent out (issue 19).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, ClassVar
from urllib.parse import quote

import jinja2

SESSION_COOKIE = "emailsync_session"
SESSION_SECONDS = 8 * 3600  # a working day; then log in again with the link
STATIC_FILES = {
    "emailsync.css": "text/css; charset=utf-8",
    "continue.js": "text/javascript; charset=utf-8",
    "office365.js": "text/javascript; charset=utf-8",
    "close.js": "text/javascript; charset=utf-8",
}
MAX_SESSIONS = 1000  # the oldest is dropped beyond this (a flood of logins cannot grow memory)
# Starts an anonymous visitor's cookie; never a logged-in session's id (token_urlsafe has no ".").
ANONYMOUS_PREFIX = "a."


@dataclass(frozen=True)
class Principal:
    """Who is asking: the admin (``address`` None) or the agent of one mailbox."""

    address: str | None

    ADMIN: ClassVar[Principal]

    def may_see(self, address: str) -> bool:
        """True for the admin, and for an agent on their own mailbox only."""
        return self.address is None or self.address == address


Principal.ADMIN = Principal(None)


@dataclass
class Session:
    """One browser's login: who, its CSRF token, and one-shot messages for the next page."""

    sid: str
    principal: Principal | None
    token: str = field(default="", repr=False)  # what it logged in with, checked each request
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    created: float = field(default_factory=time.monotonic)
    messages: dict[str, str] = field(default_factory=dict)

    def flash(self, kind: str, text: str) -> None:
        """Show ``text`` on the next page (``notice``, ``error``, ``token_link``)."""
        self.messages[kind] = text

    def pop_flash(self, kind: str) -> str | None:
        """The message of this kind, once."""
        return self.messages.pop(kind, None)


class Pages:
    """Sessions and templates of the pages; safe to use from every request thread."""

    def __init__(self, *, secure_cookie: bool = False) -> None:
        # Secure when browsers come over TLS (public_url https://): never sent in clear then.
        self._cookie_attributes = "HttpOnly; SameSite=Strict" + (
            "; Secure" if secure_cookie else ""
        )
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        # Signs anonymous visitors' CSRF tokens; per process, like the sessions themselves.
        self._anonymous_key = secrets.token_bytes(32)
        self._env = jinja2.Environment(
            loader=jinja2.PackageLoader("emailsync", "templates"),
            autoescape=True,  # every template is HTML: escape every value
            undefined=jinja2.StrictUndefined,
        )
        self._env.filters["urlpath"] = lambda value: quote(str(value), safe="@")

    # -- sessions -------------------------------------------------------------------------

    def session(self, cookie_header: str | None) -> Session | None:
        """The live session the request's cookie names, if any."""
        sid = _cookie_value(cookie_header or "", SESSION_COOKIE)
        if not sid:
            return None
        if sid.startswith(ANONYMOUS_PREFIX):
            return self._anonymous_session(sid)
        with self._lock:
            found = self._sessions.get(sid)
            if found is not None and time.monotonic() - found.created > SESSION_SECONDS:
                del self._sessions[sid]
                return None
            return found

    def anonymous(self) -> Session:
        """A session before login, so the login form has a CSRF token too; nothing is stored."""
        return self._anonymous_session(ANONYMOUS_PREFIX + secrets.token_urlsafe(32))

    def _anonymous_session(self, sid: str) -> Session:
        # The CSRF token is derived from the cookie's nonce: only a page that could read this
        # cookie (our own, SameSite=Strict, HttpOnly) shows a token that matches it.
        digest = hmac.new(self._anonymous_key, sid.encode(), hashlib.sha256).digest()
        csrf = base64.urlsafe_b64encode(digest).decode().rstrip("=")
        return Session(sid, None, csrf=csrf)

    def login(
        self, principal: Principal, *, token: str, replacing: Session | None = None
    ) -> Session:
        """A new session for ``principal``, who gave ``token`` (a new id: no fixation)."""
        if replacing is not None:
            self.logout(replacing)
        return self._add(Session(secrets.token_urlsafe(32), principal, token))

    def logout(self, session: Session) -> None:
        """End a session (an anonymous one has nothing to end)."""
        with self._lock:
            self._sessions.pop(session.sid, None)

    def _add(self, session: Session) -> Session:
        with self._lock:
            while len(self._sessions) >= MAX_SESSIONS:
                oldest = min(self._sessions.values(), key=lambda s: s.created)
                del self._sessions[oldest.sid]
            self._sessions[session.sid] = session
        return session

    @staticmethod
    def csrf_ok(session: Session, given: str) -> bool:
        """True when a form's CSRF token is this session's."""
        return hmac.compare_digest(session.csrf.encode(), given.encode("utf-8", "replace"))

    def cookie(self, session: Session | None) -> str:
        """The Set-Cookie value for a session (None: delete the cookie)."""
        if session is None:
            return f"{SESSION_COOKIE}=; Path=/; Max-Age=0; {self._cookie_attributes}"
        return (
            f"{SESSION_COOKIE}={session.sid}; Path=/; Max-Age={SESSION_SECONDS}; "
            f"{self._cookie_attributes}"
        )

    @staticmethod
    def home(principal: Principal) -> str:
        """Where a login lands: the IT overview, or the agent's Email Sync page."""
        if principal.address is None:
            return "/it"
        return "/email-sync/" + quote(principal.address, safe="@")

    # -- rendering ------------------------------------------------------------------------

    def render(self, template: str, session: Session | None, **values: Any) -> str:
        """Render a page; the session's CSRF token and messages are passed along."""
        return self._env.get_template(template).render(
            csrf=session.csrf if session else "",
            principal=session.principal if session else None,
            notice=session.pop_flash("notice") if session else None,
            flash_error=session.pop_flash("error") if session else None,
            **values,
        )

    @staticmethod
    def static(name: str) -> tuple[bytes, str]:
        """A stylesheet or script and its content type (served from our own origin: the CSP
        allows no inline style or script)."""
        content_type = STATIC_FILES[name]
        return resources.files("emailsync").joinpath(f"templates/{name}").read_bytes(), content_type


def _cookie_value(header: str, name: str) -> str | None:
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None
