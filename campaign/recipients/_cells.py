"""A list row's cells as the ledger keeps them, and the recipient rebuilt from them.

A run records each planned row's cells with the plan, and sends from them: the send loop, the
follow-up rounds and a resume whose list did not change read a row's cells from the ledger, never
the list file again, so nothing of the list is held in memory while sending. The text is JSON (the
column names and values, in column order), so that a run can also tell a row that changed since it
was checked from one that did not (the same text: the same row). A row whose message attaches a file
of its own also carries that file's size and time, under the one name no column can have (""): the
list's reader drops unnamed columns. Pure.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import orjson

from campaign.errors import LedgerError
from campaign.manifest import RecipientsSettings
from campaign.models import Address, Recipient

__all__ = ["cell_text", "encode_cells", "recipient_from_cells"]


def cell_text(value: object) -> str | None:
    """A cell that names something optional (a display name, a pinned sender): its text stripped, or
    None when empty."""
    return str(value).strip() or None


# Where the cells of a row with files of its own keep their size and time (no column is unnamed).
_FILES = ""


def encode_cells(fields: Mapping[str, object], *, files: str | None = None) -> str:
    """The row's cells (column name -> value: text, or a Parquet number or boolean) as text, with `files`
    (its own attachment files' sizes and times, as the pipeline describes them) if given."""
    if files is not None:
        fields = {**fields, _FILES: files}
    try:
        text = orjson.dumps(fields)
    except TypeError:  # an integer beyond 64 bits: the json module writes it exactly
        return json.dumps(fields)
    # orjson writes a NaN or an infinity as null; the json module keeps them (NaN, Infinity).
    if b"null" in text and any(
        isinstance(value, float) and not math.isfinite(value) for value in fields.values()
    ):
        return json.dumps(fields)
    return text.decode("utf-8")


def _decode_cells(text: str) -> dict[str, object]:
    try:
        found = orjson.loads(text)
    except orjson.JSONDecodeError:  # NaN or Infinity (see `encode_cells`)
        found = json.loads(text)
    if not isinstance(found, dict):
        raise ValueError("not an object")
    found.pop(_FILES, None)
    return found


def recipient_from_cells(
    settings: RecipientsSettings, *, row: int, key: str, email: str, cells: str | None
) -> Recipient:
    """The recipient an earlier check of the list found on `row`, rebuilt from its recorded `cells`
    (`encode_cells`) with its key and normalised address; the row is not checked again."""
    try:
        fields = _decode_cells(cells or "")
    except ValueError as exc:
        raise LedgerError(
            f"the ledger holds no readable cells for row {row} ({key}); run `campaign run` again to "
            "check the list and record them"
        ) from exc
    name = None if settings.name_column is None else cell_text(fields.get(settings.name_column, ""))
    sender = None if settings.sender_column is None else cell_text(fields.get(settings.sender_column, ""))
    return Recipient(key, row, Address(email, name), fields, sender)
