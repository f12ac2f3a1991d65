"""The demo: a throwaway Dovecot, two seeded mailboxes, groups and queued mail, then the filer."""

from __future__ import annotations

import contextlib
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import TextIO

from emailsync.config import Settings, load_settings
from emailsync.dev.crm import DevCrm
from emailsync.dev.dovecot import Dovecot
from emailsync.dev.net import free_port, port_open
from emailsync.errors import ControlError
from emailsync.imap.session import ImapSession, session_for
from emailsync.model import FolderRole
from emailsync.state.agenttoken import open_agent_tokens
from emailsync.state.base import RegisteredBranch, Registry, Store
from emailsync.telemetry.logs import configure_logging
from emailsync.timeline import open_store
from emailsync.web.control import ControlClient

AGENTS = ("agent1@example.com", "agent2@example.com")
# Not in the config: the self-service pages set it up (First Time Setup, Basic).
SELF_SERVICE_AGENT = "agent3@example.com"
SELF_SERVICE_BRANCH = "high-street"
GROUPS = {
    "Smith — 12 Acacia Avenue": ["john.smith@clients.example"],
    "Jones — 4 Privet Drive": ["mary.jones@clients.example", "tom.jones@clients.example"],
    "Okafor — 7 Mill Lane (landlord)": ["ada.okafor@landlords.example", "lettings@example.com"],
}


def _message(frm: str, to: str, subject: str, body: str, cc: str = "") -> bytes:
    msg = EmailMessage()
    msg["From"] = frm
    msg["To"] = to
    if cc:
        msg["Cc"] = cc
    msg["Subject"] = subject
    msg["Date"] = format_datetime(datetime.now(UTC))
    msg["Message-ID"] = make_msgid(domain="demo.example")
    msg.set_content(body)
    return msg.as_bytes()


# Sent to both agents: queued in both mailboxes, it makes one event listing both.
SHARED_OFFER = _message(
    "Mary Jones <mary.jones@clients.example>",
    ", ".join(AGENTS),
    "Re: offer on 4 Privet Drive",
    "We'd like to offer the asking price.",
    cc="tom.jones@clients.example",
)


def demo_messages(agent: str) -> list[bytes]:
    """The mail an agent has dragged into Queue: linked both ways, unlinked, and broken."""
    return [
        _message(
            agent,
            "John Smith <john.smith@clients.example>",
            "Viewing on Saturday",
            "Hi John, confirming the viewing at 10am.",
        ),
        SHARED_OFFER,
        _message(
            agent,
            "ada.okafor@landlords.example",
            "Tenancy renewal",
            "The tenants want to renew for a year.",
        ),
        _message(
            "newsletter@portal.example",
            agent,
            "This week's market report",
            "Nobody linked this sender to a group, so it goes to Failed.",
        ),
        b"\x00\x01 this is not an email at all \xff\xfe",
    ]


def write_config(base: Path, server: Dovecot, passwords: dict[str, str], port: int) -> Path:
    """Write the demo's config and password files; returns the config path."""
    secrets_dir = base / "secrets"
    secrets_dir.mkdir(mode=0o700, exist_ok=True)
    mailboxes = []
    for agent, password in passwords.items():
        pw_file = secrets_dir / agent
        pw_file.write_text(password + "\n", encoding="utf-8")
        pw_file.chmod(0o600)
        aliases = '\naliases = ["lettings@example.com"]' if agent == AGENTS[0] else ""
        mailboxes.append(
            f'[[mailboxes]]\naddress = "{agent}"\nbranch = "demo"\n'
            f'password_file = "secrets/{agent}"{aliases}\n'
        )
    token = secrets_dir / "control-token"
    token.write_text(secrets.token_urlsafe(24) + "\n", encoding="utf-8")
    token.chmod(0o600)
    config = base / "emailsync.toml"
    config.write_text(
        f"""# The demo's config: a throwaway Dovecot on loopback.
[daemon]
state_dir = "state"
listen = "127.0.0.1:{port}"
control_token_file = "secrets/control-token"
log_format = "json"
sweep_seconds = 60

[branches.demo]
host = "{server.host}"
port = {server.port}
security = "none"        # loopback only; real branches use ssl or starttls
allow_insecure = true

"""
        + "\n".join(mailboxes),
        encoding="utf-8",
    )
    return config


def _listen_port() -> int:
    """9387 (the default) when free, else any free port."""
    return free_port() if port_open("127.0.0.1", 9387) else 9387


def run_demo(base: Path, *, once: bool, out: TextIO, crm: bool = False) -> int:
    """Seed a throwaway Dovecot, run the daemon on it, show filing on start and live.

    On a terminal it keeps running until Ctrl-C, so the status page and /metrics can be
    looked at; otherwise (or with ``once``) it stops after the scripted part. With ``crm``
    the groups live in the reference CRM (``emailsync.dev.crm``) and the events arrive there.
    """
    base = base.resolve()
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    configure_logging("console", "warning")
    server = Dovecot()
    server.start()
    daemon: subprocess.Popen[bytes] | None = None
    reference: DevCrm | None = None
    try:
        passwords = {agent: secrets.token_urlsafe(12) for agent in AGENTS}
        for agent, password in passwords.items():
            server.add_user(agent, password)
        self_service_password = secrets.token_urlsafe(12)
        server.add_user(SELF_SERVICE_AGENT, self_service_password)
        port = _listen_port()
        config = write_config(base, server, passwords, port)
        store: Store | None = None
        if crm:
            reference = _start_crm(base, config)
        else:
            settings = load_settings(config)
            store = open_store(settings.store_url, settings.daemon.state_dir)
            for name, addresses in GROUPS.items():
                store.add_group(name, addresses)
            if isinstance(store, Registry):
                # What IT support does once per branch (PUT /v1/branches/{name}, the IT page).
                store.put_branch(
                    RegisteredBranch(SELF_SERVICE_BRANCH, server.host, server.port, "none")
                )
        settings = load_settings(config)
        print(f"Dovecot on {server.host}:{server.port} (throwaway); config {config}", file=out)
        if reference is not None:
            print(f"Reference CRM on {reference.url} (owns the groups, receives events)", file=out)
        print(f"Groups: {', '.join(GROUPS)}", file=out)
        for mailbox in settings.mailboxes:
            with demo_session(settings, mailbox.address) as session:
                session.ensure_folders()
                queued = demo_messages(mailbox.address)
                for raw in queued:
                    session.client.append(session.queue_name(), raw)
            print(f"{mailbox.address}: {len(queued)} messages dragged into Queue", file=out)

        log_path = base / "daemon.log"
        print(
            f"\nStarting the daemon: emailsync --config {config} run  (log: {log_path})", file=out
        )
        with log_path.open("wb") as log:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "emailsync.cli", "--config", str(config), "run"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        client = ControlClient(settings)
        if not wait_until(lambda: _queues_empty(client), DEMO_TIMEOUT_SECONDS):
            print(f"the daemon did not file the queue in time; see {log_path}", file=out)
            return 1
        print("Filed on start:", file=out)
        for mailbox in settings.mailboxes:
            print(f"  {mailbox.address}", file=out)
            with demo_session(settings, mailbox.address) as session:
                _show_folders(session, out)

        with demo_session(settings, AGENTS[1]) as session:
            session.client.append(
                session.queue_name(),
                _message(
                    "John Smith <john.smith@clients.example>",
                    AGENTS[1],
                    "Live: can we move the viewing?",
                    "Dropped into Queue while the daemon runs.",
                ),
            )
        started = time.monotonic()
        if not wait_until(
            lambda: _filed_count(client) >= 2 * len(demo_messages(AGENTS[0])) + 1, 30
        ):
            print(f"the live message was not filed in time; see {log_path}", file=out)
            return 1
        print(
            f"\nLive: a message dropped into {AGENTS[1]}'s Queue was filed "
            f"{time.monotonic() - started:.2f} s later (IDLE, no polling).",
            file=out,
        )
        if reference is not None:
            _show_crm_events(reference, out)
        if store is not None:
            print("\nTimeline (emailsync timeline):", file=out)
            for event in store.list_events():
                line = _event_line(
                    event.group, event.direction.value, event.subject, event.mailboxes
                )
                print(line, file=out)
            store.close()
        print("\nStatus (emailsync status):", file=out)
        for status in client.mailboxes():
            filed = ", ".join(f"{n} {outcome}" for outcome, n in sorted(status["filed"].items()))
            print(f"  {status['address']:22} {status['state']:6} filed: {filed}", file=out)
        url = f"http://127.0.0.1:{port}"
        print(f"\nStatus page {url}/   metrics {url}/metrics   log {log_path}", file=out)
        command = Path(sys.executable).with_name("emailsync")
        print(f"Try: {command} --config {config} status | timeline | start-sync --all", file=out)
        if not crm:  # the registry lives in the built-in store (the CRM demo has none)
            _print_self_service(settings, url, client.token, self_service_password, out)
        if not once and sys.stdin.isatty():
            print("Running; press Ctrl-C to stop.", file=out)
            with contextlib.suppress(KeyboardInterrupt):
                daemon.wait()
        return 0
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(15)
            except subprocess.TimeoutExpired:
                daemon.kill()
        if reference is not None:
            reference.close()
        server.close()


def _print_self_service(
    settings: Settings, url: str, admin_token: str, password: str, out: TextIO
) -> None:
    """The self-service links: the agent's Email Sync page and the IT overview."""
    with open_agent_tokens(settings) as tokens:
        token, _ = tokens.issue(SELF_SERVICE_AGENT, None, "demo")
    link = f"{url}/login?token={token}"
    print(
        f"\nSelf-service: {SELF_SERVICE_AGENT}'s Email Sync page (the link is their login):\n"
        f"  {link}\n"
        f"  First Time Setup, Basic: branch {SELF_SERVICE_BRANCH}, username "
        f"{SELF_SERVICE_AGENT}, password {password}\n"
        f"IT overview (branches + mailboxes): {url}/login?token={admin_token}",
        file=out,
    )


def _start_crm(base: Path, config: Path) -> DevCrm:
    """The reference CRM with the demo's groups, and a [crm] table pointing the config at it."""
    secret = secrets.token_urlsafe(24)
    secret_file = base / "secrets" / "crm-secret"
    secret_file.write_text(secret + "\n", encoding="utf-8")
    secret_file.chmod(0o600)
    reference = DevCrm(secret.encode(), base / "devcrm.db").start()
    for number, (name, addresses) in enumerate(GROUPS.items(), start=1):
        reference.link(f"grp-{number}", name, addresses)
    with config.open("a", encoding="utf-8") as file:
        file.write(
            f"\n[crm]  # the reference CRM (emailsync.dev.crm); requests are HMAC-signed\n"
            f'url = "{reference.url}"\nsecret_file = "secrets/crm-secret"\n'
        )
    return reference


def _event_line(group: str, direction: str, subject: str, mailboxes: Iterable[str]) -> str:
    """A timeline event as the demo shows it, recorded in the built-in store or the CRM."""
    return f"  {group:34} {direction:8} {subject!r} via {', '.join(mailboxes)}"


def _show_crm_events(reference: DevCrm, out: TextIO) -> None:
    names = {f"grp-{n}": name for n, name in enumerate(GROUPS, start=1)}
    print("\nTimeline events as the CRM received them (devcrm.db):", file=out)
    for event in reference.events():
        group = names.get(event["group_id"], event["group_id"])
        mailboxes = [v["mailbox"] for v in event["via"]]
        print(_event_line(group, event["direction"], event["subject"], mailboxes), file=out)
    print(
        f"  ({reference.calls['/timeline-events']} delivery and "
        f"{reference.calls['/groups:lookup']} lookup requests, all signed)",
        file=out,
    )


DEMO_TIMEOUT_SECONDS = 30.0


@contextlib.contextmanager
def demo_session(settings: Settings, address: str) -> Iterator[ImapSession]:
    """A logged-in session to a demo mailbox, its folder tree resolved; logged out at the end."""
    with session_for(settings, address, timeout_seconds=10) as session:
        session.resolve_tree()
        yield session


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    """True once ``condition()`` holds (a ControlError: not yet, the daemon is starting); False
    after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ControlError):
            if condition():
                return True
        time.sleep(0.1)
    return False


def _queues_empty(client: ControlClient) -> bool:
    statuses = client.mailboxes()
    return bool(statuses) and all(
        s["state"] == "idle" and s["queue"] == 0 and s["filed"] for s in statuses
    )


def _filed_count(client: ControlClient) -> int:
    return sum(sum(s["filed"].values()) for s in client.mailboxes())


def _show_folders(session: ImapSession, out: TextIO) -> None:
    tree = session.tree
    if tree is None:
        return
    for role in FolderRole:
        name = tree.name(role)
        info = session.client.select_folder(name, readonly=True)
        count = int(info.get(b"EXISTS", 0))
        subjects: list[str] = []
        uids = session.client.search(["ALL"]) if count else []
        if uids:
            fetched = session.client.fetch(uids, ["ENVELOPE", "FLAGS"])
            for data in fetched.values():
                envelope = data[b"ENVELOPE"]
                subject = (
                    envelope.subject.decode("utf-8", "replace") if envelope.subject else "(none)"
                )
                keywords = [f.decode() for f in data[b"FLAGS"] if f.startswith(b"$")]
                subjects.append(subject + (f" [{' '.join(keywords)}]" if keywords else ""))
        print(f"  {name:28} {count} message(s) {'; '.join(subjects)}", file=out)
