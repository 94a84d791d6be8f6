"""The preview site in a real browser: headless Chromium (Playwright) opens it from the file system."""

from __future__ import annotations

import shutil
import struct
import zlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import copy_sample
from playwright.sync_api import BrowserContext, ConsoleMessage, Dialog, Page, sync_playwright

CHROMIUM_NAMES = ("chromium", "chromium-browser")


def _find_chromium() -> str | None:
    """The system Chromium (Debian's package, or whatever is on PATH), else None: Playwright's own build.

    scripts/test installs one or the other; with neither, the launch fails the test (never a skip).
    """
    return next((shutil.which(name) for name in CHROMIUM_NAMES if shutil.which(name)), None)


@dataclass
class Watched:
    """A page and everything it reported: console errors, uncaught exceptions, dialogs (an alert() ran)."""

    page: Page
    errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)


@pytest.fixture
def open_page() -> Iterator[Callable[[str], Watched]]:
    """Open a URL in a new tab of a headless Chromium, recording errors and dialogs from the start.

    Playwright starts at the first call, not before: its sync API holds an event loop on this thread
    while it runs, so the test makes its preview (an anyio run) first. (pytest-playwright's session
    fixtures would hold that loop for the whole session and break every anyio test after them.)
    """
    with ExitStack() as stack:
        contexts: list[BrowserContext] = []

        def _open(url: str) -> Watched:
            if not contexts:
                playwright = stack.enter_context(sync_playwright())
                browser = playwright.chromium.launch(
                    executable_path=_find_chromium(), args=["--no-sandbox", "--disable-gpu"]
                )
                stack.callback(browser.close)
                contexts.append(browser.new_context(viewport={"width": 1280, "height": 900}))
            page = contexts[0].new_page()
            watched = Watched(page)

            def on_console(message: ConsoleMessage) -> None:
                if message.type == "error":
                    watched.errors.append(message.text)

            def on_dialog(dialog: Dialog) -> None:
                watched.dialogs.append(dialog.message)
                dialog.dismiss()  # or the page would hang; the test fails on the record

            page.on("console", on_console)
            page.on("pageerror", lambda error: watched.errors.append(str(error)))
            page.on("dialog", on_dialog)
            page.goto(url, wait_until="load")
            return watched

        yield _open


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


def _iframe_text(watched: Watched) -> str:
    """The text of the page's iframe, read from Playwright's own world (the frame's scripts are off)."""
    return watched.page.frame_locator("iframe").locator("body").inner_text()


def test_index_and_a_message_page_render_in_chromium(cli, tmp_path, open_page):
    """index.html: title, every row, working search; a message page: its iframe shows the body; no errors."""
    manifest = copy_sample("newsletter", tmp_path)
    site = tmp_path / "site"
    assert cli("preview", manifest, "--out", site, "--sandbox").exit_code == 0
    index = open_page((site / "index.html").as_uri())
    assert index.page.title() == "Preview: spring-newsletter"
    assert index.page.locator("#rows tbody tr").count() == 7
    assert index.page.locator("#shown").text_content() == "7 of 7 rows shown"
    index.page.locator("#q").fill("dora")  # fires the input event, as typing does
    assert index.page.locator("#shown").text_content() == "1 of 7 rows shown"
    index.page.locator("#q").fill("")
    assert index.page.locator("#shown").text_content() == "7 of 7 rows shown"
    _assert_rendered_png(index.page.screenshot(path=tmp_path / "index.png"))
    assert index.errors == []

    page = open_page((site / "messages" / "0001.html").as_uri())
    assert page.page.title() == "Message 1: Spring news for Ann"
    assert page.page.locator("iframe").get_attribute("sandbox") == ""
    body = _iframe_text(page)
    assert "Hi Ann," in body
    assert "Spring at Example" in body
    page.page.locator("#pretty-toggle").click()
    pretty = page.page.locator("#payload-pretty").text_content() or ""
    assert '\n  "subject": "Spring news for Ann"' in pretty
    _assert_rendered_png(page.page.screenshot(path=tmp_path / "message.png"))
    assert page.errors == []
    assert index.dialogs == page.dialogs == []


HOSTILE_NAME = "<script>alert(1)</script>"
HOSTILE_FIRST = '<img src=x onerror="alert(2)">'


def test_script_in_recipient_data_never_runs(cli, tmp_path, open_page):
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
    index = open_page((site / "index.html").as_uri())
    assert HOSTILE_NAME in index.page.locator("body").inner_text()  # shown as text
    assert index.page.evaluate("document.scripts.length") == 1  # only the site's own filter script
    page = open_page(mallory.as_uri())
    assert page.page.evaluate("document.scripts.length") == 1
    assert HOSTILE_FIRST in page.page.locator("body").inner_text()  # the subject, as text
    # The raw script did reach the iframe's document, and did not run there.
    assert page.page.frame_locator("iframe").locator("script").count() == 1
    assert index.dialogs == []
    assert page.dialogs == []
    assert index.errors == []
    unexpected = [error for error in page.errors if "sandboxed" not in error and "allow-scripts" not in error]
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
