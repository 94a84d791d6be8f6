"""The outcome report: one row per recipient from the ledger, as a polars frame written to CSV or Parquet.

Columns: row, key, email, sender, state, reason, attempts, message_id, thread_id, request_id,
replayed, error_type, error_status, error_message, note, listed, the times (created, first
claimed, last claimed, sent, updated) as UTC datetimes, and what tracking notifications kept in
the campaign's store say (opens, first and last opened, clicks, clicked URLs, the first reply), and
whether the message bounced (hard or soft, when, why: `campaign.events.find_row_bounces`).
`write_report`, the use case `campaign report` calls, reads the ledger and writes only the output file. The
idempotency key stays out (it is an internal detail, not something to act on). The file is
owner-only; in a CSV, a cell that starts like a spreadsheet formula gets a leading `'`
(`campaign.outputfiles`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path

import polars as pl

from campaign.clock import Clock
from campaign.errors import InputFileError, UsageError
from campaign.events import RowBounce, find_row_bounces
from campaign.ledger import LedgerRow, LedgerSite
from campaign.manifest import Manifest
from campaign.models import RowState
from campaign.outputfiles import SymlinkRefusedError, write_private_csv, write_private_parquet
from campaign.unsubscribe import Engagement, find_engagement, list_store_paths, open_existing_stores

__all__ = ["REPORT_COLUMNS", "REPORT_SUFFIXES", "WrittenReport", "build_report", "write_report"]

REPORT_SUFFIXES = (".csv", ".parquet")
_TIMES = {
    "created_at": "created_at",
    "first_claimed_at": "first_claimed_at",
    "claimed_at": "last_claimed_at",
    "sent_at": "sent_at",
    "updated_at": "updated_at",
}
_SCHEMA: dict[str, type[pl.DataType] | pl.DataType] = {
    "row": pl.Int64,
    "key": pl.String,
    "email": pl.String,
    "sender": pl.String,
    "state": pl.String,
    "reason": pl.String,
    "attempts": pl.Int64,
    "message_id": pl.String,
    "thread_id": pl.String,
    "request_id": pl.String,
    "replayed": pl.Boolean,
    "error_type": pl.String,
    "error_status": pl.Int64,
    "error_message": pl.String,
    "note": pl.String,
    "listed": pl.Boolean,
    **dict.fromkeys(_TIMES, pl.String),
    # From the tracking notifications in the campaign's store (`campaign serve`), by message id.
    "opens": pl.Int64,
    "first_opened_at": pl.String,
    "last_opened_at": pl.String,
    "clicks": pl.Int64,
    "clicked_urls": pl.String,
    "replied_at": pl.String,
    # Follow-ups: which step the row is ("message": step 1), when it is due, an auto-reply seen before it.
    "step": pl.String,
    "due_at": pl.String,
    "auto_reply": pl.String,
    # From the bounces the campaign's stores keep (webhooks, `events pull`): "hard" or "soft", when, why.
    "bounce": pl.String,
    "bounced_at": pl.String,
    "bounce_reason": pl.String,
}
REPORT_COLUMNS: tuple[str, ...] = tuple(_TIMES.get(name, name) for name in _SCHEMA)
_TRACKED = (
    "opens",
    "first_opened_at",
    "last_opened_at",
    "clicks",
    "clicked_urls",
    "replied_at",
    "bounce",
    "bounced_at",
    "bounce_reason",
)
_LEDGER_COLUMNS = tuple(name for name in _SCHEMA if name not in _TRACKED)


@dataclass(frozen=True, slots=True)
class WrittenReport:
    """Where a report went and what it holds."""

    path: Path
    rows: int
    states: Mapping[str, int]  # rows per state, in the order the states first occur in the report


def write_report(
    manifest: Manifest,
    site: LedgerSite,
    out: Path,
    *,
    states: Sequence[RowState] | None = None,
    clock: Clock,
) -> WrittenReport:
    """Write the campaign's report (only the rows in `states`, if given) to `out`: .csv or .parquet.

    Reads the ledger read-only, and closes it before writing the file. UsageError, before anything is
    read, when `out` is one of the campaign's own inputs (its list or a suppression file): a report
    written over the list would lose it.
    """
    _refuse_an_input(manifest, out)
    ledger = site.open(clock=clock, campaign=manifest.campaign.name, read_only=True)
    try:
        with open_existing_stores(list_store_paths(manifest), clock=clock) as stores:
            engagement = find_engagement(stores)
            bounces = find_row_bounces(stores, ledger)
        rows = ledger.rows(states=states or None)
        frame = build_report(rows, engagement, bounces=bounces, steps=manifest.steps)
    finally:
        ledger.close()
    _write_frame(frame, out)
    held = Counter(str(value) for value in frame["state"])
    return WrittenReport(out, frame.height, dict(held))


def build_report(
    rows: Iterable[LedgerRow],
    engagement: Mapping[str, Engagement] | None = None,
    *,
    bounces: Mapping[str, RowBounce] | None = None,
    steps: Sequence[str] = (),
) -> pl.DataFrame:
    """A frame with one row per ledger row, in list order (a recipient's steps in `steps` order), times
    as UTC datetimes; opens and clicks from `engagement` (by message id), bounces from `bounces` (by
    ledger key)."""
    seen, bounced = engagement or {}, bounces or {}
    records = [_record(row, seen.get(row.message_id or "", _NONE), bounced.get(row.key)) for row in rows]
    frame = pl.DataFrame(records, schema=_SCHEMA, orient="row")
    tracked_times = ("first_opened_at", "last_opened_at", "replied_at", "due_at", "bounced_at")
    times = {**_TIMES, **{name: name for name in tracked_times}}
    if len(steps) > 1:
        rank = pl.col("step").replace_strict(list(steps), list(range(len(steps))), default=len(steps))
        frame = frame.sort(pl.col("row"), rank, maintain_order=True)
    return frame.with_columns(
        pl.col(name).str.to_datetime(time_zone="UTC", time_unit="ms").alias(label)
        for name, label in times.items()
    ).select(REPORT_COLUMNS)


_NONE = Engagement()


def _record(row: LedgerRow, seen: Engagement, bounce: RowBounce | None) -> dict[str, object]:
    record: dict[str, object] = {
        name: getattr(row, name) if name != "state" else row.state.value for name in _LEDGER_COLUMNS
    }
    record["key"] = row.recipient_key  # a follow-up's row: its recipient's key, and its step beside it
    record.update(
        opens=seen.opens,
        first_opened_at=seen.first_open,
        last_opened_at=seen.last_open,
        clicks=seen.clicks,
        clicked_urls=" ".join(seen.urls) or None,
        replied_at=seen.first_reply,
        bounce=None if bounce is None else "hard" if bounce.hard else "soft",
        bounced_at=None if bounce is None else bounce.bounced_at.astimezone(UTC).isoformat(),
        bounce_reason=None if bounce is None else bounce.reason,
    )
    return record


def _refuse_an_input(manifest: Manifest, out: Path) -> None:
    inputs = [manifest.path, manifest.recipients.source, *manifest.recipients.suppress]
    target = out.resolve()
    for path in inputs:
        if isinstance(path, Path) and path.resolve() == target:
            what = _input_name(manifest, path)
            raise UsageError(f"--out {out}: is the campaign's own {what}; write the report elsewhere")


def _input_name(manifest: Manifest, path: Path) -> str:
    if path == manifest.path:
        return "manifest"
    return "recipient list" if path == manifest.recipients.source else "suppression list"


def _write_frame(frame: pl.DataFrame, path: Path) -> None:
    """Write `frame` to `path`: .csv (UTF-8, header, ISO times) or .parquet, chosen by the suffix."""
    suffix = path.suffix.lower()
    if suffix not in REPORT_SUFFIXES:
        message = f"--out {path}: the report is written as .csv or .parquet; name the file e.g. outcomes.csv"
        raise UsageError(message)
    try:
        if suffix == ".csv":
            write_private_csv(frame, path, datetime_format="%Y-%m-%dT%H:%M:%S%.3fZ")
        else:
            write_private_parquet(frame, path)
    except SymlinkRefusedError as exc:
        raise InputFileError(str(exc)) from exc
    except (OSError, pl.exceptions.PolarsError) as exc:
        message = f"{path}: cannot write the report ({exc}); check that the folder exists and is writable"
        raise InputFileError(message) from exc
