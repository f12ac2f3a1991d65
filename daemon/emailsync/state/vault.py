"""The vault: the key that encrypts registered mailboxes' passwords and signs agent tokens.

Passwords entered through the API or the pages are stored AES-GCM encrypted (a 96-bit random
nonce per encryption, the mailbox address as associated data so a ciphertext cannot be moved
to another row). The key comes from a systemd credential (``emailsync-registry-key``: 32
random bytes, base64) or else from ``<state_dir>/registry.key``, created 0600 atomically on
first use. Each key has a *generation*; ciphertexts and agent tokens carry it.

Agent tokens are ``es2.<id>.<address>.<generation>.<expiry>.<mac>``: an HMAC-SHA256 over the
format, the token's random id, the address, the key generation and the expiry, with a key
derived from the vault key (HKDF). The id names the token's row in the state database, which
revokes it on its own (``emailsync.state.agenttoken``; the vault checks only the signature and the
expiry). Tokens issued before ids, ``es1.<address>.<generation>.<expiry>.<mac>``, are still
checked. ``emailsync keys rotate`` revokes every token at once: it makes a new generation,
re-encrypts every password and drops the old key.

Rotation, and why no interruption loses a password. The key file holds the current generation
N and, while a rotation is unfinished, the *pending* one N+1 (``keys`` has N+1, ``current`` is
still N). ``rotate`` (1) writes the pending key, (2) re-encrypts every secret to N+1 in one
store transaction, (3) writes ``current = N+1`` with N+1's key alone. N is dropped only in
(3), after the transaction that left no secret under N has committed. A rotation stopped
anywhere is resumed by the next ``rotate``, which reuses the pending key (a key that exists is
never replaced); one rotation at a time (a lock file), a second is refused. New secrets are
encrypted with the newest key (the pending one while a rotation runs), and ``store_secret``
re-writes a secret whose generation a rotation moved past between its encryption and its
write, so a set-up racing a rotation never leaves a secret under a dropped generation.

Every instance sharing a state database must hold the same key: ``emailsync.state.keycheck`` seals
a constant there, and a vault whose key does not open it stores no secret (``guard``).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from emailsync.errors import ConfigError
from emailsync.mail.address import mailbox_address_problem, normalise_address
from emailsync.privilege import access_hint, write_private_file
from emailsync.secret import Secret

KEY_FILE_NAME = "registry.key"
LOCK_FILE_NAME = "registry.key.lock"  # held by the one rotation that may run
KEY_CREDENTIAL = "emailsync-registry-key"
KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # NIST SP 800-38D: 96-bit nonces for GCM
TOKEN_PREFIX = "es2"  # noqa: S105 -- a format marker, not a secret
LEGACY_TOKEN_PREFIX = "es1"  # noqa: S105 -- tokens issued before ids: no row to revoke one by
_BLOB_VERSION = b"\x01"
# A token's id: what agenttoken makes (hex) or names a mailbox's es1 row with; never a "."
TOKEN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
# store_secret writes again when a rotation passed meanwhile; each retry needs another whole
# rotation to land inside one set-up's write, so a few are plenty.
STORE_SECRET_ATTEMPTS = 5


@dataclass(frozen=True)
class AgentToken:
    """What a valid agent token grants: one mailbox, until ``expires`` (None: no expiry).

    ``token_id`` names the token's row in the state database; None for an es1 token.
    """

    address: str
    expires: datetime | None
    token_id: str | None = None


class Vault:
    """Encrypts and decrypts stored secrets; issues and checks agent tokens.

    The key file is read at every use (it is tiny), so a daemon sees a rotation made by
    ``emailsync keys rotate`` in another process at once.
    """

    def __init__(self, state_dir: Path, *, credentials_dir: Path | None = None) -> None:
        self.path = state_dir / KEY_FILE_NAME
        env_dir = os.environ.get("CREDENTIALS_DIRECTORY")
        directory = credentials_dir or (Path(env_dir) if env_dir else None)
        credential = directory / KEY_CREDENTIAL if directory is not None else None
        self.credential = credential if credential is not None and credential.exists() else None
        # Called before a secret is encrypted for the store, and again after store_secret's
        # write: raises when this key may not write secrets (emailsync.state.keycheck: the state
        # database was set up with another key). None: no check.
        self.guard: Callable[[], None] | None = None

    # -- keys -------------------------------------------------------------------------------

    def _keys(self) -> tuple[int, dict[int, bytes]]:
        """(current generation, every key by generation), creating the key file if needed."""
        if self.credential is not None:
            return 1, {1: _decode_key(self.credential.read_text(encoding="utf-8"), "credential")}
        if not self.path.exists():
            self._create()
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            keys = {int(g): _decode_key(k, str(self.path)) for g, k in data["keys"].items()}
            current = int(data["current"])
        except PermissionError as exc:
            hint = access_hint(self.path, self.path.parent)
            raise ConfigError(
                [f"{self.path}: unreadable registry key file: {exc.strerror}; {hint}"]
            ) from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError([f"{self.path}: unreadable registry key file: {exc}"]) from None
        if current not in keys:
            raise ConfigError([f"{self.path}: the current key generation is missing"])
        return current, keys

    def _create(self) -> None:
        # Written to a temporary 0600 file and linked into place: never a partial key, and two
        # processes starting at once agree on one (the loser's link fails).
        text = _key_file_text(1, {1: secrets.token_bytes(KEY_BYTES)})
        tmp = self.path.with_name(f".{KEY_FILE_NAME}.{secrets.token_hex(4)}")
        try:
            write_private_file(tmp, text)
        except OSError as exc:
            hint = access_hint(self.path, self.path.parent)
            raise ConfigError(
                [f"{self.path}: cannot create the registry key: {exc.strerror}; {hint}"]
            ) from None
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)

    @property
    def generation(self) -> int:
        """The current key generation."""
        return self._keys()[0]

    @property
    def generations(self) -> list[int]:
        """Every generation this vault holds: the current one, then a pending one if any."""
        current, keys = self._keys()
        return [current, *sorted(g for g in keys if g != current)]

    def derived_key(self, info: bytes) -> bytes:
        """A 32-byte key for one purpose (HKDF ``info``) from the current generation's key.

        Every instance holding this key derives the same one (the pages' anonymous CSRF key);
        a rotation changes it.
        """
        current, keys = self._keys()
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(
            keys[current]
        )

    def describe(self) -> str:
        """Where the key comes from, for messages (never the key)."""
        if self.credential is not None:
            return f"the systemd credential {KEY_CREDENTIAL} ({self.credential})"
        return f"the file {self.path}"

    # -- secrets ----------------------------------------------------------------------------

    def encrypt(self, plaintext: str, address: str) -> bytes:
        """AES-GCM encrypt a secret for one mailbox: version, generation, nonce, ciphertext.

        The newest key is used: while a rotation runs that is the pending one, which outlives
        the rotation (the current one does not).
        """
        if self.guard is not None:
            self.guard()
        _, keys = self._keys()
        newest = max(keys)
        return _seal(keys[newest], newest, plaintext, address)

    def store_secret(self, plaintext: str, address: str, put: Callable[[bytes], None]) -> None:
        """Encrypt a secret and hand it to ``put`` (which commits it to the store).

        Checked after ``put``: when the newest generation is still the one used, any rotation
        that drops it has yet to write its pending key, so its re-encrypt transaction (which
        starts after that) sees this row. Otherwise a rotation ran between the encryption and
        the write and may have missed the row: it is written again under the newer key.
        """
        for _ in range(STORE_SECRET_ATTEMPTS):
            if self.guard is not None:
                self.guard()
            _, keys = self._keys()
            newest = max(keys)
            put(_seal(keys[newest], newest, plaintext, address))
            if self.guard is not None:
                self.guard()  # another instance rotated the key meanwhile: say so
            if max(self._keys()[1]) == newest:
                return
        raise ConfigError([f"{address}: the registry key kept rotating; set it up again"])

    def decrypt(self, blob: bytes, address: str) -> Secret:
        """The secret in ``blob``; ConfigError (naming the mailbox only) when it cannot be read."""
        _, keys = self._keys()
        key = keys.get(blob_generation(blob))
        if blob[:1] != _BLOB_VERSION or key is None:
            raise ConfigError([f"{address}: stored password is from an unknown key generation"])
        nonce, sealed = blob[5 : 5 + NONCE_BYTES], blob[5 + NONCE_BYTES :]
        try:
            return Secret(AESGCM(key).decrypt(nonce, sealed, address.encode()).decode())
        except (InvalidTag, UnicodeDecodeError):
            raise ConfigError([f"{address}: stored password cannot be decrypted"]) from None

    def rotate(self, reencrypt: Callable[[Callable[[bytes, str], bytes]], int]) -> int:
        """Make a new key generation, re-encrypt through ``reencrypt``, drop the old keys.

        ``reencrypt(convert)`` rewrites every stored blob with ``convert(blob, address)`` in
        one transaction and returns how many it rewrote. An unfinished rotation (a pending key
        in the file) is resumed with its key, never replaced. The old key is dropped only
        once ``reencrypt`` has returned. Agent tokens signed with an old generation stop
        working. Returns the new generation. ConfigError when another rotation is running.
        """
        if self.credential is not None:
            raise ConfigError(
                [
                    f"the registry key is the systemd credential {self.credential}: "
                    "rotate it by replacing the credential on every instance, then `emailsync "
                    "keys adopt --yes` once (and re-register the mailboxes)"
                ]
            )
        self._keys()  # creates the key file (and its directory) on a first use
        with self._rotation_lock():
            current, keys = self._keys()
            new = max(keys)
            if new == current:
                new = current + 1
                keys[new] = secrets.token_bytes(KEY_BYTES)
                write_private_file(self.path, _key_file_text(current, keys))

            def convert(blob: bytes, address: str) -> bytes:
                if blob_generation(blob) == new:
                    return blob  # re-encrypted by an earlier, interrupted run, or a new set-up
                plaintext = self.decrypt(blob, address).reveal()
                return _seal(keys[new], new, plaintext, address)

            reencrypt(convert)
            write_private_file(self.path, _key_file_text(new, {new: keys[new]}))
            return new

    @contextlib.contextmanager
    def _rotation_lock(self) -> Iterator[None]:
        """Hold the rotation lock (flock, released when the process dies) or refuse."""
        path = self.path.with_name(LOCK_FILE_NAME)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            hint = access_hint(path, path.parent)
            raise ConfigError([f"{path}: cannot open: {exc.strerror}; {hint}"]) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(
                    [f"{self.path}: a key rotation is already running; let it finish"]
                ) from None
            yield
        finally:
            os.close(fd)  # closing releases the lock

    # -- agent tokens -----------------------------------------------------------------------

    def issue_token(self, address: str, expires: datetime | None, *, token_id: str) -> str:
        """A signed token for one mailbox (its set-up, Start Sync, Stop and status).

        ``token_id`` is the id of the token's row in the state database (``agenttoken``).
        """
        if not TOKEN_ID.fullmatch(token_id):
            raise ValueError("a token id is letters, digits, '-' and '_'")
        generation, keys = self._keys()
        encoded = _b64(address.encode())
        expiry = str(int(expires.timestamp())) if expires is not None else "0"
        mac = _b64(_token_mac_v2(keys[generation], token_id, address, generation, expiry))
        return f"{TOKEN_PREFIX}.{token_id}.{encoded}.{generation}.{expiry}.{mac}"

    def check_token(self, token: str, *, now: datetime | None = None) -> AgentToken | None:
        """What ``token`` grants, or None when it is not a valid, current, unexpired token.

        The signature and expiry only: whether its id was revoked is the state database's
        to say (``agenttoken.AgentTokens.check``).
        """
        parts = token.split(".")
        token_id: str | None = None
        if len(parts) == 6 and parts[0] == TOKEN_PREFIX and TOKEN_ID.fullmatch(parts[1]):
            _, token_id, encoded, generation_text, expiry, mac = parts
        elif len(parts) == 5 and parts[0] == LEGACY_TOKEN_PREFIX:
            _, encoded, generation_text, expiry, mac = parts
        else:
            return None
        if not generation_text.isdigit() or not expiry.isdigit():
            return None
        try:
            address = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
            current, keys = self._keys()
        except (ValueError, UnicodeDecodeError):
            return None
        generation = int(generation_text)
        if generation != current:
            return None  # rotation revokes every token
        if token_id is None:
            expected = _b64(_token_mac(keys[generation], address, generation, expiry))
        else:
            expected = _b64(_token_mac_v2(keys[generation], token_id, address, generation, expiry))
        if not hmac.compare_digest(expected.encode(), mac.encode()):
            return None
        when = datetime.fromtimestamp(int(expiry), UTC) if expiry != "0" else None
        if when is not None and when <= (now or datetime.now(UTC)):
            return None
        if normalise_address(address) != address or mailbox_address_problem(address) is not None:
            return None
        return AgentToken(address, when, token_id)


def _token_mac(key: bytes, address: str, generation: int, expiry: str) -> bytes:
    derived = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"emailsync agent token"
    ).derive(key)
    message = f"{address}\n{generation}\n{expiry}".encode()
    return hmac.new(derived, message, hashlib.sha256).digest()


def _token_mac_v2(key: bytes, token_id: str, address: str, generation: int, expiry: str) -> bytes:
    # Its own HKDF info: no es1 MAC is ever a valid es2 MAC, whatever the fields hold.
    derived = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"emailsync agent token es2"
    ).derive(key)
    message = f"{TOKEN_PREFIX}\n{token_id}\n{address}\n{generation}\n{expiry}".encode()
    return hmac.new(derived, message, hashlib.sha256).digest()


def _seal(key: bytes, generation: int, plaintext: str, address: str) -> bytes:
    nonce = secrets.token_bytes(NONCE_BYTES)
    sealed = AESGCM(key).encrypt(nonce, plaintext.encode(), address.encode())
    return _BLOB_VERSION + generation.to_bytes(4, "big") + nonce + sealed


def blob_generation(blob: bytes) -> int:
    return int.from_bytes(blob[1:5], "big")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _decode_key(text: str, where: str) -> bytes:
    with contextlib.suppress(ValueError):
        key = base64.b64decode(text.strip(), validate=True)
        if len(key) == KEY_BYTES:
            return key
    raise ConfigError([f"registry key in {where} is not {KEY_BYTES} bytes of base64"])


def _key_file_text(current: int, keys: dict[int, bytes]) -> str:
    encoded = {str(g): base64.b64encode(k).decode() for g, k in sorted(keys.items())}
    return json.dumps({"current": current, "keys": encoded}) + "\n"
