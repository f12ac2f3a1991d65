"""The key check through the real CLI: an instance holding another registry key exits 78.

Two "instances" are two state directories (each its own registry.key) over one state
database: a throwaway PostgreSQL database, or one SQLite file named by both configs.
"""

from __future__ import annotations

import base64
import json
import secrets
import shutil
import sqlite3
from pathlib import Path
from urllib.parse import quote

import pytest

from emailsync.dev.dovecot import Dovecot
from emailsync.state import DEFAULT_DB_NAME
from emailsync.state.vault import KEY_FILE_NAME
from emailsync.web.handler import KEY_UNAVAILABLE

from .conftest import MailUser, new_user
from .daemonproc import DaemonFactory, RunningDaemon, daemon_config_extra, new_port, run_cli
from .mailenv import write_config
from .test_selfservice_api import call

EXIT_CONFIG = 78
MISMATCH = "does not match the one this state database was set up with"


def instance(tmp_path: Path, name: str, store: str) -> tuple[Path, int, str]:
    """A config of its own (state_dir tmp_path/NAME/state) on the shared ``store``."""
    workdir = tmp_path / name
    workdir.mkdir()
    port, token = new_port(), secrets.token_urlsafe(16)
    token_file = workdir / "control-token"
    token_file.write_text(token + "\n")
    extra = daemon_config_extra(port, token_file, store=store)
    return write_config(workdir, [], extra=extra), port, token


def key_material(state_dir: Path) -> list[str]:
    """The key file's keys, as base64 and as hex."""
    keys = json.loads((state_dir / KEY_FILE_NAME).read_text())["keys"].values()
    return [*keys, *(base64.b64decode(k).hex() for k in keys)]


def test_an_instance_with_another_key_refuses_to_run_and_check_config_says_why(
    tmp_path: Path, pg_url: str
) -> None:
    first, port, token = instance(tmp_path, "a", pg_url)
    daemon = RunningDaemon(first, port, token, tmp_path / "a")
    try:
        daemon.wait_ready()  # its start wrote the key check
    finally:
        assert daemon.stop() == 0, daemon.log()

    second, _, _ = instance(tmp_path, "b", pg_url)
    result = run_cli(second, "run", timeout=30)
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert MISMATCH in result.stderr
    assert str(tmp_path / "b" / "state" / KEY_FILE_NAME) in result.stderr
    for leaked in key_material(tmp_path / "a" / "state") + key_material(tmp_path / "b" / "state"):
        assert leaked not in result.stderr + result.stdout

    checked = run_cli(second, "check-config")
    assert checked.returncode == EXIT_CONFIG, checked.stderr
    assert MISMATCH in checked.stderr

    # The operator copies the key from the instance that works: both commands accept it.
    shutil.copy(tmp_path / "a" / "state" / KEY_FILE_NAME, tmp_path / "b" / "state")
    checked = run_cli(second, "check-config")
    assert checked.returncode == 0, checked.stderr
    assert run_cli(first, "check-config").returncode == 0


def test_keys_rotate_on_one_instance_refuses_the_others_until_they_get_the_new_key(
    tmp_path: Path,
) -> None:
    shared = f"sqlite:///{tmp_path / 'shared.db'}"
    first, _, _ = instance(tmp_path, "a", shared)
    second, _, _ = instance(tmp_path, "b", shared)
    # Instance a sets the database up (a first rotation makes its key and the check); b is
    # given a's key.
    assert run_cli(first, "keys", "rotate").returncode == 0
    (tmp_path / "b" / "state").mkdir()
    shutil.copy(tmp_path / "a" / "state" / KEY_FILE_NAME, tmp_path / "b" / "state")
    assert run_cli(second, "check-config").returncode == 0

    rotated = run_cli(first, "keys", "rotate")
    assert rotated.returncode == 0, rotated.stderr
    assert "generation 3" in rotated.stdout

    assert run_cli(first, "check-config").returncode == 0
    refused = run_cli(second, "check-config")
    assert refused.returncode == EXIT_CONFIG, refused.stderr
    assert MISMATCH in refused.stderr
    assert "(generation 3)" in refused.stderr

    # A rotation on b, holding the old key, would strand the cluster's secrets: refused.
    again = run_cli(second, "keys", "rotate")
    assert again.returncode == EXIT_CONFIG, again.stderr
    assert MISMATCH in again.stderr

    shutil.copy(tmp_path / "a" / "state" / KEY_FILE_NAME, tmp_path / "b" / "state")
    assert run_cli(second, "check-config").returncode == 0


@pytest.mark.dovecot
def test_a_running_instance_whose_key_was_rotated_elsewhere_stores_no_password(
    user: MailUser, dovecot: Dovecot, daemons: DaemonFactory, tmp_path: Path
) -> None:
    """Instance a runs; b (same database, a's key) rotates the key. a's set-ups answer 500
    "tell IT" and store nothing; a restarted a exits 78 until it gets the rotated key."""
    daemon = daemons.start([user])
    state_a = tmp_path / "state"
    shared = f"sqlite:///{state_a / DEFAULT_DB_NAME}"
    second, _, _ = instance(tmp_path, "b", shared)
    (tmp_path / "b" / "state").mkdir()
    shutil.copy(state_a / KEY_FILE_NAME, tmp_path / "b" / "state")
    agent = new_user(dovecot)
    body = {"host": dovecot.host, "port": dovecot.port, "security": "none"}
    assert call(daemon, "PUT", "/v1/branches/main", body)[0] == 201

    rotated = run_cli(second, "keys", "rotate")
    assert rotated.returncode == 0, rotated.stderr

    setup = {"branch": "main", "username": agent.address, "password": agent.password}
    status, answer = call(daemon, "PUT", f"/v1/mailboxes/{quote(agent.address)}", setup)
    assert status == 500, answer
    assert answer["error"] == KEY_UNAVAILABLE  # "Please tell IT"
    assert agent.password not in daemon.log()
    assert "registry_key_mismatch" in daemon.log()
    assert MISMATCH in daemon.log()
    with sqlite3.connect(state_a / DEFAULT_DB_NAME) as conn:
        rows = conn.execute("SELECT count(*) FROM registered_mailboxes").fetchone()[0]
    assert rows == 0

    assert daemon.stop() == 0
    refused = daemons.start([user], ready=False)
    refused.expected_exit = EXIT_CONFIG
    assert refused.process.wait(timeout=30) == EXIT_CONFIG
    assert MISMATCH in refused.log()

    shutil.copy(tmp_path / "b" / "state" / KEY_FILE_NAME, state_a)  # the rotated key
    again = daemons.start([user])
    status, answer = call(again, "PUT", f"/v1/mailboxes/{quote(agent.address)}", setup)
    assert status == 200, answer
