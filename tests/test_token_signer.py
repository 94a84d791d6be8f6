"""TokenSigner (make_token's work done once per campaign) signs exactly as the token format says."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from campaign.unsubscribe import TokenSigner, make_token, verify_token

SECRETS = (b"signer-test-secret-0123456789abcdef", b"older-secret-0123456789abcdef")


def reference_token(secret: bytes, campaign: str, recipient_key: str) -> str:
    """The token format written out in one piece: version, key id, framed fields, truncated HMAC-SHA256."""
    key_id = hashlib.sha256(b"campaign-unsubscribe-key-id\x00" + secret).digest()[0]
    fields = b"".join(len(f).to_bytes(2, "big") + f for f in (campaign.encode(), recipient_key.encode()))
    payload = bytes((1, key_id)) + fields
    mac = hmac.digest(secret, b"\x0bunsubscribe" + payload, "sha256")[:16]
    return base64.urlsafe_b64encode(payload + mac).rstrip(b"=").decode("ascii")


@settings(max_examples=300, deadline=None)
@given(campaign=st.text(max_size=40), keys=st.lists(st.text(max_size=60), min_size=1, max_size=5))
def test_signer_matches_the_format_for_every_key(campaign: str, keys: list[str]) -> None:
    """One signer gives, key after key, the token the format defines, and verify_token accepts it."""
    signer = TokenSigner(secrets=SECRETS, campaign=campaign)
    for key in keys:
        token = signer.sign(key)
        assert token == reference_token(SECRETS[0], campaign, key)
        assert token == make_token(secrets=SECRETS, campaign=campaign, recipient_key=key)
        claims = verify_token(token, secrets=SECRETS)
        assert claims is not None
        assert (claims.campaign, claims.recipient_key, claims.key_index) == (campaign, key, 0)


def test_signer_refuses_what_make_token_refuses() -> None:
    """No secret, or a field too long to frame: the same ValueError as make_token."""
    with pytest.raises(ValueError, match="at least one secret"):
        TokenSigner(secrets=(), campaign="spring")
    with pytest.raises(ValueError, match="the campaign is 70000 bytes"):
        TokenSigner(secrets=SECRETS, campaign="c" * 70_000)
    signer = TokenSigner(secrets=SECRETS, campaign="spring")
    with pytest.raises(ValueError, match="the recipient key is 70000 bytes"):
        signer.sign("k" * 70_000)
    assert signer.sign("ann@example.com") == reference_token(SECRETS[0], "spring", "ann@example.com")
