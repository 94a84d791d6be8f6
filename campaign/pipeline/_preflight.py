"""Everything checked before the first send: the list, the senders, and every message rendered.

One bad row stops the run before anything is sent, unless the user asked to
skip bad rows; then they are recorded as skipped with the reason. Nothing here
writes the ledger or sends.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from campaign.errors import DataError
from campaign.ledger import Ledger
from campaign.manifest import Manifest
from campaign.models import Message, RowState, Skip, SkipReason
from campaign.pipeline._rows import Reuse, RowCheck, cells_digest, check_rows, collecting_less
from campaign.plan import Job
from campaign.render import Composer, load_message_attachments

__all__ = ["Preflight", "raise_for_problems", "render_job", "run_preflight"]

_SHOWN_IN_ERROR = 1


@dataclass(frozen=True, slots=True)
class Preflight:
    """A checked campaign: the jobs to send, the rows skipped, and the problems found."""

    manifest: Manifest
    composer: Composer
    jobs: tuple[Job, ...]  # every row that passed, settled ones included (the plan lists them all)
    skips: tuple[Skip, ...]
    problems: tuple[str, ...]
    to_send: int = 0  # the jobs a run sends: not settled in the ledger
    # Each job's cells digest (`cells_digest`), in `jobs` order; None for a row sent already (its cells
    # no longer matter, and a million digests cost seconds).
    cells: tuple[str | None, ...] = ()

    def render(self, job: Job) -> Message:
        """Render the message for `job` and read its attachment files (shared ones once per run)."""
        return render_job(self.composer, self.manifest, job)

    def raise_for_problems(self) -> None:
        """Raise a one-line DataError naming the first problem, if any were found."""
        raise_for_problems(self.problems)


def raise_for_problems(problems: Sequence[str]) -> None:
    """Raise a one-line DataError naming the first of `problems` and how many more, if there are any."""
    if not problems:
        return
    more = len(problems) - _SHOWN_IN_ERROR
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


def run_preflight(
    manifest: Manifest,
    *,
    secrets: Sequence[bytes] | None,
    skip_invalid: bool,
    ledger: Ledger | None = None,
    on_rows: Callable[[int, int], None] | None = None,
    reuse: Reuse = Reuse.NONE,
) -> Preflight:
    """Every row through the pipeline (`check_rows`), kept as the jobs to send, the skips and the problems.

    `ledger` (the campaign's, when it ran before) keeps each row's sender and says which rows a run
    sends (`to_send`). `on_rows(done, total)` hears of each batch checked (for a progress display).
    `reuse` says which rows need not be rendered again (`Reuse`): they count as checked.

    File-level problems (a missing file, a bad header, a template that does not
    compile) raise at once; row-level problems are collected. With `skip_invalid`,
    bad rows become skips and the problems list is empty.
    """
    pipeline = check_rows(manifest, secrets=secrets, ledger=ledger, reuse=reuse)
    source = manifest.recipients.source.name
    jobs: list[Job] = []
    cells: list[str | None] = []
    skips: list[Skip] = []
    problems: list[str] = []
    to_send = 0
    total, done = pipeline.scan.row_count, 0
    with collecting_less():
        for batch in pipeline.batches():
            if on_rows is not None:
                done += len(batch)
                on_rows(done, total)
            for checked in batch:
                if checked.job is not None and (checked.message is not None or checked.reused):
                    jobs.append(checked.job)
                    sent = checked.settled == RowState.SENT.value
                    digest = checked.cells or cells_digest(checked.job.recipient.fields)
                    cells.append(None if sent else digest)
                    to_send += checked.settled is None
                elif checked.checked.skip is not None:
                    skips.append(checked.checked.skip)
                elif skip_invalid:
                    skips.append(_invalid_skip(checked, source))
                elif checked.error is not None:
                    problems.append(f"{source} {checked.error}")
                else:
                    problems.extend(problem.describe(source) for problem in checked.checked.problems)
    return Preflight(
        manifest=manifest,
        composer=pipeline.composer,
        jobs=tuple(jobs),
        skips=tuple(skips),
        problems=tuple(problems),
        to_send=to_send,
        cells=tuple(cells),
    )


def _invalid_skip(checked: RowCheck, source: str) -> Skip:
    """A row that fails its checks, skipped (--skip-invalid) with every reason."""
    if checked.job is not None and checked.error is not None:
        recipient = checked.job.recipient
        text = f"{source} {checked.error}"
        return Skip(recipient.row, recipient.key, recipient.address.email, SkipReason.INVALID, text)
    detail = "; ".join(f"{problem.where}: {problem.message}" for problem in checked.checked.problems)
    return Skip(checked.row, f"row:{checked.row}", "", SkipReason.INVALID, detail)
