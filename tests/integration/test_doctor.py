"""`emailsync doctor` against real Dovecots: a healthy server, missing folders, no IDLE, TLS."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from emailsync.devserver import Dovecot, DovecotOptions

from .daemonproc import run_cli
from .mailenv import MailUser, new_user, write_config
from .test_tls import ca, ca_file, tls_config, tls_dovecot  # noqa: F401 -- fixtures by name

pytestmark = pytest.mark.dovecot


def doctor(config: Path, address: str, *args: str) -> tuple[int, dict[str, dict[str, Any]]]:
    """Run doctor --json; returns its exit code and the findings by check name."""
    result = run_cli(config, "doctor", address, "--json", "--idle-timeout", "10", *args)
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert lines, result.stderr
    return result.returncode, {line["check"]: line for line in lines}


def folder_names(user: MailUser) -> set[str]:
    client = user.client()
    try:
        return {name for _, _, name in client.list_folders()}
    finally:
        client.logout()


@pytest.fixture(scope="module")
def dovecot_noidle() -> Iterator[Dovecot]:
    server = Dovecot(None, DovecotOptions(without_capabilities=("IDLE",)))
    server.start()
    yield server
    server.close()


def test_healthy_dovecot_is_all_ok_and_the_probe_is_removed(user: MailUser, tmp_path: Path) -> None:
    config = write_config(tmp_path, [user])
    assert run_cli(config, "setup", user.address).returncode == 0
    before = folder_names(user)

    code, found = doctor(config, user.address)

    assert code == 0, found
    for check in ("login", "IDLE", "MOVE", "UIDPLUS", "NAMESPACE", "keywords", "folders"):
        assert found[check]["status"] == "ok", found[check]
    assert "Dovecot" in found["login"]["detail"]
    # Plain IMAP on loopback is worth a note, not a failure.
    assert found["tls"]["status"] == "note"
    # The probe really was announced over IDLE, quickly (Dovecot: inotify, well under 5 s).
    idle = found["idle delay"]
    assert idle["status"] == "ok", idle
    seconds = float(idle["detail"].split("after ")[1].split(" s")[0])
    assert 0 <= seconds < 5
    # The scratch folder and its probe message are gone; the tree is untouched.
    assert folder_names(user) == before


def test_missing_folders_are_a_problem_with_the_fix_and_nothing_is_created(
    user: MailUser, tmp_path: Path
) -> None:
    config = write_config(tmp_path, [user])
    before = folder_names(user)

    code, found = doctor(config, user.address)

    assert code == 1
    assert found["folders"]["status"] == "problem"
    assert "Rezi-Imported.Queue" in found["folders"]["detail"]
    assert found["folders"]["fix"] == f"emailsync setup {user.address}"
    # The IDLE probe still ran (in a top-level scratch folder) and left nothing behind.
    assert found["idle delay"]["status"] == "ok", found["idle delay"]
    assert folder_names(user) == before


def test_a_server_without_idle_is_a_problem(dovecot_noidle: Dovecot, tmp_path: Path) -> None:
    user = new_user(dovecot_noidle)
    config = write_config(tmp_path, [user])
    assert run_cli(config, "setup", user.address).returncode == 0

    code, found = doctor(config, user.address)

    assert code == 1
    assert found["IDLE"]["status"] == "problem"
    assert found["idle delay"]["status"] == "note"
    assert found["folders"]["status"] == "ok"  # the other checks still ran


def test_a_refused_login_is_one_problem_line(user: MailUser, tmp_path: Path) -> None:
    config = write_config(tmp_path, [user])
    (tmp_path / "secrets" / user.address).write_text("wrong-password\n")

    code, found = doctor(config, user.address)

    assert code == 1
    assert list(found) == ["login"]
    assert found["login"]["status"] == "problem"
    assert "wrong-password" not in json.dumps(found)


def test_tls_line_names_version_subject_and_expiry(
    tls_dovecot: Dovecot,  # noqa: F811 -- the imported fixture
    tmp_path: Path,
    ca_file: Path,  # noqa: F811 -- the imported fixture
) -> None:
    user = new_user(tls_dovecot)
    config = tls_config(tmp_path, user, port=tls_dovecot.ssl_port, security="ssl", ca_file=ca_file)

    code, found = doctor(config, user.address)

    tls = found["tls"]
    assert tls["status"] == "ok", tls
    assert tls["detail"].startswith("ssl TLSv1.")
    assert "expires" in tls["detail"]
    assert code == 1  # only because the tree was never set up
    assert [c for c, f in found.items() if f["status"] == "problem"] == ["folders"]
