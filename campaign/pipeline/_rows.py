"""The checked-row pipeline: every list row scanned, opt-outs applied, assigned a sender, rendered, checked.

`check_rows` opens it for a campaign; `RowPipeline.batches` yields the rows a batch at a time, in
file order, each a `RowCheck`: a row to send (its `Job` and rendered `Message`), a skip, or its
problems. `run` (through `run_preflight`), `preview` and `send-test` all consume it, so the three
can never disagree about who is mailed, by whom, with what. Only the current batch is held as
Python objects; what a consumer keeps is its own choice. Sends nothing, writes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import NamedTuple

from campaign.clock import SystemClock
from campaign.errors import CampaignError, DataError
from campaign.ledger import ALREADY_MAILED, Ledger
from campaign.manifest import Manifest, SenderSettings
from campaign.models import Message, PreviousStep, Recipient, RowState, Skip, SkipReason
from campaign.pipeline._compliance import check_body_link
from campaign.pipeline._optouts import skip_unsubscribed_row
from campaign.plan import Job, SenderAssigner
from campaign.recipients import (
    BATCH_ROWS,
    AudienceScan,
    CheckedRow,
    ListStart,
    comparable_address,
    encode_cells,
    same_address_detail,
    scan_audience,
)
from campaign.redaction import secret_values
from campaign.render import Composer, build_composer, check_message_attachments
from campaign.unsubscribe import StoreFollower, Unsubscribed, list_store_paths, open_store, store_exists

# What a follow-up sees of the step it answers while every row is checked (nothing is sent yet).
STAND_IN_SENT_AT = datetime(2000, 1, 3, 9, 0, tzinfo=UTC)
STAND_IN_ID = "(the message id of the step before, once sent)"

__all__ = [
    "SETTLED_STATES",
    "STAND_IN_ID",
    "STAND_IN_SENT_AT",
    "Reuse",
    "RowCheck",
    "RowPipeline",
    "check_job",
    "check_rows",
    "describe_mailed_elsewhere",
    "load_row_cells",
]

# Rows in these states are not sent by a run (only pending and in-flight rows are; unknown ones wait
# for reconcile).
SETTLED_STATES = tuple(state for state in RowState if state not in (RowState.PENDING, RowState.INFLIGHT))


class RowCheck(NamedTuple):
    """One list row through the pipeline.

    `checked` is the scanned row (a recipient, a skip, or problems: opt-outs already applied). A
    recipient has its `job`; once rendered, either its `message` or the `error` that stops it. A named
    tuple for the reason `CheckedRow` is one: one or two are made for every row of the list.
    """

    checked: CheckedRow
    job: Job | None = None
    message: Message | None = None
    error: DataError | None = None
    settled: str | None = None  # the ledger's state for a row a run will not send again (e.g. "sent")
    followups: tuple[Message, ...] = ()  # the [[followups]] steps' messages, as checked (in step order)
    reused: bool = False  # not rendered again: sent already, or unchanged since a run checked it
    cells: str | None = None  # its cells as text, when reusing it needed them (`recipients.encode_cells`)
    # With a key column: the address the ledger mailed this row's key at (sent, or unknown), when the
    # list now gives it another. A key is one recipient, mailed once: the list's address is not mailed.
    mailed_at: str | None = None
    # The ledger holds it skipped as a duplicate, and it no longer is one: this check decides it again, as a
    # new row (its recorded cells are not reused: they were last checked under rules that may have changed).
    redecided: bool = False

    @property
    def row(self) -> int:
        """The row's number in the list (1: the first data row)."""
        return self.checked.row


class Reuse(Enum):
    """Which rows the pipeline may pass on without rendering them again (a run's choice, never a
    preview's: the preview shows every message)."""

    NONE = "none"
    SENT_ROWS = "sent"  # rows the ledger holds as sent: no run sends them again
    UNCHANGED_ROWS = "unchanged"  # those, and pending rows with the cells they were checked with


class RowPipeline:
    """A campaign's list on its way to messages; see the module's docstring."""

    def __init__(
        self,
        manifest: Manifest,
        scan: AudienceScan,
        composer: Composer,
        stores: Sequence[Path | str],
        ledger: Ledger | None,
        reuse: Reuse = Reuse.NONE,
        *,
        store_notes: tuple[str, ...] = (),
    ) -> None:
        self.manifest = manifest
        self.store_notes = store_notes  # what the stores' opening found to tell (`SuppressionStore.notes`)
        self.scan = scan
        # Only the rows appended since the ledger's plan are read: the earlier ones are in the ledger.
        self._appended = scan.start.rows > 0
        self.composer = composer
        self._stores = tuple(stores)
        self._ledger = ledger
        # With a key column, an address may come back under a key the ledger does not know (or one that
        # was never sent): it is looked up among the rows mailed under other keys. Without one, the key
        # is the address, and the ledger's key says it all.
        self._keyed = manifest.recipients.key_column is not None
        self._reuse = reuse
        load = None if ledger is None else ledger.assigned_counts()
        self._assigner = SenderAssigner(manifest.senders, load=load)
        self._own_files = manifest.message.own_files  # asked once: a row's cells are encoded per row

    def assigned(self, size: int = BATCH_ROWS) -> Iterator[list[RowCheck]]:
        """The rows scanned, opt-outs skipped and senders assigned, not rendered (`render` does that).

        A row the ledger knows keeps its sender, and says its state when a run will not send it
        again; with a key column, a row a run would send whose address went out under another key is
        skipped as a duplicate. A row the ledger holds skipped as a duplicate is decided again, as a new
        one (`RowCheck.redecided`): its address fixed, or the row it repeated gone, it is mailed, unless
        its address went out under another key. The ledger and the unsubscribe stores are asked a batch
        at a time (each store opened once for the pass: a database's connection is not made again for
        every batch).
        """
        stores = StoreFollower(self._stores, clock=SystemClock())  # reading stamps nothing
        try:
            for batch in self.scan.batches(size):
                if self._appended:
                    batch = self._earlier_duplicates_skipped(batch)
                recipients = [checked.recipient for checked in batch if checked.recipient is not None]
                kept, settled, again = self._known([recipient.key for recipient in recipients])
                moved: Mapping[str, str] = {}
                if self._keyed and self._ledger is not None:
                    batch = self._mailed_duplicates_skipped(batch, settled)
                    recipients = [checked.recipient for checked in batch if checked.recipient is not None]
                    moved = self._mailed_elsewhere(recipients, settled)
                unsubscribed = Unsubscribed()
                unsubscribed.add(stores.look_up(recipients))
                yield [self._assign(checked, unsubscribed, kept, settled, moved, again) for checked in batch]
        finally:
            stores.close()

    def batches(self, size: int = BATCH_ROWS, *, render: bool = True) -> Iterator[list[RowCheck]]:
        """Every row through every stage, `size` rows of the file at a time; with `reuse`, the rows a
        run need not check again are passed on unrendered (`RowCheck.reused`). With `render` false,
        the rest are passed on unrendered too, for the caller to check elsewhere (`check_jobs`)."""
        for batch in self.assigned(size):
            unchanged = self._unchanged(batch)
            yield [self._checked(row, unchanged, render=render) for row in batch]

    def _checked(self, row: RowCheck, unchanged: Mapping[int, str | None], *, render: bool) -> RowCheck:
        if row.job is None:
            return row
        if row.row in unchanged:
            cells = unchanged[row.row]
            return RowCheck(
                row.checked, row.job, settled=row.settled, reused=True, cells=cells, mailed_at=row.mailed_at
            )
        return self._render(row, row.job) if render else row

    def _unchanged(self, batch: Sequence[RowCheck]) -> dict[int, str | None]:
        """The rows of `batch` a run need not render, with their cells as text: sent already (a run never
        sends them again; not encoded here), or (same rules) pending with the cells they were checked with."""
        if self._reuse is Reuse.NONE or self._ledger is None:
            return {}
        jobs = [(row, row.job) for row in batch if row.job is not None]
        sent = RowState.SENT.value
        found: dict[int, str | None] = {row.row: None for row, _ in jobs if row.settled == sent}
        if self._reuse is Reuse.UNCHANGED_ROWS:
            pending = [(row, job) for row, job in jobs if row.settled is None and not row.redecided]
            recorded = self._ledger.key_cells([job.recipient.key for _, job in pending])
            for row, job in pending:
                cells = recorded.get(job.recipient.key)
                if cells is not None and cells == self.cells_of(row):
                    found[row.row] = cells
        return found

    def cells_of(self, row: RowCheck) -> str:
        """A recipient's row as the ledger keeps it (`load_row_cells`; a row a run will not send again:
        its cells alone)."""
        assert row.job is not None  # a recipient's row
        if row.settled is not None or not self._own_files:
            return encode_cells(row.job.recipient.fields)
        return load_row_cells(self.composer, self.manifest, row.job)

    def render(self, row: RowCheck, *, sender: SenderSettings | None = None) -> RowCheck:
        """`row` rendered and checked (by `sender` instead of its assigned one, if given)."""
        if row.job is None:
            return row
        return self._render(row, row.job if sender is None else Job(row.job.recipient, sender.name))

    def _render(self, row: RowCheck, job: Job) -> RowCheck:
        outcome = check_steps(self.composer, self.manifest, job)
        settled, mailed_at = row.settled, row.mailed_at
        if isinstance(outcome, DataError):
            return RowCheck(row.checked, job, error=outcome, settled=settled, mailed_at=mailed_at)
        first, *more = outcome
        return RowCheck(
            row.checked, job, message=first, settled=settled, followups=tuple(more), mailed_at=mailed_at
        )

    def _assign(
        self,
        checked: CheckedRow,
        unsubscribed: Unsubscribed,
        kept: Mapping[str, str],
        settled: Mapping[str, str],
        moved: Mapping[str, str],
        again: Collection[str],
    ) -> RowCheck:
        # Opt-outs before assigning, so that an unsubscribed row takes no sender's share.
        if unsubscribed:
            checked = skip_unsubscribed_row(checked, unsubscribed)
        recipient = checked.recipient
        if recipient is None:
            return RowCheck(checked)
        key = recipient.key
        sender = self._assigner.assign(recipient, kept=kept.get(key))
        job = Job(recipient, sender)
        return RowCheck(
            checked, job, settled=settled.get(key), mailed_at=moved.get(key), redecided=key in again
        )

    def _earlier_duplicates_skipped(self, batch: list[CheckedRow]) -> list[CheckedRow]:
        """`batch` (of rows appended to the list) with the recipients that rows before it already list
        skipped as their duplicates, as a check of the whole list would find them: by key, and (with a
        key column) by address."""
        assert self._ledger is not None  # rows are appended to the list of the ledger's plan
        # Recipients, and duplicates of an appended row (whose first row may be an earlier one).
        found = [(checked, _duplicable(checked)) for checked in batch]
        earlier = self._ledger.listed_rows([key for _, (key, _) in found if key])
        addresses: Mapping[str, int] = {}
        if self._keyed:  # a recipient whose key is new, at an address an earlier row has under another
            wanted = [
                c.recipient.address.email.lower()
                for c, (key, _) in found
                if c.recipient is not None and key not in earlier
            ]
            addresses = self._ledger.listed_addresses(wanted) if wanted else {}
        if not earlier and not addresses:
            return batch
        marked = []
        for checked, (key, email) in found:
            if key in earlier:
                detail = f"duplicate of row {earlier[key]}"
            elif checked.recipient is not None and (first := addresses.get(email.lower())) is not None:
                detail = same_address_detail(first)
            else:
                marked.append(checked)
                continue
            skip = Skip(checked.row, key, email, SkipReason.DUPLICATE, detail)
            marked.append(CheckedRow(checked.row, checked.fields, skip=skip))
        return marked

    def _mailed_duplicates_skipped(
        self, batch: list[CheckedRow], settled: Mapping[str, str]
    ) -> list[CheckedRow]:
        """`batch` with each recipient that a run would send (its key new to the ledger, or not sent yet)
        skipped as a duplicate when its address was mailed under another key (sent, in flight or unknown):
        a list exported again with its keys shifted, or a person with a new record, is not mailed twice."""
        assert self._ledger is not None
        asked = [
            (recipient.key, recipient.address.email.lower())
            for checked in batch
            if (recipient := checked.recipient) is not None and recipient.key not in settled
        ]
        mailed = self._ledger.mailed_keys(asked) if asked else {}
        if not mailed:
            return batch
        marked = []
        for checked in batch:
            recipient = checked.recipient
            if recipient is not None and (other := mailed.get(recipient.key)) is not None:
                detail = f"{ALREADY_MAILED}{_quoted(other)}"
                skip = Skip(checked.row, recipient.key, recipient.address.email, SkipReason.DUPLICATE, detail)
                checked = CheckedRow(checked.row, checked.fields, skip=skip)
            marked.append(checked)
        return marked

    def _mailed_elsewhere(
        self, recipients: Sequence[Recipient], settled: Mapping[str, str]
    ) -> dict[str, str]:
        """Key -> the address the ledger mailed it at, for the `recipients` whose key was mailed (sent, or
        unknown) at another address than the list's now (compared without case)."""
        assert self._ledger is not None
        mailed = (RowState.SENT.value, RowState.UNKNOWN.value)
        wanted = {recipient.key: recipient.address.email.lower() for recipient in recipients}
        asked = [key for key in wanted if settled.get(key) in mailed]
        found = self._ledger.mailed_addresses(asked) if asked else {}
        # Compared as addresses are (a ledger older than the IDNA form may hold a domain in Unicode).
        return {
            key: email
            for key, email in found.items()
            if email.lower() != wanted[key] and comparable_address(email) != wanted[key]
        }

    def _known(self, keys: Sequence[str]) -> tuple[Mapping[str, str], Mapping[str, str], Collection[str]]:
        """Of `keys`: the senders the ledger gave them; the states of those a run will not send again; and
        those it holds skipped as a duplicate, which this check decides again (not settled: a row of
        them it plans is pending again, `Ledger.record_plan`). The last is asked only when the batch
        has skipped rows (few do)."""
        if self._ledger is None or not keys:
            return {}, {}, ()
        settled = self._ledger.key_states(SETTLED_STATES, keys)
        skipped = [key for key, state in settled.items() if state == RowState.SKIPPED.value]
        again = self._ledger.duplicate_skips(skipped) if skipped else set()
        if again:
            settled = {key: state for key, state in settled.items() if key not in again}
        return self._ledger.assigned_senders(keys), settled, again


def _duplicable(checked: CheckedRow) -> tuple[str, str]:
    """The key and address of a recipient or of a duplicate's skip; ("", "") for any other row."""
    if checked.recipient is not None:
        return checked.recipient.key, checked.recipient.address.email
    if checked.skip is not None and checked.skip.reason is SkipReason.DUPLICATE:
        return checked.skip.key, checked.skip.email
    return "", ""


def _quoted(key: str) -> str:
    """A key as a skip's reason names it: in double quotes, escaped as JSON, cut to 80 characters."""
    return json.dumps(key if len(key) <= 80 else key[:77] + "...", ensure_ascii=False)


def describe_mailed_elsewhere(count: int, first: RowCheck) -> str:
    """What a run and a preview say of the `count` rows whose key the ledger mailed at another address
    than the list's (`RowCheck.mailed_at`; `first` of them in list order)."""
    assert first.job is not None
    assert first.mailed_at is not None
    recipient = first.job.recipient
    rows = "1 row has a key" if count == 1 else f"{count:,} rows have keys"
    return (
        f"{rows} already mailed at another address, not mailed again at the list's (first: row "
        f"{recipient.row}, key {_quoted(recipient.key)}, mailed at {first.mailed_at}, the list now says "
        f"{recipient.address.email}): a key is one recipient, mailed once; if the list's keys were given "
        "out afresh, give its rows their earlier keys back"
    )


def load_row_cells(composer: Composer, manifest: Manifest, job: Job) -> str:
    """`job`'s row as the ledger keeps it (`encode_cells`): its cells and, when its message attaches files
    of its recipient's own, their sizes and times (reads them). A file that cannot be found leaves them
    out: the row then matches no record, and is checked again, which says what is wrong."""
    fields = job.recipient.fields
    if not manifest.message.own_files:
        return encode_cells(fields)
    assert composer.attachment_loader is not None  # the manifest has attachments
    try:
        files = composer.render_own_files(job.recipient, manifest.sender(job.sender))
        described = composer.attachment_loader.describe(files, row=job.recipient.row)
    except CampaignError:
        return encode_cells(fields)
    return encode_cells(fields, files=described)


def check_rows(
    manifest: Manifest,
    *,
    secrets: Sequence[bytes] | None,
    ledger: Ledger | None = None,
    reuse: Reuse = Reuse.NONE,
    start: ListStart | None = None,
) -> RowPipeline:
    """Open the pipeline: the list and its header checked, the templates compiled, the opt-outs read.

    File-level faults raise here (InputFileError, TemplateError, …); row-level ones come with the rows.
    `ledger` (the campaign's, when it ran before): a row keeps the sender it was given, and a row a run
    will not send again says so (`RowCheck.settled`). With `start` (`find_appended`), only the rows
    appended to the list the ledger's plan was of are read; one that duplicates an earlier row is
    skipped as its duplicate.
    """
    senders = [sender.name for sender in manifest.senders]
    known = secret_values(manifest.secret_envs)
    scan = scan_audience(manifest.recipients, sender_names=senders, start=start, secrets=known)
    stores = list_store_paths(manifest)
    notes: list[str] = []
    for path in stores:  # a file that is not a store is refused here, before any row is checked
        if store_exists(path):
            store = open_store(path, clock=SystemClock(), create=False)
            notes.extend(store.notes)  # a file without WAL: said once, before the run is confirmed
            store.close()
    composer = build_composer(manifest, secrets=secrets)
    return RowPipeline(manifest, scan, composer, stores, ledger, reuse, store_notes=tuple(notes))


def check_job(composer: Composer, manifest: Manifest, job: Job) -> Message | DataError:
    """Render `job`'s message, or return the row-level error (naming the row) that stops it."""
    outcome = check_steps(composer, manifest, job)
    return outcome if isinstance(outcome, DataError) else outcome[0]


def check_steps(composer: Composer, manifest: Manifest, job: Job) -> tuple[Message, ...] | DataError:
    """Render `job`'s message of every step (step 1, then each follow-up, answering the one before with
    stand-ins for what only a send knows), or return the row-level error (naming the row) that stops it."""
    sender = manifest.sender(job.sender)
    try:
        message = composer.render(job.recipient, sender)
        check_body_link(manifest, message, sender)  # Microsoft/iCloud drop the headers: a body link then
        check_message_attachments(message, composer.attachment_loader)  # found, sized, within 25 MB
        messages = [message]
        steps = (composer, *composer.followups)
        for before, followup in zip(steps, composer.followups, strict=False):
            answered = PreviousStep(before.step, messages[-1].subject, STAND_IN_ID, None, STAND_IN_SENT_AT)
            messages.append(followup.render(job.recipient, sender, previous=answered))
            check_body_link(manifest, messages[-1], sender)
            check_message_attachments(messages[-1], composer.attachment_loader)  # a huge cell: within 25 MB
    except DataError as exc:
        return exc
    return tuple(messages)
