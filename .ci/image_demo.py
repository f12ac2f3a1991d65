"""The demo's mail filed by the container image, run as the image's own user: `make test-image`.

Run by `.ci/test-image` as root on this machine, with the repo's venv, after `make image`.
`emailsync demo` itself cannot run as the image's user: its throwaway Dovecot must start as root
(Dovecot's own rule) and the image is the runtime image, without Dovecot. So the demo is split
the way Kubernetes splits it: this script does the demo's part (the throwaway Dovecot on
loopback, its two agents, the demo's config, groups and queued mail, from emailsync.dev.demo), and
the container runs only the daemon, with the image's ENTRYPOINT, CMD and USER untouched, shaped
like config/kubernetes/deployment.yaml: read-only root with no tmpfs, every capability dropped,
no new privileges, the config and secrets mounted read-only at /etc/emailsync (0640 root:10001,
as the Secret's fsGroup gives them), and the state directory its only writable path.

From outside the container it checks that every queued message was filed (the control API, the
server's folders, the timeline in the state directory), that a message dropped in afterwards is
filed live, that /metrics counts them, that every process of the container runs as the image's
non-root user, and that SIGTERM stops it cleanly. Everything has a timeout; the container, the
Dovecot and the files are removed whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import NoReturn

from emailsync.config import Settings, load_settings
from emailsync.dev.demo import AGENTS, GROUPS, demo_messages, demo_session, wait_until, write_config
from emailsync.dev.dovecot import Dovecot
from emailsync.dev.net import free_port
from emailsync.model import FolderRole
from emailsync.telemetry.logs import configure_logging
from emailsync.timeline import open_store
from emailsync.web.control import ControlClient

REPO = Path(__file__).resolve().parents[1]
PODMAN = ["bash", str(REPO / ".ci" / "podman")]
PODMAN_TIMEOUT_SECONDS = 60.0
FILED_TIMEOUT_SECONDS = 60.0  # the first pass: two mailboxes of five messages
LIVE_TIMEOUT_SECONDS = 30.0  # one message over IDLE
STOP_TIMEOUT_SECONDS = 20  # the daemon stops within 10 s of SIGTERM
CONTAINER_TIMEOUT_SECONDS = 240  # podman kills the container after this, whatever happens here


def fail(message: str) -> NoReturn:
    raise SystemExit(f"test-image: FAIL: {message}")


def say(message: str) -> None:
    print(f"test-image: {message}", file=sys.stderr, flush=True)


def podman(*args: str, check: bool = True) -> str:
    """Run .ci/podman (the flags these machines need); returns stdout."""
    done = subprocess.run(
        [*PODMAN, *args],
        capture_output=True,
        text=True,
        timeout=PODMAN_TIMEOUT_SECONDS,
        check=False,
    )
    if check and done.returncode != 0:
        fail(f"podman {' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def folder_counts(settings: Settings, address: str) -> dict[FolderRole, int]:
    """Messages in each of the mailbox's folders, on the server."""
    with demo_session(settings, address) as imap:
        tree = imap.tree
        if tree is None:
            fail(f"{address}: the folder tree was not resolved")
        return {
            role: int(imap.client.select_folder(tree.name(role), readonly=True).get(b"EXISTS", 0))
            for role in FolderRole
        }


def filed_total(client: ControlClient) -> int:
    return sum(sum(s["filed"].values()) for s in client.mailboxes())


def prepare(base: Path, server: Dovecot, uid: int, gid: int) -> tuple[Settings, int]:
    """The demo's users, config, groups and queued mail; files owned as the package has them."""
    passwords = {agent: secrets.token_urlsafe(12) for agent in AGENTS}
    for agent, password in passwords.items():
        server.add_user(agent, password)
    config = write_config(base, server, passwords, free_port())
    settings = load_settings(config)
    store = open_store(settings.store_url, settings.daemon.state_dir)
    try:
        for name, addresses in GROUPS.items():
            store.add_group(name, addresses)
    finally:
        store.close()
    queued = 0
    for mailbox in settings.mailboxes:
        with demo_session(settings, mailbox.address) as imap:
            imap.ensure_folders()
            for raw in demo_messages(mailbox.address):
                imap.client.append(imap.queue_name(), raw)
                queued += 1
    # /etc/emailsync as the package and the Deployment have it: root-owned, readable by the
    # service's group; the state directory belongs to the service's user.
    for path in [base, base / "secrets", *sorted((base / "secrets").iterdir()), config]:
        os.chown(path, 0, gid)
        path.chmod(0o750 if path.is_dir() else 0o640)
    for path in [settings.daemon.state_dir, *settings.daemon.state_dir.rglob("*")]:
        os.chown(path, uid, gid)
    settings.daemon.state_dir.chmod(0o700)
    return settings, queued


def processes(container: str) -> list[tuple[int, int, str]]:
    """(uid, gid, command line) of every process of the container, read from the host's /proc."""
    found = []
    for line in podman("top", container, "hpid").splitlines()[1:]:
        pid = line.strip()
        if not pid.isdigit():
            continue
        with contextlib.suppress(FileNotFoundError):
            status = Path(f"/proc/{pid}/status").read_text(encoding="utf-8")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            uids = re.search(r"^Uid:\s+(.*)$", status, re.M)
            gids = re.search(r"^Gid:\s+(.*)$", status, re.M)
            if uids is None or gids is None:
                fail(f"/proc/{pid}/status has no Uid/Gid lines")
            # real, effective, saved, filesystem: all must be the same unprivileged id
            (uid,) = set(map(int, uids.group(1).split()))
            (gid,) = set(map(int, gids.group(1).split()))
            found.append((uid, gid, cmdline.strip()))
    return found


def metric(text: str, family: str) -> float:
    """The sum of a family's samples in a Prometheus exposition."""
    pattern = rf"^{re.escape(family)}(?:\{{[^}}]*\}})? ([0-9.e+-]+)$"
    return sum(float(value) for value in re.findall(pattern, text, re.M))


def main() -> int:
    image = sys.argv[1]
    started = time.monotonic()
    configure_logging("console", "warning")  # this side's IMAP sessions: problems only
    # .ci/test-image's `timeout` sends SIGTERM: clean up (finally) rather than die at once.
    signal.signal(signal.SIGTERM, lambda *_: fail("stopped by SIGTERM (timeout)"))
    config = json.loads(podman("image", "inspect", "--format", "{{json .Config}}", image))
    user = str(config.get("User", ""))
    if not re.fullmatch(r"\d+:\d+", user):
        fail(f"the image's USER is {user!r}, not numeric uid:gid (runAsNonRoot cannot check it)")
    uid, gid = map(int, user.split(":"))
    if uid == 0 or gid == 0:
        fail(f"the image runs as root (USER {user})")
    base = Path(tempfile.mkdtemp(prefix="emailsync-image-"))
    container = f"emailsync-image-test-{secrets.token_hex(4)}"
    server = Dovecot()
    try:
        server.start()
        settings, queued = prepare(base, server, uid, gid)
        state = settings.daemon.state_dir
        say(f"Dovecot on {server.host}:{server.port}, {queued} messages queued; starting {image}")
        podman(
            "run", "--detach", "--name", container, "--network", "host",
            "--read-only", "--read-only-tmpfs=false", "--cap-drop", "ALL",
            "--security-opt", "no-new-privileges",
            "--timeout", str(CONTAINER_TIMEOUT_SECONDS),
            "--volume", f"{base}:/etc/emailsync:ro",
            "--volume", f"{state}:/etc/emailsync/{state.relative_to(base)}:rw",
            image,
        )  # fmt: skip
        client = ControlClient(settings)

        def all_filed() -> bool:
            statuses = client.mailboxes()
            return (
                len(statuses) == len(AGENTS)
                and all(s["state"] == "idle" and s["queue"] == 0 for s in statuses)
                and filed_total(client) == queued
            )

        if not wait_until(all_filed, FILED_TIMEOUT_SECONDS):
            log = podman("logs", "--tail", "20", container, check=False)
            fail(f"the queued mail was not filed within {FILED_TIMEOUT_SECONDS:.0f} s:\n{log}")
        say(f"[{time.monotonic() - started:.1f} s] the container filed all {queued} messages")

        running = processes(container)
        if not running:
            fail("no process found in the container")
        for proc_uid, proc_gid, cmdline in running:
            if (proc_uid, proc_gid) != (uid, gid):
                fail(f"{cmdline!r} runs as uid {proc_uid} gid {proc_gid}, not the image's {user}")
        if not any("emailsync" in cmdline and " run" in cmdline for _, _, cmdline in running):
            fail(f"the daemon is not among the container's processes: {running}")
        say(f"{len(running)} process(es), all uid {uid} gid {gid}: {running[0][2]}")

        with demo_session(settings, AGENTS[1]) as imap:
            imap.client.append(imap.queue_name(), demo_messages(AGENTS[1])[0])
        live = time.monotonic()
        if not wait_until(lambda: filed_total(client) == queued + 1, LIVE_TIMEOUT_SECONDS):
            fail(f"a message dropped into Queue was not filed within {LIVE_TIMEOUT_SECONDS:.0f} s")
        say(f"live message filed {time.monotonic() - live:.2f} s after it was queued")

        counts = {address: folder_counts(settings, address) for address in AGENTS}
        for address, by_role in counts.items():
            if by_role[FolderRole.QUEUE]:
                fail(f"{address}'s Queue still holds {by_role[FolderRole.QUEUE]} on the server")
        on_server = sum(
            c[FolderRole.SENT] + c[FolderRole.RECEIVED] + c[FolderRole.FAILED]
            for c in counts.values()
        )
        if on_server != queued + 1:
            fail(f"Sent + Received + Failed hold {on_server} messages, not {queued + 1}")
        linked = sum(c[FolderRole.SENT] + c[FolderRole.RECEIVED] for c in counts.values())
        if not linked:
            fail("nothing reached Sent or Received (the groups were not used)")
        url = f"http://127.0.0.1:{settings.daemon.listen_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode("utf-8")
        counted = metric(text, "emailsync_messages_synced_total") + metric(
            text, "emailsync_messages_received_total"
        )
        if counted != linked:
            fail(
                f"/metrics counts {counted} messages to Sent + Received, the server holds {linked}"
            )

        podman("stop", "--time", str(STOP_TIMEOUT_SECONDS), container)
        exit_code = podman("inspect", "--format", "{{.State.ExitCode}}", container).strip()
        if exit_code != "0":
            log = podman("logs", "--tail", "20", container, check=False)
            fail(f"the container exited {exit_code} on SIGTERM:\n{log}")
        store = open_store(settings.store_url, state)
        try:
            events = store.list_events()
        finally:
            store.close()
        if not events:
            fail("the timeline in the state directory is empty")
        say(
            f"ok: {queued + 1} messages filed ({linked} to Sent/Received, {len(events)} timeline"
            f" events) by {image} as uid {uid}, in {time.monotonic() - started:.1f} s"
        )
        return 0
    finally:
        podman("rm", "--force", "--time", "5", container, check=False)
        server.close()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
