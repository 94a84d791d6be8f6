"""Tests for the templates shipped in templates/: each renders with the variables it documents."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from campaign.manifest import Manifest
from campaign.manifest._load import parse_manifest
from campaign.models import Address, Message, Recipient
from campaign.render import BUILTIN_TEMPLATES, build_composer

SECRETS = (b"templates-test-secret-0123456789",)
UNSUBSCRIBE = "[unsubscribe]\nurl = 'https://example.com/u?t={{ unsubscribe_token }}'\n"
SHIPPED = sorted(path.name for path in BUILTIN_TEMPLATES.glob("*.j2"))


def _manifest(
    folder: Path, *, body: str, unsubscribe: bool = True, files: dict[str, str] | None = None
) -> Manifest:
    """A manifest in `folder` whose html or text body is `body` (a built-in name or a file written here)."""
    for name, content in (files or {}).items():
        (folder / name).write_text(content, encoding="utf-8")
    path = (folder / body) if (folder / body).exists() else BUILTIN_TEMPLATES / body
    kind = "text" if ".txt" in body else "html"
    toml = f"""
[campaign]
name = "spring"
[recipients]
source = "recipients.csv"
name_column = "name"
[message]
subject = "Spring news"
{kind} = {str(path)!r}
{UNSUBSCRIBE if unsubscribe else ""}
[[senders]]
name = "alice"
grant_id = "grant-1"
email = "alice@example.com"
from_name = "Alice Example"
"""
    return parse_manifest(toml, path=folder / "campaign.toml")


def _render(manifest: Manifest, *, name: str | None = "Ann Lee", **fields: str) -> Message:
    recipient = Recipient(
        key="ann@example.com",
        row=1,
        address=Address("ann@example.com", name),
        fields={"email": "ann@example.com", "name": name or "", **fields},
    )
    secrets = SECRETS if manifest.unsubscribe else None
    return build_composer(manifest, secrets=secrets).render(recipient, manifest.senders[0])


def _unsubscribe_url(message: Message) -> str:
    value = dict(message.headers)["List-Unsubscribe"]
    found = re.fullmatch(r"<(https://[^>]+)>", value)
    assert found is not None
    return found[1]


def test_the_three_templates_ship():
    """base, newsletter and note are in templates/ (the loader's built-in folder)."""
    assert {"base.html.j2", "newsletter.html.j2", "note.txt.j2"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_each_template_documents_its_variables(name):
    """Every shipped template opens with a Jinja comment that lists the variables it uses."""
    source = (BUILTIN_TEMPLATES / name).read_text(encoding="utf-8")
    assert source.startswith("{#")
    comment = source[: source.index("#}")]
    assert "Variables it uses" in comment
    assert "unsubscribe_url" in comment


@pytest.mark.parametrize("name", SHIPPED)
def test_each_template_renders_with_only_the_built_in_variables(tmp_path, name):
    """With no optional columns at all, every shipped template still renders (optional ones are guarded)."""
    message = _render(_manifest(tmp_path, body=name), name=None)
    body = message.html or message.text
    assert body is not None
    assert "Alice Example" in body
    assert _unsubscribe_url(message) in body


def test_base_footer_has_unsubscribe_link_and_sender(tmp_path):
    """A page extending base.html.j2 gets layout, preheader and a footer linking the unsubscribe URL."""
    page = (
        '{% extends "base.html.j2" %}{% block preheader %}Peek text{% endblock %}'
        "{% block content %}<p>Body for {{ recipient.name }}</p>{% endblock %}"
    )
    message = _render(_manifest(tmp_path, body="page.html.j2", files={"page.html.j2": page}))
    html = message.html or ""
    footer = html[html.index("Sent by") :]
    assert f'href="{_unsubscribe_url(message)}"' in footer
    assert "Sent by Alice Example." in footer
    assert "<p>Body for Ann Lee</p>" in html
    assert "Peek text</div>" in html
    assert "max-width:600px" in html
    assert '<table role="presentation"' in html


def test_base_footer_without_unsubscribe_has_no_link(tmp_path):
    """Without [unsubscribe] the base footer renders without an unsubscribe link (and no error)."""
    page = '{% extends "base.html.j2" %}{% block content %}Hi{% endblock %}'
    message = _render(
        _manifest(tmp_path, body="page.html.j2", files={"page.html.j2": page}, unsubscribe=False)
    )
    html = message.html or ""
    assert "Sent by Alice Example." in html
    assert "Unsubscribe" not in html
    assert message.headers == ()


def test_newsletter_uses_first_name_and_city_when_present(tmp_path):
    """The newsletter greets by first_name, mentions city, and escapes them as HTML."""
    message = _render(_manifest(tmp_path, body="newsletter.html.j2"), first_name="Ann & Co", city="Oslo")
    html = message.html or ""
    assert "Hi Ann &amp; Co," in html
    assert "what is coming to Oslo." in html
    assert "News from Alice Example" in html


def test_newsletter_falls_back_to_recipient_name_then_there(tmp_path):
    """Without first_name the greeting uses recipient.name, and without a name it says "there"."""
    manifest = _manifest(tmp_path, body="newsletter.html.j2")
    assert "Hi Ann Lee," in (_render(manifest, first_name="").html or "")
    assert "Hi there," in (_render(manifest, name=None).html or "")


def test_newsletter_blocks_can_be_overridden(tmp_path):
    """A campaign template extending newsletter.html.j2 replaces its headline and stories."""
    page = (
        '{% extends "newsletter.html.j2" %}{% block headline %}Spring 2026{% endblock %}'
        "{% block stories %}<p>Our story for {{ city }}</p>{% endblock %}"
    )
    html = _render(_manifest(tmp_path, body="mine.html.j2", files={"mine.html.j2": page}), city="Oslo").html
    assert html is not None
    assert ">Spring 2026</h1>" in html
    assert "<p>Our story for Oslo</p>" in html
    assert "Coming up" not in html


def test_note_text_has_greeting_signature_and_unsubscribe_line(tmp_path):
    """The plain-text note is not escaped and ends with the unsubscribe URL line."""
    message = _render(_manifest(tmp_path, body="note.txt.j2"), first_name="Ann <3")
    text = message.text or ""
    assert text.startswith("Hi Ann <3,\n\n")
    assert "Best,\nAlice Example\n" in text
    assert text.endswith(f"You can unsubscribe at any time: {_unsubscribe_url(message)}\n")
    assert message.html is None


def test_note_without_unsubscribe_has_no_footer(tmp_path):
    """Without [unsubscribe] the note ends at the signature."""
    message = _render(_manifest(tmp_path, body="note.txt.j2", unsubscribe=False))
    assert message.text == (
        "Hi Ann Lee,\n\nA quick note from Alice Example: replace this text with your message.\n\n"
        "Best,\nAlice Example\n"
    )
