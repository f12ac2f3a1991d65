"""Secrets: where each one lives, and reading it without ever showing it."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from emailsync.errors import ConfigError

_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.DOTALL)


class Secret:
    """A secret string that never shows itself in repr, str or logs."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself; call only where it is sent to the server that needs it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


@dataclass(frozen=True)
class SecretSource:
    """Where a secret lives: a file, an environment variable or a systemd credential."""

    file: Path | None = None
    env: str | None = None
    credential: str | None = None

    def key(self, prefix: str) -> str:
        """The config key that names this source, e.g. ``password_file`` for prefix password."""
        field = "file" if self.file is not None else "env" if self.env is not None else "credential"
        return f"{prefix}_{field}"

    def describe(self) -> str:
        """Where the secret is read from, for error messages (never the value)."""
        if self.file is not None:
            return f"file {self.file}"
        if self.env is not None:
            return f"environment variable {self.env}"
        return f"credential {self.credential!r} in $CREDENTIALS_DIRECTORY"

    def read(self) -> Secret:
        """Read the secret now; raises ConfigError naming the source (never the value)."""
        if self.env is not None:
            value = os.environ.get(self.env)
            if not value:
                raise ConfigError([f"secret: {self.describe()} is not set or empty"])
            return Secret(value)
        path = self.path()
        try:
            value = path.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise ConfigError([f"secret: cannot read {self.describe()}: {exc.strerror}"]) from None
        except UnicodeDecodeError:
            # ``from None`` and no message from the codec: its text quotes bytes of the secret.
            raise ConfigError([f"secret: {self.describe()} is not UTF-8 text"]) from None
        if not value:
            raise ConfigError([f"secret: {self.describe()} is empty"])
        return Secret(value)

    def path(self) -> Path:
        """The file the secret is in (for file and credential sources)."""
        if self.file is not None:
            return self.file
        creds = os.environ.get("CREDENTIALS_DIRECTORY", "")
        return Path(creds or "/nonexistent-credentials-directory") / (self.credential or "")


@dataclass(frozen=True)
class ClientCertificate:
    """An app's certificate credential as read from its PEM file; the key hides in a Secret."""

    private_key: Secret  # the PEM block of the private key, for MSAL only
    thumbprint: str  # SHA-1 of the certificate (DER) in upper-case hex, as Entra ID shows it
    certificate_chain: str | None  # the PEM certificate(s), leaf first; None when absent
    expires: datetime | None = None  # the certificate's notAfter, for the expiry gauge


def read_client_certificate(path: Path, thumbprint: str | None = None) -> ClientCertificate:
    """Read an app's private key and certificate from a PEM file.

    The thumbprint is computed from the first certificate unless given; a file with only a
    key needs it given. Raises ConfigError naming the file, never quoting key material.
    """
    try:
        text = path.read_bytes().decode("ascii")
    except OSError as exc:
        raise ConfigError([f"certificate: cannot read file {path}: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        # ``from None`` and no message from the codec: its text would quote bytes of the key.
        raise ConfigError([f"certificate: file {path} is not PEM text"]) from None
    blocks = [(match.group(1), match.group(0) + "\n") for match in _PEM_BLOCK.finditer(text)]
    keys = [(label, pem) for label, pem in blocks if label.endswith("PRIVATE KEY")]
    certificates = [pem for label, pem in blocks if label == "CERTIFICATE"]
    if len(keys) != 1:
        what = "no private key" if not keys else "more than one private key"
        raise ConfigError([f"certificate: file {path} holds {what} (PEM PRIVATE KEY block)"])
    label, key_pem = keys[0]
    encrypted = ConfigError(
        [
            f"certificate: the private key in file {path} is encrypted; store it without "
            "a passphrase in a file only emailsync can read"
        ]
    )
    if label.startswith("ENCRYPTED"):
        raise encrypted
    try:
        key = serialization.load_pem_private_key(key_pem.encode("ascii"), password=None)
    except TypeError:  # a traditional key with "Proc-Type: 4,ENCRYPTED"
        raise encrypted from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError([f"certificate: the private key in file {path} is invalid"]) from None
    if not isinstance(key, rsa.RSAPrivateKey):
        # RFC 7523 client assertions to Entra ID are signed with RS256 (or PS256): RSA only.
        raise ConfigError([f"certificate: the private key in file {path} is not an RSA key"])
    if not certificates:
        if thumbprint is None:
            raise ConfigError(
                [
                    f"certificate: file {path} holds no certificate; add it after the key "
                    "or set client_certificate_thumbprint"
                ]
            )
        return ClientCertificate(Secret(key_pem), thumbprint, None)
    try:
        leaf = x509.load_pem_x509_certificate(certificates[0].encode("ascii"))
    except ValueError:
        raise ConfigError([f"certificate: the certificate in file {path} is invalid"]) from None
    if _public_key_der(leaf.public_key()) != _public_key_der(key.public_key()):
        raise ConfigError(
            [f"certificate: the private key in file {path} does not belong to its certificate"]
        )
    # SHA-1 only names the certificate here (x5t, RFC 7515 §4.1.7), as Entra ID does.
    computed = leaf.fingerprint(hashes.SHA1()).hex().upper()  # noqa: S303 -- a name, not a MAC
    if thumbprint is not None and thumbprint != computed:
        raise ConfigError(
            [
                f"certificate: client_certificate_thumbprint {thumbprint} does not match the "
                f"certificate in file {path} (its SHA-1 thumbprint is {computed})"
            ]
        )
    return ClientCertificate(
        Secret(key_pem), computed, "".join(certificates), leaf.not_valid_after_utc
    )


def _public_key_der(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
