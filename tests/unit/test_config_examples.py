"""The example configs in config/ stay valid as the config schema changes."""

from __future__ import annotations

from pathlib import Path

import pytest

from emailsync.config import load_settings

EXAMPLES = sorted((Path(__file__).parents[2] / "config").glob("*.toml"))


def test_there_are_examples_for_passwords_and_both_office365_modes() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"emailsync.toml", "office365-delegated.toml", "office365-app-only.toml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_config_loads(path: Path) -> None:
    settings = load_settings(path)
    assert settings.mailboxes


def test_app_only_example_is_app_only_and_delegated_is_not() -> None:
    by_name = {p.name: load_settings(p) for p in EXAMPLES}
    app = by_name["office365-app-only.toml"].office365
    delegated = by_name["office365-delegated.toml"].office365
    assert app is not None
    assert app.app_only
    assert delegated is not None
    assert not delegated.app_only
