"""Whether a webhook delivery came from Nylas: the `x-nylas-signature` header checked against the body.

Nylas signs each POST with the hex HMAC-SHA256 of the raw body, keyed with the webhook's secret
(reference/next-capabilities.md §2.3). The check runs on the bytes as they arrived, compressed
or not, before anything parses them, and compares in constant time. Pure.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

__all__ = ["sign_body", "verify_signature"]

_PREFIX = "sha256="


def sign_body(body: bytes, secret: bytes) -> str:
    """The signature Nylas sends for `body` (hex HMAC-SHA256); what the fake signs its webhooks with."""
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify_signature(body: bytes, header: str | None, secrets: Sequence[bytes]) -> bool:
    """True when `header` is the signature of `body` under one of `secrets` (a rotated one too).

    An optional `sha256=` prefix and upper-case hex are accepted, as Nylas's own CLI accepts them.
    """
    if not header:
        return False
    given = header.strip().lower().removeprefix(_PREFIX)
    matched = False
    for secret in secrets:  # every secret is tried: the time taken says nothing of which matched
        matched |= hmac.compare_digest(given.encode(), sign_body(body, secret).encode())
    return matched
