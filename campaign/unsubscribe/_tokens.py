"""Opaque unsubscribe tokens and the one-click `List-Unsubscribe` headers (RFC 2369, RFC 8058).

A token (version 2) is the campaign, the recipient key and the address, encrypted and
authenticated with AES-GCM-SIV under a key derived (HKDF-SHA256) from the secret: whoever
holds the URL learns nothing about the recipient, and the endpoint trusts and reads it
without a database of issued links. Deterministic (a fixed nonce, which GCM-SIV allows:
equal tokens only say the recipient is the same), so a re-render gives the same link.
Version 1 tokens (the campaign and key in the clear plus a truncated HMAC-SHA256), already
sent, still verify. The first secret signs; every secret verifies, so keys rotate by
putting a new one first and dropping the oldest later. Where the endpoint looks for a token in a
link (`token_candidates`) is here too, so that `url_carries_token` can tell whether a rendered link
holds its token there. Pure: no I/O, no clock, and never a secret in any text.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import chain, islice
from urllib.parse import unquote, unquote_plus, urlsplit

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from campaign.errors import HeaderError, ManifestError
from campaign.headers import header_value_problem
from campaign.redaction import quote_value

__all__ = [
    "MIN_SECRET_LENGTH",
    "TOKEN_SHAPE",
    "TOKEN_VERSION",
    "TokenClaims",
    "TokenSigner",
    "build_unsubscribe_headers",
    "find_mailto_token",
    "make_token",
    "parse_secrets",
    "token_candidates",
    "url_carries_token",
    "verify_token",
]

TOKEN_VERSION = 2
_V1 = 1  # campaign and key in the clear, HMAC-signed: verified for links already sent, never made
MIN_SECRET_LENGTH = 16
_MAC_LENGTH = 16  # 128 bits: RFC 2104 §5 asks for at least half the hash and at least 80 bits
_PURPOSE = b"unsubscribe"  # binds the MAC to this use, so the same key cannot mint other tokens
_PURPOSE_FRAME = bytes((len(_PURPOSE),)) + _PURPOSE
_MAX_FIELD = 0xFFFF  # fields are framed with a two-byte length
_NO_ADDRESS = bytes(2)  # the empty address field: most keys are the address
# GCM-SIV keeps its guarantees under a repeated nonce except that equal plaintexts give equal
# tokens, which is what a link re-rendered on resume should do; a random nonce would add 12 bytes.
_NONCE = bytes(12)
_TAG_LENGTH = 16
_PAD = 16  # plaintexts are zero-padded to a multiple of this, so a token's length says little
_KDF_INFO = b"campaign unsubscribe token v2"
_HEADER_NAME = "List-Unsubscribe"
_POST_HEADER = ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click")
# RFC 5322 §2.1.1: a line MUST NOT exceed 998 characters; we never fold this header.
_MAX_LINE = 998
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9_-]+")
# What may be a token, where one is looked for in text (a URL, a subject): unpadded base64url, at least
# 24 characters (every token either version makes is 30 or more) and at most 2,048.
TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_-]{24,2048}")
# A mailto unsubscribe asks for this subject, the token after it (a client may put "Re:" before it).
_MAILTO_SUBJECT = "unsubscribe-"
_MAILTO_TOKEN = re.compile(rf"\b{_MAILTO_SUBJECT}({TOKEN_SHAPE.pattern})\b")
# Token-shaped query values, and path segments, the endpoint tries beyond the documented places: enough
# for any URL a manifest writes, few enough that a URL stuffed with junk costs a handful of checks.
_MAX_CANDIDATES_PER_PLACE = 8
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
    """What a valid token says: the campaign, the recipient key, the address, and which secret made it.

    `email` is None when the key is the address, and for a version 1 token (which never held one).
    """

    campaign: str
    recipient_key: str
    key_index: int
    email: str | None = None


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


def make_token(
    *, secrets: Sequence[bytes], campaign: str, recipient_key: str, email: str | None = None
) -> str:
    """Encrypt (campaign, recipient_key, email) with the first secret; returns base64url without padding."""
    return TokenSigner(secrets=secrets, campaign=campaign).sign(recipient_key, email=email)


class TokenSigner:
    """`make_token` for one campaign and many recipients: the cipher and the payload's start made once.

    ValueError (as make_token) without a secret or for a campaign name too long to frame.
    """

    __slots__ = ("_aad", "_cipher", "_header", "_prefix")

    def __init__(self, *, secrets: Sequence[bytes], campaign: str) -> None:
        if not secrets:
            raise ValueError("make_token needs at least one secret")
        secret = secrets[0]
        self._header = bytes((TOKEN_VERSION, _key_id(secret)))
        self._aad = _PURPOSE_FRAME + self._header
        self._prefix = _frame(campaign.encode("utf-8"), "campaign")
        self._cipher = _cipher(secret)

    def sign(self, recipient_key: str, *, email: str | None = None) -> str:
        """The token for `recipient_key` at `email` (ValueError if a value is too long to frame).

        The address is left out when it is the key (the endpoint reads it from the key).
        """
        same = email is None or email.lower() == recipient_key.lower()
        address = _NO_ADDRESS if same or email is None else _frame(email.encode("utf-8"), "address")
        plain = self._prefix + _frame(recipient_key.encode("utf-8"), "recipient key") + address
        plain += bytes(-len(plain) % _PAD)
        raw = self._header + self._cipher.encrypt(_NONCE, plain, self._aad)
        return binascii.b2a_base64(raw, newline=False).translate(_URLSAFE).rstrip(b"=").decode("ascii")


def find_mailto_token(subject: str) -> str | None:
    """The token in the subject of a mailto unsubscribe request (`unsubscribe-<token>`, as
    `build_unsubscribe_headers` asks for it), unverified; None if it holds none."""
    found = _MAILTO_TOKEN.search(subject)
    return None if found is None else found.group(1)


def token_candidates(query: Sequence[tuple[str, str]], path: str) -> Iterator[str]:
    """The strings in a request's URL that may be its token, in the order the endpoint tries them, each once.

    `query` is the URL's decoded (name, value) pairs, `path` its decoded path. First the documented
    places (`t`, `token`, the last path segment), then any query value, then any path segment, with
    its extension dropped too (`<token>.html`): a link the manifest let through must not be refused.
    Only token-shaped strings, and at most a few from each place, so a hostile URL costs little;
    which one is the token is for `verify_token` to say.
    """
    named = dict(query)  # the last value of a repeated name, as starlette's query_params.get gives
    segments = [segment for segment in path.split("/") if segment]
    documented = (named.get("t", ""), named.get("token", ""), segments[-1] if segments else "")
    values = islice(_shaped(value for _, value in query), _MAX_CANDIDATES_PER_PLACE)
    stems = islice(_shaped(_with_stems(segments)), _MAX_CANDIDATES_PER_PLACE)
    seen: set[str] = set()
    for candidate in chain(_shaped(documented), values, stems):
        if candidate not in seen:
            seen.add(candidate)
            yield candidate


def url_carries_token(url: str, token: str) -> bool:
    """Whether `token` is in the rendered unsubscribe `url` verbatim where the endpoint finds it
    (`token_candidates`): a whole query value or path segment (or a segment's part before its extension).

    A filtered token (`upper`, `truncate`, a slice), one glued to other text, or one in the fragment
    (never sent to the server) is not: a click on such a link could never unsubscribe anyone. The
    composer asks this of each row whose link names list values, so it reads the URL with string
    operations as urlsplit, parse_qsl and the endpoint do (a test holds them to agree): through them,
    it would cost a third of rendering the message.
    """
    if token not in url:
        return False
    path, query = _path_and_query(url)
    if token in query and _is_query_value(query, token):
        return True
    return token in path and _is_path_segment(unquote(path), token)


def _path_and_query(url: str) -> tuple[str, str]:
    """The path and the query a client asks for, as urlsplit splits a `scheme://host…` URL: the host ends
    at the first '/' or '?', and the fragment stays with the client."""
    rest = url.partition("//")[2].partition("#")[0]
    ends = [at for at in (rest.find("/"), rest.find("?")) if at >= 0]
    path, _, query = rest[min(ends, default=len(rest)) :].partition("?")
    return path, query


def _is_query_value(query: str, token: str) -> bool:
    """Whether `token` is the value of `t` or `token`, or among the first token-shaped values."""
    last: dict[str, str] = {}
    shaped = 0
    for piece in query.split("&"):
        name, _, value = piece.partition("=")
        value = _form_decoded(value)
        if value == token and shaped < _MAX_CANDIDATES_PER_PLACE:
            return True
        shaped += TOKEN_SHAPE.fullmatch(value) is not None
        last[_form_decoded(name)] = value
    return token in (last.get("t"), last.get("token"))


def _is_path_segment(path: str, token: str) -> bool:
    """Whether `token` is the last segment of `path`, or among its first token-shaped segments and stems."""
    segments = [segment for segment in path.split("/") if segment]
    if segments and segments[-1] == token:
        return True
    shaped = 0
    for stem in _with_stems(segments):
        if stem == token and shaped < _MAX_CANDIDATES_PER_PLACE:
            return True
        shaped += TOKEN_SHAPE.fullmatch(stem) is not None
    return False


def _form_decoded(text: str) -> str:
    # As parse_qsl decodes a name or value; most hold nothing to decode.
    return unquote_plus(text) if "%" in text or "+" in text else text


def _shaped(strings: Iterable[str]) -> Iterator[str]:
    # Only what may be a token (`TOKEN_SHAPE`): "u", "confirm" or "utm_source" values are shorter, and do
    # not use up the bound on candidates.
    return (text for text in strings if TOKEN_SHAPE.fullmatch(text))


def _with_stems(segments: Iterable[str]) -> Iterator[str]:
    """Each segment, and its part before the first dot when it has one (no token holds a dot)."""
    for segment in segments:
        yield segment
        if "." in segment:
            yield segment.partition(".")[0]


def verify_token(token: str, *, secrets: Sequence[bytes]) -> TokenClaims | None:
    """The claims of a token made with one of `secrets` (version 2 or 1), or None if malformed or forged."""
    raw = _decode(token)
    if raw is None or len(raw) < 2:
        return None
    if raw[0] == TOKEN_VERSION:
        return _open_v2(raw, secrets)
    if raw[0] == _V1:
        return _verify_v1(raw, secrets)
    return None


def _open_v2(raw: bytes, secrets: Sequence[bytes]) -> TokenClaims | None:
    if len(raw) < 2 + _TAG_LENGTH + _PAD:
        return None
    header, sealed = raw[:2], raw[2:]
    for index, secret in enumerate(secrets):
        # The key id only narrows the search; the tag decides.
        if _key_id(secret) != header[1]:
            continue
        try:
            plain = _cipher(secret).decrypt(_NONCE, sealed, _PURPOSE_FRAME + header)
        except InvalidTag:
            continue
        fields = _unframe(plain, 3, padded=True)
        if fields is None:
            return None
        campaign, recipient_key, email = fields
        return TokenClaims(campaign, recipient_key, index, email or None)
    return None


def _verify_v1(raw: bytes, secrets: Sequence[bytes]) -> TokenClaims | None:
    if len(raw) < 2 + 2 + 2 + _MAC_LENGTH:
        return None
    payload, mac = raw[:-_MAC_LENGTH], raw[-_MAC_LENGTH:]
    fields = _unframe(payload[2:], 2)
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
        items.append(f"<{prefix}>" if has_subject else f"<{prefix}subject={_MAILTO_SUBJECT}{token}>")
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


@lru_cache(maxsize=16)
def _cipher(secret: bytes) -> AESGCMSIV:
    """The token cipher for a secret: a 256-bit key derived with HKDF-SHA256 (never the secret itself)."""
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_KDF_INFO).derive(secret)
    return AESGCMSIV(key)


def _mac(secret: bytes, payload: bytes) -> bytes:
    # The purpose is length-prefixed ahead of the payload; the payload frames its own fields.
    return hmac.digest(secret, _PURPOSE_FRAME + payload, "sha256")[:_MAC_LENGTH]


def _frame(data: bytes, what: str) -> bytes:
    if len(data) > _MAX_FIELD:
        raise ValueError(f"the {what} is {len(data)} bytes; an unsubscribe token holds at most {_MAX_FIELD}")
    return len(data).to_bytes(2, "big") + data


def _unframe(data: bytes, count: int, *, padded: bool = False) -> tuple[str, ...] | None:
    """`count` framed UTF-8 fields from `data`, or None unless that is all it holds (but zero padding)."""
    fields: list[str] = []
    offset = 0
    for _ in range(count):
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
    rest = data[offset:]
    if padded and (len(rest) >= _PAD or any(rest)):
        return None
    if not padded and rest:
        return None
    return tuple(fields)


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
    if "@" in parts.netloc:  # not repeated: what comes before the host may be a password
        raise HeaderError(
            f"campaign {campaign}: unsubscribe.url must not contain a user name or password before the host"
        )
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
            f"campaign {campaign}: unsubscribe.mailto {quote_value(mailto)} must be a plain ASCII address "
            "such as unsubscribe@example.com"
        )
    params = [param for param in query.split("&") if param]
    if any(param.lower().startswith("subject=") for param in params):
        return f"mailto:{address}?{'&'.join(params)}", True
    return f"mailto:{address}?{''.join(param + '&' for param in params)}", False
