"""Resuming a campaign whose inputs have not changed: the plan stamp, and the open jobs read back.

A full preflight checks and renders every row of the list, which for a million rows
takes minutes. The plan stamp hashes every input that decides which rows are sent, by
whom, and whether they pass preflight (the manifest's settings, the content fingerprint,
the list and suppression files, this version of campaign). `run` records
it with the plan; a later run whose stamp matches knows the earlier preflight still
holds, so it reads back only the ledger's open rows instead of checking the list again.
Rows unsubscribed since then are caught before each send, as in any run. Paths count
relative to the campaign's folder (`portable_path`), so that a worker with a copy of the
campaign in another folder, or the folder moved, finds the plan checked. A stamp that does
not match (one recorded before paths counted so, say) only makes the run check the list
again. Sends nothing and writes nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from campaign import __version__
from campaign.ledger import Ledger, PlannedRow
from campaign.manifest import STORE_SUFFIXES, Manifest, RecipientsSettings
from campaign.models import Recipient, RowState
from campaign.pipeline._portable import portable_path, portable_settings
from campaign.plan import Job
from campaign.recipients import ListStart, recipient_from_cells
from campaign.render import describe_shared_files

__all__ = [
    "LedgerJobs",
    "ListExtent",
    "find_appended",
    "jobs_at",
    "load_list_extent",
    "load_plan_stamp",
    "load_recipients",
    "load_rules_stamp",
    "record_rows_given_away",
]

_READ_BYTES = 1 << 20

# Bump when preflight's rules change, so that a stamp recorded under the old rules no longer matches.
# (3: --skip-invalid is no longer part of it; a row skipped as invalid is recorded with its cells.
# 4: a suppression file's rows that hold only a recipient_key suppress that key.)
_RULES = 4


def load_rules_stamp(manifest: Manifest, *, content: str) -> str:
    """SHA-256 over every input that decides how a row is checked, but the list's rows themselves:
    the manifest, the content, the suppression files, the size and time of the files attached to every
    message, this version (reads files). Paths count from the campaign's folder (`portable_path`).

    Under the same rules stamp, a row whose cells did not change passes as it passed before (its
    cells are in the ledger: `recipients.encode_cells`), so a run re-checks only rows added or changed.
    --skip-invalid is not part of it: a row it skipped stays skipped while its cells are the same
    (`find_skipped_invalid`), and a row that fails without it stops a run whatever the stamp.
    `content` is the run's content fingerprint (`campaign.pipeline.ContentCheck.combined`).
    """
    digest = hashlib.sha256()
    settings = portable_settings(manifest.model_dump(), manifest.base_dir)
    header = [_RULES, __version__, content, settings]
    # The files every message attaches; absent without them, so that those stamps stay as they were.
    if shared := describe_shared_files(manifest.message.attachments, manifest.attachments_root):
        header.append(shared)
    digest.update(json.dumps(header, sort_keys=True, default=str).encode())
    # Unsubscribe stores change while a campaign runs; each send checks them: they are not part of the plan.
    lists = [
        path
        for path in manifest.recipients.suppress
        if isinstance(path, Path) and path.suffix.lower() not in STORE_SUFFIXES
    ]
    for path in lists:
        digest.update(f"\0{portable_path(path, manifest.base_dir)}\0".encode())
        digest.update(_file_digest(path))
    return digest.hexdigest()


def load_plan_stamp(manifest: Manifest, *, content: str) -> str:
    """SHA-256 over every input that decides the plan and its preflight: the rules stamp and the list
    file, named from the campaign's folder (reads the files)."""
    digest = hashlib.sha256(load_rules_stamp(manifest, content=content).encode())
    source = manifest.recipients.source
    digest.update(f"\0{portable_path(source, manifest.base_dir)}\0".encode())
    digest.update(_file_digest(source))
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class ListExtent:
    """The list file a plan was made of, as the ledger keeps it: its size and SHA-256, and its data rows."""

    size: int
    digest: str
    rows: int

    def encode(self) -> str:
        return json.dumps({"size": self.size, "digest": self.digest, "rows": self.rows})

    @classmethod
    def decode(cls, text: str | None) -> ListExtent | None:
        try:
            found = json.loads(text or "")
            return cls(int(found["size"]), str(found["digest"]), int(found["rows"]))
        except (ValueError, TypeError, KeyError):
            return None


def load_list_extent(path: Path, *, size: int, rows: int) -> ListExtent:
    """The list file at `path` as a plan of its first `size` bytes (its `rows` data rows: the rows a check
    read, whatever was appended meanwhile) records it (reads the file)."""
    found = _prefix_digest(path, size)
    return ListExtent(size, "" if found is None else found[0], rows)


def find_appended(manifest: Manifest, ledger: Ledger) -> ListStart | None:
    """Where the rows appended to the list since the ledger's plan start, when the list only grew: the
    file begins with the very bytes that plan was made of, ending with a newline. None when it changed
    otherwise or is not a CSV. Reads the file.

    Rows the plan skipped as invalid need no second look: under the same rules (the caller's condition)
    an unchanged row fails as it failed, and a new row that repeats the address of one whose message
    failed is its duplicate, as the ledger lists it (a row with problems claims no address).
    """
    recorded = ListExtent.decode(ledger.list_extent())
    path = manifest.recipients.source
    if recorded is None or not recorded.size or path.suffix.lower() != ".csv":
        return None
    try:
        if path.stat().st_size <= recorded.size:
            return None
    except OSError:
        return None  # the full check says what is wrong
    found = _prefix_digest(path, recorded.size)
    if found != (recorded.digest, b"\n"):
        return None
    return ListStart(recorded.size, recorded.rows)


def _prefix_digest(path: Path, size: int) -> tuple[str, bytes] | None:
    """The SHA-256 of the file's first `size` bytes, and the last of them; None: shorter, or unreadable."""
    digest, last, left = hashlib.sha256(), b"", size
    try:
        with path.open("rb") as file:
            while left > 0 and (chunk := file.read(min(left, _READ_BYTES))):
                digest.update(chunk)
                left -= len(chunk)
                last = chunk[-1:]
    except OSError:
        return None
    return None if left else (digest.hexdigest(), last)


def jobs_at(settings: RecipientsSettings, rows: Sequence[PlannedRow]) -> list[Job]:
    """The planned `rows` as jobs, their recipients rebuilt from the cells the plan recorded."""
    return [
        Job(
            recipient_from_cells(settings, row=row.row, key=row.key, email=row.email, cells=row.cells),
            row.sender,
        )
        for row in rows
    ]


def load_recipients(
    settings: RecipientsSettings, ledger: Ledger, wanted: Sequence[tuple[int, str, str]]
) -> list[Recipient]:
    """The recipients of (row, key, normalised address) that a recorded plan holds, in the order given,
    rebuilt from their recorded cells (for the follow-ups of step 1's rows: `followups.RecipientsAt`)."""
    cells = ledger.key_cells([key for _, key, _ in wanted])
    return [
        recipient_from_cells(settings, row=row, key=key, email=email, cells=cells.get(key))
        for row, key, email in wanted
    ]


class LedgerJobs:
    """The ledger's open rows of step 1 (due at `now`) as jobs for the send loop, a sender's page at a
    time: its rows left in flight first (their keys age), then its pending ones in ledger order, with
    the cells the plan recorded; nothing holds more than a page (`campaign.dispatch.JobSource`).

    Only valid when the ledger's plan is this list's (just recorded, or its plan stamp matches).
    """

    def __init__(self, ledger: Ledger, settings: RecipientsSettings, now: datetime | None) -> None:
        self._ledger = ledger
        self._settings = settings
        self._now = now
        self.counts = ledger.open_counts(now)  # per sender: the rows there are to read
        self._read = 0
        self._after: dict[tuple[str, RowState], int | None] = {}  # None: nothing more

    def __call__(self, sender: str, count: int) -> list[Job]:
        rows: list[PlannedRow] = []
        for state in (RowState.INFLIGHT, RowState.PENDING):
            wanted = count - len(rows)
            after = self._after.get((sender, state), 0)
            if wanted <= 0 or after is None:
                continue
            page = self._ledger.open_rows_of(sender, state, self._now, after=after, limit=wanted)
            self._after[(sender, state)] = page[-1].cursor if len(page) == wanted else None
            rows += page
        self._read += len(rows)
        return jobs_at(self._settings, rows)

    def left(self) -> int:
        """The rows not read yet."""
        return max(0, sum(self.counts.values()) - self._read)


def record_rows_given_away(
    ledger: Ledger, settings: RecipientsSettings, sender: str, takers: Sequence[str], *, page: int = 1000
) -> int:
    """Give `sender`'s movable pending rows (step 1, not pinned to it by the list's sender column) to the
    senders `takers`, in turn, through the ledger; returns how many moved. Where workers share a campaign,
    a grant that stopped (parked by a quota, its credentials refused) hands its rows to grants another
    worker may hold, as one process's lanes hand them over in memory."""
    moved, after = 0, 0
    while page_rows := ledger.open_rows_of(sender, RowState.PENDING, after=after, limit=page):
        after = page_rows[-1].cursor
        movable = [job.key for job in jobs_at(settings, page_rows) if job.movable]
        given = {key: takers[(moved + n) % len(takers)] for n, key in enumerate(movable)}
        moved += ledger.record_senders(given)
    return moved


def _file_digest(path: Path) -> bytes:
    try:
        with path.open("rb") as file:
            return hashlib.file_digest(file, "sha256").digest()
    except OSError:
        return b"unreadable"  # matches no recorded stamp: the full preflight then says what is wrong
