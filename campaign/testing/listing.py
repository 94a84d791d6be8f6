"""`GET /v3/grants/{id}/messages` over the fake's stored messages (`nylas-api.md` §5, §11.3).

Pure selection: filters, newest-first order and cursor pagination over a snapshot
of stored messages. Bad parameters raise `ApiProblem` (400). No state, no clock.

Order: Nylas lists messages "in reverse chronological order" (developer.nylas.com's Messages
page; nylas-api.md §11.3), by each message's `date`, not by when the fake stored it: a report
synced late, or a reply stamped later than a message sent after it arrived, sits where its date
puts it. Messages of one second go latest-stored first. A cursor names the last message of its
page by its place in that order (date, then arrival), so a page never repeats or skips one,
even when a message dated earlier arrives between pages.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from campaign.testing.envelopes import ApiProblem
from campaign.testing.payload import BASIC_HEADER_NAMES

__all__ = ["StoredMessage", "select_messages"]

DEFAULT_LIMIT = 50
MAX_LIMIT = 200
ANY_EMAIL_MAX = 25
METADATA_PAIR_KEYS = frozenset({"key1", "key2", "key3", "key4", "key5"})
# Parameters that do not filter, so they may go with metadata_pair.
NON_FILTERS = frozenset({"limit", "page_token", "fields", "select", "metadata_pair"})
# Microsoft grants take none of these with any of those (nylas-api.md §5, the `thread_id` row).
MICROSOFT_ALONE = ("thread_id", "unread", "starred")
MICROSOFT_SEARCHES = ("subject", "to", "cc", "bcc", "any_email")


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A message as the list endpoint sees it; `seq` grows with each one stored (the tie-break of
    messages with one `date`)."""

    seq: int
    data: dict[str, Any]
    headers: tuple[dict[str, str], ...]


def _invalid(message: str) -> ApiProblem:
    return ApiProblem(400, "invalid_request_error", message)


def select_messages(
    messages: Sequence[StoredMessage],
    query: Mapping[str, list[str]],
    *,
    folder_ids: frozenset[str],
    microsoft: bool = False,
) -> tuple[list[dict[str, Any]], str | None]:
    """One page of message objects, newest first, and the cursor of the next page (None on the last).

    `microsoft`: the grant's provider refuses `thread_id`, `unread` or `starred` together with
    `subject`, `to`, `cc`, `bcc` or `any_email` (400, as any bad parameter here).
    """
    if microsoft:
        alone = [name for name in MICROSOFT_ALONE if name in query]
        searches = [name for name in MICROSOFT_SEARCHES if name in query]
        if alone and searches:
            raise _invalid(
                f"{', '.join(alone)} cannot be combined with {', '.join(searches)} for Microsoft grants"
            )
    limit = _parse_int(query, "limit", DEFAULT_LIMIT)
    if not 1 <= limit <= MAX_LIMIT:
        raise _invalid(f"limit must be between 1 and {MAX_LIMIT}")
    below = _parse_cursor(query)
    tests = _build_tests(query, folder_ids)
    newest_first = sorted(messages, key=_place, reverse=True)
    chosen = [m for m in newest_first if _place(m) < below and all(t(m) for t in tests)]
    page = chosen[:limit]
    cursor = _encode_cursor(_place(page[-1])) if len(chosen) > limit else None
    return [_render(m, query) for m in page], cursor


def _place(message: StoredMessage) -> tuple[int, int]:
    """Where a message stands in the listing's order: by date, then by arrival (both descending)."""
    return int(message.data["date"]), message.seq


def _first(query: Mapping[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[0] if values else None


def _parse_int(query: Mapping[str, list[str]], name: str, default: int) -> int:
    text = _first(query, name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError as exc:
        raise _invalid(f"{name} must be an integer") from exc


def _parse_cursor(query: Mapping[str, list[str]]) -> tuple[int, int]:
    """The place (date, seq) the next page starts below; above every message without a token."""
    token = _first(query, "page_token")
    if not token:
        return 2**63, 2**63
    try:
        text = base64.urlsafe_b64decode(token.encode() + b"==").decode()
        date, seq = text.removeprefix("at:").split(":seq:")
        return int(date), int(seq)
    except (ValueError, binascii.Error) as exc:
        raise _invalid("page_token is not a cursor this API gave") from exc


def _encode_cursor(place: tuple[int, int]) -> str:
    date, seq = place
    return base64.urlsafe_b64encode(f"at:{date}:seq:{seq}".encode()).decode().rstrip("=")


Test = Callable[[StoredMessage], bool]


def _build_tests(query: Mapping[str, list[str]], folder_ids: frozenset[str]) -> list[Test]:  # noqa: C901 - one branch per query parameter of the list endpoint
    pair = _first(query, "metadata_pair")
    if pair is not None:
        others = sorted(set(query) - NON_FILTERS)
        if others:
            raise _invalid(f"metadata_pair cannot be combined with other filters ({', '.join(others)})")
        key, sep, value = pair.partition(":")
        if not sep or key not in METADATA_PAIR_KEYS:
            raise _invalid("metadata_pair must look like key1:value, with key1..key5")
        return [lambda m: m.data["metadata"].get(key) == value]
    tests: list[Test] = []
    for field in ("to", "from", "cc", "bcc"):
        wanted = {v.lower() for v in query.get(field, [])}
        if wanted:
            tests.append(_match_emails((field,), wanted))
    any_email = {a.strip().lower() for v in query.get("any_email", []) for a in v.split(",") if a.strip()}
    if len(any_email) > ANY_EMAIL_MAX:
        raise _invalid(f"any_email accepts at most {ANY_EMAIL_MAX} addresses")
    if any_email:
        tests.append(_match_emails(("from", "to", "cc", "bcc"), any_email))
    subject = _first(query, "subject")
    if subject is not None:
        tests.append(lambda m: subject.lower() in m.data["subject"].lower())
    folder = _first(query, "in")
    if folder is not None:
        if folder not in folder_ids:
            raise _invalid(f"in must be a folder id of this grant; {folder!r} is not one")
        tests.append(lambda m: folder in m.data["folders"])
    after = _parse_int(query, "received_after", -1)
    before = _parse_int(query, "received_before", 2**63)
    # Both bounds inclusive: a message sent in the same second as the bound is found.
    tests.append(lambda m: after <= m.data["date"] <= before)
    thread_id = _first(query, "thread_id")
    if thread_id is not None:
        tests.append(lambda m: m.data["thread_id"] == thread_id)
    for flag in ("unread", "starred", "has_attachment"):
        text = _first(query, flag)
        if text is not None:
            if text not in ("true", "false"):
                raise _invalid(f"{flag} must be true or false")
            tests.append(_match_flag(flag, text == "true"))
    return tests


def _match_emails(fields: Sequence[str], wanted: set[str]) -> Test:
    def test(message: StoredMessage) -> bool:
        found = {p["email"].lower() for f in fields for p in message.data[f]}
        return bool(found & wanted)

    return test


def _match_flag(flag: str, wanted: bool) -> Test:
    def test(message: StoredMessage) -> bool:
        value = message.data["attachments"] if flag == "has_attachment" else message.data[flag]
        return bool(value) is wanted

    return test


def _render(message: StoredMessage, query: Mapping[str, list[str]]) -> dict[str, Any]:
    data = dict(message.data)
    fields = _first(query, "fields")
    if fields == "include_headers":
        data["headers"] = [dict(h) for h in message.headers]
    elif fields == "include_basic_headers":
        data["headers"] = [dict(h) for h in message.headers if h["name"].lower() in BASIC_HEADER_NAMES]
    select = _first(query, "select")
    if select:
        keep = {name.strip() for name in select.split(",")} | {"id"}
        data = {name: value for name, value in data.items() if name in keep}
    return data
