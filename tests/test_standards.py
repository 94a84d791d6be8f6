"""email-standards.md §7 checks 1–25 over real sends (CLI → fake Nylas on loopback) and the real endpoint.

Items 1–14 run on the exact headers each message carried to the API and on a MIME copy
built from the delivered message's headers; 15–19 on the tokens those messages carry;
20–25 by POSTing the delivered URLs to the endpoint on loopback and sending again.
"""

from __future__ import annotations

import base64
import csv
import hmac
import os
import re
import sqlite3
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from conftest import API_KEY, SECRET
from test_token_signer import V1_ANN, V1_SECRET

import campaign.unsubscribe._tokens
from campaign.testing import FakeClock, FakeNylas, serve_on_loopback
from campaign.unsubscribe import make_token, open_store, parse_secrets, verify_token
from campaign.web._unsubscribe import UnsubscribeEndpoint

GRANT = "grant-standards"
HOST = "example.com"
# A long path makes every unsubscribe URL longer than 150 characters (§7 item 12).
URL_PATH = "/email/preferences/unsubscribe/one-click/" + "x" * 60
LIST_UNSUBSCRIBE = re.compile(r"^<[^<>\s]+>(?:[ \t]*,[ \t]*<[^<>\s]+>)*$")
CONTROLS = re.compile(r"[\x00-\x08\x0A-\x1F\x7F\x85\u2028]")
ONE_CLICK = "List-Unsubscribe=One-Click"
FORM = {"content-type": "application/x-www-form-urlencoded"}
ROWS = [
    ("ann@example.com", "Ann Lee", "Ann"),
    ("bob.stone+news@example.org", "Stone, Bob", "Bob"),
    ("zoe@example.net", "Zoë Ångström", "Zoë"),
    ("dora@example.com", 'Dora "DJ" O\'Neil', "Dora"),
    ("eve@example.org", "", "Eve"),
]


def _write_campaign(folder: Path, *, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "recipients.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["email", "name", "first_name"])
        writer.writerows(ROWS)
    (folder / "news.html.j2").write_text(
        '{% extends "base.html.j2" %}{% block content %}<p>Hi {{ first_name }},</p>{% endblock %}',
        encoding="utf-8",
    )
    manifest = folder / f"{name}.toml"
    manifest.write_text(
        f"""
[campaign]
name = "{name}"
[recipients]
source = "recipients.csv"
name_column = "name"
[message]
subject = "News for {{{{ first_name }}}} — spring edition"
html = "news.html.j2"
reply_to = "support@example.com"
headers = {{ "X-Campaign" = "{name}" }}
[unsubscribe]
url = "https://{HOST}{URL_PATH}?t={{{{ unsubscribe_token }}}}"
mailto = "unsubscribe@example.com"
store = "unsubscribes.sqlite"
[[senders]]
name = "maya"
grant_id = "{GRANT}"
email = "maya@example.com"
from_name = "Maya from Example"
per_second = 50
""",
        encoding="utf-8",
    )
    return manifest


def _custom(delivery: Any) -> list[tuple[str, str]]:
    return [(h["name"], h["value"]) for h in delivery.payload.get("custom_headers", [])]


def _https_url(value: str) -> str:
    return re.findall(r"<([^<>]*)>", value)[0]


def _token(delivery: Any) -> str:
    value = dict(_custom(delivery))["List-Unsubscribe"]
    return parse_qs(urlsplit(_https_url(value)).query)["t"][0]


def _delivered_headers(base: str) -> list[list[tuple[str, str]]]:
    """Each delivered message's full header list, as the API returns it (`fields=include_headers`)."""
    response = httpx.get(
        f"{base}/v3/grants/{GRANT}/messages",
        params={"fields": "include_headers", "limit": 50},
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    assert response.status_code == 200
    return [[(h["name"], h["value"]) for h in message["headers"]] for message in response.json()["data"]]


def _mime(headers: list[tuple[str, str]]) -> bytes:
    """The message serialised as an SMTP-bound MIME copy, as a provider that does not fold would send it."""
    message = EmailMessage(policy=policy.SMTP.clone(max_line_length=None))
    for name, value in headers:
        if name.lower() not in {"mime-version"}:
            message[name] = value
    message.set_content("Hello\n", cte="7bit")
    return bytes(message)


@pytest.fixture(name="sent")
def _sent(api: FakeNylas, cli, tmp_path) -> dict[str, Any]:
    """Two campaigns (same list, different names) sent through the CLI to the fake on loopback."""
    api.add_grant(GRANT, "maya@example.com")
    first = _write_campaign(tmp_path / "c", name="spring")
    result = cli("run", first, "--yes")
    assert result.exit_code == 0, result.output
    spring = list(api.deliveries)
    second = _write_campaign(tmp_path / "c", name="autumn")
    result = cli("run", second, "--yes")
    assert result.exit_code == 0, result.output
    autumn = api.deliveries[len(spring) :]
    base = os.environ["NYLAS_API_URI"]
    return {
        "spring": spring,
        "autumn": autumn,
        "all": list(api.deliveries),
        "headers": _delivered_headers(base),
        "store": tmp_path / "c" / "unsubscribes.sqlite",
        "manifest": first,
        "api": api,
    }


# --- header level: items 1–14 -------------------------------------------------------------------------------


def test_items_1_to_8_on_the_headers_sent_to_the_api(sent):
    """Items 1–8 hold for every message: counts, exact Post value, bracketed list, one https, clean text."""
    assert len(sent["all"]) == 2 * len(ROWS)
    for delivery in sent["all"]:
        headers = _custom(delivery)
        names = [name for name, _ in headers]
        assert names.count("List-Unsubscribe") == 1  # item 1
        assert names.count("List-Unsubscribe-Post") == 1
        values = dict(headers)
        assert re.fullmatch(r"List-Unsubscribe=One-Click", values["List-Unsubscribe-Post"].strip())  # item 2
        value = values["List-Unsubscribe"]
        assert LIST_UNSUBSCRIBE.fullmatch(value)  # item 3
        items = re.findall(r"<([^<>]*)>", value)
        assert [item for item in items if item.startswith("https://")] == items[:1]
        assert all(item.startswith("mailto:") for item in items[1:])
        assert len(items) == 2
        assert "http://" not in value
        for _, header_value in headers:  # items 4 and 8
            assert "=?" not in header_value
            assert not CONTROLS.search(header_value)
            assert "\u2029" not in header_value
        assert all(not re.search(r"\s", item) for item in items)  # item 5
        url = urlsplit(items[0])  # item 6
        assert (url.scheme, url.hostname, url.username, url.password, url.fragment) == (
            "https",
            HOST,
            None,
            None,
            "",
        )
        assert all(re.fullmatch(r"[\x21-\x39\x3B-\x7E]+", name) for name in names)  # item 7


def test_items_9_10_12_13_14_on_the_delivered_copies(sent):
    """Each delivered message as MIME: lines ≤998, CRLF, exact round trip, one of each, small headers."""
    assert len(sent["headers"]) == 2 * len(ROWS)
    for headers in sent["headers"]:
        intended = dict(headers)["List-Unsubscribe"]
        assert len(_https_url(intended)) > 150  # item 12: a long URL
        wire = _mime(headers)
        header_block = wire.split(b"\r\n\r\n", 1)[0]
        assert all(len(line) <= 998 for line in wire.split(b"\r\n"))  # item 9
        assert b"\n" not in wire.replace(b"\r\n", b"")
        assert b"=?" not in b"\r\n".join(
            line for line in header_block.split(b"\r\n") if line.lower().startswith(b"list-unsubscribe")
        )  # item 12: not encoded
        unsubscribe_lines = [
            line for line in header_block.split(b"\r\n") if line.startswith(b"List-Unsubscribe:")
        ]
        assert unsubscribe_lines == [f"List-Unsubscribe: {intended}".encode()]  # one line, unfolded
        parsed = BytesParser(policy=policy.default).parsebytes(wire)  # item 10
        assert str(parsed["List-Unsubscribe"]) == intended
        assert str(parsed["List-Unsubscribe-Post"]) == "List-Unsubscribe=One-Click"
        assert len(parsed.keys()) == len([n for n, _ in headers if n.lower() != "mime-version"]) + 3
        names = [name.lower() for name, _ in headers]  # item 13
        assert names.count("message-id") == 1
        for single in ("from", "to", "subject", "date"):
            assert names.count(single) <= 1, single
        assert len(parsed["From"].addresses) == 1
        assert all(len(value.encode()) < 32 * 1024 for _, value in headers)  # item 14
        assert len(dict(headers)["Subject"]) <= 998
        assert sum(len(n) + len(v) + 4 for n, v in headers) < 500 * 1024


def test_item_11_injection_is_refused_before_the_api(api, cli, tmp_path):
    """Item 11: a CR/LF in a merge field that reaches a header stops the run with 65; nothing is sent."""
    api.add_grant(GRANT, "maya@example.com")
    manifest = _write_campaign(tmp_path / "c", name="spring")
    with (tmp_path / "c" / "recipients.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["email", "name", "first_name"])
        writer.writerows(ROWS[:2])
        writer.writerow(["zoe@example.net", "Zoë", "Zoë\r\nBcc: victim@example.com"])
    manifest.write_text(manifest.read_text().replace("spring edition", "{{ first_name }}"))
    result = cli("run", manifest, "--yes")
    assert result.exit_code == 65
    assert "row 3" in result.stderr
    assert "message.subject" in result.stderr
    assert api.deliveries == []


# --- token / URL: items 15–19 -------------------------------------------------------------------------------


def test_item_15_tokens_differ_per_recipient_and_per_campaign(sent):
    """Every message carries its own token and URL; the same person on two campaigns gets two tokens."""
    tokens = [_token(d) for d in sent["all"]]
    assert len(set(tokens)) == len(tokens) == 2 * len(ROWS)
    spring = {d.payload["to"][0]["email"]: _token(d) for d in sent["spring"]}
    autumn = {d.payload["to"][0]["email"]: _token(d) for d in sent["autumn"]}
    assert all(spring[email] != autumn[email] for email in spring)


def test_item_16_tokens_are_unpadded_base64url_with_16_mac_bytes(sent):
    """Each token matches ^[A-Za-z0-9_-]+$ and decodes to payload plus at least 16 bytes of MAC."""
    for delivery in sent["all"]:
        token = _token(delivery)
        assert re.fullmatch(r"[A-Za-z0-9_-]+", token)
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        key = delivery.payload["metadata"]["key2"]
        campaign = delivery.payload["metadata"]["key1"]
        assert len(raw) - (1 + 1 + 2 + 2) - len(campaign.encode()) - len(key.encode()) >= 16


def test_item_17_flipped_swapped_or_relabelled_tokens_fail(sent):
    """Flipping any character, or minting for another list or recipient, never verifies as the original."""
    secrets = parse_secrets(SECRET)
    delivery = sent["spring"][0]
    token = _token(delivery)
    claims = verify_token(token, secrets=secrets)
    assert claims is not None
    assert (claims.campaign, claims.recipient_key) == ("spring", delivery.payload["metadata"]["key2"])
    for position, char in enumerate(token):
        flipped = token[:position] + ("A" if char != "A" else "B") + token[position + 1 :]
        assert verify_token(flipped, secrets=secrets) is None, position
    other = _token(sent["spring"][1])
    payload_of_other = base64.urlsafe_b64decode(other + "=" * (-len(other) % 4))[:-16]
    mac_of_first = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))[-16:]
    spliced = base64.urlsafe_b64encode(payload_of_other + mac_of_first).rstrip(b"=").decode()
    assert verify_token(spliced, secrets=secrets) is None
    autumn = next(_token(d) for d in sent["autumn"] if d.payload["to"] == delivery.payload["to"])
    assert verify_token(autumn, secrets=secrets).campaign == "autumn"  # type: ignore[union-attr]


def test_item_18_rotation_keeps_old_tokens_until_the_key_is_removed(sent):
    """With a new secret first and the old one second, delivered tokens verify; with the old one gone, not."""
    old = parse_secrets(SECRET)
    new = b"a-brand-new-secret-0123456789abcdef"
    token = _token(sent["spring"][0])
    assert verify_token(token, secrets=(new, *old)) is not None
    assert verify_token(token, secrets=(new,)) is None
    rotated = make_token(secrets=(new, *old), campaign="spring", recipient_key="ann@example.com")
    assert verify_token(rotated, secrets=(new,)) is not None


def test_item_19_verification_uses_compare_digest(sent, monkeypatch):
    """Checking a version 1 (HMAC) token calls hmac.compare_digest (observed, not assumed); a delivered
    version 2 token is checked by AES-GCM-SIV's tag verification, constant-time inside OpenSSL."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(campaign.unsubscribe._tokens.hmac, "compare_digest", spy)
    assert verify_token(V1_ANN, secrets=(V1_SECRET,)) is not None
    assert len(calls) == 1
    assert len(calls[0][0]) == 16
    assert verify_token(_token(sent["spring"][0]), secrets=parse_secrets(SECRET)) is not None


# --- endpoint: items 20–25 ----------------------------------------------------------------------------------


def _post_delivered(base: str, delivery: Any, **kwargs: Any) -> httpx.Response:
    parts = urlsplit(_https_url(dict(_custom(delivery))["List-Unsubscribe"]))
    return httpx.post(f"{base}{parts.path}?{parts.query}", follow_redirects=False, **kwargs)


def _entries(path: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT campaign, recipient_key FROM unsubscribes ORDER BY id").fetchall()


def test_items_20_to_25_against_the_endpoint_with_delivered_links(sent, cli):
    """The delivered links, POSTed and fetched on the real endpoint, then a new send honours them at once."""
    store = open_store(sent["store"], clock=FakeClock())
    endpoint = UnsubscribeEndpoint(store, secrets=parse_secrets(SECRET))
    spring = {d.payload["to"][0]["email"]: d for d in sent["spring"]}
    try:
        with serve_on_loopback(endpoint) as base:
            # Item 23: GET shows a page and changes nothing.
            parts = urlsplit(_https_url(dict(_custom(spring["eve@example.org"]))["List-Unsubscribe"]))
            page = httpx.get(f"{base}{parts.path}?{parts.query}", follow_redirects=False)
            assert page.status_code == 200
            assert "<form" in page.text
            assert _entries(sent["store"]) == []
            # Item 20: urlencoded; item 21: multipart; both for that list only.
            urlencoded = _post_delivered(base, spring["ann@example.com"], content=ONE_CLICK, headers=FORM)
            multipart = _post_delivered(
                base, spring["zoe@example.net"], files={"List-Unsubscribe": (None, "One-Click")}
            )
            # Item 24: again, harmless.
            repeated = _post_delivered(base, spring["ann@example.com"], content=ONE_CLICK, headers=FORM)
            answers = [urlencoded, multipart, repeated]
    finally:
        store.close()
    assert [a.status_code for a in answers] == [200, 200, 200]
    for answer in [page, *answers]:  # item 22
        assert not 300 <= answer.status_code < 400
        assert "set-cookie" not in answer.headers
    assert _entries(sent["store"]) == [("spring", "ann@example.com"), ("spring", "zoe@example.net")]
    # Item 25: the very next send skips them, with no delay.
    api: FakeNylas = sent["api"]
    before = len(api.deliveries)
    third = sent["manifest"].parent / "winter.toml"
    third.write_text(sent["manifest"].read_text().replace('name = "spring"', 'name = "winter"'))
    result = cli("run", third, "--yes")
    assert result.exit_code == 0, result.output
    assert "2 unsubscribed" in result.stdout
    mailed = sorted(d.payload["to"][0]["email"] for d in api.deliveries[before:])
    assert mailed == sorted(
        email for email, _, _ in ROWS if email not in {"ann@example.com", "zoe@example.net"}
    )
