"""The checked-row pipeline: every list row scanned, opt-outs applied, assigned a sender, rendered, checked.

`check_rows` opens it for a campaign; `RowPipeline.batches` yields the rows a batch at a time, in
file order, each a `RowCheck`: a row to send (its `Job` and rendered `Message`), a skip, or its
problems. `run` (through `run_preflight`), `preview` and `send-test` all consume it, so the three
can never disagree about who is mailed, by whom, with what. Only the current batch is held as
Python objects; what a consumer keeps is its own choice. Sends nothing, writes nothing.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from campaign.errors import DataError
from campaign.manifest import Manifest, SenderSettings
from campaign.models import Message
from campaign.pipeline._compliance import check_body_link
from campaign.pipeline._optouts import skip_unsubscribed_row
from campaign.plan import Job, SenderAssigner
from campaign.recipients import BATCH_ROWS, AudienceScan, CheckedRow, scan_audience
from campaign.render import Composer, build_composer, check_message_attachments
from campaign.unsubscribe import Unsubscribed, list_store_paths, load_unsubscribed

__all__ = ["RowCheck", "RowPipeline", "check_job", "check_rows", "collecting_less"]

# The cyclic garbage collector runs a young collection every this many new containers during a check.
# Its default (700) is tuned for programs that keep few objects; a check makes several per row and keeps
# a plan, so the older generations are traversed again and again for nothing (about 15 % of the check).
_CHECK_GC_THRESHOLD = 100_000


@dataclass(frozen=True, slots=True)
class RowCheck:
    """One list row through the pipeline.

    `checked` is the scanned row (a recipient, a skip, or problems: opt-outs already applied). A
    recipient has its `job`; once rendered, either its `message` or the `error` that stops it.
    """

    checked: CheckedRow
    job: Job | None = None
    message: Message | None = None
    error: DataError | None = None

    @property
    def row(self) -> int:
        """The row's number in the list (1: the first data row)."""
        return self.checked.row


class RowPipeline:
    """A campaign's list on its way to messages; see the module's docstring."""

    def __init__(
        self,
        manifest: Manifest,
        scan: AudienceScan,
        composer: Composer,
        unsubscribed: Unsubscribed,
        assigned: Mapping[str, str] | None,
    ) -> None:
        self.manifest = manifest
        self.scan = scan
        self.composer = composer
        self._unsubscribed = unsubscribed
        self._assigner = SenderAssigner(manifest.senders, assigned=assigned)

    def assigned(self, size: int = BATCH_ROWS) -> Iterator[list[RowCheck]]:
        """The rows scanned, opt-outs skipped and senders assigned, not rendered (`render` does that)."""
        for batch in self.scan.batches(size):
            yield [self._assign(checked) for checked in batch]

    def batches(self, size: int = BATCH_ROWS) -> Iterator[list[RowCheck]]:
        """Every row through every stage, `size` rows of the file at a time."""
        for batch in self.assigned(size):
            yield [self._render(row.checked, row.job) if row.job is not None else row for row in batch]

    def render(self, row: RowCheck, *, sender: SenderSettings | None = None) -> RowCheck:
        """`row` rendered and checked (by `sender` instead of its assigned one, if given)."""
        if row.job is None:
            return row
        return self._render(row.checked, row.job if sender is None else Job(row.job.recipient, sender.name))

    def _render(self, checked: CheckedRow, job: Job) -> RowCheck:
        outcome = check_job(self.composer, self.manifest, job)
        if isinstance(outcome, DataError):
            return RowCheck(checked, job, error=outcome)
        return RowCheck(checked, job, message=outcome)

    def _assign(self, checked: CheckedRow) -> RowCheck:
        # Opt-outs before assigning, so that an unsubscribed row takes no sender's share.
        if self._unsubscribed:
            checked = skip_unsubscribed_row(checked, self._unsubscribed)
        if checked.recipient is None:
            return RowCheck(checked)
        return RowCheck(checked, Job(checked.recipient, self._assigner.assign(checked.recipient)))


def check_rows(
    manifest: Manifest, *, secrets: Sequence[bytes] | None, assigned: Mapping[str, str] | None = None
) -> RowPipeline:
    """Open the pipeline: the list and its header checked, the templates compiled, the opt-outs read.

    File-level faults raise here (InputFileError, TemplateError, …); row-level ones come with the rows.
    `assigned` is the ledger's sender per recipient key: a row keeps the sender it was given.
    """
    scan = scan_audience(manifest.recipients, sender_names=[sender.name for sender in manifest.senders])
    unsubscribed = load_unsubscribed(list_store_paths(manifest))
    composer = build_composer(manifest, secrets=secrets)
    return RowPipeline(manifest, scan, composer, unsubscribed, assigned)


def check_job(composer: Composer, manifest: Manifest, job: Job) -> Message | DataError:
    """Render `job`'s message, or return the row-level error (naming the row) that stops it."""
    try:
        message = composer.render(job.recipient, manifest.sender(job.sender))
        check_body_link(manifest, message)  # Microsoft/iCloud drop the headers: the body link must be there
        check_message_attachments(message, composer.attachment_loader)  # found, sized, within 25 MB
    except DataError as exc:
        return exc
    return message


@contextmanager
def collecting_less() -> Iterator[None]:
    """Run the cyclic garbage collector less often while rows are checked (reference counting still
    frees every row's objects at once; only cycles wait a little longer). Restores the thresholds."""
    before = gc.get_threshold()
    gc.set_threshold(max(before[0], _CHECK_GC_THRESHOLD), *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)
