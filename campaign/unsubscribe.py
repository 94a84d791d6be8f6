"""Signed unsubscribe tokens and the one-click `List-Unsubscribe` headers (RFC 2369, RFC 8058).

A token names a campaign and a recipient key and carries a truncated HMAC-SHA256,
so the unsubscribe endpoint can trust it without a database of issued links. The
first secret signs; every secret verifies, so keys rotate by putting a new one first
and dropping the oldest later. Pure: no I/O, no clock, and never a secret in any text.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import urlsplit

from campaign.errors import HeaderError, ManifestError
from campaign.headers import header_value_problem

__all__ = [
    "MIN_SECRET_LENGTH",
    "TOKEN_VERSION",
    "TokenClaims",
    "TokenSigner",
    "build_unsubscribe_headers",
    "make_token",
    "parse_secrets",
    "verify_token",
]

TOKEN_VERSION = 1
MIN_SECRET_LENGTH = 16
_MAC_LENGTH = 16  # 128 bits: RFC 2104 §5 asks for at least half the hash and at least 80 bits
_PURPOSE = b"unsubscribe"  # binds the MAC to this use, so the same key cannot mint other tokens
_PURPOSE_FRAME = bytes((len(_PURPOSE),)) + _PURPOSE
_MAX_FIELD = 0xFFFF  # fields are framed with a two-byte length
_HEADER_NAME = "List-Unsubscribe"
_POST_HEADER = ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click")
# RFC 5322 §2.1.1: a line MUST NOT exceed 998 characters; we never fold this header.
_MAX_LINE = 998
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9_-]+")
_URLSAFE = bytes.maketrans(b"+/", b"-_")  # base64 to base64url, as base64.urlsafe_b64encode does
_SPLIT_SECRETS = re.compile(r"[,\s]+")
# Characters that must not appear inside <...>: whitespace, the brackets themselves,
# quotes and controls; a list item would end or be misparsed by a mail client.
_BAD_URL_CHAR = re.compile(r"[\s<>\"\x00-\x1f\x7f]")
# The common case, checked with one match: https, a plain host name, an optional short port,
# then only RFC 3986 path/query characters (so no whitespace, brackets, quotes, '#', '@' before
# the path, or non-ASCII). Anything else goes through the detailed checks, which explain.
_PLAIN_HTTPS_URL = re.compile(
    r"https://[A-Za-z0-9](?:[A-Za-z0-9_.-]*[A-Za-z0-9])?(?::[0-9]{1,4})?(?:[/?][A-Za-z0-9._~!$&'()*+,;=:@%/?-]*)?"
)


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """What a valid token says: the campaign, the recipient key, and which secret signed it."""

    campaign: str
    recipient_key: str
    key_index: int


def parse_secrets(value: str) -> tuple[bytes, ...]:
    """Split an environment value into secrets (commas or whitespace); the first one signs."""
    parts = [part for part in _SPLIT_SECRETS.split(value.strip()) if part]
    if not parts:
        raise ManifestError("the unsubscribe secret is empty; set it to a random string of 16+ characters")
    secrets = tuple(part.encode("utf-8") for part in parts)
    for number, secret in enumerate(secrets, start=1):
        if len(secret) < MIN_SECRET_LENGTH:
            which = "the unsubscribe secret" if len(secrets) == 1 else f"unsubscribe secret #{number}"
            raise ManifestError(
                f"{which} must be at least {MIN_SECRET_LENGTH} characters; "
                'generate one with `python -c "import secrets; print(secrets.token_urlsafe(32))"`'
            )
    return secrets


def make_token(*, secrets: Sequence[bytes], campaign: str, recipient_key: str) -> str:
    """Sign (campaign, recipient_key) with the first secret; returns base64url without padding."""
    return TokenSigner(secrets=secrets, campaign=campaign).sign(recipient_key)


class TokenSigner:
    """`make_token` for one campaign and many recipients: the keyed HMAC and the payload's start made once.

    ValueError (as make_token) without a secret or for a campaign name too long to frame.
    """

    __slots__ = ("_mac", "_prefix")

    def __init__(self, *, secrets: Sequence[bytes], campaign: str) -> None:
        if not secrets:
            raise ValueError("make_token needs at least one secret")
        secret = secrets[0]
        self._prefix = bytes((TOKEN_VERSION, _key_id(secret))) + _frame(campaign.encode("utf-8"), "campaign")
        # Keyed and fed with what every token of the campaign starts with; each token continues a copy.
        self._mac = hmac.new(secret, _PURPOSE_FRAME + self._prefix, "sha256")

    def sign(self, recipient_key: str) -> str:
        """The token for `recipient_key` (ValueError if the key is too long to frame)."""
        framed = _frame(recipient_key.encode("utf-8"), "recipient key")
        mac = self._mac.copy()
        mac.update(framed)
        raw = self._prefix + framed + mac.digest()[:_MAC_LENGTH]
        return binascii.b2a_base64(raw, newline=False).translate(_URLSAFE).rstrip(b"=").decode("ascii")


def verify_token(token: str, *, secrets: Sequence[bytes]) -> TokenClaims | None:
    """The claims of a token signed by one of `secrets`, or None if it is malformed or forged."""
    raw = _decode(token)
    if raw is None or len(raw) < 2 + 2 + 2 + _MAC_LENGTH or raw[0] != TOKEN_VERSION:
        return None
    payload, mac = raw[:-_MAC_LENGTH], raw[-_MAC_LENGTH:]
    fields = _unframe(payload[2:])
    if fields is None:
        return None
    key_id = payload[1]
    for index, secret in enumerate(secrets):
        # The key id only narrows the search; the MAC decides.
        if _key_id(secret) == key_id and hmac.compare_digest(_mac(secret, payload), mac):
            campaign, recipient_key = fields
            return TokenClaims(campaign=campaign, recipient_key=recipient_key, key_index=index)
    return None


def build_unsubscribe_headers(
    *, url: str, mailto: str | None, token: str, campaign: str
) -> tuple[tuple[str, str], ...]:
    """`List-Unsubscribe` (https URL first, then mailto) and `List-Unsubscribe-Post`, ready for the wire.

    `url` is the rendered unsubscribe URL; raises HeaderError if it is not a safe https URL.
    """
    if _PLAIN_HTTPS_URL.fullmatch(url) is None or "=?" in url:
        _check_url(url, campaign)
    items = [f"<{url}>"]
    if mailto is not None:
        prefix, has_subject = _parse_mailto(mailto, campaign)
        items.append(f"<{prefix}>" if has_subject else f"<{prefix}subject=unsubscribe-{token}>")
    value = ", ".join(items)
    problem = header_value_problem(value)
    if problem is not None:
        raise HeaderError(f"campaign {campaign}: {_HEADER_NAME} {problem}")
    if len(_HEADER_NAME) + 2 + len(value) > _MAX_LINE:
        raise HeaderError(
            f"campaign {campaign}: the {_HEADER_NAME} header would be {len(value)} characters, "
            f"over the {_MAX_LINE}-character line limit; shorten unsubscribe.url or the recipient key"
        )
    return ((_HEADER_NAME, value), _POST_HEADER)


@lru_cache(maxsize=64)
def _key_id(secret: bytes) -> int:
    """A one-byte hint naming the key, so verification tries only the matching secret(s)."""
    return hashlib.sha256(b"campaign-unsubscribe-key-id\x00" + secret).digest()[0]


def _mac(secret: bytes, payload: bytes) -> bytes:
    # The purpose is length-prefixed ahead of the payload; the payload frames its own fields.
    return hmac.digest(secret, _PURPOSE_FRAME + payload, "sha256")[:_MAC_LENGTH]


def _frame(data: bytes, what: str) -> bytes:
    if len(data) > _MAX_FIELD:
        raise ValueError(f"the {what} is {len(data)} bytes; an unsubscribe token holds at most {_MAX_FIELD}")
    return len(data).to_bytes(2, "big") + data


def _unframe(data: bytes) -> tuple[str, str] | None:
    """The campaign and recipient key from a framed payload, or None unless it is exactly two fields."""
    fields: list[str] = []
    offset = 0
    for _ in range(2):
        if offset + 2 > len(data):
            return None
        length = int.from_bytes(data[offset : offset + 2], "big")
        offset += 2
        if offset + length > len(data):
            return None
        try:
            fields.append(data[offset : offset + length].decode("utf-8"))
        except UnicodeDecodeError:
            return None
        offset += length
    if offset != len(data):
        return None
    return fields[0], fields[1]


def _decode(token: str) -> bytes | None:
    """Decode canonical unpadded base64url, or None.

    The re-encoding check refuses tokens that differ only in the unused low bits of
    the last character: otherwise two spellings would verify as the same token.
    """
    if not _TOKEN_CHARS.fullmatch(token) or len(token) % 4 == 1:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except ValueError:  # binascii.Error is a ValueError
        return None
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != token:
        return None
    return raw


def _check_url(url: str, campaign: str) -> None:
    where = f"campaign {campaign}: unsubscribe.url {url!r}"
    problem = header_value_problem(url)
    if problem is not None:
        raise HeaderError(f"{where} {problem}")
    bad = _BAD_URL_CHAR.search(url)
    if bad is not None:
        raise HeaderError(
            f"{where} contains {bad.group()!r}; a List-Unsubscribe URL may not hold whitespace, quotes "
            "or <>; percent-encode values with the `urlencode` filter"
        )
    if not url.isascii():
        raise HeaderError(
            f"{where} contains non-ASCII characters; percent-encode values with the `urlencode` filter"
        )
    if "=?" in url:
        raise HeaderError(
            f"{where} contains '=?', which mail software may read as an encoded-word; write %3F"
        )
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError for a port that is not a number in range
    except ValueError as exc:
        raise HeaderError(f"{where} is not a valid URL ({exc})") from exc
    if parts.scheme != "https":
        raise HeaderError(f"{where} must use https (RFC 8058 one-click needs an https URL)")
    if not parts.hostname:
        raise HeaderError(f"{where} has no host name")
    if "@" in parts.netloc:
        raise HeaderError(f"{where} must not contain a user name or password before the host")
    if "#" in url:
        raise HeaderError(f"{where} must not contain a #fragment; it is never sent to the server")


@lru_cache(maxsize=16)
def _parse_mailto(mailto: str, campaign: str) -> tuple[str, bool]:
    """The mailto URI up to where the subject goes, and whether the user already gave a subject."""
    address = mailto[len("mailto:") :] if mailto.lower().startswith("mailto:") else mailto
    address, _, query = address.partition("?")
    if (
        header_value_problem(mailto) is not None
        or _BAD_URL_CHAR.search(mailto) is not None
        or not mailto.isascii()
        or "#" in mailto
        or "=?" in mailto
        or address.count("@") != 1
        or address.startswith("@")
        or address.endswith("@")
    ):
        raise HeaderError(
            f"campaign {campaign}: unsubscribe.mailto {mailto!r} must be a plain ASCII address "
            "such as unsubscribe@example.com"
        )
    params = [param for param in query.split("&") if param]
    if any(param.lower().startswith("subject=") for param in params):
        return f"mailto:{address}?{'&'.join(params)}", True
    return f"mailto:{address}?{''.join(param + '&' for param in params)}", False
