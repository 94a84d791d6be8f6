"""normalize_address gives exactly what email_validator gives, result or error, with the domain in its
ASCII (IDNA) form: the form the Nylas API accepts."""

from __future__ import annotations

import pytest
from email_validator import EmailNotValidError, validate_email
from hypothesis import given, settings
from hypothesis import strategies as st

from campaign.recipients._audience import normalize_address

TRICKY = [
    "ann@example.com",
    "Ann.Lee@Example.COM",
    "ann@EXAMPLE.COM.",
    "ann@example.com.",
    "ann@.example.com",
    "ann@example..com",
    "ann@-example.com",
    "ann@example-.com",
    "ann@ab--cd.com",
    "ann@xn--bcher-kva.example",
    "ann@xn--bcher-kva.com",
    "ann@XN--BCHER-KVA.COM",
    "ann@bücher.com",
    "ann@BÜCHER.COM",
    "ann@straße.de",
    "ann@ｅｘａｍｐｌｅ.com",
    "ann@example。com",
    "ann@example．com",
    "ann@e\u0301xample.com",
    "ann@\u0301example.com",
    "ann@xn--zz.com",
    "ann@1.xn--4dbc.com",
    "ann@example.c0m",
    "ann@example",
    "ann@localhost",
    "ann@example.invalid",
    "ann@mail.local",
    "ann@test",
    "ann@[192.0.2.1]",
    "ann@[IPv6:2001:db8::1]",
    "ann@",
    "@example.com",
    "@",
    "",
    "ann",
    "ann@@example.com",
    "ann@b@example.com",
    "a@b@c",
    "ann@exa mple.com",
    "ann @example.com",
    "ann@example.com ",
    "ann@exa<mple.com",
    "Ann <ann@example.com>",
    "<ann@example.com>",
    '"ann"@example.com',
    '"ann lee"@example.com',
    '"ann@lee"@example.com',
    '"a\\"b"@example.com',
    "ann.@example.com",
    ".ann@example.com",
    "an..n@example.com",
    "ann+tag@example.com",
    "o'neil@example.com",
    "x!#$%&'*+/=?^_`{|}~-@example.com",
    "ännä@example.com",
    "a\u0308nn@example.com",
    "\u0301ann@example.com",
    "ann\u200b@example.com",
    "ann\u00a0@example.com",
    "ann＠example.com",
    "ann﹫example.com",
    "Info@example.com",
    "POSTMASTER@Example.com",
    "WWW@example.com",
    "info.x@example.com",
    "a" * 64 + "@example.com",
    "a" * 65 + "@example.com",
    "a" * 240 + "@example.com",
    "a" * 241 + "@example.com",
    "a" * 242 + "@example.com",
    "a" * 230 + "@bücher-bücher.com",
    "a" * 236 + "@bücher.com",
    "a" * 237 + "@bücher.com",
    "ann@" + "a" * 63 + ".com",
    "ann@" + "a" * 64 + ".com",
    "ann@" + ".".join(["abcdefghi"] * 25) + ".com",
    "ann@" + ".".join(["abcdefghi"] * 26) + ".com",
    "ann@" + "ü" * 60 + ".com",
]


def outcome(check, address: str) -> tuple[str, str]:
    """("ok", the normalised address) or (the error's class name, its message)."""
    try:
        return "ok", check(address)
    except EmailNotValidError as exc:
        return type(exc).__name__, str(exc)


def reference(address: str) -> str:
    found = validate_email(address, check_deliverability=False)
    return f"{found.local_part}@{found.ascii_domain}"


@pytest.mark.parametrize("address", TRICKY)
def test_tricky_address_matches_email_validator(address: str) -> None:
    """Each tricky address normalises (or fails, with the same message) exactly as validate_email does."""
    assert outcome(normalize_address, address) == outcome(reference, address)


def test_repeated_domain_keeps_each_local_part() -> None:
    """Addresses sharing a domain (checked once) still keep their own local part and case."""
    assert normalize_address("Ann@Example.COM") == "Ann@example.com"
    assert normalize_address("bob@EXAMPLE.com") == "bob@example.com"
    assert normalize_address("Info@EXAMPLE.com") == "info@example.com"
    with pytest.raises(EmailNotValidError, match="period"):
        normalize_address("bob.@EXAMPLE.com")


@pytest.mark.parametrize(
    "address", ["ann@example.com", "Ann.Lee@Example.COM", "info@EXAMPLE.com", "o'neil@mail.example.org"]
)
def test_a_plain_ascii_address_is_what_email_validator_normalises_it_to(address: str) -> None:
    """Ledger keys of existing campaigns stay: an ASCII domain without an `xn--` label is left as it was."""
    assert normalize_address(address) == validate_email(address, check_deliverability=False).normalized


@pytest.mark.parametrize(
    "address",
    ["ann@xn--bcher-kva.example", "ann@bücher.example", "ann@BÜCHER.example", "ann@XN--BCHER-KVA.example"],
)
def test_an_internationalised_domain_is_given_in_its_ascii_form(address: str) -> None:
    """Both spellings of a domain give the one ASCII form the API accepts (a repeat takes the fast path)."""
    assert normalize_address(address) == "ann@xn--bcher-kva.example"
    assert normalize_address(address) == "ann@xn--bcher-kva.example"


def test_a_non_ascii_local_part_keeps_its_characters() -> None:
    """The local part has no ASCII form: it is kept (normalised), the domain still made ASCII."""
    assert normalize_address("jörg@bücher.example") == "jörg@xn--bcher-kva.example"


LOCAL_CHARS = st.sampled_from([*"aZ09.+-_'!#\"\\ @<>()é\u0301\u200bß＠ä", "Info", "postmaster"])
DOMAIN_CHARS = st.sampled_from(
    [*"aZ09.-_ @<>[]:ü\u0301。．ｅß", "xn--", "xn--bcher-kva", "com", "COM", "example", "local", "test"]
)


@settings(max_examples=3000, deadline=None)
@given(
    local=st.lists(LOCAL_CHARS, max_size=12).map("".join),
    domain=st.lists(DOMAIN_CHARS, max_size=12).map("".join),
    tld=st.sampled_from(["", ".com", ".COM", ".org.", ".x1", ".de"]),
    padding=st.sampled_from([0, 1, 200, 236, 240, 250]),
)
def test_generated_addresses_match_email_validator(local: str, domain: str, tld: str, padding: int) -> None:
    """Generated addresses (quotes, several @, unicode, case, dots, lengths) match validate_email exactly."""
    address = f"{'x' * padding}{local}@{domain}{tld}"
    assert outcome(normalize_address, address) == outcome(reference, address)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=40))
def test_arbitrary_text_matches_email_validator(text: str) -> None:
    """Any text at all gives validate_email's result or its exact error."""
    assert outcome(normalize_address, text) == outcome(reference, text)
