"""What the listener asks of the rest of the daemon: the supervisor's port, and ``App``.

The listener (``emailsync.web.server``) depends on these, not on the supervisor that implements
``Control`` (``emailsync.service``). The registrar and the Office 365 sign-ins are the runtime's
own objects (``emailsync.runtime``, below this layer): no protocol restates them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Protocol, TypeVar

from emailsync.web.call import RefusedError
from emailsync.web.pages import Pages

SELF_SERVICE_OFF = "self-service is not enabled"
_T = TypeVar("_T")

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from emailsync.runtime.registrar import MailboxRegistrar
    from emailsync.runtime.signins import SignIns
    from emailsync.runtime.worker import WorkerStatus
    from emailsync.state.base import IssuedToken


class Control(Protocol):
    """What the listener asks of the supervisor."""

    def statuses(self) -> list[WorkerStatus]: ...

    def start_sync(self, address: str | None, *, include_stuck: bool = False) -> bool: ...

    def stop_mailbox(self, address: str) -> bool: ...

    def start_mailbox(self, address: str) -> bool: ...

    def healthy(self) -> bool: ...

    def ready(self) -> bool: ...


AgentTokenCheck = Callable[[str], "str | None"]
# (address, days or None for the default, issued_by) → the token and its record
AgentTokenIssue = Callable[[str, "int | None", str], "tuple[str, IssuedToken]"]
AgentTokenList = Callable[[], "list[IssuedToken]"]
# a token id or a mailbox address → the tokens revoked; ValueError when it is neither
AgentTokenRevoke = Callable[[str], "list[IssuedToken]"]


@dataclass(frozen=True)
class App:
    """What the request handler works with (``server.app``): the daemon's parts it calls.

    ``registrar`` and ``signins`` are the runtime's own objects (``MailboxRegistrar``,
    ``SignIns``), passed as they are; None where self-service is not enabled (a 503).
    """

    control: Control
    registry: CollectorRegistry
    token: str  # the admin's control token
    pages: Pages
    registrar: MailboxRegistrar | None = None
    signins: SignIns | None = None
    check_agent_token: AgentTokenCheck | None = None
    issue_agent_token: AgentTokenIssue | None = None
    list_agent_tokens: AgentTokenList | None = None
    revoke_agent_tokens: AgentTokenRevoke | None = None
    metrics_token: bool = False  # /metrics needs the admin token (server.metrics_need_token)
    public_url: str = ""  # [daemon] public_url without its trailing slash, or ""

    def require_registrar(self) -> MailboxRegistrar:
        """The registrar, or a 503 when self-service is not enabled."""
        if self.registrar is None:
            raise RefusedError(HTTPStatus.SERVICE_UNAVAILABLE, SELF_SERVICE_OFF)
        return self.registrar

    def require_signins(self) -> SignIns:
        """The Office 365 sign-ins, or a 503 when self-service is not enabled."""
        if self.signins is None:
            raise RefusedError(HTTPStatus.SERVICE_UNAVAILABLE, SELF_SERVICE_OFF)
        return self.signins

    def require(self, call: _T | None) -> _T:
        """An agent-token call (issue, list, revoke), or a 503 when agent tokens are off."""
        if call is None:
            raise RefusedError(HTTPStatus.SERVICE_UNAVAILABLE, "agent tokens are not enabled")
        return call
