"""Read a TOML config file into Settings: the table reader names file, key and what is wrong."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from emailsync.config.sections import (
    _parse_cluster,
    _parse_crm,
    _parse_daemon,
    _parse_folders,
    _parse_mailbox,
    _parse_office365,
    _parse_server,
)
from emailsync.config.settings import (
    DEFAULT_CONFIG_PATH,
    ClusterSettings,
    MailboxSettings,
    ServerSettings,
    Settings,
)
from emailsync.errors import ConfigError

T = TypeVar("T")


def default_config_path() -> Path:
    """``$EMAILSYNC_CONFIG``, else /etc/emailsync/emailsync.toml."""
    env = os.environ.get("EMAILSYNC_CONFIG")
    return Path(env) if env else DEFAULT_CONFIG_PATH


def load_settings(path: Path) -> Settings:
    """Read and validate a config file; raises ConfigError listing every problem found."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config: {exc.strerror}"]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: config is not UTF-8 text"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: invalid TOML: {exc}"]) from None
    return parse_settings(data, path)


def parse_settings(data: Mapping[str, Any], path: Path) -> Settings:
    """Validate parsed TOML; raises ConfigError listing every problem found."""
    problems: list[str] = []
    top = _Table(data, "", path, problems)
    # Relative paths in the config mean "next to the config file", whatever the cwd later is.
    base_dir = path.absolute().parent
    daemon = _parse_daemon(top.table("daemon"), base_dir)
    folders = _parse_folders(top.table("folders"))
    branches_table = top.table("branches")
    branches: dict[str, ServerSettings] = {}
    for name in branches_table.names():
        branches[name] = _parse_server(branches_table.table(name), base_dir)
    cluster_table = top.optional_table("cluster")
    cluster = ClusterSettings()
    if cluster_table is not None:
        cluster = _parse_cluster(cluster_table)
        if daemon.state.split(":", 1)[0] not in ("postgresql", "postgres"):
            cluster_table.problem(
                "instance_id" if cluster_table.has("instance_id") else "lease_seconds",
                '[cluster] needs daemon.state = "postgresql://…" (instances share through it)',
            )
    o365_table = top.optional_table("office365")
    office365 = _parse_office365(o365_table, base_dir) if o365_table is not None else None
    crm_table = top.optional_table("crm")
    # The timeline (where groups come from and events go) is the state database's built-in
    # tables, or the CRM: either combines with either state database (issue 20).
    crm = _parse_crm(crm_table, base_dir) if crm_table is not None else None
    mailboxes: list[MailboxSettings] = []
    seen: set[str] = set()
    for entry in top.array_of_tables("mailboxes"):
        mailbox = _parse_mailbox(entry, base_dir, branches, office365)
        if mailbox is None:
            continue
        if mailbox.address in seen:
            entry.problem("address", f"mailbox {mailbox.address} is listed twice")
            continue
        seen.add(mailbox.address)
        mailboxes.append(mailbox)
    top.finish()
    if problems:
        raise ConfigError(problems)
    return Settings(
        path=path,
        daemon=daemon,
        folders=folders,
        branches=branches,
        mailboxes=tuple(mailboxes),
        office365=office365,
        cluster=cluster,
        crm=crm,
    )


class _Table:
    """A TOML table being validated: typed getters that record problems, unknown-key check."""

    def __init__(
        self, data: Mapping[str, Any], where: str, path: Path, problems: list[str]
    ) -> None:
        self.data = data
        self.where = where
        self.path = path
        self.problems = problems
        self.used: set[str] = set()
        self.children: list[_Table] = []

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def problem(self, name: str, what: str) -> None:
        self.problems.append(f"{self.path}: {self.key(name)}: {what}")

    def names(self) -> list[str]:
        self.used.update(self.data)
        return list(self.data)

    def has(self, name: str) -> bool:
        return name in self.data

    def get(
        self, name: str, kind: type[T], default: T, check: Callable[[T], str | None] | None = None
    ) -> T:
        self.used.add(name)
        if name not in self.data:
            return default
        value = self.data[name]
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            self.problem(
                name, f"must be {_KIND_NAMES.get(kind, kind.__name__)}, not {_describe(value)}"
            )
            return default
        if check is not None:
            error = check(value)
            if error:
                self.problem(name, error)
                return default
        return value  # type: ignore[no-any-return]

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        def check(value: str) -> str | None:
            return (
                None if value in choices else f"must be one of {', '.join(choices)}, not {value!r}"
            )

        return self.get(name, str, default, check)

    def path_value(self, name: str, base_dir: Path) -> Path | None:
        raw = self.get(name, str, "", lambda v: None if v.strip() else "must not be empty")
        if not raw:
            return None
        value = Path(raw)
        return value if value.is_absolute() else base_dir / value

    def table(self, name: str) -> _Table:
        found = self.optional_table(name)
        return found if found is not None else _Table({}, self.key(name), self.path, self.problems)

    def optional_table(self, name: str) -> _Table | None:
        self.used.add(name)
        value = self.data.get(name)
        if value is None:
            return None
        if not isinstance(value, dict):
            self.problem(name, f"must be a table, not {_describe(value)}")
            return None
        return self._child(value, self.key(name))

    def array_of_tables(self, name: str) -> list[_Table]:
        self.used.add(name)
        value = self.data.get(name, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            self.problem(name, "must be an array of tables ([[mailboxes]])")
            return []
        return [self._child(v, f"{self.key(name)}[{i}]") for i, v in enumerate(value)]

    def finish(self) -> None:
        for name in self.data:
            if name not in self.used:
                self.problem(name, "unknown key")
        for child in self.children:
            child.finish()

    def _child(self, data: Mapping[str, Any], where: str) -> _Table:
        child = _Table(data, where, self.path, self.problems)
        self.children.append(child)
        return child


_KIND_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    list: "an array",
}


def _describe(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__
