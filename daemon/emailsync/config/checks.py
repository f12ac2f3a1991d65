"""Checks of single config values: each returns what is wrong with a value, or None."""

from __future__ import annotations

import re
import urllib.parse

from emailsync.config.settings import (
    LOOPBACK_HOSTS,
    MAX_AGENT_TOKEN_DAYS,
    MAX_LEASE_SECONDS,
    MIN_CONTROL_TOKEN_CHARS,
    MIN_CONTROL_TOKEN_DISTINCT,
    MIN_LEASE_SECONDS,
    PLAIN_HTTP_HOSTS,
    WORKER_STOP_SECONDS,
)

_INSTANCE_ID = re.compile(r"[A-Za-z0-9._@:-]{1,100}")
# Entra ID shows a certificate's SHA-1 thumbprint as 40 hex digits (openssl adds colons).
_THUMBPRINT = re.compile(r"[0-9A-Fa-f]{40}")


def weak_token_problem(token: str) -> str | None:
    """Why ``token`` is unfit to guard the control API, or None when it will do.

    An empty file (a crash right after creating it) must never mean "any ``Bearer`` header
    goes": a token shorter than MIN_CONTROL_TOKEN_CHARS, or one built from fewer than
    MIN_CONTROL_TOKEN_DISTINCT different characters, is refused.
    """
    token = token.strip()
    if len(token) < MIN_CONTROL_TOKEN_CHARS:
        return (
            f"holds {len(token)} characters; a control token needs at least "
            f"{MIN_CONTROL_TOKEN_CHARS} (e.g. `openssl rand -base64 32`)"
        )
    if len(set(token)) < MIN_CONTROL_TOKEN_DISTINCT:
        return "is too repetitive to be a secret (e.g. `openssl rand -base64 32`)"
    if any(c.isspace() or not c.isprintable() for c in token):
        return "holds white space or control characters; a bearer token cannot"
    return None


def _non_empty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _check_agent_token_days(value: int) -> str | None:
    if 0 <= value <= MAX_AGENT_TOKEN_DAYS:
        return None
    return f"must be 1 to {MAX_AGENT_TOKEN_DAYS} days, or 0 for links that never expire"


def _check_state_url(value: str) -> str | None:
    if value == "" or value.split(":", 1)[0] in ("sqlite", "postgresql", "postgres"):
        return None
    if value.split(":", 1)[0] in ("https", "http"):
        return "is emailsync's own database (sqlite:/// or postgresql://); a CRM goes in [crm] url"
    return "must be a sqlite:///… or postgresql://… URL"


def _check_instance_id(value: str) -> str | None:
    if _INSTANCE_ID.fullmatch(value):
        return None
    return "must be 1-100 letters, digits or . _ - @ : (it names this instance in the store)"


def _check_lease_seconds(value: float) -> str | None:
    if value < MIN_LEASE_SECONDS:
        return (
            f"must be at least {MIN_LEASE_SECONDS:g}: a worker gets up to "
            f"{WORKER_STOP_SECONDS:g} s to stop (finish its batch, log out), and a shorter lease"
            " could expire under it, letting another instance connect the same mailbox"
        )
    if value > MAX_LEASE_SECONDS:
        return f"must be at most {MAX_LEASE_SECONDS:g}"
    return None


def _check_folder_name(value: str) -> str | None:
    if not value.strip():
        return "must not be empty"
    if any(c in value for c in '/.%*\r\n\\"') or not value.isprintable():
        return "must not contain / . % * \\ quotes or control characters"
    return None


def _check_changed_window(value: float) -> str | None:
    # Every call inside the window is remembered to refuse its replay: an hour bounds that.
    return None if 0 < value <= 3600 else "must be more than 0 and at most 3600"


def _check_crm_url(value: str) -> str | None:
    parts = urllib.parse.urlsplit(value.strip())
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return "must be an https:// URL"
    if parts.username or parts.password:
        return "must not carry credentials; the secret goes in secret_file/_env/_credential"
    if parts.query or parts.fragment:
        return "must not have a query or fragment"
    if parts.scheme == "http" and parts.hostname not in LOOPBACK_HOSTS:
        return f"must be https:// ({PLAIN_HTTP_HOSTS})"
    return None


def _check_public_url(value: str) -> str | None:
    # Never echoes the value: a URL with credentials in it would put them in the error.
    problem = (
        "must be an absolute https:// URL without query, fragment or credentials "
        f"({PLAIN_HTTP_HOSTS}), e.g. https://emailsync.example.com"
    )
    if value == "":
        return None
    try:
        parts = urllib.parse.urlsplit(value)
        hostname, _port = parts.hostname, parts.port
    except ValueError:  # a malformed [IPv6] or port
        return problem
    if (
        parts.scheme not in ("https", "http")
        or not hostname
        or parts.username is not None
        or parts.password is not None
        or parts.query
        or parts.fragment
        or "?" in value
        or "#" in value
        or any(c.isspace() or not c.isprintable() for c in value)
        or (parts.scheme == "http" and hostname not in LOOPBACK_HOSTS)
    ):
        return problem
    return None


def _check_thumbprint(value: str) -> str | None:
    if _THUMBPRINT.fullmatch(value.replace(":", "")):
        return None
    return "must be the certificate's SHA-1 thumbprint, 40 hex digits"
