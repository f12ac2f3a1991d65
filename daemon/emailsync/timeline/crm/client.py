"""CrmClient: signed JSON POSTs to the CRM over one reused HTTPS connection per thread."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import requests

from emailsync import __version__
from emailsync.config import CrmSettings
from emailsync.errors import StoreError, StoreUnavailableError
from emailsync.secret import Secret
from emailsync.telemetry.metrics import CrmMetrics
from emailsync.timeline.crm import signing
from emailsync.timeline.crm.translate import check_status, translated

LOOKUP_PATH = "/groups:lookup"
EVENTS_PATH = "/timeline-events"
ENDPOINT_NAMES = {LOOKUP_PATH: "groups_lookup", EVENTS_PATH: "timeline_events"}


class CrmClient:
    """Posts signed JSON to the CRM and returns the decoded answer.

    Worker threads share the client; each thread keeps its own ``requests.Session`` (a Session
    is not documented as thread-safe) and so its own kept-alive connection.
    """

    def __init__(
        self, settings: CrmSettings, secret: Secret, *, metrics: CrmMetrics | None = None
    ) -> None:
        self.settings = settings
        self._secret = secret
        self.metrics = metrics
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()
        # Whether the CRM answered the last request (None: nothing asked yet).
        self.answered: bool | None = None

    def post(self, path: str, payload: dict[str, Any]) -> tuple[dict[str, Any], requests.Response]:
        """POST ``payload`` signed; the JSON object answered, and the response (for headers).

        Raises ``StoreUnavailableError`` (transient) or ``StoreError`` (see ``translate``).
        """
        endpoint = ENDPOINT_NAMES.get(path, path.strip("/"))
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        headers = {"Content-Type": "application/json", "User-Agent": f"emailsync/{__version__}"}
        started = time.monotonic()
        try:
            with translated(endpoint):
                session = self._session()
                request = session.prepare_request(
                    requests.Request("POST", self.settings.url + path, data=body, headers=headers)
                )
                # Signed over the request-target exactly as it goes on the wire (after
                # requests' quoting), so the CRM recomputes it from its request line.
                request.headers[signing.HEADER] = signing.sign(
                    self._secret.reveal().encode("utf-8"), "POST", request.path_url, body
                )
                response = session.send(
                    request,
                    timeout=self.settings.timeout_seconds,
                    verify=str(self.settings.ca_file) if self.settings.ca_file else True,
                    allow_redirects=False,
                )
        except StoreUnavailableError as exc:
            kind = "timeout" if isinstance(exc.__cause__, requests.Timeout) else "error"
            self._observe(endpoint, kind, started, up=False)
            raise
        status = str(response.status_code)
        try:
            check_status(endpoint, response)
            answer = _json_object(endpoint, response)
        except StoreUnavailableError:
            self._observe(endpoint, status, started, up=False)
            raise
        except StoreError:
            self._observe(endpoint, status, started, up=True)  # it answered; it said no
            raise
        self._observe(endpoint, status, started, up=True)
        return answer, response

    def close(self) -> None:
        """Close every thread's connection."""
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            # Proxies from the environment would see client mail; a CRM proxy is set up
            # explicitly or not at all.
            session.trust_env = False
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def _observe(self, endpoint: str, status: str, started: float, *, up: bool) -> None:
        self.answered = up
        if self.metrics is None:
            return
        self.metrics.requests.labels(endpoint=endpoint, status=status).inc()
        self.metrics.request_seconds.labels(endpoint=endpoint).observe(time.monotonic() - started)
        self.metrics.up.set(1 if up else 0)


def _json_object(endpoint: str, response: requests.Response) -> dict[str, Any]:
    """The JSON object a 2xx answer carries; ``StoreUnavailableError`` for anything else.

    A garbled answer may follow a commit, so it is transient: the retry reuses the keys.
    """
    try:
        answer = response.json()
    except ValueError as exc:
        raise StoreUnavailableError(f"CRM {endpoint}: answer is not JSON") from exc
    if not isinstance(answer, dict):
        raise StoreUnavailableError(f"CRM {endpoint}: answer is not a JSON object")
    return answer
