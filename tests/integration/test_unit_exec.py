"""Each shipped unit's own ExecStart starts the daemon; ExecReload reloads it; SIGTERM stops it.

No systemd runs here, so the test does what systemd would: it reads ``ExecStart=``,
``ExecReload=`` and ``Environment=`` from the unit file, substitutes only the program path (the
console script of this checkout) and the config directory, gives the process a
``NOTIFY_SOCKET`` and ``STATE_DIRECTORY``, and waits for ``READY=1``. A command line the CLI
rejects (issue 18: ``run --config …`` exited 2 and systemd restarted it for ever) fails here.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .daemonproc import NotifySocket, daemon_config_extra, new_port, wait_until
from .mailenv import MailUser, write_config

REPO = Path(__file__).resolve().parents[2]
UNITS = (REPO / "systemd" / "emailsync.service", REPO / "systemd" / "emailsync@.service")
UNIT_CONFIG_DIR = "/etc/emailsync/"
INSTANCE = "branch-a"


def unit_values(unit: Path, key: str) -> list[str]:
    """Every value of ``key=`` in the unit's [Service] section, in order."""
    values: list[str] = []
    section = ""
    for raw in unit.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif section == "Service" and line.startswith(f"{key}="):
            values.append(line.split("=", 1)[1])
    return values


def console_script() -> str:
    """The ``emailsync`` command installed beside this interpreter (the checkout's venv)."""
    script = Path(sys.executable).parent / "emailsync"
    if not script.exists():
        pytest.fail(f"no emailsync console script beside {sys.executable}; run `make setup`")
    return str(script)


def exec_start_argv(unit: Path, config_dir: Path) -> list[str]:
    """The unit's ExecStart as an argument list, with the program and config dir substituted."""
    (exec_start,) = unit_values(unit, "ExecStart")
    program, *args = shlex.split(exec_start.replace("%i", INSTANCE))
    assert program == "/usr/bin/emailsync", exec_start  # where the .deb puts the command
    return [console_script(), *(a.replace(UNIT_CONFIG_DIR, f"{config_dir}/") for a in args)]


def unit_environment(unit: Path) -> dict[str, str]:
    """The variables the unit's ``Environment=`` lines set."""
    env: dict[str, str] = {}
    for value in unit_values(unit, "Environment"):
        for item in shlex.split(value):
            name, _, text = item.partition("=")
            env[name] = text
    return env


@pytest.mark.parametrize("unit", UNITS, ids=lambda unit: unit.name)
def test_unit_exec_start_runs_the_daemon_reloads_and_stops(
    unit: Path, user: MailUser, tmp_path: Path
) -> None:
    """The unit's exact ExecStart reaches READY=1; ExecReload's signal reloads; SIGTERM exits 0."""
    port = new_port()
    token_file = tmp_path / "control-token"
    token_file.write_text("unit-test-token-" + os.urandom(8).hex() + "\n")
    written = write_config(tmp_path, [user], extra=daemon_config_extra(port, token_file))
    # The unit gives the state directory through $STATE_DIRECTORY (StateDirectory=), as
    # systemd does; the config leaves state_dir to that default.
    text = "\n".join(
        line for line in written.read_text().splitlines() if not line.startswith("state_dir")
    )
    config_name = "emailsync.toml" if "%i" not in unit_values(unit, "ExecStart")[0] else None
    (tmp_path / (config_name or f"{INSTANCE}.toml")).write_text(text, encoding="utf-8")
    state_dir = tmp_path / "unit-state"
    state_dir.mkdir(mode=0o700)

    notify = NotifySocket(tmp_path / "notify.sock")
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    env.update(unit_environment(unit))
    env.update(NOTIFY_SOCKET=str(notify.path), STATE_DIRECTORY=str(state_dir))
    argv = exec_start_argv(unit, tmp_path)
    log_path = tmp_path / "unit.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
    try:

        def log_text() -> str:
            return f"{argv}\n{log_path.read_text(errors='replace')}"

        try:
            wait_until(lambda: notify.seen("READY=1") or process.poll() is not None, 30)
        except AssertionError:
            raise AssertionError(f"no READY=1 within 30 s:\n{log_text()}") from None
        assert process.poll() is None, f"exited {process.returncode}:\n{log_text()}"
        assert (state_dir / "emailsync.db").exists(), "the store is not in $STATE_DIRECTORY"

        (reload_command,) = unit_values(unit, "ExecReload")
        reload_argv = shlex.split(reload_command.replace("$MAINPID", str(process.pid)))
        ready_before = sum("READY=1" in m for m in notify.messages)
        subprocess.run(reload_argv, check=True, timeout=10)
        wait_until(lambda: notify.seen("RELOADING=1"), 15)
        wait_until(lambda: sum("READY=1" in m for m in notify.messages) > ready_before, 15)
        assert process.poll() is None, log_text()

        started = time.monotonic()
        process.send_signal(signal.SIGTERM)  # systemd's default KillSignal=
        assert process.wait(15) == 0, log_text()
        assert time.monotonic() - started < 10
        assert notify.seen("STOPPING=1")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
        notify.close()


def test_unit_prevents_restart_on_usage_and_config_errors() -> None:
    """A wrong command line (64) or config (78) is never restarted in a loop by systemd."""
    for unit in UNITS:
        (value,) = unit_values(unit, "RestartPreventExitStatus")
        assert set(value.split()) >= {"64", "78"}, unit.name
