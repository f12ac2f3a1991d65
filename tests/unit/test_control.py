"""The control token and the stop markers: never an open API, never a path from an address."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from emailsync.config import Settings, load_settings
from emailsync.errors import ConfigError, ControlError
from emailsync.imap.auth import token_cache_lock_path, token_cache_path
from emailsync.state.legacystop import stopped_marker
from emailsync.web.control import control_token, generated_token_path

from .configtext import MINIMAL

CONFIG = '[daemon]\nstate_dir = "state"\n' + MINIMAL


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    path = tmp_path / "emailsync.toml"
    path.write_text(CONFIG, encoding="utf-8")
    return load_settings(path)


def test_a_generated_token_is_long_and_private(settings: Settings) -> None:
    token = control_token(settings, create=True)
    path = generated_token_path(settings)
    assert len(token) >= 40
    assert path.read_text(encoding="utf-8") == token + "\n"
    assert path.stat().st_mode & 0o777 == 0o600
    assert control_token(settings) == token  # the CLI reads the same one
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temp left


@pytest.mark.parametrize("content", ["", "\n", "abc\n"])
def test_an_empty_generated_token_is_replaced_by_the_daemon_and_refused_by_the_cli(
    settings: Settings, content: str
) -> None:
    """An empty file left by a crash mid-creation never becomes the token."""
    path = generated_token_path(settings)
    path.parent.mkdir(parents=True)
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match=str(path)):
        control_token(settings)
    token = control_token(settings, create=True)
    assert len(token) >= 40
    assert path.read_text(encoding="utf-8").strip() == token


def test_an_empty_configured_token_file_is_a_config_error_naming_it(
    settings: Settings, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("\n", encoding="utf-8")
    path = settings.path
    path.write_text(
        CONFIG.replace("[daemon]\n", f'[daemon]\ncontrol_token_file = "{token_file}"\n'),
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as caught:
        control_token(load_settings(path), create=True)
    assert str(token_file) in str(caught.value)
    assert "daemon.control_token_file" in str(caught.value)


def test_without_a_token_the_cli_says_so(settings: Settings) -> None:
    with pytest.raises(ControlError, match="no control token"):
        control_token(settings)


@pytest.mark.parametrize("address", ["../x@d", '"../../x"@example.com', "a/b@example.com"])
def test_a_stop_marker_stays_in_state_dir_whatever_the_address(
    settings: Settings, address: str
) -> None:
    marker = stopped_marker(settings, address)
    assert marker.parent == settings.daemon.state_dir / "stopped"
    assert marker.name == hashlib.sha256(address.encode()).hexdigest()


def test_a_marker_named_by_the_address_by_an_older_version_still_counts(
    settings: Settings,
) -> None:
    legacy = settings.daemon.state_dir / "stopped" / "agent1@example.com"
    legacy.parent.mkdir(parents=True)
    legacy.touch()
    marker = stopped_marker(settings, "agent1@example.com")
    assert marker.exists()
    assert not legacy.exists()


@pytest.mark.parametrize("address", ["../x@d", '"../../x"@example.com', "a/b@example.com", "..@d"])
def test_a_token_cache_stays_in_its_directory_whatever_the_address(
    tmp_path: Path, address: str
) -> None:
    """Token caches keep their percent-encoded names (existing files stay readable): no `/`."""
    path = token_cache_path(tmp_path, address)
    assert path.parent == tmp_path / "tokens"
    assert "/" not in path.name
    assert path.name.endswith(".json")
    assert token_cache_lock_path(path).parent == path.parent
