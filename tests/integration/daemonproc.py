"""The daemon as a real subprocess for tests: start, wait ready, talk HTTP, signal, stop."""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from emailsync.dev.net import free_port, stop_process
from emailsync.dev.runner import NotifyListener, start_daemon

from .faultproxy import FaultProxy
from .mailenv import MailUser, write_config

READY_TIMEOUT_SECONDS = 30.0


def run_cli(config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``emailsync --config CONFIG ARGS…`` in a subprocess, as an operator would type it."""
    return subprocess.run(
        [sys.executable, "-m", "emailsync.cli", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def wait_until(condition: Callable[[], Any], timeout: float = 15.0, interval: float = 0.1) -> Any:
    """Poll ``condition`` until it returns something truthy; fail with AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s (last value: {last!r})")


class NotifySocket(NotifyListener):
    """A unix datagram socket standing in for systemd's NOTIFY_SOCKET; records messages."""

    def __init__(self, path: Path) -> None:
        self.messages: list[str] = []
        super().__init__(path, self.messages.append)

    def seen(self, fragment: str) -> bool:
        """True when any message so far contains ``fragment``."""
        return any(fragment in m for m in list(self.messages))


class RunningDaemon:
    """``emailsync run`` in a subprocess with its own config, token and notify socket."""

    def __init__(
        self, config: Path, port: int, token: str, workdir: Path, name: str = "daemon"
    ) -> None:
        self.expected_exit = 0  # what stop_all() accepts; a test that kills it says so
        self.config = config
        self.port = port
        self.token = token
        self.workdir = workdir
        self.log_path = workdir / f"{name}.log"
        self.notify = NotifySocket(
            workdir / ("notify.sock" if name == "daemon" else f"{name}.sock")
        )
        self._log = self.log_path.open("wb")
        self.process = start_daemon(
            config,
            self._log,
            NOTIFY_SOCKET=str(self.notify.path),
            WATCHDOG_USEC="2000000",
            PYTHONUNBUFFERED="1",
        )

    def wait_ready(self) -> None:
        """Wait for /readyz and READY=1; fail with the daemon's log otherwise."""
        try:
            wait_until(lambda: self.get("/readyz")[0] == 200, READY_TIMEOUT_SECONDS)
            wait_until(lambda: self.notify.seen("READY=1"), 10)
        except AssertionError:
            raise AssertionError(f"daemon not ready; log:\n{self.log()}") from None

    def log(self) -> str:
        """Everything the daemon printed so far."""
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def request(
        self, method: str, path: str, *, token: str | None = "default"
    ) -> tuple[int, bytes]:
        """An HTTP request to the daemon; returns (status, body)."""
        headers = {}
        if token is not None:
            headers["Authorization"] = f"Bearer {self.token if token == 'default' else token}"
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            method=method,
            headers=headers,
            data=b"" if method == "POST" else None,
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as response:  # noqa: S310
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except (urllib.error.URLError, OSError):
            return 0, b""

    def get(self, path: str, **kwargs: Any) -> tuple[int, bytes]:
        """GET."""
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> tuple[int, bytes]:
        """POST."""
        return self.request("POST", path, **kwargs)

    def metric(self, name: str, **labels: str) -> float | None:
        """One sample's value from /metrics, or None when absent.

        Raises AssertionError when /metrics does not answer 200: a dead listener must not
        pass for "the series is absent".
        """
        status, body = self.get("/metrics", token=None)
        if status != 200:
            raise AssertionError(f"/metrics answered {status}, not 200: {body[:200]!r}")
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return float(sample.value)
        return None

    def samples(self, name: str) -> list[tuple[dict[str, str], float]]:
        """Every sample of one metric from a single /metrics read: (labels, value) pairs."""
        status, body = self.get("/metrics", token=None)
        if status != 200:
            raise AssertionError(f"/metrics answered {status}, not 200: {body[:200]!r}")
        return [
            (dict(sample.labels), float(sample.value))
            for family in text_string_to_metric_families(body.decode())
            for sample in family.samples
            if sample.name == name
        ]

    def mailboxes(self) -> dict[str, dict[str, Any]]:
        """The /v1/mailboxes answer keyed by address."""
        status, body = self.get("/v1/mailboxes")
        assert status == 200, body
        return {m["address"]: m for m in json.loads(body)["mailboxes"]}

    def signal(self, signum: signal.Signals) -> None:
        """Send a signal to the daemon."""
        self.process.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL, as a crash; reaps it and closes its log and notify socket (exit -9)."""
        self.expected_exit = -9
        self.process.kill()
        self.stop()

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        code = stop_process(self.process, timeout)
        self._log.close()
        self.notify.close()
        return code


def daemon_config_extra(port: int, token_file: Path, **overrides: object) -> str:
    """[daemon] keys for a test daemon: its port and token; polls and sweeps far away.

    The metrics at full detail: tests watch one mailbox's passes by trigger and its connection
    errors by kind. test_prometheus scrapes the default ("summary").
    """
    values: dict[str, object] = {
        "listen": f"127.0.0.1:{port}",
        "control_token_file": str(token_file),
        "sweep_seconds": 3600,
        "poll_seconds": 3600,
        "log_format": "json",
        "log_level": "debug",
        "metrics_detail": "mailbox",
    }
    values.update(overrides)
    return "\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items())


def new_port() -> int:
    """A free loopback port."""
    return free_port()


class DaemonFactory:
    """Starts daemons for a test and stops them at its end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.daemons: list[RunningDaemon] = []
        self._port: int | None = None  # one port and token per test: a restart reuses them
        self._token = ""

    def write(
        self,
        users: list[MailUser],
        *,
        mailbox_extra: str = "",
        groups: dict[str, list[str]] | None = None,
        proxy: FaultProxy | None = None,
        **daemon: object,
    ) -> Path:
        """Write the config (and token, and groups) a daemon for ``users`` would run with.

        With ``proxy`` the daemon reaches the proxy's upstream Dovecot through the proxy.
        """
        if self._port is None:
            self._port, self._token = new_port(), secrets.token_urlsafe(16)
        token_file = self.tmp_path / "control-token"
        token_file.write_text(self._token + "\n")
        config = write_config(
            self.tmp_path,
            users,
            extra=daemon_config_extra(self._port, token_file, **daemon),
            mailbox_extra=mailbox_extra,
            ports={proxy.upstream[1]: proxy.port} if proxy else None,
        )
        for name, addresses in (groups or {}).items():
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "emailsync.cli",
                    "--config",
                    str(config),
                    "groups",
                    "add",
                    name,
                    *addresses,
                ],
                check=True,
                capture_output=True,
            )
        return config

    def start(self, users: list[MailUser], *, ready: bool = True, **config: Any) -> RunningDaemon:
        """Write a config for ``users`` (``config`` as for ``write``) and start a daemon on it.

        Waits until it is ready unless ``ready`` is False (the caller then waits).
        """
        config_path = self.write(users, **config)
        assert self._port is not None
        name = f"daemon-{len(self.daemons) + 1}" if self.daemons else "daemon"
        process = RunningDaemon(config_path, self._port, self._token, self.tmp_path, name)
        self.daemons.append(process)
        if ready:
            process.wait_ready()
        return process

    def stop_all(self) -> None:
        """Stop every daemon; fail when one did not exit as expected (0 unless told).

        A daemon that crashed at shutdown, or had to be killed, fails the test.
        """
        failures = []
        for process in self.daemons:
            code = process.stop()
            if code != process.expected_exit:
                tail = "\n".join(process.log().splitlines()[-30:])
                failures.append(f"daemon exited {code}, expected {process.expected_exit}:\n{tail}")
        if failures:
            raise AssertionError("\n\n".join(failures))
