"""Email markup: Markdown to HTML, CSS inlining, and the plain-text version of an HTML body.

Pure functions over strings (markdown-it-py, css-inline and the standard HTML
parser): no template rendering, no file or network access (css-inline is told
never to fetch a stylesheet), and no knowledge of recipients or rows.
"""

from __future__ import annotations

import functools
import re
from html.parser import HTMLParser

import css_inline
from markdown_it import MarkdownIt

from campaign.errors import TemplateError

__all__ = ["build_text_from_html", "find_cid_references", "inline_css", "render_markdown"]

# CommonMark plus tables and ~~strike~~; raw HTML stays allowed so authors can place a
# `<img src="cid:logo">` or a button. Values from the list reach the Markdown escaped for
# Markdown and HTML (templating's Markdown autoescape), so a row cannot inject markup.
_MARKDOWN = MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"])
# @media and @font-face rules cannot be inlined: keep them in a <style> block (Gmail reads it).
_INLINER = css_inline.CSSInliner(load_remote_stylesheets=False, keep_at_rules=True)
_CID = re.compile(r"""(?:["'(=\s]|^)cid:([^"'()<>\s]+)""", re.IGNORECASE)

_SKIPPED = frozenset({"head", "title", "style", "script", "template", "noscript"})
_VOID = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
)
_PARAGRAPHS = frozenset(
    {"p", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "pre", "table", "ul", "ol", "dl", "figure"}
)
_LINES = frozenset(
    {
        "address", "article", "aside", "center", "dd", "div", "dt", "fieldset", "figcaption", "footer",
        "form", "header", "li", "main", "nav", "section", "tbody", "tfoot", "thead", "tr",
    }
)  # fmt: skip
_HIDDEN_STYLE = re.compile(r"display\s*:\s*none", re.IGNORECASE)
_SPACES = re.compile(r"[ \t\r\n\f\v\u00a0]+")
_LINK_SCHEMES_NOT_SHOWN = ("#", "cid:", "javascript:")
_UNDERLINES = {"h1": "=", "h2": "-"}


def render_markdown(source: str) -> str:
    """HTML for CommonMark `source` (with tables and strikethrough); raw HTML passes through."""
    html: str = _MARKDOWN.render(source)
    return html


def inline_css(html: str, *, row: int | None = None) -> str:
    """`html` with its <style> rules moved into style attributes; at-rules stay in a <style> block.

    `<link>` stylesheets are dropped, never fetched. TemplateError (naming the row) if css-inline fails.
    """
    try:
        return _INLINER.inline(html)
    except css_inline.InlineError as exc:
        detail = f"message.inline_css: cannot inline the CSS ({exc}); fix the <style> rules"
        raise TemplateError(detail, row=row, field="message.inline_css") from exc


def find_cid_references(html: str) -> tuple[str, ...]:
    """The content ids the HTML refers to as `cid:<id>` (in src, href or url()), in order, once each."""
    # Most bodies have none: one pass over a lowered copy instead of the pattern at every position.
    # (Looking for each spelling of "id:" in the body itself is three times slower: a search stops at
    # every ":", and CSS is full of them.)
    if "cid:" not in html.lower():
        return ()
    return _cid_references(html)


@functools.lru_cache(maxsize=4)  # the preview asks twice per message (missing, unused): scan once
def _cid_references(html: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(match.group(1) for match in _CID.finditer(html)))


def build_text_from_html(html: str) -> str:
    """A readable plain-text version of an HTML email: paragraphs, lists, "text (url)" links, alt texts.

    Hidden parts (head, style, script, `display:none` such as a preheader) are left out; lines are
    not wrapped. The result ends with one newline, or is empty.
    """
    parser = _TextBuilder()
    parser.feed(html)
    parser.close()
    return parser.build_text()


class _TextBuilder(HTMLParser):
    """Collects text and line breaks while walking the HTML."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self._out: list[str] = []
        self._break = 0  # newlines owed before the next text (1: new line, 2: blank line)
        self._separator = ""  # between table cells on one line
        self._at_line_start = True
        self._stack: list[tuple[str, bool]] = []  # open elements: (tag, hides its content)
        self._hidden = 0
        self._pre = 0
        self._lists: list[list[int]] = []  # per open list: [next number] (ol) or [] (ul)
        self._prefix: list[str] = []  # indentation of the lines of nested list items
        self._marker = ""  # a list bullet waiting for the item's first text
        self._links: list[tuple[str | None, int]] = []
        self._headings: list[tuple[str, int]] = []

    # ---- walking ----

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag not in _VOID:
            style = values.get("style") or ""
            hides = tag in _SKIPPED or "hidden" in values or bool(_HIDDEN_STYLE.search(style))
            self._stack.append((tag, hides))
            self._hidden += hides
        if self._hidden:
            return
        self._open(tag, values)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if not self._hidden:
            self._open(tag, dict(attrs))
        if tag not in _VOID:  # <p/> and the like: opened and closed at once
            self._close(tag)

    def handle_endtag(self, tag: str) -> None:
        if not any(open_tag == tag for open_tag, _ in self._stack):
            return  # a stray end tag
        while self._stack:
            open_tag, hides = self._stack.pop()
            self._hidden -= hides
            if not self._hidden:
                self._close(open_tag)
            if open_tag == tag:
                return

    def handle_data(self, data: str) -> None:
        if self._hidden or not data:
            return
        if self._pre:
            for number, line in enumerate(data.split("\n")):
                if number:
                    self._newline()
                if line:
                    self._write(line)
            return
        text = _SPACES.sub(" ", data)
        if self._at_line_start or self._break or (self._out and self._out[-1].endswith(" ")):
            text = text.lstrip(" ")
        if text:
            self._write(text)

    # ---- elements ----

    def _open(self, tag: str, attrs: dict[str, str | None]) -> None:  # noqa: C901 - one branch per HTML element the text version treats specially
        if tag in _PARAGRAPHS:
            self._request_break(1 if tag in ("ul", "ol") and self._lists else 2)
        elif tag in _LINES:
            self._request_break(1)
        if tag == "br":
            self._newline()
        elif tag == "hr":
            self._request_break(2)
            self._write("----------")
            self._request_break(2)
        elif tag == "pre":
            self._pre += 1
        elif tag in ("ul", "ol"):
            self._lists.append([1] if tag == "ol" else [])
        elif tag == "li":
            self._open_item()
        elif tag in ("td", "th"):
            self._separator = " | " if not self._at_line_start else ""
        elif tag == "a":
            self._links.append((attrs.get("href"), len(self._out)))
        elif tag == "img" and (alt := _SPACES.sub(" ", attrs.get("alt") or "").strip()):
            self._write(alt)
        elif tag in _UNDERLINES:
            self._headings.append((tag, len(self._out)))

    def _close(self, tag: str) -> None:
        if tag == "a" and self._links:
            self._close_link()
        elif tag in _UNDERLINES and self._headings:
            _, start = self._headings.pop()
            title = "".join(self._out[start:]).strip()
            if title:
                self._newline()
                self._write(_UNDERLINES[tag] * len(title))
        elif tag == "pre":
            self._pre -= 1
        elif tag in ("ul", "ol") and self._lists:
            self._lists.pop()
        elif tag == "li" and self._prefix:
            self._prefix.pop()
            self._marker = ""
        if tag in _PARAGRAPHS:
            self._request_break(1 if tag in ("ul", "ol") and self._lists else 2)
        elif tag in _LINES:
            self._request_break(1)

    def _open_item(self) -> None:
        self._request_break(1)
        counter = self._lists[-1] if self._lists else []
        if counter:
            bullet = f"{counter[0]}. "
            counter[0] += 1
        else:
            bullet = "- "
        self._marker = bullet
        self._prefix.append(" " * len(bullet))

    def _close_link(self) -> None:
        href, start = self._links.pop()
        text = "".join(self._out[start:]).strip()
        if not href or href.startswith(_LINK_SCHEMES_NOT_SHOWN):
            return
        shown = href.removeprefix("mailto:")
        if not text:
            self._write(shown)
        elif text not in (href, shown):
            self._write(f" ({shown})" if not self._out[-1].endswith(" ") else f"({shown})")

    # ---- output ----

    def _request_break(self, lines: int) -> None:
        if self._out:
            self._break = max(self._break, lines)

    def _newline(self) -> None:
        self._out.append("\n")
        self._at_line_start = True
        self._break = 0
        self._separator = ""

    def _write(self, text: str) -> None:
        if self._break:
            self._out.append("\n" * self._break)
            self._at_line_start = True
            self._break = 0
            self._separator = ""
        if self._at_line_start:
            indent = "".join(self._prefix)
            if self._marker:
                indent = indent[: -len(self._marker)] + self._marker
                self._marker = ""
            text = indent + text
        elif self._separator:
            self._out[-1] = self._out[-1].rstrip(" ")
            text = self._separator + text
        self._separator = ""
        self._out.append(text)
        self._at_line_start = False

    def build_text(self) -> str:
        lines = [line.rstrip() for line in "".join(self._out).split("\n")]
        text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")
        return text + "\n" if text else ""
