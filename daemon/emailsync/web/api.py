"""The handlers of health, metrics, the status page and the /v1 control API.

Each takes the request and its ``Call``; the route table (``emailsync.web.routes``) has already
checked who asks. Their shapes are written down in ``config/control-api.yaml`` (OpenAPI 3.1).
"""

from __future__ import annotations

import gzip
import json
import threading
from datetime import UTC, datetime
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from prometheus_client import CONTENT_TYPE_LATEST

from emailsync.config import SECURITIES, TRIGGERS
from emailsync.errors import RegistrationError
from emailsync.runtime.worker import trim_malloc
from emailsync.state.agenttoken import token_json
from emailsync.telemetry.metrics import exposition
from emailsync.timeline.crm import signing
from emailsync.timeline.crm.callback import GroupsChangedHandler
from emailsync.web.call import (
    BRANCH_NAME,
    HOST_NAME,
    NO_SUCH_MAILBOX,
    Call,
    RefusedError,
    mailbox_address,
)
from emailsync.web.pageroutes import start_office365, status_page
from emailsync.web.pages import Principal

if TYPE_CHECKING:
    from emailsync.web.handler import RequestHandler

_SCRAPE_LOCK = threading.Lock()  # see metrics: one /metrics at a time
# /metrics compressed when the scraper accepts it (Prometheus always does): the text of 2,000
# mailboxes is ~1.7 MB and compresses ~25-fold; level 6 costs ~6 ms of CPU on it, level 9 more
# for a few per cent fewer bytes.
GZIP_LEVEL = 6
MAX_FIELD_CHARS = 1024
PUT_MAILBOX_FIELDS = frozenset({"branch", "username", "password", "trigger"})
MAX_TOKEN_DAYS = 3660
MAX_ADDRESS_CHARS = 254  # RFC 5321 §4.5.3.1.3: a path holds at most 256 octets with its <>

# -- health, metrics, the status page -------------------------------------------------------


def healthz(request: RequestHandler, call: Call) -> None:
    ok = request.app.control.healthy()
    request.text(
        HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE, "ok" if ok else "unhealthy"
    )


def readyz(request: RequestHandler, call: Call) -> None:
    ok = request.app.control.ready()
    request.text(
        HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE, "ready" if ok else "starting"
    )


def metrics(request: RequestHandler, call: Call) -> None:
    # One scrape at a time, its garbage given back after: at 2,000 mailboxes a scrape peaks at
    # ~30 MB, and overlapping ones (a client that gave up and asked again) would stack up
    # (issue 10).
    with _SCRAPE_LOCK:
        body = exposition(request.app.registry)
    headers = {"Vary": "Accept-Encoding"}
    if accepts_gzip(request.headers.get("Accept-Encoding")):
        body = gzip_body(body)
        headers["Content-Encoding"] = "gzip"
    request.send(HTTPStatus.OK, body, CONTENT_TYPE_LATEST, headers)
    del body
    trim_malloc()


def status(request: RequestHandler, call: Call) -> None:
    """``/``: addresses and errors only for the token holder; others see counts by state."""
    detailed = call.principal == Principal.ADMIN
    page = status_page(request.app.control.statuses(), detailed=detailed)
    request.send(HTTPStatus.OK, page.encode(), "text/html; charset=utf-8")


def accepts_gzip(header: str | None) -> bool:
    """True when an ``Accept-Encoding`` value accepts gzip (RFC 9110 §12.5.3).

    ``gzip`` (or ``x-gzip``) or ``*`` listed with a weight above 0; an explicit ``gzip;q=0``
    refuses it whatever ``*`` says.
    """
    weights: dict[str, float] = {}
    for item in (header or "").split(","):
        coding, _, params = item.partition(";")
        weight = 1.0
        for param in params.split(";"):
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        weights.setdefault(coding.strip().lower(), weight)
    for coding in ("gzip", "x-gzip"):
        if coding in weights:
            return weights[coding] > 0
    return weights.get("*", 0.0) > 0


def gzip_body(body: bytes) -> bytes:
    """``body`` gzipped for ``Content-Encoding: gzip`` (no file name or time in the header)."""
    return gzip.compress(body, compresslevel=GZIP_LEVEL, mtime=0)


# -- mailboxes --------------------------------------------------------------------------------


def list_mailboxes(request: RequestHandler, call: Call) -> None:
    principal = call.caller
    # vars(), not asdict(): json.dumps only reads them, and asdict's deep copy was two thirds
    # of the call's CPU at 2,000 mailboxes (issue 23).
    statuses = request.app.control.statuses()
    visible = [vars(s) for s in statuses if principal.may_see(s.address)]
    request.json(HTTPStatus.OK, {"mailboxes": visible})


def mailbox_detail(request: RequestHandler, call: Call) -> None:
    request.json(HTTPStatus.OK, _detail(request, call.address))


def put_mailbox(request: RequestHandler, call: Call) -> None:
    """First Time Setup (Basic) of ``call.address``."""
    data = json_object(request.body)
    values = [data.get(k) for k in ("branch", "username", "password")]
    trigger = data.get("trigger", "auto")
    if (
        not {"branch", "username", "password"} <= set(data) <= PUT_MAILBOX_FIELDS
        or not all(isinstance(v, str) and v and len(v) <= MAX_FIELD_CHARS for v in values)
        or trigger not in TRIGGERS
    ):
        raise RefusedError(
            HTTPStatus.BAD_REQUEST,
            "expected {branch, username, password} (strings), trigger? (auto, manual)",
        )
    branch, username, password = (str(v) for v in values)
    try:
        request.app.require_registrar().setup_mailbox(
            call.address,
            branch,
            username,
            password,
            trigger,
            agent=call.caller != Principal.ADMIN,
            client=request.client_address[0],
        )
    except RegistrationError as exc:
        raise RefusedError(exc.status, str(exc), retry_after=exc.retry_after) from None
    request.json(HTTPStatus.OK, _detail(request, call.address))


def forget_mailbox(request: RequestHandler, call: Call) -> None:
    try:
        forgotten = request.app.require_registrar().forget_mailbox(call.address)
    except RegistrationError as exc:
        raise RefusedError(exc.status, str(exc)) from None
    if not forgotten:
        raise RefusedError(HTTPStatus.NOT_FOUND, NO_SUCH_MAILBOX)
    request.json(HTTPStatus.OK, {"stopped": call.address})


def office365_start(request: RequestHandler, call: Call) -> None:
    """First Time Setup (Office 365): the provider's sign-in page to send the browser to."""
    data = json_object(request.body) if request.body.strip() else {}
    branch, trigger = data.get("branch"), data.get("trigger", "auto")
    if (
        set(data) - {"branch", "trigger"}
        or not (branch is None or (isinstance(branch, str) and 0 < len(branch) <= 1024))
        or trigger not in TRIGGERS
    ):
        raise RefusedError(HTTPStatus.BAD_REQUEST, "expected {branch?, trigger? (auto, manual)}")
    url = start_office365(request, call.address, branch, trigger)
    request.json(HTTPStatus.OK, {"authorize_url": url})


def sync_all(request: RequestHandler, call: Call) -> None:
    include_stuck = _include_stuck(call.query)
    request.app.control.start_sync(None, include_stuck=include_stuck)
    request.json(HTTPStatus.ACCEPTED, {"sync": "all"})


def sync_mailbox(request: RequestHandler, call: Call) -> None:
    include_stuck = _include_stuck(call.query)
    started = request.app.control.start_sync(call.address, include_stuck=include_stuck)
    _acted(request, "sync", call.address, started)


def stop_mailbox(request: RequestHandler, call: Call) -> None:
    _acted(request, "stop", call.address, request.app.control.stop_mailbox(call.address))


def start_mailbox(request: RequestHandler, call: Call) -> None:
    _acted(request, "start", call.address, request.app.control.start_mailbox(call.address))


def _acted(request: RequestHandler, action: str, address: str, done: bool) -> None:
    # (Stop markers are named by a hash: no path is ever built from the address.)
    if not done:
        raise RefusedError(HTTPStatus.NOT_FOUND, NO_SUCH_MAILBOX)
    request.json(HTTPStatus.ACCEPTED, {action: address})


def _include_stuck(query: str) -> bool:
    """``include_stuck`` of a Start Sync query string (a 400 when it is not a boolean)."""
    values = parse_qs(query, keep_blank_values=True).get("include_stuck", ["false"])
    value = {"true": True, "1": True, "false": False, "0": False}.get(values[-1].lower())
    if value is None:
        raise RefusedError(HTTPStatus.BAD_REQUEST, "include_stuck must be true or false")
    return value


def _detail(request: RequestHandler, address: str) -> dict[str, Any]:
    detail = request.app.require_registrar().mailbox_detail(address)
    if detail is None:
        raise RefusedError(HTTPStatus.NOT_FOUND, NO_SUCH_MAILBOX)
    return detail


# -- branches ---------------------------------------------------------------------------------


def list_branches(request: RequestHandler, call: Call) -> None:
    request.json(HTTPStatus.OK, {"branches": request.app.require_registrar().branches()})


def put_branch(request: RequestHandler, call: Call) -> None:
    name = call.args["name"]
    if not BRANCH_NAME.fullmatch(name):
        raise RefusedError(HTTPStatus.BAD_REQUEST, "branch name: letters, digits, . _ -")
    data = json_object(request.body)
    host, security = data.get("host"), data.get("security")
    port = _integer(data.get("port"))
    ca_file = data.get("ca_file")
    unknown = set(data) - {"host", "port", "security", "ca_file"}
    if (
        unknown
        or not isinstance(host, str)
        or not HOST_NAME.fullmatch(host)
        or port is None
        or not 1 <= port <= 65535
        or security not in SECURITIES
        or not (ca_file is None or (isinstance(ca_file, str) and ca_file.startswith("/")))
    ):
        raise RefusedError(
            HTTPStatus.BAD_REQUEST,
            "expected {host, port (1-65535), security (ssl, starttls, none), ca_file?}",
        )
    registrar = request.app.require_registrar()
    try:
        created = registrar.put_branch(name, host, port, security, ca_file)
    except RegistrationError as exc:
        raise RefusedError(exc.status, str(exc)) from None
    branch = {"name": name, "host": host, "port": port, "security": security}
    request.json(HTTPStatus.CREATED if created else HTTPStatus.OK, branch)


# -- agent tokens -----------------------------------------------------------------------------


def list_tokens(request: RequestHandler, call: Call) -> None:
    now = datetime.now(UTC)
    issued = request.app.require(request.app.list_agent_tokens)()
    request.json(HTTPStatus.OK, {"tokens": [token_json(t, now) for t in issued]})


def issue_token(request: RequestHandler, call: Call) -> None:
    data = json_object(request.body)
    address = data.get("address")
    days = _integer(data.get("expires_days"))
    if (
        set(data) - {"address", "expires_days"}
        or not isinstance(address, str)
        or len(address) > MAX_ADDRESS_CHARS
        or (mailbox_address(address) is None)
        or (data.get("expires_days") is not None and days is None)
        or (days is not None and not 1 <= days <= MAX_TOKEN_DAYS)
    ):
        raise RefusedError(
            HTTPStatus.BAD_REQUEST,
            f"expected {{address, expires_days? (1-{MAX_TOKEN_DAYS})}}",
        )
    issue = request.app.require(request.app.issue_agent_token)
    normalised = mailbox_address(address) or ""  # checked above: never empty
    token, issued = issue(normalised, days, "api")
    expires = issued.expires_at
    request.json(
        HTTPStatus.CREATED,
        {
            "address": normalised,
            "token": token,
            "link": request.login_link(token),
            "id": issued.id,
            "expires_at": expires.isoformat() if expires is not None else None,
        },
    )


def revoke_tokens(request: RequestHandler, call: Call) -> None:
    """``DELETE /v1/tokens/{id}``: one token, or (an address) every token of a mailbox."""
    revoke = request.app.require(request.app.revoke_agent_tokens)
    try:
        revoked = revoke(call.args["id"])
    except ValueError:
        revoked = []  # neither an id nor an address: no such token either
    if not revoked:
        raise RefusedError(HTTPStatus.NOT_FOUND, "no such token")
    now = datetime.now(UTC)
    request.json(HTTPStatus.OK, {"revoked": [token_json(t, now) for t in revoked]})


# -- the CRM's callback -----------------------------------------------------------------------


def groups_changed(request: RequestHandler, call: Call) -> None:
    """``POST /v1/groups:changed``: a CRM says whose links changed (crm/callback.py)."""
    header = request.headers.get(signing.HEADER)
    if not header:  # unsigned: refused alike whether a CRM is configured or not
        raise RefusedError(HTTPStatus.UNAUTHORIZED, f"signature refused: no {signing.HEADER}")
    control = request.app.control
    if not isinstance(control, GroupsChangedHandler):
        raise RefusedError(HTTPStatus.NOT_FOUND, "not found")
    # Signed over the request-target as it arrived, as the CRM sent it.
    status, answer, headers = control.groups_changed_call(header, request.path, request.body)
    request.json(status, answer, headers or None)


def _integer(value: object) -> int | None:
    """A JSON integer (``2`` or ``2.0``: JSON Schema counts both as integers), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def json_object(body: bytes) -> dict[str, Any]:
    """A request body that must be a JSON object (a 400 otherwise)."""
    try:
        data = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict):
        raise RefusedError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
    return data
