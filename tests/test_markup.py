"""Markdown bodies, the HTML layout, CSS inlining, inline-image wiring and the plain-text version."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from campaign.errors import InputFileError, ManifestError, TemplateError
from campaign.manifest import Manifest
from campaign.manifest._load import parse_manifest
from campaign.models import Address, Message, Recipient
from campaign.nylas import build_send_payload
from campaign.render import build_composer, build_text_from_html, load_message_attachments
from campaign.render._attachments import check_missing_inline_images, check_unused_inline_images
from campaign.render._markup import find_cid_references, inline_css, render_markdown

BODY_MD = """\
# Hello {{ first_name }}

Thanks for joining **{{ company }}**. Read the [guide](https://example.com/guide).

![Logo](cid:logo)

1. Sign in
2. Invite your team
"""

# The rendered Markdown inside templates/base.html.j2's content cell (golden).
CONTENT_HTML = """\
<h1>Hello Ann</h1>
<p>Thanks for joining <strong>Tom &amp; Jerry &lt;Co&gt;</strong>. Read the \
<a href="https://example.com/guide">guide</a>.</p>
<p><img src="cid:logo" alt="Logo" /></p>
<ol>
<li>Sign in</li>
<li>Invite your team</li>
</ol>
"""

# The plain-text version of the whole message (golden): the hidden preheader and <head> left out.
BODY_TEXT = """\
Hello Ann
=========

Thanks for joining Tom & Jerry <Co>. Read the guide (https://example.com/guide).

Logo

1. Sign in
2. Invite your team

Sent by Alice Park.
"""


def _campaign(folder: Path, message: str, files: dict[str, str]) -> Manifest:
    for name, content in files.items():
        (folder / name).write_text(content, encoding="utf-8")
    toml = f"""
[campaign]
name = "launch"

[recipients]
source = "recipients.csv"
name_column = "name"

[message]
subject = "Hi {{{{ first_name }}}}"
{message}

[[senders]]
name = "alice"
grant_id = "g1"
email = "alice@example.com"
from_name = "Alice Park"
"""
    return parse_manifest(toml, path=folder / "campaign.toml")


def _recipient(**fields: str) -> Recipient:
    columns = {
        "email": "ann@example.com",
        "name": "Ann Lee",
        "first_name": "Ann",
        "company": "Tom & Jerry <Co>",
    }
    columns.update(fields)
    return Recipient("ann@example.com", 1, Address("ann@example.com", "Ann Lee"), columns)


def _render(manifest: Manifest, **fields: str) -> Message:
    return build_composer(manifest, secrets=None).render(_recipient(**fields), manifest.senders[0])


def test_markdown_body_renders_jinja_then_markdown_into_the_base_layout(tmp_path):
    """Golden: Jinja fills the Markdown (values escaped), markdown-it makes HTML, base.html.j2 wraps it."""
    manifest = _campaign(tmp_path, 'markdown = "body.md.j2"', {"body.md.j2": BODY_MD})
    message = _render(manifest)
    html = message.html or ""
    assert html.startswith("<!DOCTYPE html>")
    start = html.index("<h1>")
    assert html[start : html.index("\n          </td>", start)].rstrip("\n") + "\n" == CONTENT_HTML
    assert "<title>launch</title>" in html
    assert "Sent by Alice Park." in html
    assert message.text is None  # no text template: nothing is sent as text (Nylas derives it)


def test_text_version_of_a_markdown_message_is_golden(tmp_path):
    """The plain-text version derived from the HTML: headings, escaped values decoded, links, lists."""
    manifest = _campaign(tmp_path, 'markdown = "body.md.j2"', {"body.md.j2": BODY_MD})
    assert build_text_from_html(_render(manifest).html or "") == BODY_TEXT


def test_a_value_cannot_inject_markup_into_a_markdown_body(tmp_path):
    """A column holding <script> or raw HTML is shown as text, never as markup."""
    manifest = _campaign(tmp_path, 'markdown = "body.md.j2"', {"body.md.j2": BODY_MD})
    html = _render(manifest, company='<script>alert(1)</script><img src="x">').html or ""
    assert "<script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&lt;img" in html


def test_text_template_is_used_alongside_markdown(tmp_path):
    """message.text next to message.markdown gives the message its own text version."""
    files = {"body.md.j2": "Hi **{{ first_name }}**", "body.txt.j2": "Hi {{ first_name }} (text)"}
    manifest = _campaign(tmp_path, 'markdown = "body.md.j2"\ntext = "body.txt.j2"', files)
    message = _render(manifest)
    assert message.text == "Hi Ann (text)"
    assert "<p>Hi <strong>Ann</strong></p>" in (message.html or "")
    assert build_send_payload(message)["body"] == message.html  # the HTML is what is sent


def test_markdown_goes_into_a_custom_layout_block(tmp_path):
    """message.layout names the page; the Markdown fills its {% block content %}."""
    layout = (
        "<html><body><main>{% block content %}{% endblock %}</main><p>{{ campaign.name }}</p></body></html>"
    )
    files = {"body.md.j2": "*Hi* {{ first_name }}", "layout.html.j2": layout}
    manifest = _campaign(tmp_path, 'markdown = "body.md.j2"\nlayout = "layout.html.j2"', files)
    html = _render(manifest).html
    assert html == "<html><body><main><p><em>Hi</em> Ann</p>\n</main><p>launch</p></body></html>"


def test_templates_a_markdown_body_or_its_layout_reach_are_escaped_whatever_their_file_names(tmp_path):
    """A .j2 partial the Markdown body includes is escaped for Markdown (no heading, no link, no tag); a
    .j2 layout and what it includes, for HTML. The footer both include prints right in each."""
    files = {
        "body.md.j2": '{% include "greeting.j2" %}\n\n{% include "footer.j2" %}\n',
        "greeting.j2": "{{ first_name }}",
        "footer.j2": "<i>{{ first_name }}</i>",
        "layout.j2": "<main>{% block content %}{% endblock %}</main>"
        '<h2>{{ first_name }}</h2>{% include "footer.j2" %}',
    }
    manifest = _campaign(tmp_path, 'markdown = "body.md.j2"\nlayout = "layout.j2"', files)
    html = _render(manifest, first_name="# h [x](https://evil) <script>alert(1)</script>").html
    shown = "# h [x](https://evil) &lt;script&gt;alert(1)&lt;/script&gt;"
    assert html == f"<main><p>{shown}</p>\n<p><i>{shown}</i></p>\n</main><h2>{shown}</h2><i>{shown}</i>"


def test_layout_without_content_block_or_missing_is_refused(tmp_path):
    """A layout with no content block is a TemplateError; a missing one an InputFileError; both name it."""
    files = {"body.md.j2": "x", "bare.html.j2": "<html>{% block main %}{% endblock %}</html>"}
    manifest = _campaign(tmp_path, 'markdown = "body.md.j2"\nlayout = "bare.html.j2"', files)
    with pytest.raises(TemplateError, match=r"message\.layout: bare\.html\.j2 has no \{% block content %\}"):
        build_composer(manifest, secrets=None)
    manifest = _campaign(tmp_path, 'markdown = "body.md.j2"\nlayout = "nope.html.j2"', files)
    with pytest.raises(InputFileError, match=r"message\.layout: .*nope\.html\.j2 does not exist"):
        build_composer(manifest, secrets=None)


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ('html = "a.html.j2"\nmarkdown = "b.md.j2"', "give `html` or `markdown`, not both"),
        ('text = "a.txt"\nlayout = "l.html.j2"', "`layout` is the page a `markdown` body goes into"),
    ],
)
def test_markdown_settings_that_contradict_each_other_are_manifest_errors(tmp_path, message, expected):
    """html with markdown, or a layout without markdown, is refused with the reason."""
    with pytest.raises(ManifestError, match=expected):
        _campaign(tmp_path, message, {})


def test_markdown_undefined_variable_names_the_template_and_row(tmp_path):
    """Strict undefined holds in Markdown templates too."""
    manifest = _campaign(tmp_path, 'markdown = "body.md.j2"', {"body.md.j2": "Hi {{ nickname }}"})
    with pytest.raises(
        TemplateError, match=r"row 1: template body\.md\.j2 uses undefined variable 'nickname'"
    ):
        _render(manifest)


def test_css_is_inlined_so_styles_survive_gmail(tmp_path):
    """inline_css = true moves <style> rules into style attributes and keeps @media in a <style> block."""
    layout = (
        "<!DOCTYPE html><html><head><style>p { color: #123456 } .note { font-weight: bold } "
        "@media (max-width: 600px) { p { color: red } }</style></head>"
        '<body>{% block content %}{% endblock %}<p class="note" style="margin: 0">x</p></body></html>'
    )
    files = {"body.md.j2": "Hello", "layout.html.j2": layout}
    message = 'markdown = "body.md.j2"\nlayout = "layout.html.j2"\ninline_css = true'
    html = _render(_campaign(tmp_path, message, files)).html or ""
    assert '<p style="color: #123456;">Hello</p>' in html
    assert '<p class="note" style="color: #123456;font-weight: bold;margin: 0">x</p>' in html
    assert "<style>@media (max-width: 600px) { p { color: red } } </style>" in html
    assert ".note {" not in html  # the inlined rules are gone from the <style> block


def test_css_is_left_alone_unless_asked(tmp_path):
    """Without inline_css the <style> block stays as written."""
    files = {"a.html.j2": "<html><head><style>p { color: red }</style></head><body><p>x</p></body></html>"}
    html = _render(_campaign(tmp_path, 'html = "a.html.j2"', files)).html
    assert html == files["a.html.j2"]


def test_inline_css_never_fetches_a_stylesheet():
    """A <link> stylesheet is dropped, not fetched (no network from a render)."""
    result = inline_css(
        '<html><head><link rel="stylesheet" href="https://example.invalid/x.css"></head><body><p>x</p></body></html>'
    )
    assert "<link" not in result
    assert "<p>x</p>" in result


def test_markdown_image_with_cid_wires_the_inline_attachment(tmp_path):
    """![Logo](cid:logo) plus an inline attachment gives <img src="cid:logo"> and content_id + is_inline."""
    (tmp_path / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    message = 'markdown = "body.md.j2"\n[[message.attachments]]\npath = "logo.png"\ninline = true'
    manifest = _campaign(tmp_path, message, {"body.md.j2": "![Logo](cid:logo)"})
    composer = build_composer(manifest, secrets=None)
    rendered = composer.render(_recipient(), manifest.senders[0])
    assert find_cid_references(rendered.html or "") == ("logo",)
    (file,) = rendered.attachment_files
    assert (file.content_id, file.filename, file.content_type) == ("logo", "logo.png", "image/png")
    assert check_missing_inline_images(rendered) is None
    assert check_unused_inline_images(rendered) is None
    (item,) = build_send_payload(load_message_attachments(rendered, composer.attachment_loader))[
        "attachments"
    ]
    assert item == {
        "filename": "logo.png",
        "content_type": "image/png",
        "content": base64.b64encode(b"\x89PNG\r\n\x1a\n").decode(),
        "content_id": "logo",
        "is_inline": True,
    }


def test_cid_without_attachment_and_unused_inline_file_are_warnings(tmp_path):
    """A cid: the HTML shows but nothing provides, and an inline file never shown, are both reported."""
    (tmp_path / "logo.png").write_bytes(b"png")
    message = 'html = "a.html.j2"\n[[message.attachments]]\npath = "logo.png"\ncontent_id = "brand"'
    manifest = _campaign(
        tmp_path, message, {"a.html.j2": '<img src="cid:logo"><td style="background:url(cid:bg)">'}
    )
    rendered = _render(manifest)
    missing = check_missing_inline_images(rendered)
    unused = check_unused_inline_images(rendered)
    assert missing is not None
    assert missing[1] == "missing cid:logo, cid:bg"
    assert unused is not None
    assert unused[1] == "logo.png (cid:brand)"
    assert "no attachment provides" in missing[0]
    assert "never shows" in unused[0]


def test_text_from_html_lists_tables_breaks_and_hidden_parts():
    """Nested lists indent, table cells join with |, <br> breaks, hidden and head content is left out."""
    html = (
        "<html><head><title>T</title><style>p{}</style></head><body>"
        '<div style="display: none">preheader</div><p hidden>gone</p>'
        "<ul><li>one</li><li>two<ol><li>a</li><li>b</li></ol></li></ul>"
        "<table><tr><th>Item</th> <th>Price</th></tr><tr><td>Widget</td><td>3</td></tr></table>"
        '<p>Bye<br>Maya &amp; co &nbsp;<a href="mailto:maya@example.com">maya@example.com</a></p>'
        "<pre>  keep\n    this</pre><hr><p><a href='#top'>Top</a> <a href='https://x.test'></a></p>"
        "</body></html>"
    )
    assert build_text_from_html(html) == (
        "- one\n- two\n  1. a\n  2. b\n\nItem | Price\nWidget | 3\n\nBye\nMaya & co maya@example.com\n\n"
        "  keep\n    this\n\n----------\n\nTop https://x.test\n"
    )


def test_render_markdown_supports_tables_and_strikethrough():
    """The Markdown dialect is CommonMark plus tables and ~~strikethrough~~."""
    html = render_markdown("| a | b |\n|---|---|\n| 1 | 2 |\n\n~~old~~ new")
    assert "<table>" in html
    assert "<td>2</td>" in html
    assert "<s>old</s> new" in html


def test_cid_references_are_found_in_any_letter_case_and_none_in_a_body_without_them():
    """The quick pre-check must not hide a `CID:` reference; a body with none gives none."""
    assert find_cid_references('<img src="CID:Logo"><a href="Cid:terms">t</a>') == ("Logo", "terms")
    assert find_cid_references("<p>background: none; cide: no</p>") == ()
    for spelling in ("cid", "cId", "ciD", "cID", "Cid", "CId", "CiD", "CID"):
        assert find_cid_references(f'<img src="{spelling}:x">') == ("x",)
    assert find_cid_references('<p style="grid: auto">no image</p>') == ()
