"""The README's five-minute guide, run as written: install, configure, check, set up, start, file.

Run by `.ci/test-deb` as root on this machine, with the repo's venv (for the throwaway Dovecot).
Every ```sh block of the README's section "From the demo to a real mailbox (five minutes)" runs
in order with `bash -eu`, taken from the README itself, with two replacements only: the host
`imap.example.com` becomes `localhost` and the port 993 the throwaway Dovecot's imaps port. The
Dovecot has the user `you@example.com` with the password `PASSWORD`, and a certificate from a
throwaway CA that the commands trust through `SSL_CERT_FILE` (the system bundle plus that CA),
so the guide's `security = "ssl"` is verified TLS here too.

There is no systemd PID 1 here, so `systemctl` is a stand-in (.ci/systemctl_shim.py) that runs
the installed unit's own `ExecStart` as its `User`/`Group` with its `Environment=`, `UMask=`,
`$STATE_DIRECTORY` and a `NOTIFY_SOCKET`, and waits for `READY=1` as `Type=notify` does. `sudo`
is a stand-in that fails as on a minimal Debian, so a README step that needs it fails the walk.
After the blocks, the walk drags a message from the counterpart into Queue, as the guide says,
and waits for it in Received; `emailsync timeline` must show it and the status page answer.
"""

from __future__ import annotations

import imaplib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from email.message import EmailMessage
from pathlib import Path

import trustme

from emailsync.dev.dovecot import Dovecot, DovecotOptions, TlsFiles
from emailsync.dev.runner import NotifyListener

REPO = Path(__file__).resolve().parents[1]
SECTION = "## From the demo to a real mailbox (five minutes)"
ADDRESS = "you@example.com"
PASSWORD = "PASSWORD"  # noqa: S105 -- the README's placeholder, a throwaway server's login
COUNTERPART = "someone@else.example"
FILED_TIMEOUT_SECONDS = 30.0
BASH = "/bin/bash"
SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
STATE = Path("/var/lib/emailsync")


def readme_blocks() -> list[str]:
    """The ```sh blocks of the five-minute section, dedented, in order."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start : end if end != -1 else len(text)]
    blocks = []
    for match in re.finditer(r"^( *)```sh\n(.*?)^\1```", section, re.M | re.S):
        indent = len(match.group(1))
        lines = [line[indent:] for line in match.group(2).splitlines()]
        blocks.append("\n".join(lines) + "\n")
    if not blocks:
        raise SystemExit(f"readme-walk: no ```sh blocks under {SECTION!r} in README.md")
    return blocks


class NotifyLog(NotifyListener):
    """A NOTIFY_SOCKET that writes each message as a line of a file the systemctl stand-in reads."""

    def __init__(self, directory: Path) -> None:
        self.log = directory / "notify.log"
        self._out = self.log.open("a", encoding="utf-8")
        # Mode 0666: the daemon runs as the unit's User.
        super().__init__(directory / "notify.sock", self._write, mode=0o666)

    def _write(self, message: str) -> None:
        self._out.write(message.replace("\n", " ") + "\n")
        self._out.flush()

    def close(self) -> None:
        super().close()
        self._out.close()


def shims(directory: Path) -> Path:
    """A PATH directory with `sudo` (absent, as on a minimal Debian) and `systemctl`."""
    bin_dir = directory / "bin"
    bin_dir.mkdir()
    sudo = bin_dir / "sudo"
    sudo.write_text(
        "#!/bin/sh\necho 'sudo: command not found (a minimal Debian has none)' >&2\nexit 127\n"
    )
    systemctl = bin_dir / "systemctl"
    systemctl.write_text(
        f'#!/bin/sh\nexec {sys.executable} {REPO / ".ci" / "systemctl_shim.py"} "$@"\n'
    )
    for path in (sudo, systemctl):
        path.chmod(0o755)
    return bin_dir


def queue_message(server: Dovecot, subject: str) -> None:
    """Drag a message from the counterpart into Queue, as the agent would."""
    message = EmailMessage()
    message["From"] = f"Some One <{COUNTERPART}>"
    message["To"] = ADDRESS
    message["Subject"] = subject
    message["Message-ID"] = f"<{subject.replace(' ', '-')}@else.example>"
    message["Date"] = "Sun, 06 Dec 2026 09:00:00 +0000"
    message.set_content("Hello, about the flat on the High Street.\n")
    with imaplib.IMAP4(server.host, server.port, timeout=10) as client:
        client.login(ADDRESS, PASSWORD)
        client.append("Rezi-Imported.Queue", None, None, message.as_bytes())


def folder_subjects(server: Dovecot, folder: str) -> list[str]:
    """The subjects of the messages in one folder."""
    with imaplib.IMAP4(server.host, server.port, timeout=10) as client:
        client.login(ADDRESS, PASSWORD)
        status, count = client.select(folder, readonly=True)
        if status != "OK" or count[0] in (b"0", None):
            return []
        _, data = client.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    return [
        part[1].decode().split(":", 1)[1].strip()
        for part in data
        if isinstance(part, tuple) and b":" in part[1]
    ]


def main() -> int:
    if os.geteuid() != 0:
        raise SystemExit("readme-walk: run as root (it installs the package, as the README does)")
    for path in (Path("/opt/venvs/emailsync"), Path("/etc/emailsync"), STATE):
        if path.exists():
            raise SystemExit(f"readme-walk: {path} exists: purge emailsync (and remove it) first")
    work = Path(tempfile.mkdtemp(prefix="emailsync-walk-"))
    work.chmod(0o755)
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost")
    chain, key = work / "chain.pem", work / "key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(chain))
    leaf.private_key_pem.write_to_path(str(key))
    bundle = work / "trusted.pem"
    bundle.write_bytes(SYSTEM_BUNDLE.read_bytes() + ca.cert_pem.bytes())
    bundle.chmod(0o644)
    server = Dovecot(None, DovecotOptions(tls=TlsFiles(chain, key)))
    notify = NotifyLog(work)
    bin_dir = shims(work)
    env = dict(os.environ)
    env.update(
        PATH=f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin",
        SSL_CERT_FILE=str(bundle),
        EMAILSYNC_WALK_DIR=str(work),
        EMAILSYNC_WALK_ENV=f"SSL_CERT_FILE={bundle}",
        DEBIAN_FRONTEND="noninteractive",
    )
    for name in ("VIRTUAL_ENV", "PYTHONPATH", "EMAILSYNC_CONFIG"):
        env.pop(name, None)
    started = time.monotonic()
    passed = False
    try:
        server.start()
        server.add_user(ADDRESS, PASSWORD)
        replacements = {"imap.example.com": "localhost", "port = 993": f"port = {server.ssl_port}"}
        for number, written in enumerate(readme_blocks(), 1):
            block = written
            for old, new in replacements.items():
                block = block.replace(old, new)
            print(f"readme-walk: block {number}:\n{block}", file=sys.stderr, flush=True)
            result = subprocess.run(
                [BASH, "-eu", "-c", block], cwd=REPO, env=env, check=False, timeout=1200
            )
            if result.returncode != 0:
                raise SystemExit(f"readme-walk: FAIL: block {number} exited {result.returncode}")
        foreign = [p.name for p in STATE.iterdir() if p.owner() != "emailsync"]
        if foreign:
            raise SystemExit(f"readme-walk: FAIL: not owned by emailsync in {STATE}: {foreign}")

        subject = "Viewing on Saturday"
        queue_message(server, subject)
        deadline = time.monotonic() + FILED_TIMEOUT_SECONDS
        while subject not in folder_subjects(server, "Rezi-Imported.Received"):
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"readme-walk: FAIL: not filed to Received within {FILED_TIMEOUT_SECONDS} s"
                )
            time.sleep(0.5)
        filed_after = time.monotonic() - started
        timeline = subprocess.run(
            ["/usr/bin/emailsync", "timeline"], env=env, capture_output=True, text=True, check=True
        )
        if subject not in timeline.stdout:
            raise SystemExit(f"readme-walk: FAIL: timeline lacks the event:\n{timeline.stdout}")
        with urllib.request.urlopen("http://127.0.0.1:9387/", timeout=10) as page:
            if page.status != 200:
                raise SystemExit(f"readme-walk: FAIL: status page answered {page.status}")
        stop = subprocess.run(
            [str(bin_dir / "systemctl"), "stop", "emailsync"], env=env, check=False
        )
        if stop.returncode != 0:
            raise SystemExit("readme-walk: FAIL: the daemon did not stop cleanly (above)")
        print(
            f"readme-walk: ok: the README's steps filed a message {filed_after:.0f} s after "
            "the first one started (the package build included)",
            file=sys.stderr,
        )
        passed = True
        return 0
    finally:
        subprocess.run([str(bin_dir / "systemctl"), "kill", "emailsync"], env=env, check=False)
        notify.close()
        server.close()
        daemon_log = work / "daemon.log"
        if not passed and daemon_log.exists():
            tail = daemon_log.read_text(errors="replace")[-3000:]
            print(f"readme-walk: the daemon's last output:\n{tail}", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)
        # What the walk installed goes again: the package, its config and its state.
        subprocess.run(["/usr/bin/dpkg", "--purge", "emailsync"], capture_output=True, check=False)
        shutil.rmtree(STATE, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
