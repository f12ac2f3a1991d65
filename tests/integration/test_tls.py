"""TLS to the IMAP server: ssl and starttls verified against a CA, and refused otherwise."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from emailsync.dev.dovecot import Dovecot, DovecotOptions, TlsFiles

from .daemonproc import run_cli
from .mailenv import MailUser, new_user

pytestmark = pytest.mark.dovecot


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def tls_dovecot(ca: trustme.CA) -> Iterator[Dovecot]:
    """Dovecot with imaps and STARTTLS, its certificate (for "localhost" only) from ``ca``."""
    directory = Path(tempfile.mkdtemp(prefix="emailsync-tls-"))
    leaf = ca.issue_cert("localhost")
    chain, key = directory / "chain.pem", directory / "key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(chain))
    leaf.private_key_pem.write_to_path(str(key))
    server = Dovecot(None, DovecotOptions(tls=TlsFiles(chain, key)))
    server.start()
    yield server
    server.close()
    shutil.rmtree(directory, ignore_errors=True)


def tls_config(
    tmp_path: Path,
    user: MailUser,
    *,
    port: int,
    security: str,
    ca_file: Path | None,
    host: str = "localhost",
) -> Path:
    (tmp_path / "password").write_text(user.password + "\n")
    ca_line = f'ca_file = "{ca_file}"' if ca_file else ""
    config = tmp_path / "emailsync.toml"
    config.write_text(
        f"""[daemon]
state_dir = "{tmp_path / "state"}"
timeout_seconds = 10

[branches.b]
host = "{host}"
port = {port}
security = "{security}"
{ca_line}

[[mailboxes]]
address = "{user.address}"
branch = "b"
password_file = "password"
"""
    )
    return config


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.mark.parametrize(("security", "port"), [("ssl", "ssl_port"), ("starttls", "port")])
def test_with_the_servers_ca_logs_in(
    security: str, port: str, tls_dovecot: Dovecot, tmp_path: Path, ca_file: Path
) -> None:
    """Implicit TLS on the SSL port, STARTTLS on the plain one."""
    user = new_user(tls_dovecot)
    where = getattr(tls_dovecot, port)
    config = tls_config(tmp_path, user, port=where, security=security, ca_file=ca_file)
    result = run_cli(config, "setup", user.address)
    assert result.returncode == 0, result.stderr


def test_an_untrusted_certificate_is_refused_and_nothing_is_sent(
    tls_dovecot: Dovecot, tmp_path: Path
) -> None:
    user = new_user(tls_dovecot)
    config = tls_config(tmp_path, user, port=tls_dovecot.ssl_port, security="ssl", ca_file=None)
    result = run_cli(config, "setup", user.address)
    assert result.returncode == 69
    assert "TLS failed" in result.stderr
    assert "CERTIFICATE_VERIFY_FAILED" in result.stderr
    assert user.password not in result.stderr
    assert f"user=<{user.address}>" not in tls_dovecot.log_tail(400)  # no login was attempted


def test_a_certificate_for_another_host_is_refused(
    tls_dovecot: Dovecot, tmp_path: Path, ca_file: Path
) -> None:
    user = new_user(tls_dovecot)
    config = tls_config(
        tmp_path, user, port=tls_dovecot.ssl_port, security="ssl", ca_file=ca_file, host="127.0.0.1"
    )
    result = run_cli(config, "setup", user.address)
    assert result.returncode == 69
    assert "TLS failed" in result.stderr
    assert "IP address mismatch" in result.stderr or "doesn't match" in result.stderr
