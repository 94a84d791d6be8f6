"""Tests for signed unsubscribe tokens and the List-Unsubscribe headers (email-standards.md §7)."""

from __future__ import annotations

import base64
import re
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from urllib.parse import urlsplit

import pytest

from campaign.errors import HeaderError, ManifestError
from campaign.headers import header_name_problem, header_value_problem
from campaign.unsubscribe import (
    TokenClaims,
    build_unsubscribe_headers,
    make_token,
    parse_secrets,
    verify_token,
)

OLD = b"old-secret-0123456789abcdef"
NEW = b"new-secret-fedcba9876543210"
GONE = b"removed-secret-00000000000000"
SECRETS = (NEW, OLD)
CAMPAIGN = "spring-newsletter"
ANN = "ann@example.com"
BOB = "bob@example.com"
_LIST_UNSUBSCRIBE = re.compile(r"^<[^<>\s]+>(?:[ \t]*,[ \t]*<[^<>\s]+>)*$")


def _token(recipient: str = ANN, campaign: str = CAMPAIGN, secrets: tuple[bytes, ...] = SECRETS) -> str:
    return make_token(secrets=secrets, campaign=campaign, recipient_key=recipient)


def _headers(
    token: str, *, url: str | None = None, mailto: str | None = "unsubscribe@example.com"
) -> dict[str, str]:
    pairs = build_unsubscribe_headers(
        url=url or f"https://example.com/unsubscribe?t={token}", mailto=mailto, token=token, campaign=CAMPAIGN
    )
    return dict(pairs)


# --- parse_secrets ----------------------------------------------------------------------------------------


def test_parse_secrets_splits_on_commas_and_whitespace_in_order():
    """Several secrets are split on commas or whitespace and keep their order (the first signs)."""
    value = f" {NEW.decode()},{OLD.decode()}\n {GONE.decode()} "
    assert parse_secrets(value) == (NEW, OLD, GONE)


@pytest.mark.parametrize("value", ["", "   ", " , ,\n"])
def test_parse_secrets_refuses_empty_value(value):
    """An empty secret value is a configuration error, not a silent unsigned token."""
    with pytest.raises(ManifestError, match="empty"):
        parse_secrets(value)


def test_parse_secrets_refuses_short_secret_without_showing_it():
    """A secret under 16 characters is refused and the message never contains the secret."""
    with pytest.raises(ManifestError, match="at least 16 characters") as caught:
        parse_secrets(f"{NEW.decode()},short-secret1")
    assert "short-secret1" not in str(caught.value)
    assert "#2" in str(caught.value)


# --- tokens -----------------------------------------------------------------------------------------------


def test_token_round_trip_gives_claims():
    """A fresh token verifies to its campaign, recipient and the signing key's index."""
    assert verify_token(_token(), secrets=SECRETS) == TokenClaims(CAMPAIGN, ANN, 0)


def test_token_round_trip_with_unicode_and_separator_characters():
    """Recipient keys with non-ASCII, colons and pipes survive the round trip unchanged."""
    key = "jürgen|ops:42@exämple.com"
    assert verify_token(_token(key), secrets=SECRETS) == TokenClaims(CAMPAIGN, key, 0)


def test_token_is_base64url_with_at_least_16_mac_bytes():
    """The token is unpadded base64url and decodes to the payload plus a 16-byte MAC (§7 item 16)."""
    token = _token()
    assert re.fullmatch(r"[A-Za-z0-9_-]+", token)
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    framing = 1 + 1 + 2 + 2  # version, key id, two length prefixes
    assert len(raw) - framing - len(CAMPAIGN) - len(ANN) >= 16


def test_token_differs_per_recipient_and_per_campaign():
    """Two recipients never share a token, nor one recipient on two campaigns (§7 item 15)."""
    tokens = {_token(ANN), _token(BOB), _token(ANN, campaign="autumn"), _token(BOB, campaign="autumn")}
    assert len(tokens) == 4


def test_token_is_deterministic():
    """The same inputs give the same token, so a resend carries the same unsubscribe link."""
    assert _token() == _token()


def test_every_single_character_change_fails_verification():
    """Replacing any one character of the token with any other base64url character breaks it (§7 item 17)."""
    token = _token()
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for position, original in enumerate(token):
        for replacement in alphabet:
            if replacement == original:
                continue
            forged = token[:position] + replacement + token[position + 1 :]
            assert verify_token(forged, secrets=SECRETS) is None, (position, replacement)


def test_truncated_or_extended_token_fails():
    """Dropping characters from either end, or appending any, makes the token invalid."""
    token = _token()
    for cut in range(1, len(token)):
        assert verify_token(token[:cut], secrets=SECRETS) is None
        assert verify_token(token[cut:], secrets=SECRETS) is None
    assert verify_token(token + "A", secrets=SECRETS) is None
    assert verify_token(token + "AA", secrets=SECRETS) is None


def test_swapped_campaign_and_recipient_fails():
    """A token whose fields are re-framed in swapped order (same MAC) does not verify."""
    token = _token()
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    payload, mac = raw[:-16], raw[-16:]
    campaign, recipient = CAMPAIGN.encode(), ANN.encode()
    swapped_payload = (
        payload[:2]
        + len(recipient).to_bytes(2, "big")
        + recipient
        + len(campaign).to_bytes(2, "big")
        + campaign
    )
    forged = base64.urlsafe_b64encode(swapped_payload + mac).rstrip(b"=").decode()
    assert verify_token(forged, secrets=SECRETS) is None


def test_another_recipients_mac_does_not_transfer():
    """Splicing Bob's recipient into Ann's token with Ann's MAC fails."""
    ann = base64.urlsafe_b64decode(_token(ANN) + "==")
    bob_payload = base64.urlsafe_b64decode(_token(BOB) + "==")[:-16]
    forged = base64.urlsafe_b64encode(bob_payload + ann[-16:]).rstrip(b"=").decode()
    assert verify_token(forged, secrets=SECRETS) is None


@pytest.mark.parametrize("junk", ["", "!!!!", "A", "AAAA", "a+b/c==", "tok en", "é" * 30, "=" * 8])
def test_garbage_tokens_are_refused_without_raising(junk):
    """Malformed input of any kind returns None rather than raising."""
    assert verify_token(junk, secrets=SECRETS) is None


def test_padded_token_is_refused():
    """Only the canonical unpadded spelling verifies."""
    token = _token()
    padded = token + "=" * (-len(token) % 4)
    if padded != token:
        assert verify_token(padded, secrets=SECRETS) is None


def test_rotation_old_key_verifies_removed_key_does_not():
    """Tokens of a previous key verify after rotation; tokens of a removed key do not (§7 item 18)."""
    minted_with_old = _token(secrets=(OLD,))
    assert verify_token(minted_with_old, secrets=(NEW, OLD)) == TokenClaims(CAMPAIGN, ANN, 1)
    assert verify_token(minted_with_old, secrets=(NEW,)) is None
    minted_with_gone = _token(secrets=(GONE,))
    assert verify_token(minted_with_gone, secrets=(NEW, OLD)) is None


def test_first_secret_signs():
    """After rotation new tokens are signed with the first secret in the list."""
    token = _token(secrets=(NEW, OLD))
    assert verify_token(token, secrets=(NEW,)) == TokenClaims(CAMPAIGN, ANN, 0)
    assert verify_token(token, secrets=(OLD,)) is None


def test_make_token_needs_a_secret():
    """Signing with no secret is a programming error, never an unsigned token."""
    with pytest.raises(ValueError, match="secret"):
        make_token(secrets=(), campaign=CAMPAIGN, recipient_key=ANN)


# --- headers ----------------------------------------------------------------------------------------------


def test_exact_header_values_with_mailto():
    """The headers are exactly RFC 8058's pair, https URL first, mailto with the token as subject."""
    token = _token()
    pairs = build_unsubscribe_headers(
        url=f"https://example.com/u?t={token}",
        mailto="unsubscribe@example.com",
        token=token,
        campaign=CAMPAIGN,
    )
    assert pairs == (
        (
            "List-Unsubscribe",
            f"<https://example.com/u?t={token}>, "
            f"<mailto:unsubscribe@example.com?subject=unsubscribe-{token}>",
        ),
        ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
    )


def test_exact_header_value_without_mailto():
    """Without a mailto the header holds the https URL alone."""
    token = _token()
    headers = _headers(token, url="https://example.com/u/x", mailto=None)
    assert headers["List-Unsubscribe"] == "<https://example.com/u/x>"


def test_mailto_prefix_and_given_subject_are_kept():
    """A `mailto:` prefix is accepted, and a subject the user gave is kept instead of the token subject."""
    token = _token()
    headers = _headers(token, mailto="mailto:leave@example.com?subject=remove-me")
    assert headers["List-Unsubscribe"].endswith(", <mailto:leave@example.com?subject=remove-me>")
    headers = _headers(token, mailto="MAILTO:leave@example.com?body=x")
    assert headers["List-Unsubscribe"].endswith(
        f", <mailto:leave@example.com?body=x&subject=unsubscribe-{token}>"
    )


@pytest.mark.parametrize(
    "mailto", ["not-an-address", "a b@example.com", "x@example.com\r\nBcc: y@z.com", "<x@y.z>"]
)
def test_bad_mailto_is_refused(mailto):
    """A mailto that is not a plain address (or would break the header) raises HeaderError."""
    with pytest.raises(HeaderError, match=r"unsubscribe\.mailto"):
        _headers(_token(), mailto=mailto)


def test_headers_meet_standards_checks():
    """§7 items 1–8: one of each header, exact Post value, bracketed list, one https item, clean text."""
    token = _token()
    pairs = build_unsubscribe_headers(
        url=f"https://example.com/u?t={token}",
        mailto="unsubscribe@example.com",
        token=token,
        campaign=CAMPAIGN,
    )
    names = [name for name, _ in pairs]
    assert names.count("List-Unsubscribe") == 1  # item 1
    assert names.count("List-Unsubscribe-Post") == 1
    values = dict(pairs)
    assert re.fullmatch(r"List-Unsubscribe=One-Click", values["List-Unsubscribe-Post"].strip())  # item 2
    value = values["List-Unsubscribe"]
    assert _LIST_UNSUBSCRIBE.fullmatch(value)  # item 3
    items = re.findall(r"<([^<>]*)>", value)
    assert len([item for item in items if item.startswith("https://")]) == 1
    assert all(item.startswith(("https://", "mailto:")) for item in items)
    assert "http://" not in value
    for _, header_value in pairs:  # item 4, 8
        assert "=?" not in header_value
        assert header_value_problem(header_value) is None
        assert not re.search(r"[\x00-\x08\x0A-\x1F\x7F\x85\u2028]", header_value)
    assert all(not re.search(r"\s", item) for item in items)  # item 5
    url = urlsplit(items[0])  # item 6
    assert (url.scheme, url.hostname, url.username, url.password, url.fragment) == (
        "https",
        "example.com",
        None,
        None,
        "",
    )
    assert all(header_name_problem(name) is None for name in names)  # item 7


def test_long_url_stays_on_one_line_and_round_trips_through_email_package():
    """A 150-character URL serializes unfolded, unencoded, and parses back unchanged (§7 items 9, 10, 12)."""
    token = _token()
    url = f"https://example.com/{'p' * (150 - len('https://example.com/?t=') - len(token))}?t={token}"
    assert len(url) == 150
    pairs = build_unsubscribe_headers(
        url=url, mailto="unsubscribe@example.com", token=token, campaign=CAMPAIGN
    )
    message = EmailMessage(policy=policy.SMTP.clone(max_line_length=None))
    message["From"] = "sender@example.com"
    message["To"] = "ann@example.com"
    message["Subject"] = "Spring news"
    for name, value in pairs:
        message[name] = value
    message.set_content("Hello\n", cte="7bit")  # max_line_length=None breaks the CTE heuristic
    wire = bytes(message)
    header_block = wire.split(b"\r\n\r\n", 1)[0]
    assert b"=?" not in header_block
    lines = header_block.split(b"\r\n")
    (unsubscribe_line,) = [line for line in lines if line.startswith(b"List-Unsubscribe:")]
    assert unsubscribe_line == f"List-Unsubscribe: {dict(pairs)['List-Unsubscribe']}".encode()
    assert all(len(line) <= 998 for line in wire.split(b"\r\n"))
    parsed = BytesParser(policy=policy.default).parsebytes(wire)
    assert str(parsed["List-Unsubscribe"]) == dict(pairs)["List-Unsubscribe"]
    assert str(parsed["List-Unsubscribe-Post"]) == "List-Unsubscribe=One-Click"
    assert len(parsed.keys()) == len(message.keys())


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://example.com/u?t=x", "https"),
        ("ftp://example.com/u", "https"),
        ("https:///path-only", "host"),
        ("https://user:pw@example.com/u", "user name"),
        ("https://example.com/u#frag", "fragment"),
        ("https://example.com/u v", "whitespace"),
        ("https://example.com/u?a=<b>", "<>"),
        ("https://example.com/u\r\nBcc: x@y.z", "line feed|carriage return"),
        ("https://example.com/u\u2028x", "control character"),
        ("https://exämple.com/u", "non-ASCII"),
        ("https://example.com/u?x==?utf-8?q?a?=", "encoded-word"),
        ("https://example.com:99999/u", "not a valid URL"),
    ],
)
def test_unsafe_urls_are_refused(url, reason):
    """Non-https, no host, userinfo, fragment, whitespace, brackets, controls, bad port: HeaderError."""
    with pytest.raises(HeaderError, match=reason) as caught:
        build_unsubscribe_headers(url=url, mailto=None, token="x", campaign=CAMPAIGN)
    assert "unsubscribe.url" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_header_over_line_limit_is_refused():
    """A List-Unsubscribe value that would exceed RFC 5322's 998-character line is refused, not folded."""
    with pytest.raises(HeaderError, match="998"):
        build_unsubscribe_headers(
            url="https://example.com/" + "a" * 990, mailto=None, token="x", campaign=CAMPAIGN
        )
