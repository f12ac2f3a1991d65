"""``emailsync run`` as a subprocess for the latency bench: start, wait ready, metrics, stop."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from emailsync.dev.net import stop_process

READY_TIMEOUT_SECONDS = 30.0
# DESIGN.md §2: on SIGTERM the daemon exits within 10 s; allow a little more before SIGKILL.
STOP_TIMEOUT_SECONDS = 15.0
HTTP_TIMEOUT_SECONDS = 5.0


class DaemonStartError(RuntimeError):
    """The daemon did not become ready; the message carries the tail of its log."""


class DaemonProcess:
    """The daemon with its own config, listening on ``127.0.0.1:port``; a context manager."""

    def __init__(self, config: Path, port: int, log_path: Path) -> None:
        self.port = port
        self.log_path = log_path
        self.returncode: int | None = None
        # Not under systemd: the notify/watchdog glue stays a no-op.
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "emailsync.cli", "--config", str(config), "run"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_ready(self) -> None:
        """Return once /readyz answers 200; raise DaemonStartError with the log otherwise."""
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise DaemonStartError(f"daemon exited at start:\n{self.log_tail()}")
            if self._get("/readyz")[0] == 200:
                return
            time.sleep(0.05)
        raise DaemonStartError(f"daemon not ready in {READY_TIMEOUT_SECONDS} s:\n{self.log_tail()}")

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """Every sample of /metrics, keyed by name and label set; empty when unreachable."""
        status, body = self._get("/metrics")
        if status != 200:
            return {}
        return {
            (sample.name, frozenset(sample.labels.items())): float(sample.value)
            for family in text_string_to_metric_families(body.decode())
            for sample in family.samples
        }

    def metric(self, name: str, **labels: str) -> float | None:
        """One sample's value, or None when absent."""
        return self.metrics().get((name, frozenset(labels.items())))

    def stop(self) -> int:
        """SIGTERM and wait (SIGKILL after STOP_TIMEOUT_SECONDS); returns the exit code."""
        if self.returncode is not None:
            return self.returncode
        self.returncode = stop_process(self.process, STOP_TIMEOUT_SECONDS)
        return self.returncode

    def log_tail(self, lines: int = 40) -> str:
        """The last lines the daemon printed."""
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def _get(self, path: str) -> tuple[int, bytes]:
        url = f"http://127.0.0.1:{self.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_SECONDS) as response:
                return int(response.status), bytes(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except OSError:
            return 0, b""
