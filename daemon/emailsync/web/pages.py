"""The self-service pages: sessions, CSRF tokens and the Jinja2 templates they render.

A visitor logs in with a token (the admin's control token, or an agent's mailbox token from
``emailsync token issue``); the session is kept server-side, behind an HttpOnly,
SameSite=Strict cookie, for ``SESSION_SECONDS``. Every form carries the session's CSRF token,
compared in constant time; a form without it is refused.

Where sessions are kept is a ``SessionStore``: the daemon's is the state database
(``emailsync.state.sessions_sql.SqlSessions``: a session made on one instance of a cluster
works on every other and after a restart, a logout ends it everywhere); ``MemorySessions``,
the default, serves a ``Pages`` built alone (unit tests). Neither is cached in front of: each
request reads its session, so nothing an instance remembers can outlive a logout elsewhere.

A visitor who has not logged in yet stores nothing: their cookie holds a random nonce and the
login form's CSRF token is an HMAC of it under the anonymous key (a signed double-submit
token). The daemon derives that key from the registry key, so every instance sharing the
state accepts the login form another served; a ``Pages`` built alone draws one of its own.
Only logins take one of the ``MAX_SESSIONS`` slots, so a flood of anonymous visits cannot push
a logged-in admin or agent out (issue 19).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any, ClassVar, Protocol
from urllib.parse import quote

import jinja2

from emailsync.state.sessions_sql import SessionRow

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
    created: float = field(default_factory=time.time)  # Unix seconds: instances share it
    messages: dict[str, str] = field(default_factory=dict)
    # Writes the messages back to the session's store (None: an anonymous visitor's).
    saved: Callable[[Session], None] | None = field(default=None, repr=False, compare=False)

    def flash(self, kind: str, text: str) -> None:
        """Show ``text`` on the next page (``notice``, ``error``, ``token_link``)."""
        self.messages[kind] = text
        if self.saved is not None:
            self.saved(self)

    def pop_flash(self, kind: str) -> str | None:
        """The message of this kind, once."""
        text = self.messages.pop(kind, None)
        if text is not None and self.saved is not None:
            self.saved(self)
        return text


class SessionStore(Protocol):
    """Where logged-in sessions are kept, by the cookie's session id."""

    def load(self, sid: str, now: float | None = None) -> SessionRow | None:
        """The live session, or None; an expired one is deleted."""
        ...

    def insert(self, session: SessionRow, now: float | None = None) -> None:
        """Keep a new session: expired ones go, and the oldest beyond the cap."""
        ...

    def delete(self, sid: str) -> None:
        """End a session."""
        ...

    def save_messages(self, sid: str, messages: dict[str, str]) -> None:
        """Write a session's one-shot messages back."""
        ...


class MemorySessions:
    """Sessions in this process's memory, for a ``Pages`` without a state database."""

    def __init__(self, *, max_sessions: int) -> None:
        self.max_sessions = max_sessions
        self._rows: dict[str, SessionRow] = {}
        self._lock = threading.Lock()

    def load(self, sid: str, now: float | None = None) -> SessionRow | None:
        """A copy of the live session, or None."""
        now = time.time() if now is None else now
        with self._lock:
            found = self._rows.get(sid)
            if found is not None and found.expires_at <= now:
                del self._rows[sid]
                return None
            return None if found is None else replace(found, messages=dict(found.messages))

    def insert(self, session: SessionRow, now: float | None = None) -> None:
        """Keep a copy; the oldest go beyond ``max_sessions``."""
        now = time.time() if now is None else now
        with self._lock:
            for sid in [s for s, row in self._rows.items() if row.expires_at <= now]:
                del self._rows[sid]
            while len(self._rows) >= self.max_sessions:
                oldest = min(self._rows.values(), key=lambda row: row.created_at)
                del self._rows[oldest.sid]
            self._rows[session.sid] = replace(session, messages=dict(session.messages))

    def delete(self, sid: str) -> None:
        """Forget the session."""
        with self._lock:
            self._rows.pop(sid, None)

    def save_messages(self, sid: str, messages: dict[str, str]) -> None:
        """Replace the session's messages, if it still exists."""
        with self._lock:
            found = self._rows.get(sid)
            if found is not None:
                found.messages = dict(messages)


class Pages:
    """Sessions and templates of the pages; safe to use from every request thread."""

    def __init__(
        self,
        *,
        secure_cookie: bool = False,
        sessions: SessionStore | None = None,
        anonymous_key: Callable[[], bytes] | None = None,
    ) -> None:
        """``sessions``: where logins are kept (memory by default); ``anonymous_key``: the key
        of anonymous visitors' CSRF tokens, asked for at each use (every instance must give the
        same; by default one of this process's)."""
        # Secure when browsers come over TLS (public_url https://): never sent in clear then.
        self._cookie_attributes = "HttpOnly; SameSite=Strict" + (
            "; Secure" if secure_cookie else ""
        )
        self.sessions: SessionStore = sessions or MemorySessions(max_sessions=MAX_SESSIONS)
        own_key = secrets.token_bytes(32)
        self._anonymous_key = anonymous_key or (lambda: own_key)
        self._env = jinja2.Environment(
            loader=jinja2.PackageLoader("emailsync.web", "templates"),
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
        row = self.sessions.load(sid)
        if row is None:
            return None
        principal = Principal(row.principal)
        return Session(
            row.sid, principal, row.token, row.csrf, row.created_at, row.messages, self._save
        )

    def anonymous(self) -> Session:
        """A session before login, so the login form has a CSRF token too; nothing is stored."""
        return self._anonymous_session(ANONYMOUS_PREFIX + secrets.token_urlsafe(32))

    def _anonymous_session(self, sid: str) -> Session:
        # The CSRF token is derived from the cookie's nonce: only a page that could read this
        # cookie (our own, SameSite=Strict, HttpOnly) shows a token that matches it.
        digest = hmac.new(self._anonymous_key(), sid.encode(), hashlib.sha256).digest()
        csrf = base64.urlsafe_b64encode(digest).decode().rstrip("=")
        return Session(sid, None, csrf=csrf)

    def login(
        self, principal: Principal, *, token: str, replacing: Session | None = None
    ) -> Session:
        """A new session for ``principal``, who gave ``token`` (a new id: no fixation)."""
        if replacing is not None:
            self.logout(replacing)
        session = Session(secrets.token_urlsafe(32), principal, token, saved=self._save)
        self.sessions.insert(
            SessionRow(
                session.sid,
                principal.address,
                token,
                session.csrf,
                dict(session.messages),
                session.created,
                session.created + SESSION_SECONDS,
            )
        )
        return session

    def logout(self, session: Session) -> None:
        """End a session, on every instance (an anonymous one has nothing to end)."""
        if session.principal is not None:
            self.sessions.delete(session.sid)

    def _save(self, session: Session) -> None:
        self.sessions.save_messages(session.sid, dict(session.messages))

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
        return resources.files("emailsync.web").joinpath(
            f"templates/{name}"
        ).read_bytes(), content_type


def _cookie_value(header: str, name: str) -> str | None:
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None
