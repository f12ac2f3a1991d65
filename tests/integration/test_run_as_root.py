"""Commands run as root act as the state directory's owner (the service's user), issue 18.

Before: `token issue`, `groups add`, `setup` run as root created `registry.key` and
`emailsync.db` owned by root, 0600, in the service's state directory; the daemon could then
not check agent links and told agents their link had "expired". Here the service's user is
`nobody` (every Debian system has it), and its state directory lies outside pytest's 0700
temporary tree so that it can reach it.
"""

from __future__ import annotations

import http.client
import os
import pwd
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .daemonproc import DaemonFactory, run_cli
from .mailenv import MailUser, write_config

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")

SERVICE_USER = "nobody"


@pytest.fixture
def service_state() -> Iterator[Path]:
    """A state directory owned by the service's user, 0700, as tmpfiles makes it."""
    entry = pwd.getpwnam(SERVICE_USER)
    top = Path(tempfile.mkdtemp(prefix="emailsync-state-", dir="/tmp"))
    top.chmod(0o755)
    state = top / "state"
    state.mkdir(mode=0o700)
    os.chown(state, entry.pw_uid, entry.pw_gid)
    yield state
    shutil.rmtree(top)


def config_with_state(tmp_path: Path, user: MailUser, state: Path) -> Path:
    """A config for one mailbox whose state_dir is ``state``."""
    config = write_config(tmp_path, [user])
    text = config.read_text().replace(
        f'state_dir = "{tmp_path / "state"}"', f'state_dir = "{state}"'
    )
    config.write_text(text)
    return config


def service_user_can_use(state: Path) -> bool:
    """True when the service's user can read the key and query and write the store.

    Checked in a forked child that becomes that user (this interpreter may live where that
    user cannot run it, e.g. under /root).
    """
    entry = pwd.getpwnam(SERVICE_USER)
    pid = os.fork()
    if pid == 0:  # the child: become the service's user, try, report by exit status
        code = 1
        try:
            os.setgroups([])
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
            (state / "registry.key").read_bytes()
            with sqlite3.connect(state / "emailsync.db") as conn:
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
                conn.execute("CREATE TABLE IF NOT EXISTS probe (x)")
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def owners(state: Path) -> dict[str, str]:
    """Each file in the state directory → its owner's name."""
    return {p.name: pwd.getpwuid(p.stat().st_uid).pw_name for p in state.iterdir()}


def test_root_commands_leave_files_the_service_user_owns(
    user: MailUser, tmp_path: Path, service_state: Path
) -> None:
    """token issue and groups add as root create registry.key and the store as the owner."""
    config = config_with_state(tmp_path, user, service_state)
    issued = run_cli(config, "token", "issue", user.address)
    assert issued.returncode == 0, issued.stderr
    added = run_cli(config, "groups", "add", "Smiths", "buyer@example.org")
    assert added.returncode == 0, added.stderr
    made = owners(service_state)
    assert made["registry.key"] == SERVICE_USER
    assert made["emailsync.db"] == SERVICE_USER
    assert set(made.values()) == {SERVICE_USER}, made

    assert service_user_can_use(service_state)
    listed = run_cli(config, "groups", "list")
    assert listed.returncode == 0, listed.stderr
    assert "buyer@example.org" in listed.stdout


def test_a_store_left_by_root_names_its_owner_and_the_fix(
    user: MailUser, tmp_path: Path, service_state: Path
) -> None:
    """A root-owned store (an older version's) fails with who owns it and the chown to run."""
    config = config_with_state(tmp_path, user, service_state)
    database = service_state / "emailsync.db"
    database.touch(mode=0o600)  # root's, as a root-run command of an older version left it
    listed = run_cli(config, "groups", "list")  # as root: acts as the state's owner
    assert listed.returncode != 0
    assert f"chown {SERVICE_USER}: {database}" in listed.stderr, listed.stderr
    assert "//" not in listed.stderr.replace("://", "")


def test_check_config_as_root_checks_what_the_service_user_can_read(
    user: MailUser, tmp_path: Path, service_state: Path
) -> None:
    """A password file only root can read passes for root but not for the service: exit 78."""
    config = config_with_state(tmp_path, user, service_state)
    (tmp_path / "secrets" / user.address).chmod(0o600)
    # pytest's tmp tree is 0700 root: open the way to the files, as /etc/emailsync would be.
    for directory in (tmp_path, *tmp_path.parents):
        if directory == Path("/"):
            break
        directory.chmod(directory.stat().st_mode | 0o011)
    config.chmod(0o644)
    checked = run_cli(config, "check-config")
    assert checked.returncode == 78, checked.stdout + checked.stderr
    assert f"secrets/{user.address}" in checked.stderr
    assert "Permission denied" in checked.stderr
    assert f"checked as {SERVICE_USER}" in checked.stderr

    (tmp_path / "secrets" / user.address).chmod(0o644)
    config.chmod(0o600)  # only root can read the config itself
    checked = run_cli(config, "check-config")
    assert checked.returncode == 78, checked.stdout + checked.stderr
    assert f"{SERVICE_USER} (the service's user) cannot read the config" in checked.stderr

    config.chmod(0o644)
    checked = run_cli(config, "check-config")
    assert checked.returncode == 0, checked.stderr


def test_a_link_the_server_cannot_check_is_a_server_fault_not_expired(
    user: MailUser, daemons: DaemonFactory
) -> None:
    """With the registry key unreadable, /login?token=… answers 500 'tell IT', not 'expired'."""
    daemon = daemons.start([user])
    issued = run_cli(daemon.config, "token", "issue", user.address)
    assert issued.returncode == 0, issued.stderr
    token = next(word for word in issued.stdout.split() if word.startswith("es2."))
    key = daemon.workdir / "state" / "registry.key"
    key.write_text("{ not json")  # damaged: the daemon cannot check any link

    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
    try:
        conn.request("GET", f"/login?token={token}")
        response = conn.getresponse()
        page = response.read().decode()
    finally:
        conn.close()
    assert response.status == 500
    assert "tell IT" in page
    assert "expired" not in page.replace("has not expired", "")

    status, body = daemon.get("/v1/mailboxes", token=token)
    assert status == 500
    assert b"registry key" in body
    assert "agent_token_unchecked" in daemon.log()
