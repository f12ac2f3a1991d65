"""The generated docs match the code, and the generator sees every config key the loader reads."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

import pytest

from emailsync.config import DaemonSettings, FolderSettings
from emailsync.ops import docgen

REPO = Path(__file__).resolve().parents[2]


def test_committed_docs_are_what_the_code_generates() -> None:
    for path, text in docgen.generated_files(REPO).items():
        assert path.read_text(encoding="utf-8") == text, (
            f"{path.name} is out of date: run `python -m emailsync.ops.docgen`"
        )


def test_check_mode_reports_a_stale_file(tmp_path: Path) -> None:
    (tmp_path / "metrics" / "prometheus").mkdir(parents=True)
    alerts = REPO / "metrics" / "prometheus" / "alerts.yml"
    (tmp_path / "metrics" / "prometheus" / "alerts.yml").write_bytes(alerts.read_bytes())
    assert docgen.main([str(tmp_path), "--check"]) == 1
    assert docgen.main([str(tmp_path)]) == 0
    assert docgen.main([str(tmp_path), "--check"]) == 0
    (tmp_path / "docs" / "configuration.md").write_text("edited by hand\n")
    assert docgen.main([str(tmp_path), "--check"]) == 1


def test_a_key_without_a_description_stops_the_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    descriptions = dict(docgen.DESCRIPTIONS)
    del descriptions[("daemon", "poll_seconds")]
    monkeypatch.setattr(docgen, "DESCRIPTIONS", descriptions)
    with pytest.raises(SystemExit, match=r"daemon\.poll_seconds"):
        docgen.config_reference()


def _example_keys(data: dict[str, Any]) -> set[tuple[str, str]]:
    keys = set()
    for section, value in data.items():
        if section == "branches":
            keys |= {("branches.NAME", k) for branch in value.values() for k in branch}
        elif section == "mailboxes":
            keys |= {("mailboxes", k) for entry in value for k in entry}
        else:
            keys |= {(section, k) for k in value}
    return keys


def test_every_key_used_in_the_examples_is_in_the_reference() -> None:
    recorded = {(k.section, k.name) for k in docgen.config_keys()}
    for path in sorted((REPO / "config").glob("*.toml")):
        used = _example_keys(tomllib.loads(path.read_text(encoding="utf-8")))
        assert used <= recorded, (path.name, used - recorded)


def test_documented_defaults_are_the_settings_defaults() -> None:
    keys = {(k.section, k.name): k for k in docgen.config_keys()}
    for section, cls in (("daemon", DaemonSettings), ("folders", FolderSettings)):
        for field in dataclasses.fields(cls):
            key = keys.get((section, field.name))
            if key is None or not key.default:
                continue  # e.g. listen_host/listen_port come from `listen`
            assert key.default == docgen._toml(field.default), (section, field.name)
