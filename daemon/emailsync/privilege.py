"""Who a command runs as: root acts as the state directory's owner, and access errors say why.

The service runs as its own user (``User=emailsync``) and keeps its files in the state
directory, which belongs to that user. An operator typing ``emailsync token issue …`` or
``emailsync groups add …`` as root would otherwise create ``registry.key`` or ``emailsync.db``
owned by root, 0600, which the service then cannot read (issue 18). So a command run as root
whose state directory belongs to another user becomes that user before it touches anything,
the way ``runuser -u emailsync --`` would; nobody has to remember it, and no ``sudo`` is needed.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Files only the service user may read: secrets, keys, tokens, caches.
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


@dataclass(frozen=True)
class ActingUser:
    """The user a root-run command switched to: the owner of the state directory."""

    name: str
    uid: int
    gid: int
    state_dir: Path


def act_as_state_owner(state_dir: Path) -> ActingUser | None:
    """When root runs a command and ``state_dir`` belongs to another user, become that user.

    Returns who the process now is, or None when nothing changed: not root, no state
    directory yet, or one that root owns (the demo, the tests, a root-run install). Must be
    called before any thread starts, so that every thread of the process has the new ids.
    """
    if os.geteuid() != 0:
        return None
    try:
        info = state_dir.stat()
    except OSError:
        return None
    if info.st_uid == 0:
        return None
    try:
        entry = pwd.getpwuid(info.st_uid)
    except KeyError:
        name, gid, home = str(info.st_uid), info.st_gid, "/"
        os.setgroups([])
    else:
        name, gid, home = entry.pw_name, entry.pw_gid, entry.pw_dir
        os.initgroups(name, gid)
    os.setgid(gid)
    os.setuid(info.st_uid)
    os.environ.update(HOME=home, USER=name, LOGNAME=name)
    return ActingUser(name, info.st_uid, gid, state_dir)


def user_name(uid: int) -> str:
    """A uid's login name, or the number when it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def access_hint(path: Path, state_dir: Path) -> str:
    """Why this process may not use ``path`` in ``state_dir``, and the command that fixes it.

    The state directory's owner is the service's user: a file there that belongs to someone
    else (root, after a command run before privileges were dropped) is given back to it; a
    process running as another user is told to run as the owner.
    """
    me = user_name(os.geteuid())
    try:
        service = user_name(state_dir.stat().st_uid)
    except OSError:
        return f"{state_dir} is missing or unreadable: create it (systemd-tmpfiles --create)"
    try:
        info = path.stat()
    except OSError:
        info = None
    if info is not None and user_name(info.st_uid) != service:
        mode = stat.S_IMODE(info.st_mode)
        return (
            f"{path} belongs to {user_name(info.st_uid)} (mode {mode:04o}), not to {service}, "
            f"who owns {state_dir} and runs the service: chown {service}: {path}"
        )
    if me != service:
        return (
            f"{state_dir} belongs to {service}, and this command runs as {me}: "
            f"run it as root or as {service} (runuser -u {service} -- emailsync …)"
        )
    return f"check the permissions of {path} and {state_dir}"


def write_private_file(path: Path, text: str) -> None:
    """Replace ``path`` atomically with ``text``: mode 0600 in a 0700 directory, fsynced."""
    directory = path.parent
    directory.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    directory.chmod(PRIVATE_DIR_MODE)  # mkdir's mode is masked by umask and skipped if it exists
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as tmp:
            os.fchmod(tmp.fileno(), PRIVATE_FILE_MODE)
            tmp.write(text)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
