"""The example configs in config/ stay valid as the config schema changes."""

from __future__ import annotations

from pathlib import Path

import pytest

from emailsync.config import load_settings

EXAMPLES = sorted((Path(__file__).parents[2] / "config").glob("*.toml"))


def test_there_are_examples_for_passwords_and_both_office365_modes() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"emailsync.toml", "office365-delegated.toml", "office365-app-only.toml"} <= names


# Self-service only: every agent registers their own mailbox through the pages.
SELF_SERVICE_ONLY = {"production.toml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_config_loads(path: Path) -> None:
    settings = load_settings(path)
    assert bool(settings.mailboxes) is (path.name not in SELF_SERVICE_ONLY)


def test_the_production_example_is_crm_postgresql_a_cluster_and_tls() -> None:
    """README "Production": CRM timeline, PostgreSQL state, leases, an https public_url."""
    settings = load_settings(next(p for p in EXAMPLES if p.name == "production.toml"))
    assert settings.crm is not None
    assert settings.shared_state
    assert settings.daemon.public_url.startswith("https://")
    assert settings.office365 is not None
    assert not settings.office365.app_only


def test_app_only_example_is_app_only_and_delegated_is_not() -> None:
    by_name = {p.name: load_settings(p) for p in EXAMPLES}
    app = by_name["office365-app-only.toml"].office365
    delegated = by_name["office365-delegated.toml"].office365
    assert app is not None
    assert app.app_only
    assert delegated is not None
    assert not delegated.app_only
