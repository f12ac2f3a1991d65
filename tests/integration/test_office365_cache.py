"""Two writers of one Office 365 token cache (the daemon and `auth login`) never lose a rotation.

Uses the local identity provider on port 443 of a loopback address of the test process's own.
The provider rotates the refresh token on every use and refuses the old one, as Entra ID may.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from emailsync.config import Settings
from emailsync.imap.auth import (
    Office365Authenticator,
    identity_provider_session,
    token_cache_lock_path,
)

from .idp import IdentityProvider
from .test_office365 import AGENT, cached_refresh_tokens, office365, sign_in

pytestmark = pytest.mark.dovecot

# Each token request waits this long first, so both writers hold the same refresh token in
# memory before either redeems it: without a lock, the second redemption is refused.
TOKEN_REQUEST_DELAY_SECONDS = 0.5


def slow_session(settings: Settings) -> requests.Session:
    """An identity-provider session whose token requests start after a pause."""
    assert settings.office365 is not None
    session = identity_provider_session(settings.office365, timeout_seconds=10)
    post = session.post

    def delayed_post(url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        if "/token" in str(url):
            threading.Event().wait(TOKEN_REQUEST_DELAY_SECONDS)
        return post(url, *args, **kwargs)

    session.post = delayed_post  # type: ignore[method-assign]
    return session


def test_two_writers_refreshing_at_once_both_succeed_and_keep_the_latest_refresh_token(
    idp: IdentityProvider, office365_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = office365_settings()
    signed_in = office365(settings)
    sign_in(signed_in, idp)
    assert settings.office365 is not None
    writers = [
        Office365Authenticator(
            settings.mailbox(AGENT),
            settings.office365,
            state_dir=settings.daemon.state_dir,
            http_session=slow_session(settings),
        )
        for _ in range(2)
    ]
    for writer in writers:
        assert writer.token_expiry() is not None  # both have read the same cache
    start = threading.Barrier(len(writers))
    errors: list[BaseException] = []

    def refresh(writer: Office365Authenticator) -> None:
        start.wait()
        try:
            writer.refresh_if_needed(min_valid_seconds=10**9)  # forces a refresh
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    with ThreadPoolExecutor(len(writers)) as pool:
        list(pool.map(refresh, writers, timeout=30))

    assert errors == []
    assert [r.status for r in idp.token_requests("refresh_token")] == [200, 200]
    assert signed_in.cache_path is not None
    (kept,) = cached_refresh_tokens(signed_in.cache_path)
    assert idp.refresh_token_works(kept)  # the file holds the newest rotation
    assert token_cache_lock_path(signed_in.cache_path).exists()
