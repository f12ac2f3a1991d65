"""The one place where HTTP outcomes (``requests`` errors, status codes) become emailsync errors.

Transient (``StoreUnavailableError``, mail stays in Queue): the CRM cannot be reached, the
request timed out, 5xx, 429 or 408, and also 401/403/404 — a refused signature or a wrong URL
is a configuration fault that a person fixes, never a reason to send mail to Failed.
Any other 4xx on a whole request is a ``StoreError``: filing then retries each message alone.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Iterator
from contextlib import contextmanager

import requests

from emailsync.errors import StoreError, StoreUnavailableError

# Statuses after which the same request may succeed later without a change on our side.
_TRANSIENT_STATUSES = frozenset({401, 403, 404, 408, 425, 429})
# Longest back-off a CRM may impose with Retry-After (it still runs under max_backoff).
MAX_RETRY_AFTER_SECONDS = 3600.0
# How much of an error body goes into a log line.
REASON_CHARS = 200


@contextmanager
def translated(endpoint: str) -> Iterator[None]:
    """Turn connection failures and timeouts of a request into ``StoreUnavailableError``."""
    try:
        yield
    except requests.Timeout as exc:
        raise StoreUnavailableError(f"CRM {endpoint}: timed out") from exc
    except requests.ConnectionError as exc:
        raise StoreUnavailableError(f"CRM {endpoint}: cannot connect: {_short(exc)}") from exc
    except requests.RequestException as exc:
        raise StoreUnavailableError(f"CRM {endpoint}: request failed: {_short(exc)}") from exc


def check_status(endpoint: str, response: requests.Response) -> None:
    """Raise the error a non-2xx answer means; return for a 2xx."""
    status = response.status_code
    if 200 <= status < 300:
        return
    reason = error_reason(response)
    what = f"CRM {endpoint}: HTTP {status}" + (f": {reason}" if reason else "")
    if status in (401, 403):
        what += " (check [crm] secret and the CRM's clock)"
    if status >= 500 or status in _TRANSIENT_STATUSES:
        raise StoreUnavailableError(
            what, retry_after=retry_after(response.headers.get("Retry-After"))
        )
    raise StoreError(what)


def error_reason(response: requests.Response) -> str:
    """The ``error`` of a JSON error body, else the start of the text body."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:REASON_CHARS].strip()
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, str):
        return error[:REASON_CHARS]
    return ""


def retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from ``Retry-After``: delay-seconds or an HTTP-date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER_SECONDS)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    current = time.time() if now is None else now
    return min(max(0.0, moment.timestamp() - current), MAX_RETRY_AFTER_SECONDS)


def _short(exc: Exception) -> str:
    # requests nests urllib3's errors; the innermost text names the actual cause.
    cause: BaseException = exc
    while cause.__context__ is not None and cause.__context__ is not cause:
        cause = cause.__context__
    return str(cause)[:REASON_CHARS]
