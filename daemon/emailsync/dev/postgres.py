"""A throwaway PostgreSQL cluster on loopback, for the tests and the benchmarks.

It runs Debian's ``initdb`` and ``postgres`` binaries (package ``postgresql``) in a private
directory: trust authentication for the superuser ``emailsync``, nothing listening beyond
127.0.0.1 and a socket directory inside that directory, and fsync off (the data is thrown
away, so durability only costs time). PostgreSQL refuses to run as root, so when we are root
the server runs as the ``postgres`` system user (else ``nobody``), which owns the directory.
Stops when ``stop()`` is called or the object is used as a context.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

from emailsync.dev.net import LocalServer, free_port

START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 15.0
SUPERUSER = "emailsync"
# Debian installs each major version's server binaries here, outside $PATH.
DEBIAN_BIN_GLOB = "/usr/lib/postgresql/*/bin"
# Candidate owners of the cluster when we run as root, in order of preference.
RUN_AS_USERS = ("postgres", "nobody")


class PostgresStartError(RuntimeError):
    """The throwaway PostgreSQL could not be set up or did not come up; holds its log tail."""


def postgres_bin_dir() -> Path | None:
    """The directory of the newest installed ``initdb``/``postgres``, or None."""
    on_path = shutil.which("initdb")
    if on_path is not None:
        return Path(on_path).parent
    found = sorted(
        Path("/").glob(DEBIAN_BIN_GLOB.lstrip("/")),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    found = [p for p in found if (p / "initdb").exists() and (p / "postgres").exists()]
    return found[-1] if found else None


class Postgres(LocalServer):
    """One PostgreSQL cluster in ``base_dir`` (a fresh temp dir by default), on a free port."""

    def __init__(self, base_dir: Path | None = None) -> None:
        self._own_dir = base_dir is None
        self.base_dir = base_dir or Path(tempfile.mkdtemp(prefix="emailsync-pg-"))
        self.data_dir = self.base_dir / "data"
        self.socket_dir = self.base_dir / "run"
        self.log_path = self.base_dir / "postgres.log"
        self.host = "127.0.0.1"
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None
        self._user = _run_as_user()
        self._databases = 0

    @property
    def running(self) -> bool:
        """The server process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The postmaster's process id while it runs."""
        return self._process.pid if self.running and self._process is not None else None

    def url(self, database: str = "postgres") -> str:
        """A ``postgresql://`` URL for ``database`` as the superuser (trust: no password)."""
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{database}"

    def start(self) -> None:
        """Create the cluster on first start, start the server, wait until it accepts logins."""
        bin_dir = postgres_bin_dir()
        if bin_dir is None:
            raise PostgresStartError("PostgreSQL is not installed (Debian package postgresql)")
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(bin_dir)
        self._spawn(bin_dir)
        self._wait_ready()

    def stop(self) -> None:
        """Fast shutdown (SIGINT: roll back sessions, no waiting for clients); kill if stuck."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGINT)
        try:
            process.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self) -> None:
        """Stop and start again on the same port and data."""
        self.stop()
        bin_dir = postgres_bin_dir()
        assert bin_dir is not None  # noqa: S101 -- start() found it before
        self._spawn(bin_dir)
        self._wait_ready()

    def close(self) -> None:
        """Stop the server and remove the directory when we made it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def create_database(self, prefix: str = "t") -> str:
        """Create a fresh, empty database; return its URL."""
        self._databases += 1
        name = f"{prefix}_{os.getpid()}_{self._databases}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # name is built here, not user input
        return self.url(name)

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server's log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # -- internals --------------------------------------------------------------------------

    def _as_owner(self) -> dict[str, Any]:
        """Keywords for subprocess: run in base_dir as the cluster's owner (``_run_as_user``)."""
        return {"cwd": self.base_dir, "user": self._uid, "group": self._gid}

    def _initdb(self, bin_dir: Path) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        if self._user is not None:
            for path in (self.base_dir, self.socket_dir):
                os.chown(path, self._user.pw_uid, self._user.pw_gid)
        result = subprocess.run(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            capture_output=True,
            text=True,
            check=False,
            **self._as_owner(),
        )
        if result.returncode != 0:
            raise PostgresStartError(f"initdb failed:\n{result.stdout}\n{result.stderr}")

    def _spawn(self, bin_dir: Path) -> None:
        settings = {
            "listen_addresses": self.host,
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
            # Throwaway data: durability only costs time.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "300",
            "shared_buffers": "32MB",
        }
        args = [str(bin_dir / "postgres"), "-D", str(self.data_dir)]
        for key, value in settings.items():
            args += ["-c", f"{key}={value}"]
        log = self.log_path.open("ab")
        try:
            self._process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **self._as_owner(),
            )
        finally:
            log.close()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                raise PostgresStartError(f"postgres exited at start:\n{self.log_tail()}")
            try:
                with psycopg.connect(self.url(), connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
            except psycopg.OperationalError as exc:
                last = exc
                time.sleep(0.1)
            else:
                return
        self.stop()
        raise PostgresStartError(
            f"postgres not ready after {START_TIMEOUT_SECONDS} s ({last}):\n{self.log_tail()}"
        )

    @property
    def _uid(self) -> int | None:
        """The uid to run the binaries as (PostgreSQL refuses root); None: stay who we are."""
        return None if self._user is None else self._user.pw_uid

    @property
    def _gid(self) -> int | None:
        return None if self._user is None else self._user.pw_gid


def _run_as_user() -> pwd.struct_passwd | None:
    """The unprivileged user to run the server as when we are root; None when we are not."""
    if os.geteuid() != 0:
        return None
    for name in RUN_AS_USERS:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise PostgresStartError(f"running as root and none of the users {RUN_AS_USERS} exists")
