"""The Date header (RFC 5322 §3.3) as an aware UTC datetime, fast for the common form."""

from __future__ import annotations

import contextlib
import email.errors
import email.policy
import email.utils
import functools
import re
from datetime import UTC, datetime, timedelta

from emailsync.mail.decoding import _collapse

# Date header texts whose parse is kept, in entries: a message's Date is parsed for its date
# and again for its key, a few calls apart (datetime values are immutable, safe to share).
DATE_CACHE_SIZE = 64


@functools.lru_cache(maxsize=DATE_CACHE_SIZE)
def _parse_date(text: str) -> datetime | None:
    """The Date header (RFC 5322 §3.3) as an aware UTC datetime; None when unparseable."""
    if not text.strip():
        return None
    match = _CANONICAL_DATE.fullmatch(text)
    if match is not None:
        # Any surprise (day 31 of April, an offset of a day or more) is left to the stdlib.
        with contextlib.suppress(ArithmeticError, ValueError):
            return _canonical_date(match)
    return _stdlib_date(text)


def _canonical_date(match: re.Match[str]) -> datetime:
    """The UTC moment of a Date written as RFC 5322 §3.3 recommends, as the stdlib reads it."""
    day, month, year, hour, minute, second, sign, zone_hours, zone_minutes = match.groups()
    # _parsedate_tz's arithmetic: "+0099" is 99 minutes; datetime.timezone refuses ±24 h.
    offset = int(zone_hours) * 3600 + int(zone_minutes) * 60
    if offset >= _DAY_SECONDS:
        raise ValueError(offset)
    moment = datetime(
        int(year), _MONTHS[month], int(day), int(hour), int(minute), int(second), tzinfo=UTC
    )
    return moment - timedelta(seconds=-offset if sign == "-" else offset)


def _stdlib_date(text: str) -> datetime | None:
    """The Date header read by ``email.utils``: any form RFC 5322 §4.3 allows, and more."""
    try:
        parsed = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return _as_utc(parsed)


# "Sat, 01 Mar 2025 09:00:07 +0000", as nearly every mailer writes it (RFC 5322 §3.3): read
# without email.utils, whose pure-Python _parsedate_tz was 3 % of a backlog pass (issue 10).
# Years below 1000 are left to the stdlib, which takes "0099" for 1999.
_CANONICAL_DATE = re.compile(
    r"(?:(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), )?(\d{1,2}) "
    r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) ([1-9]\d{3}) "
    r"(\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)",
    re.ASCII,
)
_MONTHS = {
    name: number
    for number, name in enumerate(
        ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"),
        start=1,
    )
}
_DAY_SECONDS = 24 * 3600


def _as_utc(moment: datetime | None) -> datetime | None:
    """``moment`` in UTC; a naive time (zone "-0000", RFC 5322 §3.3) is taken as UTC."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except (OverflowError, ValueError):
        return None


def _normalise_date_text(text: str) -> str:
    """The Date as UTC ISO 8601 when parseable, else the header text with white space collapsed."""
    parsed = _parse_date(text)
    return parsed.isoformat() if parsed is not None else _collapse(text)
