"""The CRM connector's pure parts: request signing, the lookup cache, HTTP header parsing, [crm]."""

from __future__ import annotations

import hashlib
import hmac
import textwrap
from pathlib import Path

import pytest
from openapi_spec_validator import validate
from openapi_spec_validator.readers import read_from_filename

from emailsync import cli
from emailsync.config import load_settings
from emailsync.errors import ConfigError
from emailsync.model import Group
from emailsync.timeline.crm import signing
from emailsync.timeline.crm.cache import LookupCache
from emailsync.timeline.crm.store import cache_seconds
from emailsync.timeline.crm.translate import retry_after

from .clocks import HandClock
from .configtext import MINIMAL

SECRET = b"shared-secret"
BODY = b'{"addresses":["a@example.com"]}'
NOW = 1_800_000_000.0


# -- signing ---------------------------------------------------------------------------------


PATH = "/crm/v1/groups:lookup"


def test_a_v2_signature_is_the_hmac_of_version_time_method_path_and_body() -> None:
    header = signing.sign(SECRET, "POST", PATH, BODY, now=NOW)
    signed = b"v2\n1800000000\nPOST\n/crm/v1/groups:lookup\n" + BODY
    expected = hmac.new(SECRET, signed, hashlib.sha256).hexdigest()
    assert header == f"t=1800000000,v2={expected}"
    signing.verify(SECRET, header, "POST", PATH, BODY, now=NOW)


def _v1(secret: bytes, body: bytes, now: float) -> str:
    """A scheme-1 header (time and body only), as emailsync sent before v2."""
    mac = hmac.new(secret, str(int(now)).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={int(now)},v1={mac}"


GOOD = signing.sign(SECRET, "POST", PATH, BODY, now=NOW)


@pytest.mark.parametrize(
    ("header", "target", "body", "why"),
    [
        (None, ("POST", PATH), BODY, "no X-EmailSync-Signature"),
        ("garbage", ("POST", PATH), BODY, "malformed"),
        ("t=abc,v2=00", ("POST", PATH), BODY, "malformed"),
        ("v2=00", ("POST", PATH), BODY, "needs t= and v2="),
        (signing.sign(b"other", "POST", PATH, BODY, now=NOW), ("POST", PATH), BODY, "match"),
        (GOOD, ("POST", PATH), BODY + b" ", "does not match"),  # altered body
        (GOOD, ("POST", "/crm/v1/timeline-events"), BODY, "does not match"),  # another endpoint
        (GOOD, ("PUT", PATH), BODY, "does not match"),  # another method
        (signing.sign(SECRET, "POST", PATH, BODY, now=NOW - 301), ("POST", PATH), BODY, "window"),
        (signing.sign(SECRET, "POST", PATH, BODY, now=NOW + 301), ("POST", PATH), BODY, "window"),
        (_v1(SECRET, BODY, NOW), ("POST", PATH), BODY, "v1 .*no longer accepted"),
    ],
)
def test_verify_refuses_missing_malformed_forged_altered_moved_stale_and_v1_signatures(
    header: str | None, target: tuple[str, str], body: bytes, why: str
) -> None:
    method, path = target
    with pytest.raises(signing.SignatureError, match=why):
        signing.verify(SECRET, header, method, path, body, now=NOW)


def test_verify_accepts_the_edges_of_the_window_and_any_of_several_v2_values() -> None:
    early = signing.sign(SECRET, "POST", PATH, BODY, now=NOW - 300)
    signing.verify(SECRET, early, "POST", PATH, BODY, now=NOW)
    good = signing.sign(SECRET, "POST", PATH, BODY, now=NOW)
    rotated = good.replace("v2=", "v2=" + "0" * 64 + ",v2=")
    signing.verify(SECRET, rotated, "POST", PATH, BODY, now=NOW)
    with_v1 = good + "," + _v1(SECRET, BODY, NOW).split(",")[1]  # an extra v1 is ignored
    signing.verify(SECRET, with_v1, "POST", PATH, BODY, now=NOW)


# -- the lookup cache ------------------------------------------------------------------------


def test_the_cache_keeps_answers_and_negative_answers_for_the_ttl() -> None:
    clock = HandClock(100.0)
    cache = LookupCache(60, clock=clock)
    smith = Group("Smith", ("a@x.example",), id="g1")
    cache.put_many({"a@x.example": (smith,), "nobody@x.example": ()})
    found, missing = cache.get_many(["a@x.example", "nobody@x.example", "new@x.example"])
    assert found == {"a@x.example": (smith,), "nobody@x.example": ()}
    assert missing == ["new@x.example"]
    clock.now += 60
    assert cache.get_many(["a@x.example", "nobody@x.example"]) == (
        {},
        ["a@x.example", "nobody@x.example"],
    )


def test_the_servers_max_age_shortens_the_ttl_but_never_lengthens_it() -> None:
    clock = HandClock(100.0)
    cache = LookupCache(60, clock=clock)
    cache.put_many({"a@x.example": ()}, ttl_seconds=5)
    cache.put_many({"b@x.example": ()}, ttl_seconds=3600)
    clock.now += 6
    assert cache.get_many(["a@x.example", "b@x.example"]) == ({"b@x.example": ()}, ["a@x.example"])
    clock.now += 60
    assert cache.get_many(["b@x.example"]) == ({}, ["b@x.example"])


def test_a_ttl_of_zero_caches_nothing_and_the_oldest_entries_go_first_when_full() -> None:
    assert LookupCache(0).get_many(["a"]) == ({}, ["a"])
    uncached = LookupCache(0)
    uncached.put_many({"a": ()})
    assert uncached.get_many(["a"]) == ({}, ["a"])
    small = LookupCache(60, max_entries=2)
    small.put_many({"a": ()})
    small.put_many({"b": ()})
    small.put_many({"c": ()})
    assert small.get_many(["a", "b", "c"]) == ({"b": (), "c": ()}, ["a"])


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, None),
        ("max-age=30", 30.0),
        ("public, max-age=5", 5.0),
        ("no-store", 0.0),
        ("no-cache, max-age=30", 0.0),
        ("must-revalidate", None),
    ],
)
def test_cache_control_gives_the_ttl(header: str | None, seconds: float | None) -> None:
    assert cache_seconds(header) == seconds


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, None),
        ("7", 7.0),
        ("999999", 3600.0),
        ("Fri, 15 Jan 2027 08:00:30 GMT", 30.0),
        ("Fri, 15 Jan 2027 07:00:00 GMT", 0.0),
        ("soon", None),
    ],
)
def test_retry_after_reads_seconds_or_an_http_date(
    header: str | None, seconds: float | None
) -> None:
    now = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC
    assert retry_after(header, now=now) == seconds


# -- [crm] config ----------------------------------------------------------------------------


def load(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "emailsync.toml"
    path.write_text(textwrap.dedent(MINIMAL + text), encoding="utf-8")
    return load_settings(path)


def test_a_crm_table_is_parsed_with_defaults(tmp_path: Path) -> None:
    settings = load(tmp_path, '[crm]\nurl = "https://crm.example.com/api/"\nsecret_env = "CRM"\n')
    assert settings.crm is not None
    assert settings.crm.url == "https://crm.example.com/api"
    assert settings.crm.timeout_seconds == 10
    assert settings.crm.group_cache_seconds == 60
    assert settings.crm.secret.env == "CRM"


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        ('[crm]\nsecret_env = "X"\n', "crm.url: is required"),
        ('[crm]\nurl = "https://c.example"\n', "crm.secret_file: is required"),
        ('[crm]\nurl = "http://crm.example.com"\nsecret_env = "X"\n', "crm.url: must be https://"),
        ('[crm]\nurl = "ftp://c.example"\nsecret_env = "X"\n', "crm.url: must be an https:// URL"),
        (
            '[crm]\nurl = "https://u:p@c.example"\nsecret_env = "X"\n',
            "crm.url: must not carry credentials",
        ),
        (
            '[crm]\nurl = "https://c.example"\nsecret_env = "X"\ngroup_cache_seconds = -1\n',
            "crm.group_cache_seconds: must be 0",
        ),
        (
            '[crm]\nurl = "https://c.example"\nsecret_env = "X"\nsecret_file = "s"\n',
            "give only one of",
        ),
        (
            '[crm]\nurl = "https://c.example"\nsecret_env = "X"\nport = 1\n',
            "crm.port: unknown key",
        ),
    ],
)
def test_crm_config_problems_name_the_file_and_key(
    tmp_path: Path, table: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, table)
    assert any(problem in p and str(tmp_path) in p for p in caught.value.problems), (
        caught.value.problems
    )


def test_check_config_reports_an_unreadable_crm_secret_and_exits_78(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    load(tmp_path, '[crm]\nurl = "http://127.0.0.1:9/api"\nsecret_file = "missing-secret"\n')
    code = cli.main(["--config", str(tmp_path / "emailsync.toml"), "check-config"])
    assert code == 78
    assert "crm.secret_file: secret: cannot read" in capsys.readouterr().err


def test_the_crm_api_document_is_valid_openapi_3_1() -> None:
    document, _ = read_from_filename(str(Path(__file__).parents[2] / "config" / "crm-api.yaml"))
    validate(document)  # raises on any schema violation
    assert document["openapi"].startswith("3.1")
    assert set(document["paths"]) == {"/groups:lookup", "/timeline-events"}


def test_the_crm_api_document_and_the_config_error_name_the_same_plain_http_hosts(
    tmp_path: Path,
) -> None:
    """Issue 19: the OpenAPI said requests go over TLS, the config error "only to localhost",
    and the code took 127.0.0.1 and ::1 as well. Both now name the same three hosts."""
    for host in ("localhost", "127.0.0.1", "[::1]"):
        load(tmp_path, f'[crm]\nurl = "http://{host}:8080/api"\nsecret_env = "X"\n')
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, '[crm]\nurl = "http://crm.example.com"\nsecret_env = "X"\n')
    (problem,) = caught.value.problems
    wording = "plain http:// only to localhost, 127.0.0.1 or [::1]"
    assert wording in problem
    document = (Path(__file__).parents[2] / "config" / "crm-api.yaml").read_text()
    assert wording in " ".join(document.split())
