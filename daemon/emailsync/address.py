"""Email address normalisation: one comparable form for config, messages and the store."""

from __future__ import annotations

import email.utils
import functools

import idna

# Distinct addresses remembered by normalise_address: a pass meets the same few hundred
# addresses again and again (the owner's on every message), and parseaddr is the single
# largest cost of parsing headers (issue 10 profile). Bounded: about 1 MB at most.
ADDRESS_CACHE_SIZE = 4096


@functools.lru_cache(maxsize=ADDRESS_CACHE_SIZE)
def normalise_address(raw: str) -> str | None:
    """Return ``local@domain`` lower-cased with the domain in ASCII (IDNA) form, or None.

    Accepts a bare address or a display form (``"Name" <a@b>``). Returns None for anything
    that is not a single address with a local part and a domain (group syntax, garbage).
    Local parts are lower-cased too: RFC 5321 allows case-sensitive local parts, but no
    mail system our users meet treats them so, and agents type addresses in any case.
    """
    _, addr = email.utils.parseaddr(raw.strip())
    addr = addr.strip().strip("<>").strip()
    if addr.count("@") != 1:
        return None
    local, domain = addr.rsplit("@", 1)
    local = local.strip()
    domain = domain.strip().rstrip(".")
    if not local or not domain or any(c.isspace() for c in addr):
        return None
    ascii_domain = _ascii_domain(domain)
    if ascii_domain is None:
        return None
    return f"{local.lower()}@{ascii_domain}"


def _ascii_domain(domain: str) -> str | None:
    """The IDNA (punycode) form of a domain, lower-cased; None when it cannot be encoded."""
    if domain.isascii():
        return domain.lower()
    try:
        return idna.encode(domain, uts46=True).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError):
        return None
