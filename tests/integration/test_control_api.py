"""The control API against its OpenAPI document, fuzzed by schemathesis, and what tokens reveal.

A real daemon subprocess with one real Dovecot mailbox; schemathesis (its CLI, in a subprocess,
with a fixed seed) generates requests from ``config/control-api.yaml`` and runs every check:
no 5xx, every status, content type, header and body as documented, 405 for undeclared methods,
401 when the token is left out, answers within ``MAX_RESPONSE_SECONDS``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from emailsync.web.routes import ROUTES

from .conftest import MailUser
from .daemonproc import DaemonFactory, wait_until

pytestmark = pytest.mark.dovecot

SCHEMA = Path(__file__).resolve().parents[2] / "config" / "control-api.yaml"
SETTINGS = Path(__file__).with_name("schemathesis.toml")
MAX_EXAMPLES = 25  # per operation and phase: about 400 requests, a few seconds
MAX_RESPONSE_SECONDS = 5.0  # "no hang": each answer within this
RUN_TIMEOUT_SECONDS = 90
# The operations of the document are the API routes of the listener's table
# (tests/unit/test_web.py checks that the two name the same ones).
OPERATIONS = sum(1 for route in ROUTES if not route.access.page)


def test_schemathesis_finds_no_5xx_hang_or_undocumented_response(
    user: MailUser, daemons: DaemonFactory, tmp_path: Path
) -> None:
    daemon = daemons.start([user])
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "--config-file",
            str(SETTINGS),
            "run",
            str(SCHEMA),
            "--url",
            f"http://127.0.0.1:{daemon.port}",
            "--header",
            f"Authorization: Bearer {daemon.token}",
            "--checks",
            "all",
            "--max-examples",
            str(MAX_EXAMPLES),
            "--seed",
            "20261201",
            "--request-timeout",
            "12",
            "--max-response-time",
            str(MAX_RESPONSE_SECONDS),
            # One worker: with two threads, hypothesis' lambda descriptions call ast.parse
            # concurrently, which CPython 3.11 can fail with "AST constructor recursion depth
            # mismatch" (a SystemError inside the fuzzer, not an answer of ours).
            "--workers",
            "1",
            "--no-color",
        ],
        cwd=tmp_path,  # its caches and reports stay out of the work tree
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_SECONDS,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-8000:]
    # Positive signal: it did test every operation with many cases.
    assert f"Tested: {OPERATIONS}" in output, output[-3000:]
    generated = re.search(r"(\d+) generated, (\d+) passed", output)
    assert generated is not None, output[-3000:]
    assert int(generated.group(1)) >= 200
    assert int(generated.group(1)) == int(generated.group(2))
    # The daemon is still whole: healthy, the mailbox still listed, no route failed.
    assert daemon.get("/healthz", token=None)[0] == 200
    assert user.address in daemon.mailboxes()
    assert "http_request_failed" not in daemon.log()
    assert "Traceback" not in daemon.log()


def test_wrong_or_missing_tokens_never_tell_whether_a_mailbox_exists(
    user: MailUser, daemons: DaemonFactory
) -> None:
    daemon = daemons.start([user])
    wait_until(lambda: daemon.mailboxes()[user.address]["state"] == "idle")
    known = user.address
    addresses = [known, known.upper(), "nobody@example.com", "..%2Fx@d", "%00"]
    for token in (None, "", "wrong", daemon.token + "x", daemon.token[:-1]):
        answers = {
            (action, address): daemon.post(f"/v1/mailboxes/{address}/{action}", token=token)
            for action in ("sync", "stop", "start")
            for address in addresses
        }
        assert set(answers.values()) == {(401, b'{"error": "missing or wrong bearer token"}')}, (
            token,
            answers,
        )
        assert daemon.get("/v1/mailboxes", token=token)[0] == 401
        page = daemon.get("/", token=token)
        assert page[0] == 200
        assert known.encode() not in page[1]
    # Nothing above reached the mailbox: still idle, never stopped.
    assert daemon.mailboxes()[known]["state"] == "idle"
    assert "mailbox_stopped" not in daemon.log()
    # With the token the difference is real (so the sameness above is not for want of one).
    assert daemon.post(f"/v1/mailboxes/{known}/sync")[0] == 202
    unknown = daemon.post("/v1/mailboxes/nobody@example.com/sync")
    assert unknown == (404, b'{"error": "no such mailbox"}')
    assert daemon.post("/v1/mailboxes/..%2Fx@d/sync") == unknown
    body = json.loads(daemon.get("/v1/mailboxes")[1])
    assert [m["address"] for m in body["mailboxes"]] == [known]
