"""Unsubscribe tokens: version 2 is opaque (AES-GCM-SIV, HKDF key); version 1 links already sent verify."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from campaign.unsubscribe import TokenClaims, TokenSigner, make_token, verify_token

SECRETS = (b"signer-test-secret-0123456789abcdef", b"older-secret-0123456789abcdef")
# Tokens made by campaign before version 2 (main at ce1b9d2), with the secret each was signed with.
V1_SECRET = b"old-secret-0123456789abcdef"
V1_ROTATED_SECRET = b"rotated-secret-0123456789"
V1_ANN = "ATwABnNwcmluZwAPYW5uQGV4YW1wbGUuY29tX2X9wfgPGie179naX7mEWQ"
V1_ANN_ROTATED = "AQoABnNwcmluZwAPYW5uQGV4YW1wbGUuY29tb2_xAmwUgQPcHwkyB_EGhA"
V1_CUSTOMER = "ATwABnNwcmluZwAHY3VzdC00MoX5BjVFS0HIhIQJsL07708"


def reference_v1_token(secret: bytes, campaign: str, recipient_key: str) -> str:
    """The version 1 format written out in one piece: version, key id, framed fields, truncated HMAC."""
    key_id = hashlib.sha256(b"campaign-unsubscribe-key-id\x00" + secret).digest()[0]
    fields = b"".join(len(f).to_bytes(2, "big") + f for f in (campaign.encode(), recipient_key.encode()))
    payload = bytes((1, key_id)) + fields
    mac = hmac.digest(secret, b"\x0bunsubscribe" + payload, "sha256")[:16]
    return base64.urlsafe_b64encode(payload + mac).rstrip(b"=").decode("ascii")


def open_reference_v2(secret: bytes, token: str) -> bytes:
    """The version 2 format read back in one piece: version, key id, AES-GCM-SIV of padded framed fields."""
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    key_id = hashlib.sha256(b"campaign-unsubscribe-key-id\x00" + secret).digest()[0]
    assert raw[:2] == bytes((2, key_id))
    key = HKDF(hashes.SHA256(), 32, None, b"campaign unsubscribe token v2").derive(secret)
    return AESGCMSIV(key).decrypt(bytes(12), raw[2:], b"\x0bunsubscribe" + raw[:2])


def _framed(*fields: str) -> bytes:
    plain = b"".join(len(f.encode()).to_bytes(2, "big") + f.encode() for f in fields)
    return plain + bytes(-len(plain) % 16)


@settings(max_examples=200, deadline=None)
@given(
    campaign=st.text(max_size=40),
    keys=st.lists(st.tuples(st.text(max_size=60), st.emails()), min_size=1, max_size=5),
)
def test_signer_makes_the_version_2_format_and_verify_reads_it(campaign, keys) -> None:
    """One signer gives, key after key, the format's plaintext under AES-GCM-SIV; verify_token reads it."""
    signer = TokenSigner(secrets=SECRETS, campaign=campaign)
    for key, email in keys:
        token = signer.sign(key, email=email)
        same = email.lower() == key.lower()
        assert open_reference_v2(SECRETS[0], token) == _framed(campaign, key, "" if same else email)
        assert token == make_token(secrets=SECRETS, campaign=campaign, recipient_key=key, email=email)
        assert verify_token(token, secrets=SECRETS) == TokenClaims(campaign, key, 0, None if same else email)


@settings(max_examples=200, deadline=None)
@given(campaign=st.text(max_size=40), key=st.text(max_size=60))
def test_version_1_tokens_still_verify_with_every_listed_secret(campaign, key) -> None:
    """A version 1 token (links already sent) verifies under the first or a later secret."""
    for index, secret in enumerate(SECRETS):
        token = reference_v1_token(secret, campaign, key)
        assert verify_token(token, secrets=SECRETS) == TokenClaims(campaign, key, index)


def test_tokens_made_before_version_2_verify_after_rotation() -> None:
    """Fixed tokens made by the previous release verify with their secret listed anywhere; not without it."""
    rotated = (b"brand-new-secret-0123456789", V1_SECRET, V1_ROTATED_SECRET)
    assert verify_token(V1_ANN, secrets=rotated) == TokenClaims("spring", "ann@example.com", 1)
    assert verify_token(V1_ANN_ROTATED, secrets=rotated) == TokenClaims("spring", "ann@example.com", 2)
    assert verify_token(V1_CUSTOMER, secrets=rotated) == TokenClaims("spring", "cust-42", 1)
    assert verify_token(V1_ANN, secrets=(b"brand-new-secret-0123456789",)) is None


def test_version_2_tokens_reveal_nothing_and_rotate() -> None:
    """The address, key and campaign are not in the token (nor its base64); an older secret still opens it."""
    token = make_token(secrets=SECRETS, campaign="spring", recipient_key="cust-42", email="ann@example.com")
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    for secret_part in (b"ann", b"example", b"cust-42", b"spring"):
        assert secret_part not in raw
    for text in ("ann", "example", "cust", "spring", "YW5u", "c3By"):
        assert text not in token
    assert len(token) <= 90
    older = make_token(
        secrets=SECRETS[1:], campaign="spring", recipient_key="cust-42", email="ann@example.com"
    )
    assert verify_token(older, secrets=SECRETS) == TokenClaims("spring", "cust-42", 1, "ann@example.com")
    assert verify_token(token, secrets=(b"someone-elses-secret-000000000",)) is None
    tampered = token[:10] + ("A" if token[10] != "A" else "B") + token[11:]
    assert verify_token(tampered, secrets=SECRETS) is None


def test_signer_refuses_what_make_token_refuses() -> None:
    """No secret, or a field too long to frame: the same ValueError as make_token."""
    with pytest.raises(ValueError, match="at least one secret"):
        TokenSigner(secrets=(), campaign="spring")
    with pytest.raises(ValueError, match="the campaign is 70000 bytes"):
        TokenSigner(secrets=SECRETS, campaign="c" * 70_000)
    signer = TokenSigner(secrets=SECRETS, campaign="spring")
    with pytest.raises(ValueError, match="the recipient key is 70000 bytes"):
        signer.sign("k" * 70_000)
    assert signer.sign("ann@example.com") == make_token(
        secrets=SECRETS, campaign="spring", recipient_key="ann@example.com"
    )
