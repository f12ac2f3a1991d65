"""Problems with the secrets a config names: unreadable or (a control token) too weak."""

from __future__ import annotations

from emailsync.config.checks import weak_token_problem
from emailsync.config.settings import Settings
from emailsync.errors import ConfigError


def check_secrets(settings: Settings) -> list[str]:
    """Problems with secrets that the config names but that cannot be read (values unseen)."""
    return mailbox_secret_problems(settings) + shared_secret_problems(settings)


def mailbox_secret_problems(settings: Settings) -> list[str]:
    """Unreadable mailbox passwords: each concerns one mailbox only."""
    problems: list[str] = []
    for index, mailbox in enumerate(settings.mailboxes):
        if mailbox.enabled and mailbox.password is not None:
            try:
                mailbox.password.read()
            except ConfigError as exc:
                key = f"mailboxes[{index}].{mailbox.password.key('password')}"
                problems.extend(
                    f"{settings.path}: {key}: mailbox {mailbox.address}: {p}" for p in exc.problems
                )
    return problems


def shared_secret_problems(settings: Settings) -> list[str]:
    """Unreadable secrets every mailbox or the daemon itself needs (token, Office 365 app)."""
    problems: list[str] = []
    if settings.daemon.control_token is not None:
        source = settings.daemon.control_token
        try:
            weak = weak_token_problem(source.read().reveal())
        except ConfigError as exc:
            problems.extend(
                f"{settings.path}: daemon.control_token_file: {p}" for p in exc.problems
            )
        else:
            if weak is not None:
                problems.append(
                    f"{settings.path}: daemon.control_token_file: {source.describe()} {weak}"
                )
    if settings.office365 is not None and settings.office365.client_secret is not None:
        source = settings.office365.client_secret
        try:
            source.read()
        except ConfigError as exc:
            key = f"office365.{source.key('client_secret')}"
            problems.extend(f"{settings.path}: {key}: {p}" for p in exc.problems)
    if settings.office365 is not None and settings.office365.client_certificate is not None:
        try:
            settings.office365.read_client_certificate()
        except ConfigError as exc:
            key = "office365.client_certificate_file"
            problems.extend(f"{settings.path}: {key}: {p}" for p in exc.problems)
    if settings.crm is not None:
        try:
            settings.crm.secret.read()
        except ConfigError as exc:
            key = f"crm.{settings.crm.secret.key('secret')}"
            problems.extend(f"{settings.path}: {key}: {p}" for p in exc.problems)
    return problems
