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


# RFC 5322 §3.2.3 atext; RFC 6531 §3.3 adds any non-ASCII UTF-8 character for SMTPUTF8.
_ATEXT_ASCII = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~"
)
# RFC 5321 §4.5.3.1: 64 octets of local part, 255 of domain.
MAX_LOCAL_PART_OCTETS = 64
MAX_DOMAIN_OCTETS = 255
MAX_LABEL_OCTETS = 63


def mailbox_address_problem(address: str) -> str | None:
    """Why ``address`` cannot name a mailbox we sync, or None when it can.

    ``address`` is a normalised address (``normalise_address``). The local part must be an
    RFC 5321 §4.1.2 Dot-string (atoms of atext joined by single dots) or Quoted-string, the
    domain a host name whose IDNA labels are letters, digits and inner hyphens. Address
    literals (``user@[192.0.2.1]``) are refused: no mailbox provider hands them out.
    """
    if address.count("@") < 1:
        return "is not an email address"
    local, domain = address.rsplit("@", 1)
    if len(local.encode("utf-8")) > MAX_LOCAL_PART_OCTETS:
        return f"has a local part longer than {MAX_LOCAL_PART_OCTETS} octets (RFC 5321)"
    if not (_dot_string(local) or _quoted_string(local)):
        return "has a local part that is neither a dot-atom nor a quoted string (RFC 5321 §4.1.2)"
    if len(domain) > MAX_DOMAIN_OCTETS:
        return f"has a domain longer than {MAX_DOMAIN_OCTETS} octets (RFC 5321)"
    labels = domain.split(".")
    if not all(_host_label(label) for label in labels):
        return "has a domain that is not a host name (RFC 5321 §4.1.2, IDNA)"
    return None


def _dot_string(local: str) -> bool:
    atoms = local.split(".")
    return all(atoms) and all(c in _ATEXT_ASCII or ord(c) > 127 for c in local if c != ".")


def _quoted_string(local: str) -> bool:
    # RFC 5321 §4.1.2: qtextSMTP is %d32-33 / %d35-91 / %d93-126; quoted-pairSMTP is "\" %d32-126.
    if len(local) < 2 or local[0] != '"' or local[-1] != '"':
        return False
    inner = local[1:-1]
    i = 0
    while i < len(inner):
        c = inner[i]
        if c == "\\":
            if i + 1 >= len(inner) or not 32 <= ord(inner[i + 1]) <= 126:
                return False
            i += 2
            continue
        if c == '"' or not (32 <= ord(c) <= 126 or ord(c) > 127):
            return False
        i += 1
    return True


def _host_label(label: str) -> bool:
    return (
        0 < len(label) <= MAX_LABEL_OCTETS
        and label.isascii()
        and all(c.isalnum() or c == "-" for c in label)
        and not label.startswith("-")
        and not label.endswith("-")
    )
