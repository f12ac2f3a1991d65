"""Agent tokens one by one: a random id in each token (es2), a row per token in the state
database (SQLite and PostgreSQL alike), a default expiry, revocation by id or by mailbox, the
last use recorded at most once a minute, and what becomes of es1 tokens issued before."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from emailsync.state.agenttoken import LAST_USED_WRITE_SECONDS, AgentTokens, legacy_token_id
from emailsync.state.base import IssuedToken, TokenLedger
from emailsync.state.sqlite import SqliteStore
from emailsync.state.vault import Vault, _token_mac

from .stores import KINDS, closed_after, open_store_of

AGENT = "agent@example.com"
OTHER = "other@example.com"
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


class Clock:
    """Wall clock and monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = T0
        self.mono = 1000.0

    def wall(self) -> datetime:
        return self.now

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
        self.mono += seconds


@pytest.fixture(params=KINDS)
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TokenLedger]:
    """The tokens table of each state database: both keep the same semantics."""
    yield from closed_after(open_store_of(request.param, request, tmp_path))


@pytest.fixture
def clock() -> Clock:
    return Clock()


def tokens_with(
    ledger: TokenLedger, clock: Clock, tmp_path: Path, default_days: int = 90
) -> AgentTokens:
    return AgentTokens(
        Vault(tmp_path / "vault"),
        ledger,
        default_days=default_days,
        clock=clock.wall,
        monotonic=clock.monotonic,
    )


def es1_token(vault: Vault, address: str, expires: datetime | None = None) -> str:
    """A token as emailsync issued them before ids (``es1``), signed with the vault's key."""
    generation, keys = vault._keys()
    expiry = str(int(expires.timestamp())) if expires is not None else "0"
    encoded = base64.urlsafe_b64encode(address.encode()).decode().rstrip("=")
    mac = _token_mac(keys[generation], address, generation, expiry)
    return (
        f"es1.{encoded}.{generation}.{expiry}.{base64.urlsafe_b64encode(mac).decode().rstrip('=')}"
    )


# -- the token and its MAC -------------------------------------------------------------------


def test_an_issued_token_carries_its_id_and_the_mac_covers_it(tmp_path: Path) -> None:
    """es2.<id>.<address>.<generation>.<expiry>.<mac>: another id, address or expiry in the
    same token is refused."""
    vault = Vault(tmp_path)
    token = vault.issue_token(AGENT, T0 + timedelta(days=1), token_id="0123456789abcdef")
    prefix, token_id, address, generation, expiry, mac = token.split(".")
    assert (prefix, token_id) == ("es2", "0123456789abcdef")
    granted = vault.check_token(token, now=T0)
    assert granted is not None
    assert (granted.address, granted.token_id) == (AGENT, "0123456789abcdef")
    other = base64.urlsafe_b64encode(OTHER.encode()).decode().rstrip("=")
    for forged in (
        ".".join([prefix, "fedcba9876543210", address, generation, expiry, mac]),
        ".".join([prefix, token_id, other, generation, expiry, mac]),
        ".".join([prefix, token_id, address, generation, "0", mac]),
        ".".join(["es1", address, generation, expiry, mac]),
    ):
        assert vault.check_token(forged, now=T0) is None, forged


def test_an_es1_token_still_checks_without_an_id(tmp_path: Path) -> None:
    vault = Vault(tmp_path)
    granted = vault.check_token(es1_token(vault, AGENT))
    assert granted is not None
    assert (granted.address, granted.token_id) == (AGENT, None)


# -- issuing, checking, revoking -------------------------------------------------------------


def test_a_token_issued_without_days_expires_after_the_default(
    ledger: TokenLedger, clock: Clock, tmp_path: Path
) -> None:
    tokens = tokens_with(ledger, clock, tmp_path, default_days=90)
    token, issued = tokens.issue(AGENT, None, "api")
    assert issued.expires_at == T0 + timedelta(days=90)
    assert ledger.issued_token(issued.id) == issued
    clock.advance(90 * 86400 - 1)
    assert tokens.check(token) is not None
    clock.advance(1)
    assert tokens.check(token) is None
    # Days given win over the default; a default of 0 (set on purpose) issues no expiry.
    assert tokens.issue(AGENT, 2, "api")[1].expires_at == clock.now + timedelta(days=2)
    forever = tokens_with(ledger, clock, tmp_path, default_days=0)
    assert forever.issue(AGENT, None, "api")[1].expires_at is None


def test_revoking_one_of_two_tokens_leaves_the_other_working(
    ledger: TokenLedger, clock: Clock, tmp_path: Path
) -> None:
    tokens = tokens_with(ledger, clock, tmp_path)
    first, issued = tokens.issue(AGENT, None, "page")
    second, _ = tokens.issue(AGENT, None, "cli:root")
    assert tokens.check(first) is not None
    revoked = tokens.revoke(issued.id)
    assert [t.id for t in revoked] == [issued.id]
    assert tokens.check(first) is None
    granted = tokens.check(second)
    assert granted is not None
    assert granted.address == AGENT


def test_a_token_the_database_does_not_know_is_refused(
    ledger: TokenLedger, clock: Clock, tmp_path: Path
) -> None:
    """A database restored from a backup older than the token: no row, no access."""
    tokens = tokens_with(ledger, clock, tmp_path)
    unknown = tokens.vault.issue_token(AGENT, None, token_id="00000000deadbeef")
    assert tokens.vault.check_token(unknown) is not None  # the signature alone is fine
    assert tokens.check(unknown) is None


def test_revoking_by_address_ends_every_token_of_the_mailbox_and_no_other(
    ledger: TokenLedger, clock: Clock, tmp_path: Path
) -> None:
    tokens = tokens_with(ledger, clock, tmp_path)
    mine = [tokens.issue(AGENT, None, "api")[0] for _ in range(2)]
    theirs, _ = tokens.issue(OTHER, None, "api")
    old = es1_token(tokens.vault, AGENT)
    assert tokens.check(old) is not None
    revoked = tokens.revoke(AGENT.upper())  # an address in any case
    assert len(revoked) == 3  # two es2 tokens and the mailbox's es1 tokens
    assert all(t.address == AGENT and t.revoked_at == T0 for t in revoked)
    assert [tokens.check(t) for t in [*mine, old]] == [None, None, None]
    assert tokens.check(theirs) is not None
    with pytest.raises(ValueError, match="neither a token id nor a mailbox address"):
        tokens.revoke("not a token")


def test_the_last_use_is_written_at_most_once_a_minute(
    ledger: TokenLedger, clock: Clock, tmp_path: Path
) -> None:
    tokens = tokens_with(ledger, clock, tmp_path)
    token, issued = tokens.issue(AGENT, None, "api")
    assert ledger.issued_token(issued.id).last_used_at is None  # type: ignore[union-attr]
    assert tokens.check(token) is not None
    assert ledger.issued_token(issued.id).last_used_at == T0  # type: ignore[union-attr]
    clock.advance(LAST_USED_WRITE_SECONDS - 1)
    assert tokens.check(token) is not None
    assert ledger.issued_token(issued.id).last_used_at == T0  # type: ignore[union-attr]
    clock.advance(1)
    assert tokens.check(token) is not None
    assert ledger.issued_token(issued.id).last_used_at == clock.now  # type: ignore[union-attr]


def test_an_es1_token_is_listed_once_used_and_revoked_with_its_mailbox(
    ledger: TokenLedger, clock: Clock, tmp_path: Path
) -> None:
    """es1 tokens keep working after the upgrade (no agent loses their link at once); the
    first use records one row for the mailbox's es1 tokens, which revokes them all."""
    tokens = tokens_with(ledger, clock, tmp_path)
    old = es1_token(tokens.vault, AGENT)
    assert tokens.issued() == []
    assert tokens.check(old) is not None
    (row,) = tokens.issued()
    assert (row.id, row.address, row.issued_by, row.issued_at) == (
        legacy_token_id(AGENT),
        AGENT,
        "es1",
        None,
    )
    assert row.last_used_at == T0
    assert [t.id for t in tokens.revoke(row.id)] == [row.id]
    assert tokens.check(old) is None
    # A mailbox's es1 tokens that were never used since are revoked with its address too.
    unseen = es1_token(tokens.vault, OTHER)
    tokens.revoke(OTHER)
    assert tokens.check(unseen) is None


def test_rotating_the_key_marks_every_token_revoked(
    ledger: TokenLedger, clock: Clock, tmp_path: Path
) -> None:
    tokens = tokens_with(ledger, clock, tmp_path)
    token, _ = tokens.issue(AGENT, None, "api")
    tokens.rotated()
    assert [t.state(clock.now) for t in tokens.issued()] == ["revoked"]
    assert tokens.check(token) is None


def test_a_listed_token_says_whether_it_is_active_expired_or_revoked() -> None:
    token = IssuedToken("a1", AGENT, T0, "api", T0 + timedelta(days=1))
    assert token.state(T0) == "active"
    assert token.state(T0 + timedelta(days=1)) == "expired"
    assert IssuedToken("a1", AGENT, T0, "api", None, revoked_at=T0).state(T0) == "revoked"


def test_with_a_crm_the_cli_keeps_tokens_in_the_configured_state_database(
    tmp_path: Path,
) -> None:
    """Tokens are emailsync's state: with a [crm] timeline they still go to ``[daemon]
    state`` (here a SQLite file outside state_dir), where the daemon checks them."""
    from emailsync.config import load_settings  # noqa: PLC0415
    from emailsync.state.agenttoken import open_agent_tokens  # noqa: PLC0415

    database = tmp_path / "shared" / "state.db"
    database.parent.mkdir()
    (tmp_path / "crm-secret").write_text("s3cret-shared-with-the-crm\n")
    config = tmp_path / "emailsync.toml"
    config.write_text(
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\nstate = "sqlite://{database}"\n'
        '[crm]\nurl = "https://crm.example/v1"\nsecret_file = "crm-secret"\n'
    )
    with open_agent_tokens(load_settings(config)) as tokens:
        tokens.issue("agent@example.com", None, "api")

    state = SqliteStore(database)
    try:
        assert [t.address for t in state.issued_tokens()] == ["agent@example.com"]
    finally:
        state.close()
    assert not (tmp_path / "state" / "emailsync.db").exists()
