"""The control API's token, and the client the CLI uses to talk to a running daemon."""

from __future__ import annotations

import json
import secrets
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

import structlog

from emailsync.config import Settings, weak_token_problem
from emailsync.errors import ConfigError, ControlError
from emailsync.privilege import write_private_file

log = structlog.get_logger(__name__)

CONTROL_TIMEOUT_SECONDS = 10.0
GENERATED_TOKEN_NAME = "control-token"  # noqa: S105 -- a file name, not a secret


def generated_token_path(settings: Settings) -> Path:
    """Where the daemon keeps the token it made when the config names no token file."""
    return settings.daemon.state_dir / GENERATED_TOKEN_NAME


def control_token(settings: Settings, *, create: bool = False) -> str:
    """The bearer token: from control_token_file, else the one generated in state_dir.

    The control API is never open without a token: with no token file configured, the daemon
    writes a random one (mode 0600) that only its own user (and root) can read. A token that
    is empty or short (an empty file left by a crash, a placeholder) is a ConfigError naming
    the file, never an open door.
    """
    if settings.daemon.control_token is not None:
        source = settings.daemon.control_token
        try:
            token = source.read().reveal().strip()
        except ConfigError as exc:
            raise ConfigError(
                [f"{settings.path}: daemon.control_token_file: {p}" for p in exc.problems]
            ) from None
        _refuse_weak(token, f"{settings.path}: daemon.control_token_file: {source.describe()}")
        return token
    path = generated_token_path(settings)
    if path.exists():
        token = path.read_text(encoding="utf-8").strip()
        if weak_token_problem(token) is None or not create:
            _refuse_weak(token, f"generated control token {path}")
            return token
        # Only a crash of an old version could leave it so (ours is written whole or not at
        # all): the daemon makes a new one rather than run open or refuse to start.
        log.warning("control_token_regenerated", path=str(path))
    elif not create:
        raise ControlError(f"no control token at {path}: is the daemon running with this config?")
    token = secrets.token_urlsafe(32)
    write_private_file(path, token + "\n")
    return token


def _refuse_weak(token: str, where: str) -> None:
    problem = weak_token_problem(token)
    if problem is not None:
        raise ConfigError([f"{where} {problem}"])


class ControlClient:
    """Talks to the daemon's /v1 API on its listen address."""

    def __init__(self, settings: Settings) -> None:
        host = settings.daemon.listen_host
        if host in ("0.0.0.0", "::", ""):  # noqa: S104 -- a wildcard listener is reached on loopback
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        self.base = f"http://{host}:{settings.daemon.listen_port}"
        try:
            self.token = control_token(settings)
        except ConfigError as exc:
            raise ControlError("; ".join(exc.problems)) from None

    def request(self, method: str, path: str) -> dict[str, Any]:
        """Send one request; returns the JSON answer. Raises ControlError when unreachable."""
        req = urllib.request.Request(  # noqa: S310 -- http:// on our own listen address
            self.base + path,
            method=method,
            headers={"Authorization": f"Bearer {self.token}"},
            data=b"" if method == "POST" else None,
        )
        try:
            with urllib.request.urlopen(req, timeout=CONTROL_TIMEOUT_SECONDS) as response:  # noqa: S310
                return dict(json.loads(response.read() or b"{}"))
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace").strip()
            raise ControlError(f"daemon answered {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise ControlError(f"cannot reach the daemon at {self.base}: {exc}") from None

    def mailboxes(self) -> list[dict[str, Any]]:
        """Per-mailbox status."""
        return list(self.request("GET", "/v1/mailboxes").get("mailboxes", []))

    def sync(self, address: str | None, *, include_stuck: bool = False) -> None:
        """Start Sync for one mailbox, or all; ``include_stuck`` releases quarantined mail first."""
        path = "/v1/sync" if address is None else f"/v1/mailboxes/{quote(address)}/sync"
        self.request("POST", path + ("?include_stuck=true" if include_stuck else ""))

    def stop(self, address: str) -> None:
        """Stop Email Sync for a mailbox."""
        self.request("POST", f"/v1/mailboxes/{quote(address)}/stop")

    def start(self, address: str) -> None:
        """Start a stopped mailbox again (after setup)."""
        self.request("POST", f"/v1/mailboxes/{quote(address)}/start")
