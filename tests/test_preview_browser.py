"""The preview site in a real browser: headless Chromium opens it from the file system, with no network."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from conftest import copy_sample
from headless import open_browser


def _assert_rendered_png(data: bytes) -> None:
    """A PNG with a real size whose pixels are not all one colour (something was drawn)."""
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 800
    assert height >= 600
    idat, offset = b"", 8
    while offset < len(data):
        length = struct.unpack(">I", data[offset : offset + 4])[0]
        kind = data[offset + 4 : offset + 8]
        if kind == b"IDAT":
            idat += data[offset + 8 : offset + 8 + length]
        offset += 12 + length
    pixels = zlib.decompress(idat)
    assert len(set(pixels[: 1 << 20])) > 8


def test_index_and_a_message_page_render_in_chromium(cli, tmp_path):
    """index.html: title, every row, working search; a message page: its iframe shows the body; no errors."""
    manifest = copy_sample("newsletter", tmp_path)
    site = tmp_path / "site"
    assert cli("preview", manifest, "--out", site, "--sandbox").exit_code == 0
    with open_browser(tmp_path / "profile") as browser:
        index = browser.open((site / "index.html").as_uri())
        assert index.evaluate("document.title") == "Preview: spring-newsletter"
        assert index.evaluate("document.querySelectorAll('#rows tbody tr').length") == 7
        assert index.evaluate("document.getElementById('shown').textContent") == "7 of 7 rows shown"
        index.evaluate(
            "(() => { const q = document.getElementById('q'); q.value = 'dora';"
            " q.dispatchEvent(new Event('input')); })()"
        )
        assert index.evaluate("document.getElementById('shown').textContent") == "1 of 7 rows shown"
        index.evaluate("document.getElementById('q').value = ''")
        _assert_rendered_png(index.screenshot(tmp_path / "index.png"))
        index.settle()
        assert index.errors == []

        page = browser.open((site / "messages" / "0001.html").as_uri())
        assert page.evaluate("document.title") == "Message 1: Spring news for Ann"
        assert page.evaluate("document.querySelector('iframe').getAttribute('sandbox')") == ""
        assert "Hi Ann," in page.evaluate_in_child_frame("document.body.innerText")
        assert "Spring at Example" in page.evaluate_in_child_frame("document.body.innerText")
        page.evaluate("document.getElementById('pretty-toggle').click()")
        assert '\n  "subject": "Spring news for Ann"' in page.evaluate(
            "document.getElementById('payload-pretty').textContent"
        )
        _assert_rendered_png(page.screenshot(tmp_path / "message.png"))
        page.settle()
        assert page.errors == []
        assert index.dialogs == page.dialogs == []


HOSTILE_NAME = "<script>alert(1)</script>"
HOSTILE_FIRST = '<img src=x onerror="alert(2)">'


def test_script_in_recipient_data_never_runs(cli, tmp_path):
    """A recipient named <script>alert(1)</script> shows as text; even unescaped in the body it cannot run."""
    manifest = copy_sample("newsletter", tmp_path)
    folder = manifest.parent
    with (folder / "recipients.csv").open("a", encoding="utf-8") as handle:
        handle.write(
            f'mallory@example.com,"{HOSTILE_NAME}","{HOSTILE_FIRST.replace(chr(34), chr(34) * 2)}",Nowhere\n'
        )
    # A careless template: the name goes into the HTML body unescaped.
    template = folder / "spring.html.j2"
    template.write_text(
        template.read_text(encoding="utf-8").replace(
            "{% block stories %}", "{% block stories %}{{ name|safe }}", 1
        ),
        encoding="utf-8",
    )
    assert "{{ name|safe }}" in template.read_text(encoding="utf-8")
    site = tmp_path / "site"
    result = cli("preview", manifest, "--out", site, "--sandbox", "--sample", "10")
    assert result.exit_code == 0, result.output
    index_html = (site / "index.html").read_text(encoding="utf-8")
    assert HOSTILE_NAME not in index_html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in index_html
    mallory = next(
        page
        for page in (site / "messages").glob("*.html")
        if "mallory@example.com" in page.read_text(encoding="utf-8")
    )
    with open_browser(tmp_path / "profile") as browser:
        index = browser.open((site / "index.html").as_uri())
        assert HOSTILE_NAME in index.evaluate("document.body.innerText")  # shown as text
        assert index.evaluate("document.scripts.length") == 1  # only the site's own filter script
        page = browser.open(mallory.as_uri())
        assert page.evaluate("document.scripts.length") == 1
        assert HOSTILE_FIRST in page.evaluate("document.body.innerText")  # the subject, as text
        # The raw script did reach the iframe's document, and did not run there.
        assert page.evaluate_in_child_frame("document.querySelectorAll('script').length") == 1
        page.settle()
        index.settle()
        assert index.dialogs == []
        assert page.dialogs == []
        assert index.errors == []
        unexpected = [
            error for error in page.errors if "sandboxed" not in error and "allow-scripts" not in error
        ]
        assert unexpected == []


def test_site_pages_load_nothing_from_the_network(cli, tmp_path):
    """No page refers to http(s) resources: scripts and styles are inline, the policy allows no fetches."""
    manifest = copy_sample("outreach", tmp_path)
    site = tmp_path / "site"
    assert cli("preview", manifest, "--out", site, "--sandbox").exit_code == 0
    for page in [site / "index.html", *sorted((site / "messages").glob("*.html"))]:
        text = page.read_text(encoding="utf-8")
        assert "default-src &#x27;none&#x27;" in text
        assert "<script src" not in text
        assert "<link" not in text
        assert Path(page).stat().st_size > 1000
