"""The [cluster] table: instance_id and lease_seconds, and that it needs a PostgreSQL store."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from emailsync.cluster.lease import default_instance_id
from emailsync.config import LEASE_SECONDS, ConfigError, Settings, load_settings

BASE = """
[daemon]
state_dir = "{state}"
store = "{store}"
[folders]
[branches.london]
host = "imap.example.com"
"""
PG = "postgresql://emailsync@db.example.com/emailsync"


def load(tmp_path: Path, extra: str, store: str = PG) -> Settings:
    path = tmp_path / "emailsync.toml"
    text = BASE.format(state=tmp_path / "state", store=store) + textwrap.dedent(extra)
    path.write_text(text, encoding="utf-8")
    return load_settings(path)


def test_cluster_defaults_without_a_table(tmp_path: Path) -> None:
    """No [cluster]: an instance id is chosen at start, leases last 30 s."""
    settings = load(tmp_path, "")
    assert settings.cluster.instance_id == ""
    assert settings.cluster.lease_seconds == LEASE_SECONDS == 30.0


def test_cluster_keys_are_read(tmp_path: Path) -> None:
    """instance_id and lease_seconds as written."""
    settings = load(tmp_path, '[cluster]\ninstance_id = "host-a.1"\nlease_seconds = 12\n')
    assert settings.cluster.instance_id == "host-a.1"
    assert settings.cluster.lease_seconds == 12.0


@pytest.mark.parametrize(
    ("extra", "store", "problem"),
    [
        ("[cluster]\nlease_seconds = 1\n", PG, "cluster.lease_seconds: must be at least 12"),
        ("[cluster]\nlease_seconds = 3601\n", PG, "cluster.lease_seconds: must be at most 3600"),
        ('[cluster]\ninstance_id = "a b"\n', PG, "cluster.instance_id: must be 1-100 letters"),
        ("[cluster]\nlease_seconds = 10\n", "sqlite:///x.db", "needs daemon.state"),
        ('[cluster]\nowner = "x"\n', PG, "cluster.owner: unknown key"),
    ],
)
def test_bad_cluster_settings_are_reported(
    tmp_path: Path, extra: str, store: str, problem: str
) -> None:
    """Each bad value is one problem line naming the key."""
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, extra, store)
    assert any(problem in line for line in caught.value.problems), caught.value.problems


def test_default_instance_ids_differ_on_one_host() -> None:
    """Two instances on one host get different ids (hostname + random suffix)."""
    assert default_instance_id() != default_instance_id()


def test_a_lease_shorter_than_a_worker_s_stop_is_refused_by_check_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 19 #8: a lease too short for a worker's stop (8 s, which the two thirds of a
    lease left after a heartbeat must cover) is a config error: check-config exits 78 with
    one line naming the file, the key and why; 12 s, the least that covers it, passes."""
    from emailsync.cli import main  # noqa: PLC0415 -- the CLI is what an operator runs

    (tmp_path / "state").mkdir()
    path = tmp_path / "emailsync.toml"
    text = BASE.format(state=tmp_path / "state", store=PG)
    path.write_text(text + "[cluster]\nlease_seconds = 10\n", encoding="utf-8")
    assert main(["--config", str(path), "check-config", "--skip-secrets"]) == 78
    out = capsys.readouterr()
    lines = [line for line in (out.out + out.err).splitlines() if "lease_seconds" in line]
    assert len(lines) == 1, out
    assert lines[0].startswith(f"{path}: cluster.lease_seconds: must be at least 12")
    assert "8 s to stop" in lines[0]
    assert "another instance connect the same mailbox" in lines[0]
    path.write_text(text + "[cluster]\nlease_seconds = 12\n", encoding="utf-8")
    assert main(["--config", str(path), "check-config", "--skip-secrets"]) == 0
