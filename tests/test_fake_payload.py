"""The fake Nylas API's payload helpers keep their plain definitions under their faster code.

The snippet reads only the start of a long body, the idempotency fingerprint comes from orjson
with json.dumps behind it, and ids come from bulk random bytes; each is held here to the simple
version it replaced.
"""

from __future__ import annotations

import html
import json
import random
import re
from typing import Any

import pytest

from campaign.testing.payload import build_snippet, fingerprint_payload, new_opaque_id


def plain_snippet(body: str, *, plaintext: bool) -> str:
    text = body if plaintext else html.unescape(re.sub(r"<[^>]*>", " ", body))
    return re.sub(r"\s+", " ", text).strip()[:100]


def plain_fingerprint(payload: dict[str, Any]) -> str:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


PIECES = ["<", ">", "<p>", "</p>", "<a href='x'>", "&amp;", "&amp", "&nbsp;", "&#x3c;", "&#60", "&lt;"]
PIECES += [" ", "\n", "\t", "\xa0", "\u2003", "word", "é", "&", ";", "#", "<br/>", "<!-- c -->", "&notit;"]


@pytest.mark.parametrize(
    "body",
    [
        "<div>" + "<span> </span>" * 200 + "late text " * 30 + "</div>",
        "<p>" + "a" * 1020 + "&am" + "p; tail</p>" + "<b>x</b>" * 50,
        "x" * 1023 + "<i" + " " * 3000 + "> after " * 40,
        "<p>" + "word " * 400 + "</p>",
        "short <b>body</b>",
    ],
)
def test_snippet_of_a_long_body_is_the_plain_one(body: str) -> None:
    """Cutting a long HTML body short gives the snippet the whole body gives."""
    for plaintext in (False, True):
        assert build_snippet(body, plaintext=plaintext) == plain_snippet(body, plaintext=plaintext)


def test_snippet_of_random_markup_is_the_plain_one() -> None:
    """Tags, entities and whitespace of every kind, cut anywhere: the same snippet as before."""
    rng = random.Random(20260105)
    for _ in range(400):
        weights = [rng.random() for _ in PIECES]
        body = "".join(rng.choices(PIECES, weights, k=rng.choice([20, 600, 3000])))
        assert build_snippet(body, plaintext=False) == plain_snippet(body, plaintext=False), body


VALUES: list[Any] = [None, float("nan"), float("inf"), -float("inf"), 0, 0.0, -0.0, 1, 1.0, 1e16, 10**16]
VALUES += [2**63, 2**64, -(2**63) - 1, True, "null", "NaN", "\ud800", "é", [], {}, [None], {"a": None}]


def test_fingerprints_are_equal_exactly_when_json_dumps_is() -> None:
    """Values orjson writes alike (NaN and None as null) or not at all (big ints) still differ as before."""
    payloads = [{"to": [{"email": "a@x.test"}], "metadata": {"k": value}} for value in VALUES]
    payloads += [json.loads(json.dumps(p)) for p in payloads]
    for first in payloads:
        for second in payloads:
            same = plain_fingerprint(first) == plain_fingerprint(second)
            assert (fingerprint_payload(first) == fingerprint_payload(second)) is same, (first, second)


def test_fingerprint_ignores_key_order() -> None:
    """Parsed JSON with the same members in another order is the same payload."""
    assert fingerprint_payload({"b": 1, "a": {"y": 2, "x": 3}}) == fingerprint_payload(
        {"a": {"x": 3, "y": 2}, "b": 1}
    )


def test_opaque_ids_look_like_the_apis() -> None:
    """Lower-case letters and digits, of the length asked, every character in use."""
    ids = [new_opaque_id() for _ in range(400)]
    assert all(re.fullmatch(r"[a-z0-9]{25}", found) for found in ids)
    assert set("".join(ids)) == set("abcdefghijklmnopqrstuvwxyz0123456789")
    assert len(new_opaque_id(20)) == 20
