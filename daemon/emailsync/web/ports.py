"""What the listener asks of the rest of the daemon: the supervisor's and registrar's ports.

The listener (``emailsync.web.server``) and the pages (``emailsync.web.pageroutes``) depend on
these protocols, not on the supervisor that implements them (``emailsync.service``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from emailsync.web.pages import Pages

if TYPE_CHECKING:
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


class Registrar(Protocol):
    """What the self-service API and pages ask of the supervisor (see ``Supervisor``)."""

    def branches(self) -> list[dict[str, Any]]: ...

    def put_branch(
        self, name: str, host: str, port: int, security: str, ca_file: str | None = None
    ) -> bool: ...

    def setup_mailbox(
        self,
        address: str,
        branch: str,
        username: str,
        password: str,
        trigger: str = "auto",
        *,
        agent: bool,
        client: str | None,
    ) -> None: ...

    def forget_mailbox(self, address: str) -> bool: ...

    def mailbox_detail(self, address: str) -> dict[str, Any] | None: ...

    def office365_available(self) -> bool: ...

    def office365_start(
        self, address: str, branch: str | None, redirect_uri: str, trigger: str = "auto"
    ) -> str: ...

    def office365_finish(self, params: dict[str, str]) -> str: ...


AgentTokenCheck = Callable[[str], "str | None"]
# (address, days or None for the default, issued_by) → the token and its record
AgentTokenIssue = Callable[[str, "int | None", str], "tuple[str, IssuedToken]"]
AgentTokenList = Callable[[], "list[IssuedToken]"]
# a token id or a mailbox address → the tokens revoked; ValueError when it is neither
AgentTokenRevoke = Callable[[str], "list[IssuedToken]"]


@dataclass(frozen=True)
class SelfService:
    """The listener's optional self-service parts: registry, agent tokens, pages."""

    registrar: Registrar | None
    check_agent_token: AgentTokenCheck | None
    issue_agent_token: AgentTokenIssue | None
    pages: Pages
    list_agent_tokens: AgentTokenList | None = None
    revoke_agent_tokens: AgentTokenRevoke | None = None
