"""``emailsync run`` as a subprocess for the latency bench: start, wait ready, metrics, stop."""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from emailsync.dev.net import stop_process
from emailsync.dev.runner import start_daemon

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
        with log_path.open("wb") as log:
            self.process = start_daemon(config, log)

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


def smaps_breakdown(pid: int) -> dict[str, tuple[int, int]]:
    """A process's resident memory by kind of mapping (issue 23): kind -> (mappings, bytes).

    Kinds, from /proc/PID/smaps (proc(5)): ``heap`` (glibc's main arena, brk), ``files``
    (the interpreter and its libraries), ``stack`` (the main thread's), and anonymous
    mappings by their size: ``anon NNN KiB`` (a thread's stack is WORKER_STACK_BYTES, its
    frame chunk 16 KiB, CPython's object arenas 1 MiB; glibc's other arenas grow inside
    64 MiB reservations, and the kernel merges neighbouring anonymous mappings, so the
    larger ones are malloc and Python objects together).
    """
    kinds: dict[str, list[int]] = {}
    name = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and not head[0].endswith(":"):
            start, end = (int(part, 16) for part in head[0].split("-"))
            size = (end - start) // 1024
            path = head[5] if len(head) > 5 else ""
            if path in ("[heap]", "[stack]"):
                name = path.strip("[]")
            elif path.startswith("/"):
                name = "files"
            elif path:
                name = path
            else:
                name = f"anon {size} KiB" if size <= 2048 else "anon > 2 MiB"
        elif head[0] == "Rss:":
            entry = kinds.setdefault(name, [0, 0])
            entry[0] += 1
            entry[1] += int(head[1]) * 1024
    return {kind: (count, rss) for kind, (count, rss) in kinds.items() if rss}


def rss_bytes(pid: int) -> int:
    """A process's resident set (VmRSS, proc(5)); 0 once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def memory_lines(pid: int) -> str:
    """The smaps breakdown and thread count of a process, biggest first, one kind a line."""
    status = Path(f"/proc/{pid}/status").read_text()
    threads = next(line.split()[1] for line in status.splitlines() if line.startswith("Threads:"))
    rows = sorted(smaps_breakdown(pid).items(), key=lambda item: -item[1][1])
    total = sum(rss for _, (_, rss) in rows)
    targets: dict[str, int] = {}
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        kind = target.split(":")[0] if ":[" in target else Path(target).name
        targets[kind] = targets.get(kind, 0) + 1
    files = ", ".join(f"{n} {kind}" for kind, n in sorted(targets.items(), key=lambda i: -i[1])[:5])
    out = [f"RSS {total / 2**20:.1f} MB, {threads} threads; open: {files}"]
    out += [f"{rss / 2**20:8.1f} MB {count:6d} x {kind}" for kind, (count, rss) in rows[:14]]
    return "\n".join(out)
