"""RFC 5322 rules for header names and values, checked before anything reaches the wire.

Pure: used by the manifest (custom header names), rendering (every rendered value)
and unsubscribe headers.
"""

from __future__ import annotations

import re

__all__ = ["header_name_problem", "header_value_problem"]

# ftext: printable US-ASCII except colon (RFC 5322 §3.6.8).
_NAME = re.compile(r"[\x21-\x39\x3B-\x7E]+")
# CR, LF and every other control except HTAB: C0, DEL and C1 (U+0080-U+009F, which holds NEL, U+0085,
# and CSI, U+009B, that terminals take as ESC [), plus the Unicode line breaks that Python's
# str.splitlines() (and so the email package) treats as line ends.
_BAD_VALUE_CHAR = re.compile(r"[\x00-\x08\x0A-\x1F\x7F-\x9F\u2028\u2029]")


def header_name_problem(name: str) -> str | None:
    """Why `name` is not a valid header field name, or None if it is."""
    if not _NAME.fullmatch(name):
        return f"header name {name!r} may only use printable ASCII without spaces or ':'"
    return None


def header_value_problem(value: str) -> str | None:
    """Why `value` cannot be sent as a header value (line breaks, controls), or None."""
    # Every character the pattern finds is a control or a line or paragraph separator, which Python
    # never counts as printable: a printable value (most are) needs no search, and isprintable's one
    # pass costs a third of the pattern's.
    if value.isprintable():
        return None
    found = _BAD_VALUE_CHAR.search(value)
    if found is None:
        return None
    char = found.group()
    names = {"\r": "a carriage return (CR)", "\n": "a line feed (LF)"}
    what = names.get(char, f"control character U+{ord(char):04X}")
    return f"contains {what}; header values must be a single line"
