"""The key check: every instance that shares a state database holds the same registry key.

The state database's ``state_meta`` row ``key_check`` holds a constant sealed by the vault
(AES-GCM, like a stored password: version, key generation, nonce, ciphertext) under the
registry key it was set up with. The first instance to start writes it (``INSERT … ON
CONFLICT DO NOTHING`` and a re-read, so instances starting together agree on one); every
later start must open it with its own key, the current one or, while a rotation is
unfinished, the pending one. An instance whose key does not open it would write secrets
nobody else can read: ``emailsync run`` refuses to start (``ConfigError``, exit 78),
``check-config`` reports it, and a running daemon checks it again before each secret it
writes (``guard``: ``KeyUnavailableError``, an API or page answers 500 "tell IT").

``emailsync keys rotate`` seals the check under the new generation (``rotate_key_check``) in
a transaction of its own, after the pending key is written and before the secrets are
re-encrypted: from then on an instance that holds only the old key fails the check, so it
neither starts nor writes a secret the rotation would leave behind. The instance that rotated
holds both keys until it switches and passes. The operator then gives every other instance
the new key file (or credential); until then they refuse to start and to store secrets.

The statements are written once, with ``?`` markers, for SQLite and PostgreSQL (``SqlEngine``).
The message never shows key material: generations and where the key came from only.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import structlog

from emailsync.errors import ConfigError, KeyUnavailableError, StoreError
from emailsync.state import POSTGRES_SCHEMES, open_state, sqlite_path
from emailsync.state.base import Registry
from emailsync.state.sqlcore import SqlEngine, dialect_of
from emailsync.state.tokencache_sql import reseal_shared_state
from emailsync.state.vault import Vault, blob_generation

log = structlog.get_logger(__name__)

KEY_CHECK = "key_check"  # the row's name in state_meta
# The sealed constant, and the associated data that binds it to its row (never a mailbox's).
CHECK_PLAINTEXT = "emailsync registry key check"
CHECK_LABEL = "state_meta:key_check"

_REMEDY = (
    "every instance must hold the same key, or the secrets it writes are unreadable to the "
    "others: copy the key from an instance that works (its <state_dir>/registry.key, or its "
    "credential), also after a `keys rotate` on another instance; if that key is lost for "
    "good, or a replaced credential is the one to keep, `emailsync keys adopt --yes` makes "
    "this key the database's (what the old key encrypted must be set up again)"
)
_READ = "SELECT value FROM state_meta WHERE name = ?"
_INSERT = "INSERT INTO state_meta (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING"
_UPDATE = "UPDATE state_meta SET value = ? WHERE name = ?"
_ADOPT = (
    "INSERT INTO state_meta (name, value) VALUES (?, ?)"
    " ON CONFLICT (name) DO UPDATE SET value = excluded.value"
)


def state_engine(store: object) -> SqlEngine | None:
    """The SQL database that holds ``store``'s state: the store itself (SQLite, PostgreSQL),
    a CRM store's local ``state()`` SQLite, or None when there is none."""
    if isinstance(store, SqlEngine):
        return store
    state = getattr(store, "state", None)
    if callable(state):
        engine = state()
        if isinstance(engine, SqlEngine):
            return engine
    return None


def ensure_key_check(store: object, vault: Vault) -> None:
    """Write the key check if the database has none; else check that ``vault`` opens it.

    ``ConfigError`` (exit 78) naming the mismatch when it does not, or when the key itself is
    unreadable. Nothing to do for a store without a state database.
    """
    engine = state_engine(store)
    if engine is None:
        return
    blob = _read(engine)
    if blob is None:
        sealed = vault.encrypt(CHECK_PLAINTEXT, CHECK_LABEL)
        with engine.transaction("write the key check") as conn:
            conn.execute(_sql(engine, _INSERT), (KEY_CHECK, sealed))
        blob = _read(engine)  # another instance's, if it wrote first
        if blob is None:
            raise ConfigError(["the state database lost its key check as it was written"])
    problem = _mismatch(blob, vault)
    if problem is not None:
        raise ConfigError([problem])


def key_check_problem(store: object, vault: Vault) -> str | None:
    """What ``ensure_key_check`` would refuse, without writing anything (``check-config``).

    None when the key opens the check, or when there is no check yet.
    """
    engine = state_engine(store)
    if engine is None:
        return None
    blob = _read(engine)
    if blob is None:
        return None
    if vault.credential is None and not vault.path.exists():  # not made here: reading only
        return (
            f"this instance has no registry key yet ({vault.describe()}): its first start "
            "would make a new one, which does not match the one this state database was set "
            f"up with (generation {blob_generation(blob)}); {_REMEDY}"
        )
    return _mismatch(blob, vault)


def check_state_database(url: str, state_dir: Path, vault: Vault) -> tuple[list[str], list[str]]:
    """``check-config``'s key check of the state database ``url`` names: (problems, notes).

    Creates nothing: a SQLite file that does not exist yet is set up by the first start, and
    a key file is not made. A database that cannot be opened is a note, not a problem of the
    config (``run`` says so itself).
    """
    if urlsplit(url.strip()).scheme.lower() not in POSTGRES_SCHEMES:
        try:
            if not sqlite_path(url, state_dir).exists():
                return [], []
        except ConfigError:
            return [], []  # an unusable URL: check-config reports it on its own
    try:
        store = open_state(url, state_dir)
    except StoreError as exc:
        return [], [f"the registry key was not checked against the state database: {exc}"]
    try:
        problem = key_check_problem(store, vault)
    except ConfigError as exc:  # the key file itself is unreadable or damaged
        return list(exc.problems), []
    except StoreError as exc:
        return [], [f"the registry key was not checked against the state database: {exc}"]
    finally:
        store.close()
    return ([problem] if problem is not None else []), []


def rotate_key_check(store: object, convert: Callable[[bytes, str], bytes]) -> None:
    """Re-seal the key check with a rotation's ``convert`` (``Vault.rotate``), in one transaction.

    Call it inside the rotation before the secrets are re-encrypted (see the module's
    docstring); ``ensure_key_check`` before the rotation makes sure there is a row.
    """
    engine = state_engine(store)
    if engine is None:
        return
    with engine.transaction("re-seal the key check") as conn:
        row = conn.execute(_sql(engine, _READ), (KEY_CHECK,)).fetchone()
        if row is not None:
            conn.execute(_sql(engine, _UPDATE), (convert(bytes(row[0]), CHECK_LABEL), KEY_CHECK))


def key_check_guard(store: object, vault: Vault) -> Callable[[], None] | None:
    """A ``Vault.guard`` for a running daemon: before a secret is written, the key check.

    It raises ``KeyUnavailableError`` (the API and the pages answer 500 "tell IT") and logs
    the problem when this instance's key no longer opens it: another instance rotated the
    key, or this one's key file was replaced. None for a store without a state database.
    """
    engine = state_engine(store)
    if engine is None:
        return None

    def guard() -> None:
        blob = _read(engine)
        problem = _mismatch(blob, vault) if blob is not None else None
        if problem is not None:
            log.error("registry_key_mismatch", problem=problem)
            raise KeyUnavailableError(problem)

    return guard


def _mismatch(blob: bytes, vault: Vault) -> str | None:
    """Why ``vault`` cannot open the key check, or None when it can.

    ``ConfigError`` as is when the key itself cannot be read (that message names the file).
    """
    vault.generations  # noqa: B018 -- reads the key: its own problems are raised as they are
    try:
        opened = vault.decrypt(blob, CHECK_LABEL).reveal()
    except ConfigError:
        return _message(vault, blob_generation(blob))
    if opened != CHECK_PLAINTEXT:
        return _message(vault, blob_generation(blob))
    return None


def _message(vault: Vault, database_generation: int) -> str:
    generations = vault.generations
    held = f"generation {generations[0]}"
    if len(generations) > 1:
        held += f", and {generations[1]} of an unfinished rotation"
    return (
        f"the registry key ({held}, from {vault.describe()}) does not match the one this "
        f"state database was set up with (generation {database_generation}); {_REMEDY}"
    )


def _read(engine: SqlEngine) -> bytes | None:
    with engine.reading("read the key check") as conn:
        row = conn.execute(_sql(engine, _READ), (KEY_CHECK,)).fetchone()
    return bytes(row[0]) if row is not None else None


def _sql(engine: SqlEngine, text: str) -> str:
    return dialect_of(engine).sql(text)


def bind_key_check(store: object, vault: Vault) -> None:
    """At daemon start: ``ensure_key_check``, then ``vault`` checks again before each secret.

    ``ConfigError`` (exit 78) when this instance's key does not open the state database's
    check; afterwards ``vault.guard`` refuses secrets once it no longer does (a rotation on
    another instance).
    """
    ensure_key_check(store, vault)
    vault.guard = key_check_guard(store, vault)


def adopt_key_check(store: object, vault: Vault) -> bool:
    """Seal the key check under ``vault``'s key, replacing any (``emailsync keys adopt``).

    For when the key the database was set up with is lost for good, or a systemd credential
    was replaced: secrets stored under the old key stay unreadable (their mailboxes are set
    up again), and every other instance must be given this key. False when the key already
    opens the check (nothing written).
    """
    engine = state_engine(store)
    if engine is None:
        return False
    blob = _read(engine)
    if blob is not None and _mismatch(blob, vault) is None:
        return False
    sealed = vault.encrypt(CHECK_PLAINTEXT, CHECK_LABEL)
    with engine.transaction("adopt the key check") as conn:
        conn.execute(_sql(engine, _ADOPT), (KEY_CHECK, sealed))
    return True


def rotate_registry_key(registry: Registry, vault: Vault) -> int:
    """``emailsync keys rotate`` on one instance of a state database; the new generation.

    Refused (``ConfigError``) when this instance's key does not open the check: rotating
    with it would strand the others' secrets. Inside ``Vault.rotate``, once the pending key
    is written: the check is re-sealed under it (instances holding only the old key fail it
    from then on), then every secret is re-encrypted in the registry's one transaction.
    """
    ensure_key_check(registry, vault)

    def reencrypt(convert: Callable[[bytes, str], bytes]) -> int:
        rotate_key_check(registry, convert)
        engine = state_engine(registry)
        if engine is not None:  # token caches, page sessions, sign-ins under way (issue 20)
            reseal_shared_state(engine, convert)
        return registry.reencrypt_secrets(convert)

    return vault.rotate(reencrypt)
