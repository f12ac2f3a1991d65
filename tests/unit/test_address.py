"""Tests of emailsync.mail.address: one comparable form for every address."""

from __future__ import annotations

import pytest

from emailsync.mail.address import normalise_address


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # Agents type addresses in any case; both halves compare lower-cased.
        pytest.param(
            "Agent.One@Example.COM",
            "agent.one@example.com",
            id="address-is-lower-cased-in-local-part-and-domain",
        ),
        # The display form of RFC 5322 §3.4 reduces to the bare addr-spec.
        pytest.param(
            "Agent One <Agent@example.com>",
            "agent@example.com",
            id="display-name-and-angle-brackets-are-stripped",
        ),
        # A comma inside a quoted display name does not split the address.
        pytest.param(
            '"Seller, Sue" <Sue@Example.org>',
            "sue@example.org",
            id="quoted-display-name-containing-a-comma-is-one-address",
        ),
        # Addresses copied from config or CSV often carry stray spaces.
        pytest.param(
            "  <ann@example.org>\t", "ann@example.org", id="surrounding-white-space-is-ignored"
        ),
        # IDN domains compare in their ASCII (punycode) form, as DESIGN.md §1 requires.
        pytest.param(
            "info@bücher.example",
            "info@xn--bcher-kva.example",
            id="unicode-domain-becomes-its-idna-ascii-form",
        ),
        # ``example.com.`` is the same domain as ``example.com``.
        pytest.param(
            "ann@example.com.",
            "ann@example.com",
            id="trailing-dot-of-a-fully-qualified-domain-is-dropped",
        ),
        # RFC 6532 allows UTF-8 local parts; they are kept, only case-folded.
        pytest.param(
            "Jörg@example.de", "jörg@example.de", id="unicode-local-part-is-kept-and-lower-cased"
        ),
    ],
)
def test_an_address_normalises_to_its_comparable_form(raw: str, expected: str) -> None:
    """Each case: an address as written, and the one form it compares in."""
    assert normalise_address(raw) == expected


def test_unicode_domain_in_upper_case_matches_the_lower_case_one() -> None:
    """UTS #46 mapping folds case before encoding, so BÜCHER and bücher are one domain."""
    assert normalise_address("x@BÜCHER.de") == normalise_address("x@bücher.de")


def test_domain_already_in_punycode_is_kept() -> None:
    """An address written in ASCII form equals the same address written in Unicode."""
    assert normalise_address("x@xn--bcher-kva.de") == normalise_address("x@bücher.de")


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "garbage",
        "a@b@c",
        "@example.com",
        "user@",
        "a b@example.com",
        "undisclosed-recipients:;",
        "Landlords:;",
    ],
)
def test_anything_but_a_single_address_is_none(raw: str) -> None:
    """Group syntax, missing halves and garbage are not addresses."""
    assert normalise_address(raw) is None


def test_domain_that_idna_cannot_encode_is_none() -> None:
    """A symbol that IDNA 2008 disallows makes the domain unusable rather than raising."""
    assert normalise_address("x@☃.com") is None
