"""`emailsync doctor` against real Dovecots: a healthy server, missing folders, no IDLE, TLS,
refused logins and connections with their fix, and a scratch folder that never stays behind."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from emailsync.dev.dovecot import Dovecot, DovecotOptions
from emailsync.dev.net import free_port

from .daemonproc import run_cli, wait_until
from .faultproxy import FaultProxy
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
    assert "slowest of 3 probes" in idle["detail"]  # a fast first notice is not the verdict
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


def with_security(config: Path, security: str) -> Path:
    """The config with the branch's ``security`` changed (write_config writes "none")."""
    text = config.read_text(encoding="utf-8")
    config.write_text(text.replace('security = "none"', f'security = "{security}"'))
    return config


def test_a_refused_login_has_a_fix_naming_the_password_file_and_the_lockout_risk(
    user: MailUser, tmp_path: Path
) -> None:
    config = write_config(tmp_path, [user])
    (tmp_path / "secrets" / user.address).write_text("wrong-password\n")

    code, found = doctor(config, user.address)

    assert code == 1
    fix = found["login"]["fix"]
    assert fix, found["login"]
    assert str(tmp_path / "secrets" / user.address) in fix
    assert user.address in fix
    assert "lock" in fix
    assert "wrong-password" not in json.dumps(found)


def test_a_closed_port_has_a_fix_naming_host_and_port(user: MailUser, tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, [user], ports={user.server.port: port})

    code, found = doctor(config, user.address)

    assert code == 1
    assert list(found) == ["login"]
    fix = found["login"]["fix"]
    assert fix, found["login"]
    assert f"127.0.0.1:{port}" in fix
    assert "nothing listens" in fix
    # The human-readable report carries the same fix on its own line.
    text = run_cli(config, "doctor", user.address).stdout
    assert f"fix: nothing listens on 127.0.0.1:{port}" in text


def test_ssl_against_a_plain_text_port_suggests_starttls_or_none(
    user: MailUser, tmp_path: Path
) -> None:
    config = with_security(write_config(tmp_path, [user]), "ssl")

    code, found = doctor(config, user.address)

    assert code == 1
    login = found["login"]
    assert login["status"] == "problem"
    assert "plain text" in login["fix"], login
    assert 'security = "starttls"' in login["fix"]
    assert '"none" with allow_insecure = true' in login["fix"]
    assert f"127.0.0.1:{user.server.port}" in login["fix"]


def test_plain_text_against_an_imaps_port_suggests_ssl(
    tls_dovecot: Dovecot,  # noqa: F811 -- the imported fixture
    tmp_path: Path,
) -> None:
    user = new_user(tls_dovecot)
    config = write_config(
        tmp_path,
        [user],
        extra="timeout_seconds = 2\n",
        ports={tls_dovecot.port: tls_dovecot.ssl_port},
    )

    code, found = doctor(config, user.address)

    assert code == 1
    assert 'security = "ssl"' in found["login"]["fix"], found["login"]


def scratch_folders(user: MailUser) -> list[str]:
    return sorted(name for name in folder_names(user) if "emailsync-doctor-" in name)


@pytest.mark.parametrize(("signum", "exit_code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stopped_doctor_removes_its_scratch_folder_before_it_exits(
    user: MailUser, tmp_path: Path, signum: signal.Signals, exit_code: int
) -> None:
    """SIGTERM or SIGINT while the probe is under way: the scratch folder goes, then doctor."""
    assert run_cli(write_config(tmp_path, [user]), "setup", user.address).returncode == 0
    with FaultProxy(user.server.port) as proxy:
        # The probe's APPEND never gets its answer: doctor waits, its scratch folder made.
        proxy.stall_on(r"\bAPPEND\b")
        config = write_config(
            tmp_path, [user], extra="timeout_seconds = 30\n", ports={user.server.port: proxy.port}
        )
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "emailsync.cli",
                "--config",
                str(config),
                "doctor",
                user.address,
                "--json",
                "--idle-timeout",
                "60",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_until(lambda: proxy.commands(r"\bAPPEND\b"), 20)
            assert len(scratch_folders(user)) == 1
            process.send_signal(signum)
            stdout, stderr = process.communicate(timeout=20)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()

    assert scratch_folders(user) == []
    assert process.returncode == exit_code, stderr
    found = {line["check"]: line for line in map(json.loads, stdout.splitlines())}
    stopped = found["interrupted"]
    assert stopped["status"] == "problem"
    assert "removed" in stopped["detail"]
    assert stopped["fix"]


def test_scratch_folders_left_by_earlier_runs_are_removed_and_reported(
    user: MailUser, tmp_path: Path
) -> None:
    config = write_config(tmp_path, [user])
    assert run_cli(config, "setup", user.address).returncode == 0
    old = datetime.now(UTC) - timedelta(hours=3)
    leftovers = [
        f"Rezi-Imported.emailsync-doctor-{old:%Y%m%dT%H%M%SZ}-beef",
        "emailsync-doctor-1a2b3c4d",  # an earlier version named them without a time
    ]
    recent = f"emailsync-doctor-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-cafe"  # a doctor running now?
    with user.client() as client:
        for name in [*leftovers, recent]:
            client.create_folder(name)
        client.append(leftovers[0], b"Subject: emailsync doctor probe\r\n\r\nprobe\r\n")

    code, found = doctor(config, user.address)

    assert code == 0, found
    assert scratch_folders(user) == [recent]
    line = found["leftovers"]
    assert line["status"] == "note"
    assert "removed 2 leftover scratch folders from earlier runs" in line["detail"]
    assert recent in line["detail"]  # named, and left alone
    assert line["fix"]
