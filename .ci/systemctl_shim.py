"""A stand-in for `systemctl` on a machine without systemd as PID 1 (for .ci/readme_walk.py).

Knows what the README's five-minute guide asks of it: `start`, `status`, `stop` (and `kill`,
for clean-up) of `emailsync`. `start` runs the installed unit's own `ExecStart=` as systemd
would: as its `User=`/`Group=` (setpriv), with its `Environment=` and `UMask=`,
`$STATE_DIRECTORY`, `$RUNTIME_DIRECTORY` and `$CONFIGURATION_DIRECTORY` from its directory
settings, a `NOTIFY_SOCKET`, and `ConditionPathExists=` honoured; it returns once the daemon
sent `READY=1` (`Type=notify`), and fails with the daemon's output if it exits first. The one
addition to the unit's environment is `$EMAILSYNC_WALK_ENV` (the walk's `SSL_CERT_FILE`).
"""

from __future__ import annotations

import os
import pwd
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

UNIT = Path("/lib/systemd/system/emailsync.service")
READY_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 15.0  # the unit's TimeoutStopSec


def unit_settings(path: Path) -> dict[str, list[str]]:
    """Every `Key=value` of the unit by key (section-qualified only by order), values in order."""
    settings: dict[str, list[str]] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")) or "=" not in line:
            continue
        key, value = line.split("=", 1)
        settings.setdefault(key, []).append(value)
    return settings


def walk_dir() -> Path:
    return Path(os.environ["EMAILSYNC_WALK_DIR"])


def pid_file() -> Path:
    return walk_dir() / "emailsync.pid"


def running_pid() -> int | None:
    """The daemon's pid while it runs (its monitor has not recorded an exit yet)."""
    try:
        pid = int(pid_file().read_text())
    except (OSError, ValueError):
        return None
    return None if exit_file().exists() else pid


def exit_file() -> Path:
    return walk_dir() / "emailsync.exit"


def daemon_command() -> tuple[list[str], dict[str, str], int] | None:
    """(argv, environment, umask) the unit starts its daemon with; None if a condition fails."""
    unit = unit_settings(UNIT)
    for condition in unit.get("ConditionPathExists", []):
        if not Path(condition).exists():
            print(f"emailsync.service: condition unmet: {condition} (not started)")
            return None
    user = unit["User"][-1]
    group = unit["Group"][-1]
    entry = pwd.getpwnam(user)
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    env.update(LANG="C.UTF-8", HOME=entry.pw_dir, USER=user, LOGNAME=user)
    for value in unit.get("Environment", []):
        for item in shlex.split(value):
            name, _, text = item.partition("=")
            env[name] = text
    for key, variable, base in (
        ("StateDirectory", "STATE_DIRECTORY", "/var/lib"),
        ("RuntimeDirectory", "RUNTIME_DIRECTORY", "/run"),
        ("ConfigurationDirectory", "CONFIGURATION_DIRECTORY", "/etc"),
    ):
        directory = Path(base) / unit[key][-1]
        if key == "RuntimeDirectory":  # systemd makes it at start, owned by the unit's user
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chown(directory, entry.pw_uid, entry.pw_gid)
        env[variable] = str(directory)
    env["NOTIFY_SOCKET"] = str(walk_dir() / "notify.sock")
    for item in shlex.split(os.environ.get("EMAILSYNC_WALK_ENV", "")):
        name, _, text = item.partition("=")
        env[name] = text
    umask = int(unit.get("UMask", ["0022"])[-1], 8)
    argv = shlex.split(unit["ExecStart"][-1])
    as_user = ["/usr/bin/setpriv", f"--reuid={user}", f"--regid={group}", "--init-groups", "--"]
    return [*as_user, *argv], env, umask


def monitor() -> int:
    """The daemon's parent (systemd's role): start it, wait for it, record its exit code."""
    found = daemon_command()
    if found is None:
        return 0
    command, env, umask = found
    with (walk_dir() / "daemon.log").open("ab") as out:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd="/",
            preexec_fn=lambda: os.umask(umask),  # noqa: PLW1509 -- a single-threaded stand-in
        )
    pid_file().write_text(str(process.pid))
    exit_file().write_text(str(process.wait()))
    return 0


def start() -> int:
    """Start the unit and wait for READY=1, as ``systemctl start`` of a Type=notify unit."""
    if daemon_command() is None:
        return 0
    notify_log = walk_dir() / "notify.log"
    already = notify_log.read_text(encoding="utf-8").count("READY=1")
    for path in (pid_file(), exit_file()):
        path.unlink(missing_ok=True)
    subprocess.Popen(
        [sys.executable, __file__, "__monitor"],
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while notify_log.read_text(encoding="utf-8").count("READY=1") <= already:
        if exit_file().exists() or time.monotonic() > deadline:
            why = f"exited {exit_file().read_text()}" if exit_file().exists() else "no READY=1"
            print(f"emailsync.service: failed ({why})", file=sys.stderr)
            log = (walk_dir() / "daemon.log").read_text(encoding="utf-8", errors="replace")
            sys.stderr.write(log[-4000:])
            return 1
        time.sleep(0.2)
    print(f"emailsync.service: started (pid {pid_file().read_text()})", file=sys.stderr)
    return 0


def status() -> int:
    pid = running_pid()
    if pid is None:
        print("○ emailsync.service - inactive (dead)")
        return 3
    last = [
        line for line in (walk_dir() / "notify.log").read_text().splitlines() if "STATUS=" in line
    ]
    summary = last[-1].split("STATUS=", 1)[1] if last else ""
    print(f'● emailsync.service - active (running), Main PID: {pid}\n     Status: "{summary}"')
    return 0


def stop(signum: signal.Signals = signal.SIGTERM) -> int:
    """Signal the daemon and wait for its exit code (0 is a clean stop)."""
    pid = running_pid()
    if pid is None:
        return 0
    os.kill(pid, signum)
    deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
    while not exit_file().exists():
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            print("emailsync.service: did not stop in time; killed", file=sys.stderr)
            return 1
        time.sleep(0.2)
    code = int(exit_file().read_text())
    print(f"emailsync.service: stopped (exit {code})", file=sys.stderr)
    return 0 if code == 0 or signum == signal.SIGKILL else 1


def main(argv: list[str]) -> int:
    if argv == ["__monitor"]:
        return monitor()
    words = [a for a in argv if not a.startswith("--")]
    if len(words) != 2 or words[1] not in ("emailsync", "emailsync.service"):
        print(
            f"systemctl (stand-in): only start|status|stop|kill emailsync, not {argv}",
            file=sys.stderr,
        )
        return 2
    action = words[0]
    if action == "start":
        return start()
    if action == "status":
        return status()
    if action == "stop":
        return stop()
    if action == "kill":
        return stop(signal.SIGKILL) if running_pid() else 0
    print(f"systemctl (stand-in): unknown action {action}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
