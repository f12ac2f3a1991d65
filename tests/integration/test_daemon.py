"""``emailsync run`` as a real subprocess against real Dovecot: IDLE filing, Start Sync,
reconnects, reload, shutdown, control API, metrics and sd_notify."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import pytest

from emailsync import cli
from emailsync.dev.dovecot import Dovecot

from .conftest import MailUser, new_user, write_config
from .daemonproc import (
    DaemonFactory,
    RunningDaemon,
    daemon_config_extra,
    new_port,
    run_cli,
    wait_until,
)
from .mailenv import session_log
from .test_filing import build_message, folder_subjects, queue

pytestmark = pytest.mark.dovecot


def wait_filed(user: MailUser, folder: str, subject: str, timeout: float = 10.0) -> None:
    wait_until(lambda: subject in folder_subjects(user, folder), timeout)


def test_appended_message_is_filed_by_idle_without_polling(
    user: MailUser, daemons: DaemonFactory
) -> None:
    daemon = daemons.start([user], groups={"Smith": ["john@clients.example"]})
    wait_until(
        lambda: daemon.metric("emailsync_mailbox_state", mailbox=user.address, state="idle") == 1
    )
    started = time.monotonic()
    queue(user, build_message("john@clients.example", user.address, "live"))
    wait_filed(user, "Received", "live", timeout=10)
    assert time.monotonic() - started < 10  # sweep and poll are an hour away: IDLE did it
    # A pass is counted when it ends, a moment after its MOVE is visible to another client.
    wait_until(
        lambda: (
            daemon.metric("emailsync_sync_passes_total", mailbox=user.address, trigger="idle") >= 1
        )
    )
    assert daemon.metric("emailsync_sync_passes_total", mailbox=user.address, trigger="sweep") == 0
    assert daemon.metric("emailsync_messages_received_total", mailbox=user.address) == 1
    assert daemon.metric("emailsync_timeline_events_total", mailbox=user.address) == 1
    assert daemon.metric("emailsync_filing_latency_seconds_count") == 1


def test_startup_pass_files_mail_queued_before_start(
    user: MailUser, daemons: DaemonFactory, tmp_path: Path
) -> None:
    write_config(tmp_path, [user])
    cli.main(["--config", str(tmp_path / "emailsync.toml"), "setup", user.address])
    queue(user, build_message(user.address, "john@clients.example", "early out"))
    queue(user, build_message("stranger@else.example", user.address, "early unlinked"))
    daemon = daemons.start([user], groups={"Smith": ["john@clients.example"]})
    wait_filed(user, "Sent", "early out")
    wait_filed(user, "Failed", "early unlinked")
    wait_until(
        lambda: (
            daemon.metric("emailsync_sync_passes_total", mailbox=user.address, trigger="startup")
            == 1
        )
    )
    assert daemon.metric("emailsync_messages_synced_total", mailbox=user.address) == 1
    assert (
        daemon.metric("emailsync_messages_failed_total", mailbox=user.address, reason="no_group")
        == 1
    )
    assert (
        daemon.metric("emailsync_sync_passes_total", mailbox=user.address, trigger="startup") == 1
    )


def test_worker_reconnects_after_kick_and_files_mail_queued_meanwhile(
    user: MailUser, daemons: DaemonFactory
) -> None:
    daemon = daemons.start(
        [user], groups={"Smith": ["john@clients.example"]}, max_backoff_seconds=2
    )
    wait_until(
        lambda: daemon.metric("emailsync_mailbox_state", mailbox=user.address, state="idle") == 1
    )
    user.server.kick(user.address)
    queue(user, build_message("john@clients.example", user.address, "after kick"))
    wait_filed(user, "Received", "after kick", timeout=15)
    assert daemon.metric("emailsync_connection_errors_total", mailbox=user.address, kind="bye") >= 1


def test_worker_reconnects_after_the_server_restarts(
    tmp_path: Path, daemons: DaemonFactory
) -> None:
    server = Dovecot()
    server.start()
    try:
        user = new_user(server)
        daemon = daemons.start(
            [user], groups={"Smith": ["john@clients.example"]}, max_backoff_seconds=2
        )
        wait_until(
            lambda: (
                daemon.metric("emailsync_mailbox_state", mailbox=user.address, state="idle") == 1
            )
        )
        server.stop()
        wait_until(
            lambda: (
                daemon.metric("emailsync_mailbox_state", mailbox=user.address, state="idle") == 0
            )
        )
        server.restart()
        queue(user, build_message("john@clients.example", user.address, "after restart"))
        wait_filed(user, "Received", "after restart", timeout=20)
        assert daemon.process.poll() is None
    finally:
        server.close()


def test_manual_mailbox_files_only_on_start_sync(user: MailUser, daemons: DaemonFactory) -> None:
    daemon = daemons.start(
        [user], mailbox_extra='trigger = "manual"', groups={"Smith": ["john@clients.example"]}
    )
    wait_until(
        lambda: daemon.metric("emailsync_mailbox_state", mailbox=user.address, state="idle") == 1
    )
    queue(user, build_message("john@clients.example", user.address, "waits for api"))
    wait_until(lambda: daemon.metric("emailsync_queue_messages", mailbox=user.address) == 1)
    # IDLE announced it and the worker decided: a manual mailbox leaves it for Start Sync.
    wait_until(lambda: '"pass_waits_for_start_sync"' in daemon.log())
    assert folder_subjects(user, "Queue") == {"waits for api": set()}
    status, _ = daemon.post(f"/v1/mailboxes/{user.address}/sync")
    assert status == 202
    wait_filed(user, "Received", "waits for api")

    queue(user, build_message("john@clients.example", user.address, "waits for cli"))
    result = run_cli(daemon.config, "start-sync", user.address)
    assert result.returncode == 0, result.stderr
    wait_filed(user, "Received", "waits for cli")

    queue(user, build_message("john@clients.example", user.address, "waits for signal"))
    daemon.signal(signal.SIGUSR1)
    wait_filed(user, "Received", "waits for signal")
    assert (
        daemon.metric("emailsync_sync_passes_total", mailbox=user.address, trigger="start_sync")
        == 3
    )
    assert daemon.metric("emailsync_sync_passes_total", mailbox=user.address, trigger="idle") == 0


def test_control_api_refuses_missing_or_wrong_token(user: MailUser, daemons: DaemonFactory) -> None:
    daemon = daemons.start([user])
    assert daemon.get("/v1/mailboxes", token=None)[0] == 401
    assert daemon.get("/v1/mailboxes", token="wrong")[0] == 401
    assert daemon.post("/v1/sync", token="wrong")[0] == 401
    assert daemon.post(f"/v1/mailboxes/{user.address}/stop", token=None)[0] == 401
    assert daemon.get("/v1/mailboxes")[0] == 200
    assert daemon.get("/metrics", token=None)[0] == 200
    assert daemon.get("/healthz", token=None)[0] == 200
    assert daemon.post("/v1/mailboxes/nobody@nowhere.example/sync")[0] == 404
    assert daemon.token not in daemon.log()


def test_status_command_shows_each_mailbox(user: MailUser, daemons: DaemonFactory) -> None:
    daemon = daemons.start([user])
    wait_until(lambda: daemon.mailboxes()[user.address]["state"] == "idle")
    result = run_cli(daemon.config, "status", "--json")
    assert result.returncode == 0, result.stderr
    assert f'"address": "{user.address}"' in result.stdout
    assert '"state": "idle"' in result.stdout
    assert user.password not in result.stdout


def test_sighup_adds_a_mailbox_and_leaves_the_others_connection_alone(
    dovecot: Dovecot, daemons: DaemonFactory, tmp_path: Path
) -> None:
    first, second = new_user(dovecot), new_user(dovecot)
    daemon = daemons.start([first], groups={"Smith": ["john@clients.example"]})
    wait_until(
        lambda: daemon.metric("emailsync_mailbox_state", mailbox=first.address, state="idle") == 1
    )
    pids_before = imap_pids(dovecot, first.address)
    assert len(pids_before) == 1
    text = daemon.config.read_text()
    write_config(tmp_path, [first, second], extra="")  # writes the second's password file
    added = (
        f'address = "{second.address}"\nbranch = "b0"\npassword_file = "secrets/{second.address}"'
    )
    daemon.config.write_text(f"{text}\n[[mailboxes]]\n{added}\n")
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: daemon.notify.seen("RELOADING=1"))
    wait_until(
        lambda: daemon.metric("emailsync_mailbox_state", mailbox=second.address, state="idle") == 1
    )
    assert imap_pids(dovecot, first.address) == pids_before
    queue(second, build_message("john@clients.example", second.address, "second mailbox"))
    wait_filed(second, "Received", "second mailbox")


def imap_pids(server: Dovecot, address: str) -> set[str]:
    """Dovecot's imap process ids serving a user (one connection each, here)."""
    out = server.doveadm("who", "-1", address, check=False).stdout
    return {line.split()[-2] for line in out.splitlines()[1:] if line.strip()}


def test_sigterm_stops_cleanly_with_logout_and_sd_notify(
    user: MailUser, daemons: DaemonFactory
) -> None:
    daemon = daemons.start([user])
    wait_until(
        lambda: daemon.metric("emailsync_mailbox_state", mailbox=user.address, state="idle") == 1
    )
    (pid,) = imap_pids(user.server, user.address)  # the daemon's one IMAP session
    assert daemon.notify.seen("READY=1")
    wait_until(lambda: daemon.notify.seen("WATCHDOG=1"), 5)
    assert daemon.notify.seen("STATUS=")
    started = time.monotonic()
    code = daemon.stop()
    assert code == 0
    assert time.monotonic() - started < 10
    assert daemon.notify.seen("STOPPING=1")
    # Dovecot's log is shared by the whole test session: only this user's session counts.
    wait_until(
        lambda: any(
            "Disconnected: Logged out" in line
            for line in session_log(user.server, user.address, pid)
        ),
        5,
    )


def sweeps(daemon: RunningDaemon, user: MailUser) -> float:
    """Sweep passes a mailbox has run: the positive signal that the daemon was looking."""
    return daemon.metric("emailsync_sync_passes_total", mailbox=user.address, trigger="sweep") or 0


def test_stop_then_setup_restarts_the_mailbox(
    user: MailUser, dovecot: Dovecot, daemons: DaemonFactory
) -> None:
    witness = new_user(dovecot)  # a running mailbox whose sweeps show the daemon is at work
    daemon = daemons.start(
        [user, witness], sweep_seconds=0.3, groups={"Smith": ["john@clients.example"]}
    )
    wait_until(lambda: daemon.mailboxes()[user.address]["state"] == "idle")
    result = run_cli(daemon.config, "stop", user.address)
    assert result.returncode == 0, result.stderr
    wait_until(lambda: daemon.mailboxes()[user.address]["state"] == "stopped")
    assert daemon.metric("emailsync_mailbox_state", mailbox=user.address, state="stopped") == 1
    queue(user, build_message("john@clients.example", user.address, "while stopped"))
    swept = sweeps(daemon, witness)
    wait_until(lambda: sweeps(daemon, witness) >= swept + 2)  # sweeps ran ...
    assert "while stopped" in folder_subjects(user, "Queue")  # ... and none touched it
    result = run_cli(daemon.config, "setup", user.address)
    assert result.returncode == 0, result.stderr
    wait_filed(user, "Received", "while stopped")


def test_refused_login_puts_the_mailbox_in_needs_reauth(
    user: MailUser, daemons: DaemonFactory, tmp_path: Path
) -> None:
    witness = new_user(user.server)  # a healthy mailbox whose sweeps show the daemon at work
    daemon = daemons.start(
        [user, witness], sweep_seconds=0.5, groups={"Smith": ["john@clients.example"]}
    )
    password_file = tmp_path / "secrets" / user.address
    password_file.write_text("wrong-password\n")
    user.server.kick(user.address)
    wait_until(
        lambda: (
            daemon.metric("emailsync_mailbox_state", mailbox=user.address, state="needs_reauth")
            == 1
        )
    )
    assert daemon.metric("emailsync_auth_failures_total", mailbox=user.address) == 1
    swept = sweeps(daemon, witness)
    wait_until(lambda: sweeps(daemon, witness) >= swept + 3)  # sweeps go by ...
    # ... and none of them retried the login: no hammering.
    assert daemon.metric("emailsync_auth_failures_total", mailbox=user.address) == 1
    assert "wrong-password" not in daemon.log()
    assert daemon.get("/readyz", token=None)[0] == 200
    # The operator fixes the password and presses Start Sync: back without a restart.
    password_file.write_text(user.password + "\n")
    queue(user, build_message("john@clients.example", user.address, "after the fix"))
    assert run_cli(daemon.config, "start-sync", user.address).returncode == 0
    wait_filed(user, "Received", "after the fix")
    assert daemon.metric("emailsync_mailbox_state", mailbox=user.address, state="needs_reauth") == 0


def test_a_taken_listen_port_exits_69_with_a_clear_message(user: MailUser, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        token_file = tmp_path / "control-token"
        token_file.write_text("t0ken-for-the-taken-port-test\n")
        config = write_config(tmp_path, [user], extra=daemon_config_extra(port, token_file))
        result = run_cli(config, "run")
    assert result.returncode == 69
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_sighup_restarts_a_changed_mailbox_stops_a_removed_one_and_survives_a_bad_config(
    dovecot: Dovecot, daemons: DaemonFactory, tmp_path: Path
) -> None:
    kept, changed, removed = new_user(dovecot), new_user(dovecot), new_user(dovecot)
    daemon = daemons.start([kept, changed, removed])
    for u in (kept, changed, removed):
        wait_until(
            lambda u=u: (
                daemon.metric("emailsync_mailbox_state", mailbox=u.address, state="idle") == 1
            )
        )
    kept_pids, changed_pids = imap_pids(dovecot, kept.address), imap_pids(dovecot, changed.address)
    original = daemon.config.read_text()

    daemon.config.write_text(original + "\n[daemon\n")  # broken TOML
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: "reload_failed" in daemon.log())
    assert daemon.process.poll() is None
    assert imap_pids(dovecot, kept.address) == kept_pids

    section = f'address = "{changed.address}"'
    marked = original.replace(section, section + '\ntrigger = "manual"')
    cut = marked.index(f'[[mailboxes]]\naddress = "{removed.address}"')
    daemon.config.write_text(marked[:cut])
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: imap_pids(dovecot, removed.address) == set())
    wait_until(lambda: daemon.mailboxes().get(changed.address, {}).get("trigger") == "manual")
    wait_until(lambda: len(imap_pids(dovecot, changed.address)) == 1)
    assert imap_pids(dovecot, changed.address) != changed_pids
    assert imap_pids(dovecot, kept.address) == kept_pids
    assert removed.address not in daemon.mailboxes()
    # Its series go once the main loop has reaped the ended worker (a tick after LOGOUT).
    wait_until(
        lambda: (
            daemon.metric("emailsync_mailbox_state", mailbox=removed.address, state="stopped")
            is None
        )
    )
    assert daemon.metric("emailsync_mailbox_state", mailbox=removed.address, state="idle") is None


def test_one_unreadable_password_does_not_stop_the_other_mailboxes(
    dovecot: Dovecot, tmp_path: Path
) -> None:
    good, broken = new_user(dovecot), new_user(dovecot)
    port, token_file = new_port(), tmp_path / "control-token"
    token_file.write_text("t0ken-for-this-test-0123456789\n")
    config = write_config(tmp_path, [good, broken], extra=daemon_config_extra(port, token_file))
    (tmp_path / "secrets" / broken.address).unlink()  # missing from the start
    assert run_cli(config, "groups", "add", "Smith", "john@clients.example").returncode == 0
    daemon = RunningDaemon(config, port, "t0ken-for-this-test-0123456789", tmp_path)
    try:
        daemon.wait_ready()
        assert "mailbox_secret_unreadable" in daemon.log()
        wait_until(
            lambda: (
                daemon.metric(
                    "emailsync_mailbox_state", mailbox=broken.address, state="needs_reauth"
                )
                == 1
            )
        )
        queue(good, build_message("john@clients.example", good.address, "still flowing"))
        wait_filed(good, "Received", "still flowing")
    finally:
        assert daemon.stop() == 0


def test_an_unreadable_control_token_stops_the_daemon_with_exit_78(
    user: MailUser, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-token"
    config = write_config(tmp_path, [user], extra=daemon_config_extra(1, missing))
    result = run_cli(config, "run")
    assert result.returncode == 78
    assert "daemon.control_token_file" in result.stderr
    assert str(missing) in result.stderr
