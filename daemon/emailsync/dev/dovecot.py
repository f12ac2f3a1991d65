"""A throwaway Dovecot IMAP server on loopback, for the demo, the tests and the benchmarks.

It runs Debian's ``dovecot`` binary in the foreground with a config written into a private
directory: users in a passwd-file (added while it runs), maildirs owned by uid 65534, no
chroot, and nothing listening beyond 127.0.0.1. Must run as root (Dovecot's own rule for
``default_login_user``); stops when ``stop()`` is called or the object is used as a context.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from emailsync.dev.net import LocalServer, free_port, stop_process, wait_for_port

MAIL_UID = 65534  # "nobody": Dovecot refuses to run mail processes as root
START_TIMEOUT_SECONDS = 15.0
INOTIFY_INSTANCES = 4096  # Dovecot needs one per IDLE client per uid (DESIGN.md §2)
MAX_IMAP_CONNECTIONS = 10000  # service imap: process_limit x client_limit

# Capabilities Dovecot 2.3 announces after login; tests remove some to exercise fallbacks.
POST_LOGIN_CAPABILITIES = (
    "IMAP4rev1",
    "SASL-IR",
    "LOGIN-REFERRALS",
    "ID",
    "ENABLE",
    "IDLE",
    "SORT",
    "SORT=DISPLAY",
    "THREAD=REFERENCES",
    "THREAD=REFS",
    "THREAD=ORDEREDSUBJECT",
    "MULTIAPPEND",
    "URL-PARTIAL",
    "CATENATE",
    "UNSELECT",
    "CHILDREN",
    "NAMESPACE",
    "UIDPLUS",
    "LIST-EXTENDED",
    "I18NLEVEL=1",
    "CONDSTORE",
    "QRESYNC",
    "ESEARCH",
    "ESORT",
    "SEARCHRES",
    "WITHIN",
    "CONTEXT=SEARCH",
    "LIST-STATUS",
    "BINARY",
    "MOVE",
    "SNIPPET=FUZZY",
    "PREVIEW=FUZZY",
    "PREVIEW",
    "STATUS=SIZE",
    "SAVEDATE",
    "LITERAL+",
    "NOTIFY",
)


class DovecotStartError(RuntimeError):
    """Dovecot did not come up; the message carries the tail of its log."""


@dataclass(frozen=True)
class TlsFiles:
    """A server certificate chain and key in PEM files, for Dovecot's ssl settings."""

    cert_chain: Path
    key: Path


@dataclass
class DovecotOptions:
    """How the throwaway server is set up."""

    separator: str = "."  # hierarchy delimiter: "." (maildir++) or "/" (LAYOUT=fs)
    prefix: str = ""  # personal namespace prefix, e.g. "INBOX." as Courier has it
    without_capabilities: tuple[str, ...] = ()  # e.g. ("MOVE",) or ("IDLE",)
    tls: TlsFiles | None = None  # adds STARTTLS on the imap port and an imaps port
    extra_config: str = ""  # appended verbatim (oauth2 passdb and the like)
    passdb: str = field(default="")  # replaces the passwd-file passdb when set
    # Connections one imap process serves (service imap's client_limit). 1, Dovecot's own
    # default, gives each connection its own process, which tests use to tell sessions
    # apart (doveadm who's pid). More lets thousands of connections share a few long-lived
    # processes (allowed: all mail belongs to one uid) and runs imap-login in Dovecot's
    # high-performance mode too, for the benchmarks at 6,000 mailboxes (issue 23).
    imap_client_limit: int = 1


class Dovecot(LocalServer):
    """One Dovecot instance in ``base_dir``; ``start()``, ``add_user()``, ``stop()``."""

    def __init__(self, base_dir: Path | None = None, options: DovecotOptions | None = None) -> None:
        # Dovecot's unprivileged processes must traverse every parent of base_dir, so the
        # default is a fresh directory in /tmp (pytest's and $HOME's are mode 0700).
        self._owns_dir = base_dir is None
        self.base_dir = base_dir or Path(tempfile.mkdtemp(prefix="emailsync-dovecot-"))
        self.options = options or DovecotOptions()
        self.host = "127.0.0.1"
        self.port = free_port()
        self.ssl_port = free_port() if self.options.tls else 0
        base_dir = self.base_dir
        self.config_path = base_dir / "dovecot.conf"
        self.passwd_path = base_dir / "passwd"
        self.log_path = base_dir / "dovecot.log"
        self.mail_dir = base_dir / "mail"
        self._process: subprocess.Popen[bytes] | None = None
        if self.options.imap_client_limit < 1:
            raise ValueError("imap_client_limit must be at least 1")

    def close(self) -> None:
        """Stop, and remove the directory when this object made it."""
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    @property
    def running(self) -> bool:
        """True while the master process lives."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Write the config and start Dovecot; returns once it accepts connections."""
        binary = shutil.which("dovecot") or "/usr/sbin/dovecot"
        if not Path(binary).exists():
            raise DovecotStartError("dovecot is not installed (Debian package dovecot-imapd)")
        self._prepare_dirs()
        self.config_path.write_text(self._config(), encoding="utf-8")
        _raise_inotify_limit()
        self._spawn(binary)

    def stop(self) -> None:
        """Stop Dovecot and wait for it; safe to call twice."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        stop_process(process, 10)
        # Client processes (imap) outlive the master; a real restart drops their connections,
        # so end everything in the instance's process group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)

    def restart(self) -> None:
        """Stop and start again on the same ports, keeping users and mail."""
        self.stop()
        wait_for_port(self.host, self.port, START_TIMEOUT_SECONDS, open_=False)
        self._spawn(shutil.which("dovecot") or "/usr/sbin/dovecot")

    def _spawn(self, binary: str) -> None:
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [binary, "-F", "-c", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group, so stop() can end it all
            )
        self._wait_ready()

    def add_user(self, address: str, password: str) -> None:
        """Add a login (at once usable)."""
        if any(c in address + password for c in ":\n\r"):
            raise ValueError(
                "user names and passwords for the passwd-file cannot hold ':' or newlines"
            )
        # One passwd-file per user: Dovecot re-reads a changed passwd-file at most once a
        # second, so users added to one shared file in quick succession would go unseen.
        path = self.passwd_path / address
        path.write_text(f"{address}:{{PLAIN}}{password}::::::\n", encoding="utf-8")
        path.chmod(0o644)

    def doveadm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``doveadm`` against this instance."""
        return subprocess.run(
            [shutil.which("doveadm") or "/usr/bin/doveadm", "-c", str(self.config_path), *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=check,
        )

    def sessions(self) -> list[str]:
        """The user of each open IMAP session (``doveadm who -1``: one line per connection)."""
        out = self.doveadm("who", "-1", check=False).stdout
        return [line.split()[0] for line in out.splitlines()[1:] if line.strip()]

    def kick(self, user: str) -> None:
        """Disconnect every session of a user from the server side."""
        self.doveadm("kick", user, check=False)

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of Dovecot's log, for error messages."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _prepare_dirs(self) -> None:
        # Dovecot's unprivileged processes must traverse the tree; mail belongs to MAIL_UID.
        for path in (self.base_dir, self.base_dir / "run", self.base_dir / "state"):
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(0o755)
        self.mail_dir.mkdir(exist_ok=True)
        os.chown(self.mail_dir, MAIL_UID, MAIL_UID)
        self.passwd_path.mkdir(exist_ok=True)
        self.passwd_path.chmod(0o755)

    def _wait_ready(self) -> None:
        process = self._process

        def alive() -> bool:
            return process is None or process.poll() is None

        if wait_for_port(self.host, self.port, START_TIMEOUT_SECONDS, alive=alive):
            return
        if not alive():
            raise DovecotStartError(f"dovecot exited at start:\n{self.log_tail()}")
        self.stop()
        raise DovecotStartError(
            f"dovecot did not listen within {START_TIMEOUT_SECONDS} s:\n{self.log_tail()}"
        )

    def _config(self) -> str:
        opts = self.options
        base = self.base_dir
        layout = ":LAYOUT=fs" if opts.separator == "/" else ""
        caps = ""
        if opts.without_capabilities:
            kept = [c for c in POST_LOGIN_CAPABILITIES if c not in opts.without_capabilities]
            caps = f"imap_capability = {' '.join(kept)}"
        if opts.tls:
            ssl = f"ssl = yes\nssl_cert = <{opts.tls.cert_chain}\nssl_key = <{opts.tls.key}"
            imaps = (
                f"inet_listener imaps {{\n    address = 127.0.0.1\n    port = {self.ssl_port}\n  }}"
            )
        else:
            ssl = "ssl = no"
            imaps = "inet_listener imaps {\n    port = 0\n  }"
        clients = opts.imap_client_limit
        processes = -(-MAX_IMAP_CONNECTIONS // clients)
        # service_count = 0: a process takes new connections for as long as it lives, rather
        # than one each (then client_limit would change nothing). Login processes hand a
        # connection over once logged in, so two of them (one a core) suffice.
        # Each such imap process keeps a connection to auth, which counts them all.
        shared = (
            f"service_count = 0\n  client_limit = {clients}\n  process_min_avail = 2"
            if clients > 1
            else "process_min_avail = 1"
        )
        auth = f"service auth {{\n  client_limit = {processes + 1000}\n}}" if clients > 1 else ""
        passdb = opts.passdb or (
            f"passdb {{\n  driver = passwd-file\n  args = scheme=PLAIN {self.passwd_path}/%u\n}}"
        )
        return f"""# written by emailsync.dev.dovecot; throwaway
protocols = imap
listen = 127.0.0.1
base_dir = {base}/run
state_dir = {base}/state
log_path = {self.log_path}
default_login_user = dovenull
default_internal_user = dovecot
{ssl}
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = 0
mail_location = maildir:{self.mail_dir}/%u/Maildir{layout}
mail_uid = {MAIL_UID}
mail_gid = {MAIL_UID}
first_valid_uid = 1
mail_max_userip_connections = 10000
{caps}
{passdb}
userdb {{
  driver = static
  args = uid={MAIL_UID} gid={MAIL_UID} home={self.mail_dir}/%u allow_all_users=yes
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.port}
  }}
  {imaps}
  chroot =
  {shared}
}}
service imap {{
  process_limit = {processes}
  client_limit = {clients}
  service_count = {0 if clients > 1 else 1}
}}
{auth}
service anvil {{
  chroot =
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
namespace inbox {{
  inbox = yes
  separator = {opts.separator}
  prefix = {opts.prefix}
}}
{opts.extra_config}
"""


def _raise_inotify_limit() -> None:
    # Without an inotify instance Dovecot polls every 30 s instead of telling IDLE clients
    # within 0.5 s; the default of 128 per uid runs out with many mailboxes.
    knob = Path("/proc/sys/fs/inotify/max_user_instances")
    with contextlib.suppress(OSError, ValueError):
        if int(knob.read_text()) < INOTIFY_INSTANCES:
            knob.write_text(str(INOTIFY_INSTANCES))


@contextlib.contextmanager
def running_dovecot(
    base_dir: Path | None = None, options: DovecotOptions | None = None
) -> Iterator[Dovecot]:
    """Start a Dovecot for the length of a ``with`` block."""
    server = Dovecot(base_dir, options)
    server.start()
    try:
        yield server
    finally:
        server.close()
