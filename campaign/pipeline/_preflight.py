"""Everything checked before the first send: the list, the senders, and every message rendered.

One bad row stops the run before anything is sent, unless the user asked to
skip bad rows; then they are recorded as skipped with the reason. Nothing here
writes the ledger or sends.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from campaign.errors import DataError
from campaign.manifest import Manifest
from campaign.models import Message, Skip, SkipReason
from campaign.pipeline._compliance import check_body_link
from campaign.pipeline._optouts import skip_unsubscribed
from campaign.plan import Job, assign_senders
from campaign.recipients import Audience, build_invalid_skips, load_audience
from campaign.render import Composer, build_composer, check_message_attachments, load_message_attachments
from campaign.unsubscribe import list_store_paths, load_unsubscribed

__all__ = ["Preflight", "check_job", "raise_for_problems", "render_job", "run_preflight"]

_SHOWN_IN_ERROR = 1


@dataclass(frozen=True, slots=True)
class Preflight:
    """A checked campaign: the jobs to send, the rows skipped, and the problems found."""

    manifest: Manifest
    audience: Audience
    composer: Composer
    jobs: tuple[Job, ...]
    skips: tuple[Skip, ...]
    problems: tuple[str, ...]

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
    """The message to send for a checked `job`, with its attachment files read (shared ones once per run)."""
    message = composer.render(job.recipient, manifest.sender(job.sender))
    return load_message_attachments(message, composer.attachment_loader)


def check_job(composer: Composer, manifest: Manifest, job: Job) -> Message | DataError:
    """Render `job`'s message, or return the row-level error (naming the row) that stops it."""
    try:
        message = composer.render(job.recipient, manifest.sender(job.sender))
        check_body_link(manifest, message)  # Microsoft/iCloud drop the headers: the body link must be there
        check_message_attachments(message, composer.attachment_loader)  # found, sized, within 25 MB
    except DataError as exc:
        return exc
    return message


def run_preflight(
    manifest: Manifest,
    *,
    secrets: Sequence[bytes] | None,
    skip_invalid: bool,
    assigned: Mapping[str, str] | None = None,
) -> Preflight:
    """Load and validate the list, assign senders, render every message; collect problems per row.

    File-level problems (a missing file, a bad header, a template that does not
    compile) raise at once; row-level problems are collected. With `skip_invalid`,
    bad rows become skips and the problems list is empty.
    """
    audience = load_audience(manifest.recipients, sender_names=[sender.name for sender in manifest.senders])
    audience = skip_unsubscribed(audience, load_unsubscribed(list_store_paths(manifest)))
    composer = build_composer(manifest, secrets=secrets)
    source = manifest.recipients.source.name
    jobs: list[Job] = []
    failures: list[tuple[Job, str]] = []
    for job in assign_senders(audience.recipients, manifest.senders, assigned=assigned):
        checked = check_job(composer, manifest, job)
        if isinstance(checked, DataError):
            failures.append((job, f"{source} {checked}"))
        else:
            jobs.append(job)
    row_problems = [problem for problem in audience.problems if problem.row is not None]
    problems = [problem.describe(source) for problem in audience.problems if problem.row is None]
    skips = list(audience.skipped)
    if skip_invalid:
        skips.extend(build_invalid_skips(audience))
        skips.extend(
            Skip(job.recipient.row, job.recipient.key, job.recipient.address.email, SkipReason.INVALID, text)
            for job, text in failures
        )
    else:
        found = [(problem.row or 0, problem.describe(source)) for problem in row_problems]
        found += [(job.recipient.row, text) for job, text in failures]
        problems += [text for _, text in sorted(found, key=lambda item: item[0])]
    return Preflight(
        manifest=manifest,
        audience=audience,
        composer=composer,
        jobs=tuple(jobs),
        skips=tuple(skips),
        problems=tuple(problems),
    )
