"""The HTTP session MSAL talks to the identity provider through: verified TLS, timeouts."""

from __future__ import annotations

from collections.abc import Mapping

import requests
from requests.adapters import HTTPAdapter

from emailsync.config import Office365Settings


class _TimeoutAdapter(HTTPAdapter):
    """An HTTP adapter that puts a timeout on every request (MSAL passes none)."""

    def __init__(self, timeout_seconds: float) -> None:
        # One retry on a dropped pooled connection, as MSAL's own default session does.
        super().__init__(max_retries=1)
        self._timeout_seconds = timeout_seconds

    def send(  # noqa: PLR0917 -- the signature of requests' HTTPAdapter.send
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: float | tuple[float, float] | tuple[float, None] | None = None,
        verify: bool | str = True,
        cert: bytes | str | tuple[bytes | str, bytes | str] | None = None,
        proxies: Mapping[str, str] | None = None,
    ) -> requests.Response:
        return super().send(
            request,
            stream=stream,
            timeout=self._timeout_seconds if timeout is None else timeout,
            verify=verify,
            cert=cert,
            proxies=proxies,
        )


def identity_provider_session(
    office365: Office365Settings, *, timeout_seconds: float
) -> requests.Session:
    """The HTTP session MSAL uses: verified TLS (``ca_file`` or system CAs), timeouts.

    ``trust_env`` is off so that environment variables (proxies, REQUESTS_CA_BUNDLE, .netrc)
    cannot redirect or loosen how tokens travel.
    """
    session = requests.Session()
    session.trust_env = False
    session.verify = str(office365.ca_file) if office365.ca_file else True
    adapter = _TimeoutAdapter(timeout_seconds)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session
