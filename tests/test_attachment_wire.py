"""Attachments on the wire: JSON with base64 up to 3 MB, multipart above, byte-identical at the fake API."""

from __future__ import annotations

import base64
import json
import os
import re

import httpx
import pytest
from conftest import API_KEY, copy_sample

from campaign.errors import DataError
from campaign.models import Address, Attachment, Message
from campaign.nylas import (
    JSON_LIMIT_BYTES,
    MULTIPART_LIMIT_BYTES,
    NylasClient,
    build_send_payload,
    build_send_request,
    encode_send_body,
    measure_send_request,
)
from campaign.nylas._payload import HEADER_ALLOWANCE_BYTES, SendRequest
from campaign.testing import FakeNylas
from campaign.testing.clock import FakeClock

GRANT = "grant-1"
LOGO = b"\x89PNG\r\n\x1a\n" + os.urandom(200)
TERMS = "Conditions générales — v2\n".encode() + os.urandom(300)


def _message(*attachments: Attachment, html: str = '<p>Hi</p><img src="cid:logo">') -> Message:
    return Message(
        recipient_key="ann@example.com",
        row=1,
        sender="alice",
        to=(Address("ann@example.com", "Ann Zoë"),),
        subject="Your files",
        html=html,
        metadata=(("key1", "files"), ("key2", "ann@example.com")),
        attachments=attachments,
    )


def _fake() -> FakeNylas:
    fake = FakeNylas(api_key=API_KEY, clock=FakeClock())
    fake.add_grant(GRANT, "alice@example.com")
    return fake


async def _send(request: SendRequest | dict, *, fake: FakeNylas | None = None, key: str = "k-1") -> FakeNylas:
    fake = fake or _fake()
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=fake.app), base_url="http://fake.test"
    ) as http:
        outcome = await NylasClient(http, api_key=API_KEY, clock=fake.clock).send_message(
            GRANT, request, idempotency_key=key
        )
    assert outcome.message_id, outcome
    return fake


def _delivered(fake: FakeNylas) -> list[tuple[str, str, bytes, str | None]]:
    (delivery,) = fake.deliveries
    return [(a.filename, a.content_type, a.content, a.content_id) for a in delivery.attachments]


@pytest.mark.anyio
async def test_small_attachments_go_as_json_and_arrive_byte_identical():
    """Under 3 MB: one JSON body with base64 contents; the fake decodes exactly the same files."""
    message = _message(
        Attachment("logo.png", "image/png", LOGO, content_id="logo"),
        Attachment("Conditions générales.txt", "text/plain", TERMS),
    )
    request = build_send_request(message)
    assert not request.multipart
    assert request.content_type == "application/json"
    assert request.build_body() == encode_send_body(build_send_payload(message))
    assert request.size == len(request.build_body())
    fake = await _send(request)
    assert fake.deliveries[0].multipart is False
    assert _delivered(fake) == [
        ("logo.png", "image/png", LOGO, "logo"),
        ("Conditions générales.txt", "text/plain", TERMS, None),
    ]
    sent = json.loads(request.build_body())["attachments"]
    assert [base64.b64decode(item["content"]) for item in sent] == [LOGO, TERMS]
    assert sent[0]["is_inline"] is True


@pytest.mark.anyio
async def test_big_attachments_go_multipart_with_named_parts_and_arrive_byte_identical():
    """Over 3 MB: a `message` part (JSON, no attachments), then a part per file named by cid or fileN."""
    brochure = os.urandom(2_400_000)  # 3.2 MB once base64-encoded
    message = _message(
        Attachment("logo.png", "image/png", LOGO, content_id="logo"),
        Attachment("Brochure été.pdf", "application/pdf", brochure),
        Attachment("terms.txt", "text/plain", TERMS),
    )
    request = build_send_request(message)
    assert request.multipart
    body = request.build_body()
    assert request.size == len(body)
    boundary = request.content_type.removeprefix("multipart/form-data; boundary=")
    names = re.findall(rb'Content-Disposition: form-data; name="([^"]+)"(?:; filename="([^"]*)")?', body)
    assert names == [
        (b"message", b""),
        (b"logo", b"logo.png"),
        (b"file1", "Brochure été.pdf".encode()),
        (b"file2", b"terms.txt"),
    ]
    assert body.endswith(f"--{boundary}--\r\n".encode())
    fake = await _send(request)
    delivery = fake.deliveries[0]
    assert delivery.multipart is True
    assert "attachments" not in delivery.payload  # the message part carries no base64 copies
    assert delivery.payload["to"] == [{"email": "ann@example.com", "name": "Ann Zoë"}]
    assert _delivered(fake) == [
        ("logo.png", "image/png", LOGO, "logo"),
        ("Brochure été.pdf", "application/pdf", brochure, None),
        ("terms.txt", "text/plain", TERMS, None),
    ]


def _message_of_json_size(size: int) -> Message:
    """A message whose JSON request body is exactly `size` bytes (padding the HTML body)."""
    attachment = Attachment("data.bin", "application/octet-stream", os.urandom(2_100_000))
    short = _message(attachment, html="")
    padding = size - measure_send_request(short).json_bytes
    assert padding >= 0
    return _message(attachment, html="x" * padding)


@pytest.mark.anyio
async def test_the_3_mb_switch_point_on_both_sides_of_the_boundary():
    """The largest request a JSON send allows goes JSON; one byte more goes multipart; both are accepted."""
    largest_json = JSON_LIMIT_BYTES - HEADER_ALLOWANCE_BYTES  # the request line and headers count too
    fits, one_more = _message_of_json_size(largest_json), _message_of_json_size(largest_json + 1)
    below, above = build_send_request(fits), build_send_request(one_more)
    assert (below.multipart, below.size, len(below.build_body())) == (False, largest_json, largest_json)
    assert measure_send_request(one_more).json_bytes == largest_json + 1
    assert above.multipart
    assert above.size < largest_json  # raw bytes instead of base64
    fake = await _send(below, key="below")
    await _send(above, fake=fake, key="above")
    assert [delivery.multipart for delivery in fake.deliveries] == [False, True]
    sent = [message.attachments[0].content for message in (fits, one_more)]
    assert [delivery.attachments[0].content for delivery in fake.deliveries] == sent


def test_the_size_is_measured_on_the_encoded_request_not_the_files():
    """A 2.5 MB file is under 3 MB raw but over it base64-encoded: multipart, as the wire requires."""
    message = _message(Attachment("a.bin", "application/octet-stream", bytes(2_500_000)))
    size = measure_send_request(message)
    assert size.json_bytes > JSON_LIMIT_BYTES > 2_500_000
    assert size.multipart
    assert build_send_request(message).multipart


def test_over_25_mb_cannot_be_encoded():
    """A message whose multipart form passes 25 MB is a DataError naming the row, never a request."""
    message = _message(Attachment("big.bin", "application/octet-stream", bytes(MULTIPART_LIMIT_BYTES)))
    with pytest.raises(DataError, match=r"^row 1: the message and its attachments come to 25\.0 MB; .*25 MB"):
        build_send_request(message)


def test_equal_messages_give_byte_identical_multipart_bodies():
    """The boundary comes from the message, so a resend under the same Idempotency-Key is the same bytes."""
    content = os.urandom(3_000_000)
    first = build_send_request(_message(Attachment("a.bin", "application/octet-stream", content)))
    again = build_send_request(_message(Attachment("a.bin", "application/octet-stream", bytes(content))))
    assert first.content_type == again.content_type
    assert first.build_body() == again.build_body()
    other = build_send_request(
        _message(Attachment("b.bin", "application/octet-stream", content), html="<p>B</p>")
    )
    assert other.content_type != first.content_type


@pytest.mark.anyio
async def test_a_multipart_resend_with_the_same_key_is_replayed_not_sent_twice():
    """Same key, same multipart request: the fake replays the first answer and delivers once."""
    message = _message(Attachment("a.bin", "application/octet-stream", os.urandom(2_400_000)))
    fake = await _send(build_send_request(message), key="same")
    await _send(build_send_request(message), fake=fake, key="same")
    assert len(fake.deliveries) == 1
    assert [record.replayed for record in fake.requests] == [False, True]


@pytest.mark.anyio
async def test_a_big_json_payload_given_as_a_dict_is_sent_multipart():
    """send_message with a plain payload whose base64 files pass 3 MB takes them out into file parts."""
    content = os.urandom(2_400_000)
    payload = build_send_payload(_message(Attachment("a.bin", "application/octet-stream", content)))
    fake = await _send(payload)
    assert fake.deliveries[0].multipart is True
    assert _delivered(fake) == [("a.bin", "application/octet-stream", content, None)]


def test_cli_run_sends_each_recipient_their_own_files_over_loopback(api, cli, tmp_path):
    """CLI over loopback: inline logo, shared and per-recipient files; JSON and multipart; bytes identical."""
    invoices = {"A-1": b"%PDF ann " + os.urandom(100), "B-2": b"%PDF bob " + os.urandom(2_400_000)}
    (tmp_path / "invoices").mkdir()
    for invoice, content in invoices.items():
        (tmp_path / "invoices" / f"{invoice}.pdf").write_bytes(content)
    (tmp_path / "logo.png").write_bytes(LOGO)
    (tmp_path / "terms.txt").write_bytes(TERMS)
    (tmp_path / "recipients.csv").write_text(
        "email,name,invoice_id\nann@example.com,Ann,A-1\nbob@example.com,Bob,B-2\n", encoding="utf-8"
    )
    (tmp_path / "body.md.j2").write_text(
        "![Logo](cid:logo)\n\nHi **{{ name }}**, invoice {{ invoice_id }}.\n"
    )
    (tmp_path / "campaign.toml").write_text(
        """
[campaign]
name = "billing"

[recipients]
source = "recipients.csv"
name_column = "name"

[message]
subject = "Invoice {{ invoice_id }}"
markdown = "body.md.j2"

[[message.attachments]]
path = "logo.png"
inline = true

[[message.attachments]]
path = "terms.txt"

[[message.attachments]]
path = "invoices/{{ invoice_id }}.pdf"
filename = "Invoice {{ invoice_id }}.pdf"

[[senders]]
name = "billing"
grant_id = "grant-billing"
email = "billing@example.com"
per_second = 50
""",
        encoding="utf-8",
    )
    api.add_grant("grant-billing", "billing@example.com")
    result = cli("run", tmp_path / "campaign.toml", "--yes")
    assert result.exit_code == 0, result.output
    delivered = {delivery.payload["to"][0]["email"]: delivery for delivery in api.deliveries}
    assert sorted(delivered) == ["ann@example.com", "bob@example.com"]
    for email, invoice, multipart in (("ann@example.com", "A-1", False), ("bob@example.com", "B-2", True)):
        delivery = delivered[email]
        assert delivery.multipart is multipart
        assert '<img src="cid:logo" alt="Logo" />' in delivery.payload["body"]
        assert [(a.filename, a.content_type, a.content, a.content_id) for a in delivery.attachments] == [
            ("logo.png", "image/png", LOGO, "logo"),
            ("terms.txt", "text/plain", TERMS, None),
            (f"Invoice {invoice}.pdf", "application/pdf", invoices[invoice], None),
        ]


def test_a_files_type_comes_from_its_path_not_the_name_the_list_shows(api, cli, tmp_path):
    """An attachment is sent as the type of the file (its path's extension), never of the name a list
    cell shows: report.pdf shown as report.exe or x.html arrives as application/pdf. Only a path with
    no known extension takes the name's; the manifest's content_type wins over both."""
    report = b"%PDF-1.4 report\n" + os.urandom(64)
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "report.pdf").write_bytes(report)
    (tmp_path / "files" / "notes").write_bytes(TERMS)
    (tmp_path / "recipients.csv").write_text(
        "email,shown\nann@example.com,report.exe\nbob@example.com,x.html\n", encoding="utf-8"
    )
    (tmp_path / "body.txt.j2").write_text("Hi, your files.\n", encoding="utf-8")
    (tmp_path / "campaign.toml").write_text(
        """
[campaign]
name = "reports"

[recipients]
source = "recipients.csv"

[message]
subject = "Your report"
text = "body.txt.j2"

[[message.attachments]]
path = "files/report.pdf"
filename = "{{ shown }}"

[[message.attachments]]
path = "files/notes"
filename = "notes.txt"

[[message.attachments]]
path = "files/report.pdf"
filename = "{{ shown }}"
content_type = "application/octet-stream"

[[senders]]
name = "reports"
grant_id = "grant-reports"
email = "reports@example.com"
""",
        encoding="utf-8",
    )
    api.add_grant("grant-reports", "reports@example.com")
    result = cli("run", tmp_path / "campaign.toml", "--yes")
    assert result.exit_code == 0, result.output
    delivered = {delivery.payload["to"][0]["email"]: delivery for delivery in api.deliveries}
    for email, shown in (("ann@example.com", "report.exe"), ("bob@example.com", "x.html")):
        assert [(a.filename, a.content_type, a.content) for a in delivered[email].attachments] == [
            (shown, "application/pdf", report),
            ("notes.txt", "text/plain", TERMS),
            (shown, "application/octet-stream", report),
        ]


def test_invoices_sample_mails_each_customer_their_own_invoice(api, cli, tmp_path):
    """samples/invoices: Markdown in a layout with inlined CSS, the logo inline, shared terms, own invoice."""
    manifest = copy_sample("invoices", tmp_path)
    folder = manifest.parent
    api.add_grant("7d2e9c41-5b3a-4c8e-9f10-2a3b4c5d6e7f", "billing@example.com")
    result = cli("run", manifest, "--yes")
    assert result.exit_code == 0, result.output
    rows = {
        "ann.lee@example.com": "INV-1001",
        "bob@example.org": "INV-1002",
        "chen.wei@example.net": "INV-1003",
    }
    delivered = {delivery.payload["to"][0]["email"]: delivery for delivery in api.deliveries}
    assert sorted(delivered) == sorted(rows)
    for email, invoice in rows.items():
        delivery = delivered[email]
        assert not delivery.multipart
        body = delivery.payload["body"]
        assert '<img src="cid:logo" alt="Example Ltd">' in body
        assert f'<h1 style="margin: 16px 0;font-size: 22px;color: #111827;">Invoice {invoice}</h1>' in body
        assert [(a.filename, a.content, a.content_id) for a in delivery.attachments] == [
            ("logo.png", (folder / "logo.png").read_bytes(), "logo"),
            ("Example Ltd payment terms.pdf", (folder / "payment-terms.pdf").read_bytes(), None),
            (f"Invoice {invoice}.pdf", (folder / "invoices" / f"{invoice}.pdf").read_bytes(), None),
        ]
