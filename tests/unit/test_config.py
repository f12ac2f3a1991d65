"""Tests of emailsync.config and ``emailsync check-config``: validation, defaults, secrets."""

from __future__ import annotations

import dataclasses
import os
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from emailsync.config import Settings, check_secrets, default_config_path, load_settings
from emailsync.config.settings import (
    DaemonSettings,
    FolderSettings,
    MailboxSettings,
    Office365Settings,
    ServerSettings,
)
from emailsync.errors import ConfigError
from emailsync.mail.address import normalise_address
from emailsync.model import FolderRole
from emailsync.secret import Secret, SecretSource

from .configtext import LONDON, MINIMAL, OFFICE365

PASSWORD = "hunter2-Tr0ub4dor&3"  # a distinctive value to look for in output
EXIT_OK = 0
EXIT_CONFIG = 78

FULL_STORE_URL = "postgresql://emailsync@db.example.com/emailsync"
# LONDON with agent1, whose password is the file agent1.password next to the config.
AGENT1_BY_FILE = (
    LONDON
    + """
[[mailboxes]]
address = "agent1@example.com"
branch = "london"
password_file = "agent1.password"
"""
)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts without the systemd and emailsync variables config.py reads."""
    for name in ("STATE_DIRECTORY", "CREDENTIALS_DIRECTORY", "EMAILSYNC_CONFIG"):
        monkeypatch.delenv(name, raising=False)


def write_config(directory: Path, text: str, name: str = "emailsync.toml") -> Path:
    """Write a dedented TOML config into directory and return its path."""
    path = directory / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load(directory: Path, text: str) -> Settings:
    """Write and load a config."""
    return load_settings(write_config(directory, text))


def problem(directory: Path, key: str, what: str) -> str:
    """A problem as load_settings reports it for the config ``write_config`` put in directory."""
    return f"{directory / 'emailsync.toml'}: {key}: {what}"


def invalid(text: str, expected: str) -> tuple[str, str, str]:
    """A case of test_invalid_values_are_errors_naming_the_key: the config text, and the key
    and what the problem says about it, given as one ``"key: what"``."""
    key, what = expected.split(": ", 1)
    return text, key, what


def problems_of(directory: Path, text: str) -> list[str]:
    """Write a config that must fail to load and return its problem lines."""
    path = write_config(directory, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    return caught.value.problems


def check_config(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``emailsync --config PATH check-config`` in-process: (exit code, stdout, stderr)."""
    from emailsync.cli import main  # noqa: PLC0415 -- cli imports modules still being written

    code = main(["--config", str(path), "check-config"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- a full, valid configuration ------------------------------------------------------------


def write_full_config(directory: Path) -> Path:
    """A config using every documented key, with the files it names present."""
    (directory / "internal-ca.pem").write_text("-----BEGIN CERTIFICATE-----\n", encoding="utf-8")
    (directory / "agent1.password").write_text(PASSWORD + "\n", encoding="utf-8")
    (directory / "control-token").write_text("control-token-value-0123456789\n", encoding="utf-8")
    (directory / "client-secret").write_text("client-secret-value\n", encoding="utf-8")
    return write_config(
        directory,
        f"""
        [daemon]
        state_dir = "{directory}/state"
        store = "{FULL_STORE_URL}"
        listen = "[::1]:9400"
        control_token_file = "{directory}/control-token"
        log_format = "json"
        log_level = "debug"
        idle_renew_seconds = 1200
        sweep_seconds = 300
        poll_seconds = 30
        timeout_seconds = 12.5
        fetch_batch = 50
        max_backoff_seconds = 120
        reauth_retry_seconds = 900
        stuck_after_attempts = 3

        [folders]
        root = "CRM"
        queue = "Inbox-Queue"
        sent = "Outbox"
        received = "Incoming"
        failed = "Problems"

        [branches.london]
        host = "imap.example.com"
        port = 1993
        security = "ssl"
        ca_file = "{directory}/internal-ca.pem"

        [branches.leeds]
        host = "mail.leeds.example.com"
        security = "starttls"

        [[mailboxes]]
        address = "Agent1@Example.com"
        branch = "london"
        auth = "password"
        username = "agent1"
        password_file = "{directory}/agent1.password"
        aliases = ["lettings@example.com", "Sales@Example.com"]
        trigger = "manual"
        enabled = true

        [[mailboxes]]
        address = "agent2@example.com"
        branch = "leeds"
        password_env = "AGENT2_PASSWORD"
        enabled = false

        [[mailboxes]]
        address = "agent3@example.com"
        auth = "office365"

        [office365]
        tenant_id = "tenant-1234"
        client_id = "client-5678"
        client_secret_file = "{directory}/client-secret"
        client_secret_expires = 2027-06-30
        authority = "https://login.example.test/"
        """,
    )


def test_full_config_with_every_documented_key_loads_to_the_expected_values(
    tmp_path: Path,
) -> None:
    """Every key of DESIGN §3 is read into the matching field of the settings."""
    path = write_full_config(tmp_path)

    settings = load_settings(path)

    london = ServerSettings(
        host="imap.example.com", port=1993, security="ssl", ca_file=tmp_path / "internal-ca.pem"
    )
    leeds = ServerSettings(host="mail.leeds.example.com", port=143, security="starttls")
    assert settings == Settings(
        path=path,
        daemon=DaemonSettings(
            state_dir=tmp_path / "state",
            state="postgresql://emailsync@db.example.com/emailsync",
            listen_host="::1",
            listen_port=9400,
            control_token=SecretSource(file=tmp_path / "control-token"),
            log_format="json",
            log_level="debug",
            idle_renew_seconds=1200.0,
            sweep_seconds=300.0,
            poll_seconds=30.0,
            timeout_seconds=12.5,
            fetch_batch=50,
            max_backoff_seconds=120.0,
            reauth_retry_seconds=900.0,
            stuck_after_attempts=3,
        ),
        folders=FolderSettings(
            root="CRM", queue="Inbox-Queue", sent="Outbox", received="Incoming", failed="Problems"
        ),
        branches={"london": london, "leeds": leeds},
        mailboxes=(
            MailboxSettings(
                address="agent1@example.com",
                server=london,
                auth="password",
                username="agent1",
                password=SecretSource(file=tmp_path / "agent1.password"),
                aliases=("lettings@example.com", "sales@example.com"),
                trigger="manual",
                enabled=True,
                branch="london",
            ),
            MailboxSettings(
                address="agent2@example.com",
                server=leeds,
                username="agent2@example.com",
                password=SecretSource(env="AGENT2_PASSWORD"),
                enabled=False,
                branch="leeds",
            ),
            MailboxSettings(
                address="agent3@example.com",
                server=ServerSettings(host="outlook.office365.com", port=993, security="ssl"),
                auth="office365",
                username="agent3@example.com",
                password=None,
            ),
        ),
        office365=Office365Settings(
            tenant_id="tenant-1234",
            client_id="client-5678",
            client_secret=SecretSource(file=tmp_path / "client-secret"),
            authority="https://login.example.test",
            client_secret_expires=datetime(2027, 6, 30, tzinfo=UTC),
        ),
    )
    assert settings.office365 is not None
    assert settings.office365.app_only
    assert settings.store_url == "postgresql://emailsync@db.example.com/emailsync"
    assert settings.mailbox("agent1@example.com").owner_addresses == {
        "agent1@example.com",
        "lettings@example.com",
        "sales@example.com",
    }


def test_settings_are_frozen_at_every_level(tmp_path: Path) -> None:
    """Loaded settings cannot be changed after the fact, neither the whole nor its parts."""
    settings = load_settings(write_full_config(tmp_path))

    frozen: list[object] = [
        settings,
        settings.daemon,
        settings.folders,
        settings.branches["london"],
        settings.mailboxes[0],
        settings.office365,
        settings.daemon.control_token,
    ]
    for value in frozen:
        field_name = dataclasses.fields(value)[0].name  # type: ignore[arg-type]
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(value, field_name, None)
    assert isinstance(settings.mailboxes, tuple)
    assert isinstance(settings.mailboxes[0].aliases, tuple)


def test_mailbox_lookup_ignores_case_and_display_form(tmp_path: Path) -> None:
    """Settings.mailbox finds a mailbox however its address is written."""
    settings = load(tmp_path, MINIMAL)

    assert settings.mailbox("AGENT1@example.COM").address == "agent1@example.com"
    assert settings.mailbox("Agent <agent1@example.com>").address == "agent1@example.com"


def test_mailbox_lookup_of_an_unconfigured_address_is_a_config_error(tmp_path: Path) -> None:
    """Asking for a mailbox the config does not list names the file and the address."""
    path = write_config(tmp_path, MINIMAL)
    settings = load_settings(path)

    with pytest.raises(ConfigError) as caught:
        settings.mailbox("nobody@example.com")

    assert caught.value.problems == [f"{path}: no mailbox 'nobody@example.com' in mailboxes"]


# --- defaults --------------------------------------------------------------------------------


@pytest.mark.parametrize("detail", ["summary", "mailbox"])
def test_metrics_detail_takes_summary_or_mailbox(tmp_path: Path, detail: str) -> None:
    settings = load(tmp_path, MINIMAL + f'\n[daemon]\nmetrics_detail = "{detail}"\n')
    assert settings.daemon.metrics_detail == detail


def test_an_unknown_metrics_detail_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, MINIMAL + '\n[daemon]\nmetrics_detail = "all"\n')
    assert caught.value.problems[0].endswith(
        "daemon.metrics_detail: must be one of summary, mailbox, not 'all'"
    )


def test_minimal_config_gets_the_documented_defaults(tmp_path: Path) -> None:
    """Without [daemon] and [folders] tables the documented defaults apply."""
    settings = load(tmp_path, MINIMAL)

    assert settings.daemon == DaemonSettings()
    assert settings.daemon.state_dir == Path("/var/lib/emailsync")
    assert settings.daemon.log_format == "auto"
    assert settings.daemon.metrics_detail == "summary"
    assert (settings.daemon.listen_host, settings.daemon.listen_port) == ("127.0.0.1", 9387)
    assert settings.daemon.control_token is None
    assert settings.daemon.idle_renew_seconds == 23 * 60
    assert settings.daemon.stuck_after_attempts == 5
    assert settings.folders == FolderSettings(
        root="Rezi-Imported", queue="Queue", sent="Sent", received="Received", failed="Failed"
    )
    assert settings.office365 is None
    assert settings.store_url == "sqlite:///var/lib/emailsync/emailsync.db"


def test_folder_names_are_found_by_role(tmp_path: Path) -> None:
    """FolderSettings.name maps each folder role to its configured child name."""
    settings = load(tmp_path, MINIMAL + '\n[folders]\nqueue = "ToFile"\n')

    assert {role: settings.folders.name(role) for role in FolderRole} == {
        FolderRole.QUEUE: "ToFile",
        FolderRole.SENT: "Sent",
        FolderRole.RECEIVED: "Received",
        FolderRole.FAILED: "Failed",
    }


@pytest.mark.parametrize(
    ("security", "port"), [("ssl", 993), ("starttls", 143)], ids=["ssl", "starttls"]
)
def test_branch_port_defaults_to_993_for_ssl_and_143_for_starttls(
    tmp_path: Path, security: str, port: int
) -> None:
    """A branch without a port gets the IMAP port for its security (RFC 8314, RFC 3501)."""
    settings = load(
        tmp_path,
        f"""
        [branches.london]
        host = "imap.example.com"
        security = "{security}"
        """,
    )

    assert settings.branches["london"] == ServerSettings(
        host="imap.example.com", port=port, security=security
    )


def test_branch_security_defaults_to_ssl(tmp_path: Path) -> None:
    """A branch that names only its host is reached over implicit TLS on 993."""
    settings = load(tmp_path, MINIMAL)

    assert settings.branches["london"] == ServerSettings(host="imap.example.com", port=993)
    assert settings.mailboxes[0].server is settings.branches["london"]


def test_office365_mailbox_defaults_to_outlook_office365_com_993_ssl(tmp_path: Path) -> None:
    """An office365 mailbox without a branch talks to Exchange Online over SSL."""
    settings = load(
        tmp_path, OFFICE365 + '[[mailboxes]]\naddress = "agent@example.com"\nauth = "office365"\n'
    )

    mailbox = settings.mailboxes[0]
    assert mailbox.server == ServerSettings(host="outlook.office365.com", port=993, security="ssl")
    assert mailbox.password is None
    assert mailbox.branch is None
    assert settings.office365 is not None
    assert settings.office365.authority == "https://login.microsoftonline.com"
    assert not settings.office365.app_only


def test_office365_mailbox_with_a_branch_uses_that_branch(tmp_path: Path) -> None:
    """A branch overrides the Exchange Online default (for tests against a local server)."""
    settings = load(
        tmp_path,
        OFFICE365
        + """
        [branches.local]
        host = "127.0.0.1"
        port = 10993

        [[mailboxes]]
        address = "agent@example.com"
        auth = "office365"
        branch = "local"
        """,
    )

    assert settings.mailboxes[0].server == ServerSettings(host="127.0.0.1", port=10993)


def test_mailbox_defaults_are_password_auth_auto_trigger_enabled(tmp_path: Path) -> None:
    """A mailbox naming only address, branch and a secret gets the documented defaults."""
    mailbox = load(tmp_path, MINIMAL).mailboxes[0]

    assert mailbox.auth == "password"
    assert mailbox.trigger == "auto"
    assert mailbox.enabled is True
    assert mailbox.aliases == ()
    assert mailbox.username == "agent1@example.com"


def test_username_defaults_to_the_address_as_written_without_display_name(
    tmp_path: Path,
) -> None:
    """The login name is the addr-spec as typed: case kept, display name dropped."""
    settings = load(
        tmp_path,
        LONDON + '[[mailboxes]]\naddress = "Agent One <Agent1@Example.com>"\nbranch = "london"\n',
    )

    assert settings.mailboxes[0].address == "agent1@example.com"
    assert settings.mailboxes[0].username == "Agent1@Example.com"


def test_password_mailbox_without_a_secret_uses_a_credential_named_after_the_address(
    tmp_path: Path,
) -> None:
    """No password_* key means LoadCredential=ADDRESS:… in the systemd unit."""
    settings = load(
        tmp_path, LONDON + '[[mailboxes]]\naddress = "Agent1@Example.com"\nbranch = "london"\n'
    )

    assert settings.mailboxes[0].password == SecretSource(credential="agent1@example.com")


def test_aliases_are_normalised_deduplicated_and_exclude_the_mailbox_itself(
    tmp_path: Path,
) -> None:
    """Aliases compare like addresses; repeating one or the own address is harmless."""
    settings = load(
        tmp_path,
        MINIMAL
        + """aliases = ["Lettings@Example.com", "lettings@example.com", "AGENT1@example.com",
                       "Sales <sales@example.com>"]
        """,
    )

    assert settings.mailboxes[0].aliases == ("lettings@example.com", "sales@example.com")


def test_office365_client_secret_expiry_accepts_a_date_time_with_offset(tmp_path: Path) -> None:
    """client_secret_expires may be a full offset date-time as well as a date."""
    settings = load(
        tmp_path,
        OFFICE365
        + """
        client_secret_env = "O365_SECRET"
        client_secret_expires = 2027-06-30T12:00:00Z
        """,
    )

    assert settings.office365 is not None
    assert settings.office365.client_secret_expires == datetime(2027, 6, 30, 12, tzinfo=UTC)
    assert settings.office365.client_secret == SecretSource(env="O365_SECRET")


# --- the environment -------------------------------------------------------------------------


def test_state_dir_defaults_to_state_directory_from_systemd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$STATE_DIRECTORY (StateDirectory= in the unit) is the state_dir default; first entry."""
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/emailsync-test:/var/lib/other")

    settings = load(tmp_path, MINIMAL)

    assert settings.daemon.state_dir == Path("/var/lib/emailsync-test")
    assert settings.store_url == "sqlite:///var/lib/emailsync-test/emailsync.db"


def test_explicit_state_dir_wins_over_state_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A state_dir in the config is used even when systemd sets $STATE_DIRECTORY."""
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/emailsync-test")

    settings = load(tmp_path, MINIMAL + '\n[daemon]\nstate_dir = "/srv/emailsync"\n')

    assert settings.daemon.state_dir == Path("/srv/emailsync")


def test_default_config_path_is_emailsync_config_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """$EMAILSYNC_CONFIG names the config when --config is not given."""
    monkeypatch.setenv("EMAILSYNC_CONFIG", "/srv/emailsync/config.toml")

    assert default_config_path() == Path("/srv/emailsync/config.toml")


def test_default_config_path_without_emailsync_config_is_etc_emailsync() -> None:
    """Without $EMAILSYNC_CONFIG the config is /etc/emailsync/emailsync.toml."""
    assert default_config_path() == Path("/etc/emailsync/emailsync.toml")


def test_password_credential_resolves_against_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """password_credential names a file in systemd's $CREDENTIALS_DIRECTORY."""
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "agent1").write_text(PASSWORD + "\n", encoding="utf-8")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    settings = load(
        tmp_path,
        """
        [branches.london]
        host = "imap.example.com"

        [[mailboxes]]
        address = "agent1@example.com"
        branch = "london"
        password_credential = "agent1"
        """,
    )

    source = settings.mailboxes[0].password
    assert source == SecretSource(credential="agent1")
    assert source.path() == credentials / "agent1"
    assert source.read().reveal() == PASSWORD
    assert check_secrets(settings) == []


def test_credential_without_credentials_directory_cannot_be_read(tmp_path: Path) -> None:
    """Outside systemd a credential is reported missing, naming $CREDENTIALS_DIRECTORY."""
    settings = load(tmp_path, MINIMAL.replace('password_env = "AGENT1_PASSWORD"', ""))

    problems = check_secrets(settings)

    assert len(problems) == 1
    assert "mailboxes[0].password_credential" in problems[0]
    assert "credential 'agent1@example.com' in $CREDENTIALS_DIRECTORY" in problems[0]


def test_relative_paths_resolve_against_the_config_files_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """state_dir, secret files and CA files given relatively are next to the config file."""
    conf = tmp_path / "etc"
    (conf / "certs").mkdir(parents=True)
    (conf / "certs" / "ca.pem").write_text("x", encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = write_config(
        conf,
        """
        [daemon]
        state_dir = "state"
        control_token_file = "secrets/token"

        [branches.london]
        host = "imap.example.com"
        ca_file = "certs/ca.pem"

        [[mailboxes]]
        address = "agent1@example.com"
        branch = "london"
        password_file = "secrets/agent1"

        [office365]
        tenant_id = "t"
        client_id = "c"
        client_secret_file = "../shared/o365"
        ca_file = "certs/ca.pem"
        """,
    )

    settings = load_settings(path)

    assert settings.daemon.state_dir == conf / "state"
    assert settings.daemon.control_token == SecretSource(file=conf / "secrets" / "token")
    assert settings.branches["london"].ca_file == conf / "certs" / "ca.pem"
    assert settings.mailboxes[0].password == SecretSource(file=conf / "secrets" / "agent1")
    assert settings.office365 is not None
    assert settings.office365.client_secret == SecretSource(file=conf / ".." / "shared" / "o365")
    assert settings.office365.ca_file == conf / "certs" / "ca.pem"


def test_relative_paths_stay_next_to_a_config_given_by_a_relative_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --config etc/emailsync.toml, paths are absolute so a later chdir cannot move them."""
    (tmp_path / "etc").mkdir()
    write_config(tmp_path / "etc", MINIMAL + '\n[daemon]\ncontrol_token_file = "token"\n')
    monkeypatch.chdir(tmp_path)

    settings = load_settings(Path("etc/emailsync.toml"))

    assert settings.daemon.control_token == SecretSource(file=tmp_path / "etc" / "token")


# --- problems: what every line says ----------------------------------------------------------


def test_every_problem_line_names_the_file_the_key_path_and_what_is_wrong(tmp_path: Path) -> None:
    """Each line reads FILE: KEY.PATH: what is wrong, so an operator can go straight to it."""
    path = write_config(
        tmp_path,
        """
        [daemon]
        log_format = "xml"

        [branches.london]
        host = "imap.example.com"
        port = 70000

        [[mailboxes]]
        address = "agent1@example.com"
        branch = "london"

        [[mailboxes]]
        address = "agent2@example.com"
        branch = "paris"
        """,
    )

    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    assert caught.value.problems == [
        f"{path}: daemon.log_format: must be one of auto, json, console, journal, not 'xml'",
        f"{path}: branches.london.port: must be 1-65535",
        f"{path}: mailboxes[1].branch: unknown branch 'paris' (known: london)",
    ]


def test_several_problems_are_all_reported_at_once(tmp_path: Path) -> None:
    """One run lists every problem, not just the first, so a config is fixed in one go."""
    problems = problems_of(
        tmp_path,
        """
        surprise = 1

        [daemon]
        listen = "nowhere"
        fetch_batch = 0
        idle_renew_seconds = 1800
        stuck_after_attempts = 0

        [folders]
        sent = "Sent/Items"

        [branches.london]
        security = "tls"

        [[mailboxes]]
        address = "not an address"
        branch = "london"

        [[mailboxes]]
        address = "agent2@example.com"
        trigger = "sometimes"
        """,
    )

    keys = [line.split(": ")[1] for line in problems]
    assert sorted(keys) == sorted(
        [
            "surprise",
            "daemon.listen",
            "daemon.fetch_batch",
            "daemon.idle_renew_seconds",
            "daemon.stuck_after_attempts",
            "folders.sent",
            "branches.london.host",
            "branches.london.security",
            "mailboxes[0].address",
            "mailboxes[1].trigger",
            "mailboxes[1].branch",
        ]
    )


def test_a_config_error_carries_all_problems_in_its_message(tmp_path: Path) -> None:
    """str(ConfigError) joins the problem lines, for logs that show only the message."""
    path = write_config(tmp_path, "a = 1\nb = 2\n")

    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    assert str(caught.value) == f"{path}: a: unknown key; {path}: b: unknown key"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("surprise = true\n", "surprise"),
        ("[daemon]\nlisten_port = 1\n", "daemon.listen_port"),
        ('[folders]\ninbox = "INBOX"\n', "folders.inbox"),
        ('[branches.london]\nhost = "h"\nusername = "u"\n', "branches.london.username"),
        (
            '[[mailboxes]]\naddress = "a@example.com"\nauth = "office365"\npasword_env = "X"\n'
            '[office365]\ntenant_id = "t"\nclient_id = "c"\n',
            "mailboxes[0].pasword_env",
        ),
        ('[office365]\ntenant_id = "t"\nclient_id = "c"\nsecret = "s"\n', "office365.secret"),
    ],
    ids=["top-level", "daemon", "folders", "branch", "mailbox", "office365"],
)
def test_unknown_keys_at_every_level_are_errors(tmp_path: Path, text: str, key: str) -> None:
    """A misspelt key is reported rather than silently ignored."""
    path = write_config(tmp_path, text)

    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    assert caught.value.problems == [f"{path}: {key}: unknown key"]


def test_unknown_key_message_does_not_echo_its_value(tmp_path: Path) -> None:
    """An inline ``password = …`` is refused without repeating the password."""
    problems = problems_of(tmp_path, MINIMAL + f'password = "{PASSWORD}"\n')

    assert problems == [problem(tmp_path, "mailboxes[0].password", "unknown key")]


def test_mailbox_address_of_the_wrong_type_also_needs_no_other_report(tmp_path: Path) -> None:
    """A non-string address is one problem; the mailbox is otherwise skipped."""
    problems = problems_of(tmp_path, "[[mailboxes]]\naddress = 42\n")

    assert [p.split(": ")[1] for p in problems] == ["mailboxes[0].address", "mailboxes[0].branch"]


@pytest.mark.parametrize(
    ("text", "key", "what"),
    [
        # Of the wrong TOML type: the problem says which type the key wanted.
        invalid("daemon = 1\n", "daemon: must be a table, not a number"),
        invalid("mailboxes = 1\n", "mailboxes: must be an array of tables ([[mailboxes]])"),
        invalid("[daemon]\nstate_dir = 5\n", "daemon.state_dir: must be a string, not a number"),
        invalid("[daemon]\nlisten = 9387\n", "daemon.listen: must be a string, not a number"),
        invalid(
            "[daemon]\npoll_seconds = true\n",
            "daemon.poll_seconds: must be a number, not a boolean",
        ),
        invalid(
            "[daemon]\nfetch_batch = 2.5\n", "daemon.fetch_batch: must be an integer, not a number"
        ),
        invalid(
            "[daemon]\nfetch_batch = true\n",
            "daemon.fetch_batch: must be an integer, not a boolean",
        ),
        invalid(
            "[daemon]\nstuck_after_attempts = 2.5\n",
            "daemon.stuck_after_attempts: must be an integer, not a number",
        ),
        invalid(
            '[daemon]\nstuck_after_attempts = "5"\n',
            "daemon.stuck_after_attempts: must be an integer, not a string",
        ),
        invalid(
            '[daemon]\nlog_format = ["json"]\n', "daemon.log_format: must be a string, not an array"
        ),
        invalid("[folders]\nroot = {}\n", "folders.root: must be a string, not a table"),
        invalid(
            '[branches.london]\nhost = "h"\nport = "993"\n',
            "branches.london.port: must be an integer, not a string",
        ),
        invalid(
            '[branches.london]\nhost = "h"\nallow_insecure = "yes"\n',
            "branches.london.allow_insecure: must be true or false, not a string",
        ),
        invalid(
            '[branches.london]\nhost = "h"\n[[mailboxes]]\naddress = "a@example.com"\n'
            'branch = "london"\nenabled = 1\n',
            "mailboxes[0].enabled: must be true or false, not a number",
        ),
        invalid(
            '[branches.london]\nhost = "h"\n[[mailboxes]]\naddress = "a@example.com"\n'
            'branch = "london"\naliases = "b@example.com"\n',
            "mailboxes[0].aliases: must be an array, not a string",
        ),
        invalid(
            "[[mailboxes]]\naddress = 42\n", "mailboxes[0].address: must be a string, not a number"
        ),
        invalid(
            '[office365]\ntenant_id = "t"\nclient_id = "c"\nclient_secret_expires = "2027"\n',
            "office365.client_secret_expires: must be a TOML date, like 2027-06-30",
        ),
        # Of the right type but outside what the key allows.
        invalid('[daemon]\nlisten = "9387"\n', "daemon.listen: must be HOST:PORT"),
        invalid('[daemon]\nlisten = "localhost:0"\n', "daemon.listen: must be HOST:PORT"),
        invalid('[daemon]\nlisten = ":9387"\n', "daemon.listen: must be HOST:PORT"),
        invalid(
            '[daemon]\nstore = "mysql://db"\n',
            "daemon.store: must be a sqlite:///… or postgresql://… URL",
        ),
        invalid('[daemon]\nstate_dir = ""\n', "daemon.state_dir: must not be empty"),
        invalid("[daemon]\nsweep_seconds = 0\n", "daemon.sweep_seconds: must be greater than 0"),
        invalid("[daemon]\npoll_seconds = -1\n", "daemon.poll_seconds: must be greater than 0"),
        invalid(
            "[daemon]\nstuck_after_attempts = 0\n",
            "daemon.stuck_after_attempts: must be greater than 0",
        ),
        invalid(
            "[daemon]\nstuck_after_attempts = -3\n",
            "daemon.stuck_after_attempts: must be greater than 0",
        ),
        invalid(
            '[daemon]\nlog_level = "verbose"\n',
            "daemon.log_level: must be one of debug, info, warning, error, not 'verbose'",
        ),
        invalid('[folders]\nroot = ""\n', "folders.root: must not be empty"),
        invalid(
            '[folders]\nqueue = "Q*"\n',
            "folders.queue: must not contain / . % * \\ quotes or control characters",
        ),
        invalid(
            '[folders]\nsent = "sent"\nreceived = "SENT"\n',
            "folders.queue: queue, sent, received and failed must be four different names",
        ),
        invalid("[branches.london]\nport = 993\n", "branches.london.host: is required"),
        invalid('[branches.london]\nhost = " "\n', "branches.london.host: must not be empty"),
        invalid(
            '[branches.london]\nhost = "h"\nsecurity = "tls"\n',
            "branches.london.security: must be one of ssl, starttls, none, not 'tls'",
        ),
        invalid('[office365]\nclient_id = "c"\n', "office365.tenant_id: is required"),
        invalid('[office365]\ntenant_id = "t"\n', "office365.client_id: is required"),
        invalid(
            '[office365]\ntenant_id = "t"\nclient_id = "c"\nauthority = "http://idp"\n',
            "office365.authority: must be an https:// URL",
        ),
        invalid(
            '[office365]\ntenant_id = "t"\nclient_id = "c"\n'
            'client_secret_file = "a"\nclient_secret_env = "B"\n',
            "office365.client_secret_env: "
            "give only one of client_secret_file, client_secret_env, client_secret_credential",
        ),
        invalid(
            '[office365]\ntenant_id = "t"\nclient_id = "c"\n'
            'client_certificate_file = "app.pem"\nclient_certificate_thumbprint = "AB12"\n',
            "office365.client_certificate_thumbprint: "
            "must be the certificate's SHA-1 thumbprint, 40 hex digits",
        ),
        invalid(
            '[office365]\ntenant_id = "t"\nclient_id = "c"\n'
            f'client_certificate_thumbprint = "{"AB" * 20}"\n',
            "office365.client_certificate_thumbprint: needs client_certificate_file",
        ),
    ],
)
def test_invalid_values_are_errors_naming_the_key(
    tmp_path: Path, text: str, key: str, what: str
) -> None:
    """Each key accepts only its TOML type and its range of values; the problem names the key
    and says what it wanted."""
    problems = problems_of(tmp_path, text)

    assert problem(tmp_path, key, what) in problems


@pytest.mark.parametrize(
    ("value", "accepted"),
    [(1739, True), (1739.5, True), (1740, False), (1800, False), (0, False), (-5, False)],
)
def test_idle_renew_seconds_must_stay_below_29_minutes(
    tmp_path: Path, value: float, accepted: bool
) -> None:
    """RFC 2177: servers may drop an IDLE client after 30 minutes, so 1740 s and up is refused."""
    path = write_config(tmp_path, MINIMAL + f"\n[daemon]\nidle_renew_seconds = {value}\n")

    if accepted:
        assert load_settings(path).daemon.idle_renew_seconds == value
    else:
        with pytest.raises(ConfigError) as caught:
            load_settings(path)
        assert caught.value.problems == [
            f"{path}: daemon.idle_renew_seconds: must be between 0 and 1740 (RFC 2177: < 29 min)"
        ]


def test_security_none_without_allow_insecure_is_refused(tmp_path: Path) -> None:
    """Clear-text IMAP would send the password unencrypted, so it needs explicit consent."""
    problems = problems_of(tmp_path, '[branches.lab]\nhost = "h"\nsecurity = "none"\n')

    assert problems == [
        problem(
            tmp_path,
            "branches.lab.security",
            '"none" sends the password in clear text; set allow_insecure = true to accept that',
        )
    ]


def test_security_none_with_allow_insecure_is_accepted_on_port_143(tmp_path: Path) -> None:
    """With allow_insecure = true a clear-text branch loads, on the plain IMAP port."""
    settings = load(
        tmp_path, '[branches.lab]\nhost = "h"\nsecurity = "none"\nallow_insecure = true\n'
    )

    assert settings.branches["lab"] == ServerSettings(
        host="h", port=143, security="none", allow_insecure=True
    )


def test_missing_ca_file_is_an_error(tmp_path: Path) -> None:
    """A ca_file that is not there is caught at load time, not at the first TLS handshake."""
    problems = problems_of(tmp_path, '[branches.london]\nhost = "h"\nca_file = "nope.pem"\n')

    assert problems == [
        problem(
            tmp_path, "branches.london.ca_file", f"{tmp_path / 'nope.pem'} is not a readable file"
        )
    ]


def test_unknown_branch_is_an_error_listing_the_known_branches(tmp_path: Path) -> None:
    """A mailbox naming a branch that is not defined says which branches there are."""
    problems = problems_of(
        tmp_path,
        """
        [branches.london]
        host = "a"
        [branches.leeds]
        host = "b"

        [[mailboxes]]
        address = "agent1@example.com"
        branch = "Londn"
        """,
    )

    assert problems == [
        problem(tmp_path, "mailboxes[0].branch", "unknown branch 'Londn' (known: leeds, london)")
    ]


def test_unknown_branch_without_any_branches_says_none_are_defined(tmp_path: Path) -> None:
    """With no [branches] at all the problem says so."""
    problems = problems_of(tmp_path, '[[mailboxes]]\naddress = "a@example.com"\nbranch = "x"\n')

    assert problems == [
        problem(tmp_path, "mailboxes[0].branch", "unknown branch 'x' (known: none defined)")
    ]


def test_password_mailbox_without_a_branch_is_an_error(tmp_path: Path) -> None:
    """Only Office 365 mailboxes have a default server."""
    problems = problems_of(tmp_path, '[[mailboxes]]\naddress = "a@example.com"\n')

    assert problems == [
        problem(tmp_path, "mailboxes[0].branch", 'is required for auth = "password" mailboxes')
    ]


def test_office365_mailbox_without_an_office365_table_is_an_error(tmp_path: Path) -> None:
    """auth = "office365" needs the tenant and client of [office365]."""
    problems = problems_of(
        tmp_path, '[[mailboxes]]\naddress = "a@example.com"\nauth = "office365"\n'
    )

    assert problems == [
        problem(tmp_path, "mailboxes[0].auth", 'auth = "office365" needs an [office365] table')
    ]


def test_duplicate_mailbox_is_an_error_even_in_another_case(tmp_path: Path) -> None:
    """The same address twice (any case, any display form) names the second entry."""
    problems = problems_of(
        tmp_path,
        MINIMAL
        + """
        [[mailboxes]]
        address = "Agent One <AGENT1@example.com>"
        branch = "london"
        """,
    )

    assert problems == [
        problem(tmp_path, "mailboxes[1].address", "mailbox agent1@example.com is listed twice")
    ]


@pytest.mark.parametrize("address", ["agent1", "agent1@", "@example.com", "a b@example.com", ""])
def test_bad_mailbox_address_is_an_error(tmp_path: Path, address: str) -> None:
    """An address that is not local@domain is refused, quoting what was written."""
    problems = problems_of(
        tmp_path,
        f'[branches.london]\nhost = "h"\n[[mailboxes]]\naddress = "{address}"\nbranch = "london"\n',
    )

    assert problems == [
        problem(tmp_path, "mailboxes[0].address", f"{address!r} is not an email address")
    ]


def test_missing_mailbox_address_is_an_error(tmp_path: Path) -> None:
    """address is the one key every mailbox must have."""
    problems = problems_of(
        tmp_path, '[branches.london]\nhost = "h"\n[[mailboxes]]\nbranch = "london"\n'
    )

    assert problems == [problem(tmp_path, "mailboxes[0].address", "is required")]


def test_bad_alias_is_an_error_naming_the_alias(tmp_path: Path) -> None:
    """Each alias that is not an address is reported; the good ones do not mask it."""
    problems = problems_of(tmp_path, MINIMAL + 'aliases = ["ok@example.com", "lettings", 7]\n')

    assert problems == [
        problem(tmp_path, "mailboxes[0].aliases", "'lettings' is not an email address"),
        problem(tmp_path, "mailboxes[0].aliases", "7 is not an email address"),
    ]


def test_two_password_sources_for_one_mailbox_are_an_error(tmp_path: Path) -> None:
    """password_file, password_env and password_credential are alternatives."""
    problems = problems_of(tmp_path, MINIMAL + 'password_file = "/run/agent1"\n')

    assert problems == [
        problem(
            tmp_path,
            "mailboxes[0].password_env",
            "give only one of password_file, password_env, password_credential",
        )
    ]


@pytest.mark.parametrize(
    ("line", "key", "what"),
    [
        ('password_credential = "../agent1"', "password_credential", "must be a bare name"),
        ('password_credential = ""', "password_credential", "must not be empty"),
        ('password_env = ""', "password_env", "must not be empty"),
        ('password_file = ""', "password_file", "must not be empty"),
        ('username = ""', "username", "must not be empty"),
    ],
)
def test_bad_password_source_or_username_is_an_error(
    tmp_path: Path, line: str, key: str, what: str
) -> None:
    """An explicit but unusable secret source is reported instead of quietly falling back."""
    text = MINIMAL.replace('password_env = "AGENT1_PASSWORD"', line)

    problems = problems_of(tmp_path, text)

    assert problems == [problem(tmp_path, f"mailboxes[0].{key}", what)]


def test_invalid_toml_is_an_error_with_its_line_and_column(tmp_path: Path) -> None:
    """A TOML syntax error names the file and where in it the parser stopped."""
    path = write_config(tmp_path, '[daemon]\nlog_format = "json"\nlisten = \n')

    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    assert caught.value.problems == [f"{path}: invalid TOML: Invalid value (at line 3, column 10)"]


def test_config_that_is_not_utf8_is_an_error(tmp_path: Path) -> None:
    """TOML is UTF-8; other encodings are refused, naming the file."""
    path = tmp_path / "emailsync.toml"
    path.write_bytes(b'[folders]\nroot = "Import\xe9"\n')

    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    assert caught.value.problems == [f"{path}: config is not UTF-8 text"]


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    """A config that is not there is a config error naming the path and the OS reason."""
    path = tmp_path / "absent.toml"

    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    assert caught.value.problems == [f"{path}: cannot read config: No such file or directory"]


def test_unreadable_config_file_is_an_error(tmp_path: Path) -> None:
    """A config path that cannot be read (here a directory; tests may run as root) is reported."""
    with pytest.raises(ConfigError) as caught:
        load_settings(tmp_path)

    assert caught.value.problems == [f"{tmp_path}: cannot read config: Is a directory"]


# --- secrets ---------------------------------------------------------------------------------


def test_secrets_are_never_in_the_repr_or_str_of_settings(tmp_path: Path) -> None:
    """Settings hold where a secret is, never its value, so logging them leaks nothing."""
    settings = load_settings(write_full_config(tmp_path))
    password = settings.mailboxes[0].password
    assert password is not None

    assert password.read().reveal() == PASSWORD  # the file really holds the password
    assert PASSWORD not in repr(settings)
    assert PASSWORD not in str(settings)
    assert "control-token-value-0123456789" not in repr(settings)
    assert "client-secret-value" not in repr(settings)


def test_a_read_secret_hides_itself_in_repr_and_str() -> None:
    """A Secret shows only asterisks unless revealed on purpose."""
    secret = Secret(PASSWORD)

    assert repr(secret) == str(secret) == f"{secret}" == "Secret('***')"
    assert secret.reveal() == PASSWORD


def test_secret_file_is_read_without_its_trailing_newline(tmp_path: Path) -> None:
    """Files written with echo end in a newline that is not part of the password."""
    secret_file = tmp_path / "secret"
    secret_file.write_text(PASSWORD + "\r\n", encoding="utf-8")

    assert SecretSource(file=secret_file).read().reveal() == PASSWORD


def test_secret_env_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """password_env reads the named variable at the moment the secret is needed."""
    monkeypatch.setenv("AGENT1_PASSWORD", PASSWORD)

    assert SecretSource(env="AGENT1_PASSWORD").read().reveal() == PASSWORD


def test_config_errors_never_contain_a_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Neither load nor secret-check problems repeat a password that was read."""
    (tmp_path / "agent1.password").write_text(PASSWORD, encoding="utf-8")
    (tmp_path / "bad.password").write_bytes(PASSWORD.encode() + b"\xff\xfe")
    monkeypatch.setenv("AGENT2_PASSWORD", PASSWORD)
    base = (
        AGENT1_BY_FILE
        + """
        [[mailboxes]]
        address = "agent2@example.com"
        branch = "london"
        password_env = "AGENT2_PASSWORD"

        [[mailboxes]]
        address = "agent3@example.com"
        branch = "london"
        password_file = "bad.password"
    """
    )
    settings = load(tmp_path, base)
    with pytest.raises(ConfigError) as load_error:
        load(tmp_path, base + "\n[daemon]\nlisten = 1\n")

    secret_problems = check_secrets(settings)

    assert secret_problems == [
        f"{settings.path}: mailboxes[2].password_file: mailbox agent3@example.com: "
        f"secret: file {tmp_path / 'bad.password'} is not UTF-8 text"
    ]
    for text in (str(load_error.value), *secret_problems, repr(settings)):
        assert PASSWORD not in text


# --- Office 365 certificate credentials -----------------------------------------------------


@pytest.fixture(scope="module")
def app_certificate() -> trustme.LeafCert:
    """An RSA key and certificate, as an app registration's certificate credential uses."""
    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    return ca.issue_cert("emailsync.example.com", key_type=trustme.KeyType.RSA)


def sha1_thumbprint(certificate: trustme.LeafCert) -> str:
    """The SHA-1 thumbprint as Entra ID shows it (upper-case hex), computed independently."""
    leaf = x509.load_pem_x509_certificate(certificate.cert_chain_pems[0].bytes())
    return leaf.fingerprint(hashes.SHA1()).hex().upper()  # noqa: S303 -- a name, not a MAC


def key_lines(certificate: trustme.LeafCert) -> list[str]:
    """The full base64 lines of the private key's PEM, to look for in output."""
    pem = certificate.private_key_pem.bytes().decode("ascii")
    return [line for line in pem.splitlines() if len(line) == 64]


CERTIFICATE_CONFIG = OFFICE365 + 'client_certificate_file = "certs/app.pem"\n'


def test_office365_certificate_loads_and_its_thumbprint_is_computed_from_the_file(
    tmp_path: Path, app_certificate: trustme.LeafCert
) -> None:
    """A relative client_certificate_file is next to the config; the thumbprint is the SHA-1."""
    (tmp_path / "certs").mkdir()
    app_certificate.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "certs/app.pem"))

    settings = load(tmp_path, CERTIFICATE_CONFIG)

    office365 = settings.office365
    assert office365 is not None
    assert office365.client_certificate == tmp_path / "certs" / "app.pem"
    assert office365.client_certificate_thumbprint is None
    assert office365.client_secret is None
    assert office365.app_only
    assert office365.credential == "certificate"
    credential = office365.read_client_certificate()
    assert credential.thumbprint == sha1_thumbprint(app_certificate)
    assert credential.private_key.reveal().startswith("-----BEGIN ")
    assert credential.private_key.reveal().rstrip().endswith("PRIVATE KEY-----")
    assert credential.certificate_chain is not None
    assert credential.certificate_chain.startswith(
        app_certificate.cert_chain_pems[0].bytes().decode()
    )
    assert not [line for line in key_lines(app_certificate) if line in repr(credential)]
    assert check_secrets(settings) == []


def test_office365_configured_thumbprint_is_upper_case_hex_and_must_match_the_certificate(
    tmp_path: Path, app_certificate: trustme.LeafCert
) -> None:
    """Lower case or openssl's colons are accepted; a thumbprint of another certificate is not."""
    (tmp_path / "certs").mkdir()
    app_certificate.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "certs/app.pem"))
    thumbprint = sha1_thumbprint(app_certificate)
    with_colons = ":".join(thumbprint[i : i + 2] for i in range(0, 40, 2)).lower()

    settings = load(
        tmp_path, CERTIFICATE_CONFIG + f'client_certificate_thumbprint = "{with_colons}"\n'
    )
    other = load(tmp_path, CERTIFICATE_CONFIG + f'client_certificate_thumbprint = "{"0" * 40}"\n')

    assert settings.office365 is not None
    assert settings.office365.client_certificate_thumbprint == thumbprint
    assert settings.office365.read_client_certificate().thumbprint == thumbprint
    assert check_secrets(other) == [
        f"{other.path}: office365.client_certificate_file: certificate: "
        f"client_certificate_thumbprint {'0' * 40} does not match the certificate in file "
        f"{tmp_path / 'certs' / 'app.pem'} (its SHA-1 thumbprint is {thumbprint})"
    ]


@pytest.mark.parametrize(
    "secret_key", ["client_secret_file", "client_secret_env", "client_secret_credential"]
)
def test_office365_client_secret_and_certificate_together_are_an_error_naming_both(
    tmp_path: Path, secret_key: str
) -> None:
    """App-only sign-in takes one credential: a client secret or a certificate, not both."""
    problems = problems_of(tmp_path, CERTIFICATE_CONFIG + f'{secret_key} = "o365"\n')

    assert problems == [
        problem(
            tmp_path,
            "office365.client_certificate_file",
            f"give either {secret_key} or client_certificate_file, not both",
        )
    ]


def test_check_config_reports_a_missing_certificate_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The config loads, but check-config (like the daemon's start) names the absent file."""
    monkeypatch.setenv("AGENT1_PASSWORD", PASSWORD)
    path = write_config(tmp_path, MINIMAL + CERTIFICATE_CONFIG)

    assert check_config(path, capsys) == (
        EXIT_CONFIG,
        "",
        f"{path}: office365.client_certificate_file: certificate: cannot read file "
        f"{tmp_path / 'certs' / 'app.pem'}: No such file or directory\n",
    )


@pytest.mark.parametrize(
    ("contents", "what"),
    [
        ("certificate", "holds no private key (PEM PRIVATE KEY block)"),
        ("key", "holds no certificate; add it after the key or set client_certificate_thumbprint"),
        ("key twice", "holds more than one private key (PEM PRIVATE KEY block)"),
        ("another key", "the private key in file {path} does not belong to its certificate"),
        (
            "encrypted key",
            "the private key in file {path} is encrypted; store it without a passphrase "
            "in a file only emailsync can read",
        ),
    ],
)
def test_check_secrets_reports_a_bad_certificate_file_without_showing_the_key(
    tmp_path: Path, app_certificate: trustme.LeafCert, contents: str, what: str
) -> None:
    """A certificate file must hold one private key and, first, its certificate."""
    key = app_certificate.private_key_pem.bytes()
    certificate = app_certificate.cert_chain_pems[0].bytes()
    other_key = trustme.CA(key_type=trustme.KeyType.RSA).private_key_pem.bytes()
    encrypted_key = serialization.load_pem_private_key(key, password=None).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    )
    pem = {
        "certificate": certificate,
        "key": key,
        "key twice": key + key + certificate,
        "another key": other_key + certificate,
        "encrypted key": encrypted_key + certificate,
    }[contents]
    (tmp_path / "certs").mkdir()
    path = tmp_path / "certs" / "app.pem"
    path.write_bytes(pem)
    settings = load(tmp_path, CERTIFICATE_CONFIG)

    problems = check_secrets(settings)

    detail = what.format(path=path) if "{path}" in what else f"file {path} {what}"
    assert problems == [
        f"{settings.path}: office365.client_certificate_file: certificate: {detail}"
    ]
    assert "PRIVATE KEY-----" not in problems[0]
    assert not [line for line in key_lines(app_certificate) if line in problems[0]]


# --- check_secrets ---------------------------------------------------------------------------


def test_check_secrets_finds_nothing_when_every_secret_can_be_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The full config, with its files present and env set, has no secret problems."""
    monkeypatch.setenv("AGENT2_PASSWORD", PASSWORD)

    assert check_secrets(load_settings(write_full_config(tmp_path))) == []


def test_check_secrets_skips_disabled_mailboxes(tmp_path: Path) -> None:
    """A disabled mailbox's password is not needed, so its absence is not a problem."""
    settings = load(tmp_path, MINIMAL + "enabled = false\n")

    assert check_secrets(settings) == []


def test_check_secrets_reports_daemon_and_office365_secret_files(tmp_path: Path) -> None:
    """The control token and the Office 365 client secret are checked too."""
    (tmp_path / "client-secret").write_text("", encoding="utf-8")
    settings = load(
        tmp_path,
        """
        [daemon]
        control_token_file = "missing-token"

        [office365]
        tenant_id = "t"
        client_id = "c"
        client_secret_file = "client-secret"
        """,
    )

    assert check_secrets(settings) == [
        f"{settings.path}: daemon.control_token_file: "
        f"secret: cannot read file {tmp_path / 'missing-token'}: No such file or directory",
        f"{settings.path}: office365.client_secret_file: "
        f"secret: file {tmp_path / 'client-secret'} is empty",
    ]


# --- emailsync check-config ------------------------------------------------------------------


def test_check_config_of_a_good_config_exits_0_with_an_ok_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A valid config with readable secrets prints one ok line with the mailbox counts."""
    monkeypatch.setenv("AGENT2_PASSWORD", PASSWORD)
    path = write_full_config(tmp_path)
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace(FULL_STORE_URL, f"sqlite:///{tmp_path}/timeline.db"))

    code, out, err = check_config(path, capsys)

    assert code == EXIT_OK
    assert out == f"{path}: ok (3 mailboxes, 2 enabled)\n"
    assert err == ""
    assert PASSWORD not in out


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("https://db.example.com/emailsync", "a CRM goes in [crm] url"),
        ("sqlite://db.example.com/x.db", "names a host"),
        ("sqlite:///x.db?mode=ro", "has a query or fragment"),
    ],
)
def test_check_config_refuses_a_store_url_that_run_would_refuse(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    url: str,
    why: str,
) -> None:
    """check-config parses the store URL with open_store's own parser: no "ok" that run refuses."""
    monkeypatch.setenv("AGENT2_PASSWORD", PASSWORD)
    path = write_full_config(tmp_path)
    path.write_text(path.read_text(encoding="utf-8").replace(FULL_STORE_URL, url))

    code, out, err = check_config(path, capsys)

    assert code == EXIT_CONFIG
    assert out == ""
    assert f"{path}: daemon.store: " in err
    assert why in err
    assert "emailsync@" not in err  # a postgresql URL's user (or password) is never echoed


def test_check_config_uses_emailsync_config_when_no_config_is_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --config, check-config validates the file $EMAILSYNC_CONFIG names."""
    monkeypatch.setenv("AGENT1_PASSWORD", PASSWORD)
    path = write_config(tmp_path, MINIMAL, name="from-env.toml")
    monkeypatch.setenv("EMAILSYNC_CONFIG", str(path))
    from emailsync.cli import main  # noqa: PLC0415 -- see check_config

    code = main(["check-config"])

    assert code == EXIT_OK
    assert capsys.readouterr().out == f"{path}: ok (1 mailbox, 1 enabled)\n"


def test_check_config_of_a_bad_config_exits_78_with_one_line_per_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every problem is one line on stderr, stdout stays empty, and the exit code is EX_CONFIG."""
    path = write_config(
        tmp_path,
        """
        typo = 1
        [daemon]
        log_format = "xml"
        [branches.lab]
        host = "h"
        security = "none"
        [[mailboxes]]
        address = "nobody"
        branch = "lab"
        """,
    )

    code, out, err = check_config(path, capsys)

    assert code == EXIT_CONFIG
    assert out == ""
    assert err.splitlines() == [
        f"{path}: daemon.log_format: must be one of auto, json, console, journal, not 'xml'",
        f"{path}: branches.lab.security: "
        '"none" sends the password in clear text; set allow_insecure = true to accept that',
        f"{path}: mailboxes[0].address: 'nobody' is not an email address",
        f"{path}: typo: unknown key",
    ]


def test_check_config_of_a_missing_file_exits_78(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A config that is not there is a config error, not a traceback."""
    path = tmp_path / "absent.toml"

    code, out, err = check_config(path, capsys)

    assert code == EXIT_CONFIG
    assert out == ""
    assert err == f"{path}: cannot read config: No such file or directory\n"


def test_check_config_of_invalid_toml_exits_78_with_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The syntax error's position reaches the operator."""
    path = write_config(tmp_path, "[daemon\n")

    code, _, err = check_config(path, capsys)

    assert code == EXIT_CONFIG
    assert err.startswith(f"{path}: invalid TOML: ")
    assert "(at line 1, column 8)" in err


@pytest.mark.parametrize(
    ("setup", "line", "what"),
    [
        (
            "missing",
            'password_file = "agent2.password"',
            "cannot read file {dir}/agent2.password: No such file or directory",
        ),
        ("empty", 'password_file = "agent2.password"', "file {dir}/agent2.password is empty"),
        ("newline", 'password_file = "agent2.password"', "file {dir}/agent2.password is empty"),
        (
            "unset",
            'password_env = "AGENT2_PASSWORD"',
            "environment variable AGENT2_PASSWORD is not set or empty",
        ),
        (
            "empty-env",
            'password_env = "AGENT2_PASSWORD"',
            "environment variable AGENT2_PASSWORD is not set or empty",
        ),
        (
            "no-credentials",
            'password_credential = "agent2"',
            "cannot read credential 'agent2' in $CREDENTIALS_DIRECTORY: No such file or directory",
        ),
    ],
)
def test_check_config_reports_an_unusable_password_without_printing_any_secret(
    *,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    setup: str,
    line: str,
    what: str,
) -> None:
    """A password that cannot be read exits 78 naming its source; no password is printed."""
    (tmp_path / "agent1.password").write_text(PASSWORD + "\n", encoding="utf-8")
    if setup == "empty":
        (tmp_path / "agent2.password").write_text("", encoding="utf-8")
    elif setup == "newline":
        (tmp_path / "agent2.password").write_text("\n", encoding="utf-8")
    elif setup == "empty-env":
        monkeypatch.setenv("AGENT2_PASSWORD", "")
    path = write_config(
        tmp_path,
        AGENT1_BY_FILE
        + f"""
        [[mailboxes]]
        address = "agent2@example.com"
        branch = "london"
        {line}
        """,
    )
    key = line.split(" = ", maxsplit=1)[0]

    code, out, err = check_config(path, capsys)

    assert code == EXIT_CONFIG
    assert out == ""
    assert err == (
        f"{path}: mailboxes[1].{key}: mailbox agent2@example.com: "
        f"secret: {what.format(dir=tmp_path)}\n"
    )
    assert PASSWORD not in out + err


def test_check_config_reports_every_unreadable_secret_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Missing mailbox, control-token and client secrets are all listed in one run."""
    path = write_config(
        tmp_path,
        '[daemon]\ncontrol_token_file = "token"\n'
        + MINIMAL
        + """
        [[mailboxes]]
        address = "agent2@example.com"
        branch = "london"
        password_file = "agent2"

        [office365]
        tenant_id = "t"
        client_id = "c"
        client_secret_env = "O365_SECRET"
        """,
    )

    code, _, err = check_config(path, capsys)

    assert code == EXIT_CONFIG
    keys = [line.split(": ")[1] for line in err.splitlines()]
    assert keys == [
        "mailboxes[0].password_env",
        "mailboxes[1].password_file",
        "daemon.control_token_file",
        "office365.client_secret_env",
    ]
    assert all(line.startswith(f"{path}: ") for line in err.splitlines())


def test_check_config_does_not_read_secrets_of_a_config_that_fails_to_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Load problems come first; the unreadable secret of a broken config is not a second wave."""
    path = write_config(tmp_path, "unknown = 1\n" + MINIMAL)

    code, _, err = check_config(path, capsys)

    assert code == EXIT_CONFIG
    assert err == f"{path}: unknown: unknown key\n"


def test_check_config_names_the_environment_variable_but_not_a_set_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one secret set and another missing, only the missing one's name is printed."""
    monkeypatch.setenv("AGENT1_PASSWORD", PASSWORD)
    path = write_config(tmp_path, MINIMAL + '\n[daemon]\ncontrol_token_file = "/nonexistent/t"\n')

    code, out, err = check_config(path, capsys)

    assert code == EXIT_CONFIG
    assert PASSWORD not in out + err
    assert os.environ["AGENT1_PASSWORD"] == PASSWORD
    assert err == (
        f"{path}: daemon.control_token_file: "
        "secret: cannot read file /nonexistent/t: No such file or directory\n"
    )


# --- addresses that would name files ----------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "../x@d",
        "../../etc/passwd@example.com",
        "a..b@example.com",
        ".a@example.com",
        "a@-bad.example",
        "a@[192.0.2.1]",
        "a@under_score.example",
    ],
)
def test_an_address_outside_rfc_5321_is_a_config_error_naming_its_entry(
    tmp_path: Path, address: str
) -> None:
    """Only RFC 5321 dot-atom or quoted local parts and host-name domains are mailboxes."""
    path = write_config(
        tmp_path, MINIMAL + f'\n[[mailboxes]]\naddress = "{address}"\nbranch = "london"\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith(f"{path}: mailboxes[1].address: {address!r} ")


@pytest.mark.parametrize(
    "address",
    [
        "a.b+tag@example.com",
        "o'brien@example.com",
        "a/b@example.com",
        "agent@bücher.example",
        "agent@localhost",
    ],
)
def test_unusual_but_valid_addresses_still_load(tmp_path: Path, address: str) -> None:
    """Dot-atoms with atext like ' / + and IDN domains stay valid mailbox addresses."""
    settings = load(
        tmp_path,
        f'[branches.l]\nhost = "h"\n[[mailboxes]]\naddress = "{address}"\n'
        'branch = "l"\npassword_env = "X"\n',
    )
    assert settings.mailboxes[0].address == normalise_address(address)


def test_a_short_or_empty_control_token_file_is_a_config_error_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An empty token file (a crash right after creating it) is refused, never an open API."""
    monkeypatch.setenv("AGENT1_PASSWORD", PASSWORD)
    token = tmp_path / "token"
    path = write_config(tmp_path, MINIMAL + '\n[daemon]\ncontrol_token_file = "token"\n')
    for content in ("", "\n", "short-token\n", "a" * 40 + "\n"):
        token.write_text(content, encoding="utf-8")
        problems = check_secrets(load_settings(path))
        assert len(problems) == 1, content
        assert problems[0].startswith(f"{path}: daemon.control_token_file: ")
        assert str(token) in problems[0]


def test_check_config_exits_78_for_a_path_traversing_address(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(
        tmp_path, MINIMAL + '\n[[mailboxes]]\naddress = "../x@d"\nbranch = "london"\n'
    )
    code, out, err = check_config(path, capsys)
    assert code == EXIT_CONFIG
    assert out == ""
    assert err.startswith(f"{path}: mailboxes[1].address: '../x@d' has a local part that is ")


# --- [daemon] public_url ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "read"),
    [
        ("https://emailsync.example.com", "https://emailsync.example.com"),
        ("https://emailsync.example.com/sync/", "https://emailsync.example.com/sync"),
        ("https://emailsync.example.com:8443", "https://emailsync.example.com:8443"),
        ("http://localhost:9387", "http://localhost:9387"),
        ("http://127.0.0.1:9387/", "http://127.0.0.1:9387"),
        ("http://[::1]:9387", "http://[::1]:9387"),
    ],
)
def test_public_url_is_read_without_a_trailing_slash(tmp_path: Path, given: str, read: str) -> None:
    """Links and the OAuth redirect are built from it: `{public_url}/login?token=…`."""
    settings = load(tmp_path, f'[daemon]\npublic_url = "{given}"\n' + textwrap.dedent(MINIMAL))
    assert settings.daemon.public_url == read


def test_public_url_defaults_to_none_links_then_come_from_the_host_header(tmp_path: Path) -> None:
    assert load(tmp_path, MINIMAL).daemon.public_url == ""


@pytest.mark.parametrize(
    "given",
    [
        "emailsync.example.com",  # not absolute
        "//emailsync.example.com",
        "http://emailsync.example.com",  # links would carry tokens in clear
        "http://10.0.0.5:9387",
        "ftp://emailsync.example.com",
        "https://",
        "https://emailsync.example.com/?x=1",
        "https://emailsync.example.com/#top",
        "https://user:secret@emailsync.example.com",
        "https://emailsync.example.com/a b",
        "https://emailsync.example.com:99999",
        "https://[::1",
    ],
)
def test_check_config_refuses_a_public_url_that_is_not_https_and_names_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], given: str
) -> None:
    """Issue 19: an absolute https:// URL (http:// only to this machine), no query, fragment or
    credentials; check-config names the file and key and exits 78."""
    path = write_config(tmp_path, f'[daemon]\npublic_url = "{given}"\n' + textwrap.dedent(MINIMAL))
    code, out, err = check_config(path, capsys)
    assert code == EXIT_CONFIG
    assert out == ""
    assert f"{path}: daemon.public_url: must be an absolute https:// URL" in err
    assert "secret" not in err


def test_token_issue_links_to_public_url_when_it_is_set(tmp_path: Path) -> None:
    """`emailsync token issue` prints `page: {public_url}/login?token=…`; without public_url,
    the listen address (a wildcard read as loopback, IPv6 in brackets)."""
    from emailsync.cli import page_base  # noqa: PLC0415 -- as check_config above

    daemon = '[daemon]\nlisten = "[::]:9400"\n'
    with_url = daemon + 'public_url = "https://emailsync.example.com/"\n'
    assert page_base(load(tmp_path, with_url + textwrap.dedent(MINIMAL))) == (
        "https://emailsync.example.com"
    )
    assert page_base(load(tmp_path, daemon + textwrap.dedent(MINIMAL))) == "http://127.0.0.1:9400"
    ipv6 = '[daemon]\nlisten = "[::1]:9400"\n'
    assert page_base(load(tmp_path, ipv6 + textwrap.dedent(MINIMAL))) == "http://[::1]:9400"


@pytest.mark.parametrize(
    ("given", "problem"),
    [
        ("-1", "must be 1 to 3660 days, or 0 for links that never expire"),
        ("3661", "must be 1 to 3660 days, or 0 for links that never expire"),
        ('"90"', "must be an integer, not a string"),
        ("true", "must be an integer, not a boolean"),
    ],
)
def test_check_config_refuses_an_agent_token_days_out_of_range_and_names_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], given: str, problem: str
) -> None:
    """Issue 19: agents' links expire after agent_token_days (default 90); 0 only on purpose."""
    path = write_config(
        tmp_path, f"[daemon]\nagent_token_days = {given}\n" + textwrap.dedent(MINIMAL)
    )
    code, _, err = check_config(path, capsys)
    assert code == EXIT_CONFIG
    assert f"{path}: daemon.agent_token_days: {problem}" in err


def test_agent_links_expire_after_90_days_unless_the_config_says_otherwise(
    tmp_path: Path,
) -> None:
    assert load(tmp_path, textwrap.dedent(MINIMAL)).daemon.agent_token_days == 90
    never = "[daemon]\nagent_token_days = 0\n" + textwrap.dedent(MINIMAL)
    assert load(tmp_path, never).daemon.agent_token_days == 0


@pytest.mark.parametrize("key", ["state", "store"])
def test_the_state_database_is_named_by_state_or_by_its_old_name_store(
    tmp_path: Path, key: str
) -> None:
    """A config that named the database ``store`` (before issue 20) still loads the same."""
    path = tmp_path / "emailsync.toml"
    path.write_text(f'[daemon]\n{key} = "postgresql://emailsync@db/emailsync"\n')

    settings = load_settings(path)

    assert settings.state_url == "postgresql://emailsync@db/emailsync"
    assert settings.shared_state


def test_state_and_its_old_name_together_are_refused_naming_the_old_key(tmp_path: Path) -> None:
    """Two URLs for one database: the old key is named, with what to do."""
    text = '[daemon]\nstate = "sqlite:///a.db"\nstore = "sqlite:///b.db"\n'
    problems = problems_of(tmp_path, text)

    assert problems == [
        problem(tmp_path, "daemon.store", "is the old name of daemon.state: give daemon.state only")
    ]


def test_a_crm_url_given_as_the_state_database_says_where_it_belongs(tmp_path: Path) -> None:
    """``state = "https://crm…"`` is a mix-up of the two choices: the message says so."""
    problems = problems_of(tmp_path, '[daemon]\nstate = "https://crm.example/v1"\n')

    assert len(problems) == 1
    assert "daemon.state: " in problems[0]
    assert "a CRM goes in [crm] url" in problems[0]
