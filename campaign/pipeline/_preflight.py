"""Everything checked before the first send: the list, the senders, and every message rendered.

One bad row stops the run before anything is sent, unless the user asked to
skip bad rows; then they are recorded as skipped with the reason. Nothing here
writes the ledger or sends.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from campaign.collector import collecting_less
from campaign.errors import DataError
from campaign.ledger import Ledger, PlannedRow, PlanSink
from campaign.manifest import Manifest
from campaign.models import Message, Skip, SkipReason
from campaign.pipeline._compliance import check_body_link, needs_body_link
from campaign.pipeline._parallel import checked_rows, error_line
from campaign.pipeline._rows import Reuse, RowCheck, check_rows, describe_mailed_elsewhere
from campaign.plan import Job
from campaign.recipients import ListStart, describe_key_only_entries, describe_skipped_row, encode_cells
from campaign.render import Composer, load_message_attachments

__all__ = [
    "Preflight",
    "find_skipped_invalid",
    "may_move_to",
    "raise_for_problems",
    "render_job",
    "run_preflight",
]

_SHOWN_IN_ERROR = 1
_KEPT_PROBLEMS = 1_000  # a run stops on the first; a list of a million bad rows need not be kept whole


@dataclass(frozen=True, slots=True)
class Preflight:
    """A checked campaign: how many rows go out, were skipped and why, and the problems found. The plan
    itself (each row's job, each skip) went to the `PlanSink` the check was given."""

    manifest: Manifest
    composer: Composer
    last_row: int  # the number of the last row of the list checked (blank lines counted)
    list_end: int  # a CSV list's byte offset just after it (`AudienceScan.end`)
    planned: int  # rows that passed, settled ones included (the plan lists them all)
    skipped: Mapping[str, int]  # skip reason -> rows
    problems: tuple[str, ...]  # the first few found
    problem_count: int = 0  # every problem found
    to_send: int = 0  # the rows a run sends: not settled in the ledger
    # What the user should know of the plan (`describe_key_only_entries`, `describe_mailed_elsewhere`).
    notes: tuple[str, ...] = ()

    def render(self, job: Job) -> Message:
        """Render the message for `job` and read its attachment files (shared ones once per run)."""
        return render_job(self.composer, self.manifest, job)

    def raise_for_problems(self) -> None:
        """Raise a one-line DataError naming the first problem, if any were found."""
        raise_for_problems(self.problems, total=self.problem_count)


def raise_for_problems(problems: Sequence[str], *, total: int | None = None) -> None:
    """Raise a one-line DataError naming the first of `problems` and how many more (of `total`, when only
    the first few were kept), if there are any."""
    if not problems:
        return
    more = (len(problems) if total is None else total) - _SHOWN_IN_ERROR
    tail = f" (and {more} more; `campaign preview` lists them all)" if more > 0 else ""
    hint = "" if "--skip-invalid" in problems[0] else " (or pass --skip-invalid to skip bad rows)"
    message = f"{problems[0]}{tail}; nothing was sent{hint}"
    raise DataError(message)


def render_job(composer: Composer, manifest: Manifest, job: Job) -> Message:
    """The message to send for a checked `job` (of its step), with its attachment files read (shared ones
    once per run)."""
    step = composer.for_step(job.step)
    message = step.render(job.recipient, manifest.sender(job.sender), previous=job.previous)
    return load_message_attachments(message, composer.attachment_loader)


def may_move_to(composer: Composer, manifest: Manifest, job: Job, sender: str) -> bool:
    """Whether `job` may go out from `sender` instead of the sender it was checked for (a stopped
    sender's rows move to the others): its message from `sender` passes the checks that depend on the
    sender. Only a Microsoft/iCloud sender has such a check (its body must link to unsubscribe, as it
    sends no List-Unsubscribe headers), so only a move to one renders the message."""
    settings = manifest.sender(sender)
    if not needs_body_link(manifest, settings):
        return True
    try:
        message = composer.for_step(job.step).render(job.recipient, settings, previous=job.previous)
        check_body_link(manifest, message, settings)
    except DataError:
        return False
    return True


def run_preflight(
    manifest: Manifest,
    sink: PlanSink,
    *,
    secrets: Sequence[bytes] | None,
    skip_invalid: bool,
    ledger: Ledger | None = None,
    on_rows: Callable[[int, int], None] | None = None,
    reuse: Reuse = Reuse.NONE,
    due_at: Callable[[Job], datetime | None] = lambda _job: None,
    start: ListStart | None = None,
) -> Preflight:
    """Every row through the pipeline (`check_rows`), its plan handed to `sink` a batch at a time: the
    rows to mail (with their cells and when they are due, `due_at`) and the skips. Nothing of
    the list is held but the current batch.

    `ledger` (the campaign's, when it ran before) keeps each row's sender and says which rows a run
    sends (`to_send`). `on_rows(done, total)` hears of each batch checked (for a progress display).
    `reuse` says which rows need not be rendered again (`Reuse`): they count as checked. With `start`,
    only the rows appended to the list since the ledger's plan are checked (`check_rows`).

    File-level problems (a missing file, a bad header, a template that does not
    compile) raise at once; row-level problems are collected. With `skip_invalid`,
    bad rows become skips and the problems list is empty.
    """
    pipeline = check_rows(manifest, secrets=secrets, ledger=ledger, reuse=reuse, start=start)
    source = manifest.recipients.source.name
    skipped: Counter[str] = Counter()
    problems: list[str] = []
    problem_count = planned = to_send = moved = 0
    first_moved: RowCheck | None = None  # the first row whose key was mailed at another address
    total, done = pipeline.scan.row_count, 0
    with collecting_less():
        for batch in checked_rows(pipeline, secrets, error_line):
            if on_rows is not None:
                done += len(batch)
                on_rows(done, total)
            rows: list[PlannedRow] = []
            skips: list[Skip] = []
            rendered = ((checked, error is not None) for checked, error in batch)
            earlier = frozenset() if skip_invalid else find_skipped_invalid(ledger, rendered)
            for checked, error in batch:
                if checked.job is not None and error is None:  # rendered and checked, or reused
                    cells = checked.cells or pipeline.cells_of(checked)
                    rows.append(_planned_row(checked.job, due_at(checked.job), cells))
                    to_send += checked.settled is None
                    if checked.mailed_at is not None:
                        moved += 1
                        first_moved = checked if first_moved is None else first_moved
                elif checked.checked.skip is not None:
                    skips.append(_kept_skip(checked, with_cells=bool(manifest.followups)))
                elif skip_invalid or checked.row in earlier:
                    skips.append(_invalid_skip(checked, error, source))
                else:
                    found = _problems(checked, error, source)
                    problem_count += len(found)
                    problems.extend(found[: max(0, _KEPT_PROBLEMS - len(problems))])
            sink.add(rows, skips)
            planned += len(rows)
            skipped.update(skip.reason.value for skip in skips)
    return Preflight(
        manifest=manifest,
        composer=pipeline.composer,
        last_row=pipeline.scan.last_row,
        list_end=pipeline.scan.end,
        planned=planned,
        skipped=dict(skipped),
        problems=tuple(problems),
        problem_count=problem_count,
        to_send=to_send,
        notes=(
            *pipeline.store_notes,
            *describe_key_only_entries(manifest.recipients, pipeline.scan.suppression),
            *(() if first_moved is None else (describe_mailed_elsewhere(moved, first_moved),)),
        ),
    )


# Skips of a recipient who may have been mailed before (the list names them; they opted out since).
_OPT_OUTS = frozenset({SkipReason.UNSUBSCRIBED, SkipReason.BOUNCED, SkipReason.SUPPRESSED})


def _kept_skip(checked: RowCheck, *, with_cells: bool) -> Skip:
    """The skip the plan records for `checked`: an opt-out with the row's cells `with_cells` (a campaign
    with follow-ups). A recipient mailed step 1 and opted out since still has follow-ups due, rebuilt
    from step 1's cells before the opt-out skips them; a ledger from before cells were kept (migration 8
    cleared them) holds none for that row, and the run stopped at it (exit 74) on every resume."""
    skip = checked.checked.skip
    assert skip is not None
    if not with_cells or skip.reason not in _OPT_OUTS:
        return skip
    return replace(skip, cells=encode_cells(checked.checked.fields))


def _planned_row(job: Job, due_at: datetime | None, cells: str) -> PlannedRow:
    """A row to mail, as the plan records it, with the cells it is sent from (a row sent already too: its
    follow-ups are)."""
    recipient = job.recipient
    return PlannedRow(
        recipient.key, recipient.row, recipient.address.email, job.sender, due_at=due_at, cells=cells
    )


def _problems(checked: RowCheck, error: str | None, source: str) -> list[str]:
    if error is not None:
        return [f"{source} {error}"]
    return [problem.describe(source) for problem in checked.checked.problems]


def find_skipped_invalid(ledger: Ledger | None, rows: Iterable[tuple[RowCheck, bool]]) -> frozenset[int]:
    """Of `rows` (each with whether its message failed), those that fail their checks and that a run
    skipped as invalid (--skip-invalid) when they held the very cells they hold now: that decision stands
    without the flag. A row changed since, or moved to another number (such a row is known by its
    number: it may have no address), is a problem again. Reads the ledger."""
    if ledger is None:
        return frozenset()
    known = {row.row: _invalid_identity(row) for row, failed in rows if failed or row.checked.problems}
    if not known:
        return frozenset()
    recorded = ledger.invalid_cells([key for key, _ in known.values()])
    return frozenset(row for row, (key, cells) in known.items() if recorded.get(key) == cells)


def _invalid_identity(checked: RowCheck) -> tuple[str, str]:
    """The key and cells a row skipped as invalid is recorded under: its recipient's key when its message
    failed, else its row number (a row with problems may have no address)."""
    key = f"row:{checked.row}" if checked.job is None else checked.job.recipient.key
    return key, encode_cells(checked.checked.fields)


def _invalid_skip(checked: RowCheck, error: str | None, source: str) -> Skip:
    """A row that fails its checks (`error`: its message's), skipped (--skip-invalid) with every reason,
    and the cells that a later run knows it by (`find_skipped_invalid`)."""
    key, cells = _invalid_identity(checked)
    if checked.job is not None and error is not None:
        recipient = checked.job.recipient
        text = describe_skipped_row(f"{source} {error}")
        return Skip(recipient.row, key, recipient.address.email, SkipReason.INVALID, text, cells)
    detail = "; ".join(
        f"{problem.where}: {describe_skipped_row(problem.message)}" for problem in checked.checked.problems
    )
    return Skip(checked.row, key, "", SkipReason.INVALID, detail, cells)
