"""The content fingerprint notices an edit to any template a message is built from."""

from __future__ import annotations

from campaign.manifest import load_manifest
from campaign.pipeline import load_content_fingerprint

MANIFEST = """\
[campaign]
name = "c"
[recipients]
source = "r.csv"
[message]
subject = "Hi"
markdown = "body.md.j2"
layout = "page.html.j2"
[[senders]]
name = "a"
grant_id = "g"
"""


def _campaign(folder):
    (folder / "campaign.toml").write_text(MANIFEST)
    (folder / "body.md.j2").write_text("# Hello {{ name }}\n")
    (folder / "page.html.j2").write_text('{% extends "base.html.j2" %}{% block content %}{% endblock %}')
    return load_manifest(folder / "campaign.toml")


def test_markdown_body_edit_changes_the_fingerprint(tmp_path):
    """Editing the Markdown body template gives another fingerprint."""
    manifest = _campaign(tmp_path)
    before = load_content_fingerprint(manifest)
    (tmp_path / "body.md.j2").write_text("# Hello again {{ name }}\n")
    assert load_content_fingerprint(manifest) != before


def test_layout_edit_changes_the_fingerprint(tmp_path):
    """Editing the layout a Markdown body goes into gives another fingerprint."""
    manifest = _campaign(tmp_path)
    before = load_content_fingerprint(manifest)
    (tmp_path / "page.html.j2").write_text(
        '{% extends "base.html.j2" %}{% block content %}<hr>{% endblock %}'
    )
    assert load_content_fingerprint(manifest) != before


def test_an_unchanged_campaign_keeps_its_fingerprint(tmp_path):
    """Computing it twice over the same files gives the same fingerprint."""
    manifest = _campaign(tmp_path)
    assert load_content_fingerprint(manifest) == load_content_fingerprint(manifest)
