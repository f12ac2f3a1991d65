"""Tests of emailsync.mail.address: one comparable form for every address."""

from __future__ import annotations

import pytest

from emailsync.mail.address import normalise_address


def test_address_is_lower_cased_in_local_part_and_domain() -> None:
    """Agents type addresses in any case; both halves compare lower-cased."""
    assert normalise_address("Agent.One@Example.COM") == "agent.one@example.com"


def test_display_name_and_angle_brackets_are_stripped() -> None:
    """The display form of RFC 5322 §3.4 reduces to the bare addr-spec."""
    assert normalise_address("Agent One <Agent@example.com>") == "agent@example.com"


def test_quoted_display_name_containing_a_comma_is_one_address() -> None:
    """A comma inside a quoted display name does not split the address."""
    assert normalise_address('"Seller, Sue" <Sue@Example.org>') == "sue@example.org"


def test_surrounding_white_space_is_ignored() -> None:
    """Addresses copied from config or CSV often carry stray spaces."""
    assert normalise_address("  <ann@example.org>\t") == "ann@example.org"


def test_unicode_domain_becomes_its_idna_ascii_form() -> None:
    """IDN domains compare in their ASCII (punycode) form, as DESIGN.md §1 requires."""
    assert normalise_address("info@bücher.example") == "info@xn--bcher-kva.example"


def test_unicode_domain_in_upper_case_matches_the_lower_case_one() -> None:
    """UTS #46 mapping folds case before encoding, so BÜCHER and bücher are one domain."""
    assert normalise_address("x@BÜCHER.de") == normalise_address("x@bücher.de")


def test_domain_already_in_punycode_is_kept() -> None:
    """An address written in ASCII form equals the same address written in Unicode."""
    assert normalise_address("x@xn--bcher-kva.de") == normalise_address("x@bücher.de")


def test_trailing_dot_of_a_fully_qualified_domain_is_dropped() -> None:
    """``example.com.`` is the same domain as ``example.com``."""
    assert normalise_address("ann@example.com.") == "ann@example.com"


def test_unicode_local_part_is_kept_and_lower_cased() -> None:
    """RFC 6532 allows UTF-8 local parts; they are kept, only case-folded."""
    assert normalise_address("Jörg@example.de") == "jörg@example.de"


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
