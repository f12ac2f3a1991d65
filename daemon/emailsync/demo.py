"""The demo: a throwaway Dovecot, two seeded mailboxes, groups and queued mail, then the filer."""

from __future__ import annotations

import secrets
import shutil
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import TextIO

from emailsync.config import load_settings
from emailsync.devserver import Dovecot
from emailsync.filing import Filer
from emailsync.imap.auth import make_authenticator
from emailsync.imap.session import ImapSession
from emailsync.logs import configure_logging
from emailsync.model import FolderRole
from emailsync.store import open_store

AGENTS = ("agent1@example.com", "agent2@example.com")
GROUPS = {
    "Smith — 12 Acacia Avenue": ["john.smith@clients.example"],
    "Jones — 4 Privet Drive": ["mary.jones@clients.example", "tom.jones@clients.example"],
    "Okafor — 7 Mill Lane (landlord)": ["ada.okafor@landlords.example", "lettings@example.com"],
}


def demo_messages(agent: str) -> list[bytes]:
    """The mail an agent has dragged into Queue: linked both ways, unlinked, and broken."""
    now = datetime.now(UTC)

    def message(frm: str, to: str, subject: str, body: str, cc: str = "") -> bytes:
        msg = EmailMessage()
        msg["From"] = frm
        msg["To"] = to
        if cc:
            msg["Cc"] = cc
        msg["Subject"] = subject
        msg["Date"] = format_datetime(now)
        msg["Message-ID"] = make_msgid(domain="demo.example")
        msg.set_content(body)
        return msg.as_bytes()

    return [
        message(
            agent,
            "John Smith <john.smith@clients.example>",
            "Viewing on Saturday",
            "Hi John, confirming the viewing at 10am.",
        ),
        message(
            "Mary Jones <mary.jones@clients.example>",
            agent,
            "Re: offer on 4 Privet Drive",
            "We'd like to offer the asking price.",
            cc="tom.jones@clients.example",
        ),
        message(
            agent,
            "ada.okafor@landlords.example",
            "Tenancy renewal",
            "The tenants want to renew for a year.",
        ),
        message(
            "newsletter@portal.example",
            agent,
            "This week's market report",
            "Nobody linked this sender to a group, so it goes to Failed.",
        ),
        b"\x00\x01 this is not an email at all \xff\xfe",
    ]


def write_config(base: Path, server: Dovecot, passwords: dict[str, str]) -> Path:
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
listen = "127.0.0.1:9387"
control_token_file = "secrets/control-token"
log_format = "console"
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


def run_demo(base: Path, *, once: bool, out: TextIO) -> int:
    """Start everything, file the seeded mail, show the result; then keep running if asked."""
    base = base.resolve()
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    server = Dovecot()
    server.start()
    try:
        passwords = {agent: secrets.token_urlsafe(12) for agent in AGENTS}
        for agent, password in passwords.items():
            server.add_user(agent, password)
        config = write_config(base, server, passwords)
        settings = load_settings(config)
        configure_logging("console", "warning")
        store = open_store(settings.store_url, settings.daemon.state_dir)
        for name, addresses in GROUPS.items():
            store.add_group(name, addresses)
        print(f"Dovecot on {server.host}:{server.port}; config {config}", file=out)
        for mailbox in settings.mailboxes:
            session = ImapSession.open(
                mailbox, settings.folders, make_authenticator(mailbox, settings), timeout_seconds=10
            )
            session.ensure_folders()
            for raw in demo_messages(mailbox.address):
                session.client.append(session.tree.queue if session.tree else "", raw)
            print(
                f"{mailbox.address}: queued {len(demo_messages(mailbox.address))} messages",
                file=out,
            )
            result = Filer(mailbox, store).run_pass(session)
            print(
                f"{mailbox.address}: filed {len(result.decisions)} messages, "
                f"{result.new_events} new timeline events",
                file=out,
            )
            _show_folders(session, out)
            session.logout()
        print("\nTimeline (emailsync timeline):", file=out)
        for event in store.list_events():
            print(
                f"  {event.group:34} {event.direction.value:8} {event.subject!r} "
                f"via {', '.join(event.mailboxes)}",
                file=out,
            )
        store.close()
        del once
        return 0
    finally:
        server.close()


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
