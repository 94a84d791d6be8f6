"""Sending the campaign: `run` and `resume`, which check every row, record the plan in the ledger, send
through `dispatch` (Ctrl-C stops it gracefully), persist quota parks, and choose the exit code.

`resume` is `run` that requires the ledger to exist; neither does anything `campaign preview` would not
check first.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Annotated, NoReturn

import anyio
import typer

from campaign.cli.base import (
    EXIT_AUTH,
    EXIT_DONE,
    EXIT_INTERRUPTED,
    EXIT_NOT_ALL_SENT,
    EXIT_RESUMABLE,
    ManifestArg,
    SandboxOpt,
    SkipInvalidOpt,
    err,
    exit_codes,
    options,
    out,
)
from campaign.cli.inspecting import preview
from campaign.cli.output import print_checked, print_deliveries, print_next_steps, print_run_summary
from campaign.cli.progress import SendProgress
from campaign.cli.wiring import (
    build_sandbox_api,
    connect_api,
    locate_ledger,
    open_campaign_ledger,
    read_api_key,
    read_secrets,
)
from campaign.clock import Clock
from campaign.dispatch import DispatchResult, DispatchSettings, dispatch, run_interruptible
from campaign.errors import DataError, InputFileError, LedgerError, UsageError
from campaign.ledger import (
    Ledger,
    PlannedRow,
    SyncReport,
    check_key_scheme,
    check_ledger_free,
    lock_ledger,
    record_key_scheme,
    unlock_ledger,
)
from campaign.manifest import Manifest, load_manifest
from campaign.models import RowState
from campaign.pipeline import (
    PLAN_STAMP_KEY,
    ContentCheck,
    Preflight,
    check_content,
    check_job,
    load_content_fingerprint,
    load_open_jobs,
    load_plan_stamp,
    record_content,
    render_job,
    run_preflight,
)
from campaign.plan import DAY_S, Job
from campaign.render import Composer, build_composer
from campaign.status import build_status
from campaign.testing import FakeNylas
from campaign.unsubscribe import UnsubscribeWatch, list_store_paths

__all__ = ["resume", "run"]

_OPEN = (RowState.PENDING, RowState.INFLIGHT)

YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
LimitOpt = Annotated[int | None, typer.Option(min=1, help="Send at most N messages this run.")]
WaitOpt = Annotated[
    bool,
    typer.Option(
        "--wait", help="When every sender is at its quota, wait (with a countdown) instead of stopping."
    ),
]
AllowChangedOpt = Annotated[
    bool,
    typer.Option(
        "--allow-changed-content",
        help="Send the rest even though the subject, a template or a header changed since sending "
        "began (the change is recorded in the ledger).",
    ),
]


@dataclass(frozen=True, slots=True)
class _RunChoices:
    """The options `run` and `resume` share, as given on the command line."""

    yes: bool
    limit: int | None
    sandbox: bool
    skip_invalid: bool
    wait: bool
    allow_changed_content: bool


def run(
    manifest: ManifestArg,
    yes: YesOpt = False,
    limit: LimitOpt = None,
    sandbox: SandboxOpt = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Same as `campaign preview`.")] = False,
    skip_invalid: SkipInvalidOpt = False,
    wait: WaitOpt = False,
    allow_changed_content: AllowChangedOpt = False,
) -> None:
    """Send the campaign (continues where an earlier run stopped)."""
    if dry_run:
        preview(manifest, sandbox=sandbox, skip_invalid=skip_invalid)
        return
    choices = _RunChoices(yes, limit, sandbox, skip_invalid, wait, allow_changed_content)
    _send_and_exit(manifest, choices, resuming=False)


def resume(
    manifest: ManifestArg,
    yes: YesOpt = False,
    limit: LimitOpt = None,
    sandbox: SandboxOpt = False,
    skip_invalid: SkipInvalidOpt = False,
    wait: WaitOpt = False,
    allow_changed_content: AllowChangedOpt = False,
) -> None:
    """Continue a campaign after a quota stop, crash or Ctrl-C (needs its ledger)."""
    choices = _RunChoices(yes, limit, sandbox, skip_invalid, wait, allow_changed_content)
    _send_and_exit(manifest, choices, resuming=True)


def _send_and_exit(manifest: Path, choices: _RunChoices, *, resuming: bool) -> NoReturn:
    with exit_codes():
        raise typer.Exit(_run(manifest, choices, resuming=resuming))


def _run(path: Path, choices: _RunChoices, *, resuming: bool) -> int:
    sandbox = choices.sandbox
    manifest = load_manifest(path)
    ledger_path = locate_ledger(manifest, sandbox=sandbox)
    if resuming and not ledger_path.exists():
        message = f"{ledger_path}: no ledger, so nothing to resume; start with `campaign run {path}`"
        raise InputFileError(message)
    check_ledger_free(ledger_path)  # before anything is printed: a refused run says nothing of a plan
    api_key = read_api_key(manifest, sandbox=sandbox)
    secrets = read_secrets(manifest, sandbox=sandbox)
    fingerprint = load_content_fingerprint(manifest)
    stamp = load_plan_stamp(manifest, content=fingerprint, skip_invalid=choices.skip_invalid)
    plan = _check_plan(manifest, ledger_path, stamp, secrets=secrets, skip_invalid=choices.skip_invalid)
    content = _check_content(manifest, ledger_path, fingerprint, allow=choices.allow_changed_content)
    # The writer lock is taken before the plan is printed and held through the confirmation: a run
    # refused for a busy ledger (or one whose lock cannot be made) says nothing of what it would send.
    lock = _lock_ledger(ledger_path)
    try:
        print_checked(
            out,
            source=manifest.recipients.source.name,
            to_send=plan.to_send,
            skipped=plan.skipped,
            unchanged=plan.preflight is None,
        )
        _confirm(plan.to_send, manifest, yes=choices.yes, sandbox=sandbox)
        return _record_and_send(manifest, path, ledger_path, plan, stamp, content, api_key, choices)
    finally:
        unlock_ledger(lock)


def _lock_ledger(ledger_path: Path) -> int:
    """Take the ledger's writer lock, making the sandbox ledger's folder if need be."""
    try:
        ledger_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        message = f"{ledger_path.parent}: cannot make the ledger's folder ({exc.strerror or exc})"
        raise LedgerError(message) from exc
    return lock_ledger(ledger_path)


def _record_and_send(
    manifest: Manifest,
    path: Path,
    ledger_path: Path,
    plan: _Plan,
    stamp: str,
    content: ContentCheck,
    api_key: str,
    choices: _RunChoices,
) -> int:
    """Record the confirmed plan and send it (the caller holds the writer lock); return the exit code."""
    clock = options.clock
    sandbox = choices.sandbox
    ledger = open_campaign_ledger(manifest, ledger_path, create=True)
    try:
        sync = _record_plan(ledger, plan.preflight, stamp)
        record_content(ledger, content)
        record_key_scheme(ledger, manifest)
        ledger.record_moved_mailboxes({sender.mailbox: sender.name for sender in manifest.senders})
        ledger.record_expired_claims()
        jobs = _open_jobs(manifest, ledger, plan, stamp)
        fake = build_sandbox_api(manifest) if sandbox else None
        settings = DispatchSettings(limit=choices.limit, wait=choices.wait)
        work = partial(_send, manifest, plan.composer, jobs, ledger, api_key, clock, settings, fake)
        interrupted = anyio.run(partial(run_interruptible, work, on_signal=_say_stopping))
        result = interrupted.result
        if result is not None:
            _record_parks(ledger, result, manifest)
        states = {state.value: count for state, count in ledger.counts(listed=True).items()}
        steps = build_status(
            manifest, ledger, clock=clock, command_path=str(path), sandbox=sandbox
        ).next_steps
    finally:
        ledger.close()
    _print_sync(content, sync.newly_skipped, sync.restored)
    if fake is not None:
        _print_sandbox_outbox(fake, manifest, ledger_path.parent / "outbox")
    if result is None:  # a second Ctrl-C: cancelled at once
        out.print("Stopped at once (second Ctrl-C): sends in flight stay in flight; resume settles them.")
        print_next_steps(out, steps)
        return EXIT_INTERRUPTED
    print_run_summary(out, result, states=states, next_steps=steps)
    return EXIT_INTERRUPTED if interrupted.signals else _exit_code(result, states)


@dataclass(frozen=True, slots=True)
class _Plan:
    """What this run will send: checked now (`preflight`), or unchanged since a run that checked it (None)."""

    composer: Composer
    preflight: Preflight | None
    to_send: int
    skipped: Mapping[str, int]


def _check_plan(
    manifest: Manifest, ledger_path: Path, stamp: str, *, secrets: Sequence[bytes] | None, skip_invalid: bool
) -> _Plan:
    """Check every row, unless the ledger's plan stamp says nothing changed since a run that did.

    Read only: the plan is recorded after confirmation. With a million rows, checking
    them all takes minutes; a resume of an unchanged campaign reads only its open rows.
    """
    if ledger_path.exists():
        ledger = open_campaign_ledger(manifest, ledger_path)
        try:
            unchanged = ledger.get_meta(PLAN_STAMP_KEY) == stamp
            composer = build_composer(manifest, secrets=secrets) if unchanged else None
            if composer is not None and _files_still_there(manifest, composer, ledger):
                counts = ledger.counts(listed=True)
                skipped = {"skipped earlier": counts[RowState.SKIPPED]} if counts[RowState.SKIPPED] else {}
                to_send = counts[RowState.PENDING] + counts[RowState.INFLIGHT]
                return _Plan(composer, None, to_send, skipped)
            assigned = ledger.assigned_senders()
            # Only pending and in-flight rows are sent; unknown ones wait for `campaign reconcile`.
            settled = ledger.key_states([state for state in RowState if state not in _OPEN])
        finally:
            ledger.close()
    else:
        assigned, settled = {}, {}
    preflight = run_preflight(manifest, secrets=secrets, skip_invalid=skip_invalid, assigned=assigned)
    preflight.raise_for_problems()
    to_send = sum(1 for job in preflight.jobs if job.recipient.key not in settled)
    skipped = Counter(skip.reason.value for skip in preflight.skips)
    return _Plan(preflight.composer, preflight, to_send, skipped)


def _files_still_there(manifest: Manifest, composer: Composer, ledger: Ledger) -> bool:
    """Whether every open row's attachment files are still found and fit (the plan stamp does not
    cover them); if one is not, the full check runs and says which, before anything is recorded."""
    if not manifest.message.attachments:
        return True
    return not any(
        isinstance(check_job(composer, manifest, job), DataError) for job in load_open_jobs(manifest, ledger)
    )


def _record_plan(ledger: Ledger, preflight: Preflight | None, stamp: str) -> SyncReport:
    """Record a freshly checked plan, and its stamp (so that an unchanged resume need not check again)."""
    if preflight is None:
        return SyncReport(added=0, skipped_added=0, existing=0, missing=0)
    planned = [
        PlannedRow(job.recipient.key, job.recipient.row, job.recipient.address.email, job.sender)
        for job in preflight.jobs
    ]
    # One transaction: a stamp must never describe rows recorded for another list.
    with ledger.batch():
        sync = ledger.record_plan(planned, preflight.skips)
        ledger.set_meta(PLAN_STAMP_KEY, stamp)
    return sync


async def _send(
    manifest: Manifest,
    composer: Composer,
    jobs: Sequence[Job],
    ledger: Ledger,
    api_key: str,
    clock: Clock,
    settings: DispatchSettings,
    fake: FakeNylas | None,
    stop: anyio.Event | None = None,
) -> DispatchResult:
    since = clock.now().timestamp() - DAY_S
    # Only daily limits look back; a sender without one would load its whole day's sends for nothing.
    history = {
        sender.name: ledger.sent_recipients_since(sender.name, since)
        for sender in manifest.senders
        if sender.per_day is not None or sender.per_day_messages is not None
    }
    async with connect_api(manifest, api_key=api_key, clock=clock, fake=fake) as client:
        with SendProgress(out, total=len(jobs), senders=manifest.senders, clock=clock) as progress:
            for sender in manifest.senders:
                used = sum(count for _, count in history.get(sender.name, ()))
                left = None if sender.per_day is None else max(0, sender.per_day - used)
                share = sum(1 for job in jobs if job.sender == sender.name)
                progress.set_share(sender.name, share, budget_left=left)
            # Issue 5: re-read the unsubscribe stores (about once a second) so a mid-run unsubscribe holds.
            stores = list_store_paths(manifest)
            watch = UnsubscribeWatch(stores, clock=clock)
            try:
                return await dispatch(
                    jobs,
                    senders=manifest.senders,
                    render=partial(render_job, composer, manifest),
                    client=client,
                    ledger=ledger,
                    clock=clock,
                    history=history,
                    parked=_load_parks(ledger, manifest),
                    on_event=progress.handle,
                    settings=settings,
                    unsubscribed=watch.is_unsubscribed if stores else None,
                    stop=stop,
                    # Rows in flight from an earlier run keep their grant (their key may be used).
                    bound={row.key for row in ledger.rows(states=(RowState.INFLIGHT,))},
                )
            finally:
                watch.close()


def _load_parks(ledger: Ledger, manifest: Manifest) -> dict[str, datetime]:
    """Senders parked by an earlier run (a quota refusal), persisted so a resume does not retry early."""
    parks = {}
    for sender in manifest.senders:
        stored = ledger.get_meta(f"parked_until:{sender.name}")
        if stored:
            parks[sender.name] = datetime.fromisoformat(stored)
    return parks


def _record_parks(ledger: Ledger, result: DispatchResult, manifest: Manifest) -> None:
    for sender in manifest.senders:
        until = result.parked.get(sender.name)
        ledger.set_meta(f"parked_until:{sender.name}", until.isoformat() if until is not None else "")


def _check_content(manifest: Manifest, ledger_path: Path, fingerprint: str, *, allow: bool) -> ContentCheck:
    """Compare this run's key scheme and content `fingerprint` with the ledger's (read only: recorded
    after confirmation)."""
    if not ledger_path.exists():
        return check_content(None, fingerprint, allow_changed=allow, manifest=manifest)
    ledger = open_campaign_ledger(manifest, ledger_path)
    try:
        check_key_scheme(ledger, manifest)
        return check_content(ledger, fingerprint, allow_changed=allow, manifest=manifest)
    finally:
        ledger.close()


def _open_jobs(manifest: Manifest, ledger: Ledger, plan: _Plan, stamp: str) -> list[Job]:
    """The jobs whose rows still need a send; rows left in flight first (their keys age)."""
    if plan.preflight is None:
        if ledger.get_meta(PLAN_STAMP_KEY) != stamp:  # another command recorded a plan meanwhile
            message = f"{ledger.path}: another command changed the ledger while this one started; run again"
            raise LedgerError(message)
        return load_open_jobs(manifest, ledger)
    inflight = {row.key: row.inflight for row in ledger.open_rows()}
    wanted = [job for job in plan.preflight.jobs if job.recipient.key in inflight]
    return sorted(wanted, key=lambda job: not inflight[job.recipient.key])


def _confirm(count: int, manifest: Manifest, *, yes: bool, sandbox: bool) -> None:
    if yes or count == 0:
        return
    where = "to the sandbox" if sandbox else "for real"
    question = f"Send {count:,} messages from {len(manifest.senders)} senders {where}?"
    if not sys.stdin.isatty():
        message = f"{question} There is no terminal to confirm on; pass --yes to send"
        raise UsageError(message)
    if not typer.confirm(question):
        raise typer.Exit(EXIT_DONE)


def _say_stopping(signals: int) -> None:
    if signals == 1:
        err.print(
            "Stopping: no new sends; waiting for the sends in flight to finish and be recorded "
            "(Ctrl-C again to quit at once)"
        )
    else:
        err.print("Quitting now: rows in flight stay in flight; `campaign resume` settles them")


def _print_sync(content: ContentCheck, newly_skipped: int, restored: int) -> None:
    if content.changed:
        out.print("The content changed since sending began: sent with --allow-changed-content, and recorded.")
    if newly_skipped:
        out.print(f"{newly_skipped} rows not sent yet are now skipped (suppressed, unsubscribed or invalid).")
    if restored:
        out.print(f"{restored} rows skipped earlier as invalid now validate and are pending again.")


def _print_sandbox_outbox(fake: FakeNylas, manifest: Manifest, outbox: Path) -> None:
    """Write what the sandbox received to `outbox` and list it (sender, recipient, subject)."""
    fake.write_outbox(outbox)
    grants = {sender.route: sender.name for sender in manifest.senders}
    print_deliveries(
        out,
        [
            (grants.get(d.grant_id, d.grant_id), d.payload["to"][0]["email"], d.payload.get("subject", ""))
            for d in fake.deliveries
        ],
        outbox,
    )


def _exit_code(result: DispatchResult, states: dict[str, int]) -> int:
    if result.auth_refused:
        return EXIT_AUTH
    if result.remaining or states["pending"] or states["inflight"]:
        return EXIT_RESUMABLE
    if states["failed"] or states["unknown"]:
        return EXIT_NOT_ALL_SENT
    return EXIT_DONE
