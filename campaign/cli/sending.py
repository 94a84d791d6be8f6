"""`campaign run` and `campaign resume`: options in, `campaign.run.run_campaign`, the terminal out.

This module shows the plan and asks to confirm it, shows the live progress, says what Ctrl-C
does, prints the summary and picks the exit code; the use case does the rest. `resume` is `run`
that requires the ledger to exist.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from campaign.cli.base import (
    EXIT_AUTH,
    EXIT_DONE,
    EXIT_INTERRUPTED,
    EXIT_NOT_ALL_SENT,
    EXIT_REFUSED,
    EXIT_RESUMABLE,
    LedgerOpt,
    ManifestArg,
    SandboxOpt,
    SkipInvalidOpt,
    err,
    exit_codes,
    options,
    out,
)
from campaign.cli.inspecting import preview
from campaign.cli.output import plural, print_checked, print_deliveries, print_next_steps, print_run_summary
from campaign.cli.progress import SendProgress, show_checking, show_waiting
from campaign.cli.wiring import (
    build_sandbox_api,
    command_path,
    connect_api,
    load_campaign,
    locate_ledger,
    prepare_sandbox_outbox,
    read_api_key,
    read_secrets,
    require_ledger,
    sandbox_outbox_path,
    write_sandbox_outbox,
)
from campaign.clock import Clock
from campaign.dispatch import DispatchEvent, DispatchResult
from campaign.errors import UsageError
from campaign.ledger import SyncReport
from campaign.manifest import Manifest
from campaign.pipeline import ContentCheck
from campaign.run import RunOptions, RunPlan, SenderShare, run_campaign
from campaign.timetext import format_local_time

__all__ = ["resume", "run"]

YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
LimitOpt = Annotated[int | None, typer.Option(min=1, help="Send at most N messages this run.")]
WaitOpt = Annotated[
    bool,
    typer.Option(
        "--wait",
        help="When every sender with work left is at its quota or outside its window, or the next follow-up "
        "is not due yet, wait (with a countdown) and go on instead of stopping with exit 75; an API that "
        "cannot be reached is tried again.",
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
    ledger: str | None


DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Same as `campaign preview`.")]


def run(
    manifest: ManifestArg,
    yes: YesOpt = False,
    limit: LimitOpt = None,
    sandbox: SandboxOpt = False,
    dry_run: DryRunOpt = False,
    skip_invalid: SkipInvalidOpt = False,
    wait: WaitOpt = False,
    allow_changed_content: AllowChangedOpt = False,
    ledger: LedgerOpt = None,
) -> None:
    """Send the campaign (continues where an earlier run stopped)."""
    if dry_run:
        preview(manifest, sandbox=sandbox, skip_invalid=skip_invalid, ledger=ledger)
        return
    choices = _RunChoices(yes, limit, sandbox, skip_invalid, wait, allow_changed_content, ledger)
    _send_and_exit(manifest, choices, resuming=False)


def resume(
    manifest: ManifestArg,
    yes: YesOpt = False,
    limit: LimitOpt = None,
    sandbox: SandboxOpt = False,
    dry_run: DryRunOpt = False,
    skip_invalid: SkipInvalidOpt = False,
    wait: WaitOpt = False,
    allow_changed_content: AllowChangedOpt = False,
    ledger: LedgerOpt = None,
) -> None:
    """Continue a campaign after a quota stop, crash or Ctrl-C (needs its ledger)."""
    if dry_run:
        with exit_codes():  # as resume itself: nothing to resume without the ledger (exit 66)
            require_ledger(load_campaign(manifest), manifest, sandbox=sandbox, url=ledger)
        preview(manifest, sandbox=sandbox, skip_invalid=skip_invalid, ledger=ledger)
        return
    choices = _RunChoices(yes, limit, sandbox, skip_invalid, wait, allow_changed_content, ledger)
    _send_and_exit(manifest, choices, resuming=True)


def _send_and_exit(path: Path, choices: _RunChoices, *, resuming: bool) -> NoReturn:
    with exit_codes():
        raise typer.Exit(_run(path, choices, resuming=resuming))


def _run(path: Path, choices: _RunChoices, *, resuming: bool) -> int:
    sandbox = choices.sandbox
    manifest = load_campaign(path)
    site = locate_ledger(manifest, sandbox=sandbox, url=choices.ledger)
    api_key = read_api_key(manifest, sandbox=sandbox)
    secrets = read_secrets(manifest, sandbox=sandbox)
    fake = build_sandbox_api(manifest, clock=options.clock) if sandbox else None
    run_options = RunOptions(
        resuming=resuming,
        limit=choices.limit,
        skip_invalid=choices.skip_invalid,
        wait=choices.wait,
        allow_changed_content=choices.allow_changed_content,
        sandbox=sandbox,
    )
    clock = options.clock
    outcome = run_campaign(
        manifest,
        site,
        run_options,
        secrets=secrets,
        connect=partial(connect_api, manifest, api_key=api_key, clock=clock, fake=fake),
        clock=clock,
        hooks=_Hooks(manifest, yes=choices.yes, sandbox=sandbox, clock=clock),
        command_path=command_path(path, choices.ledger),
    )
    if outcome is None:
        return EXIT_DONE
    _print_sync(outcome.content, outcome.sync)
    if fake is not None:
        first = write_sandbox_outbox(fake, manifest)
        print_deliveries(out, fake, manifest, sandbox_outbox_path(manifest), first=first)
    if outcome.result is None:  # a second Ctrl-C: cancelled at once
        out.print("Stopped at once (second Ctrl-C): sends in flight stay in flight; resume settles them.")
        print_next_steps(out, outcome.next_steps)
        return EXIT_INTERRUPTED
    print_run_summary(out, outcome.result, states=dict(outcome.states), next_steps=outcome.next_steps)
    if outcome.next_due is not None:
        out.print(
            f"The next follow-up is due at {format_local_time(outcome.next_due)}: run `campaign resume` "
            "then (or keep one running with --wait)."
        )
    return EXIT_INTERRUPTED if outcome.signals else _exit_code(outcome.result, outcome.states)


class _Hooks:
    """The run's turns on a terminal: the plan and its confirmation, the live progress, Ctrl-C."""

    def __init__(self, manifest: Manifest, *, yes: bool, sandbox: bool, clock: Clock) -> None:
        self._manifest = manifest
        self._yes = yes
        self._sandbox = sandbox
        self._clock = clock

    def confirm(self, plan: RunPlan) -> bool:
        if self._sandbox:  # checked and not yet recorded: an outbox it cannot write stops it, nothing sent
            prepare_sandbox_outbox(self._manifest)
        print_checked(
            out,
            source=plan.source.name,
            to_send=plan.to_send,
            skipped=plan.skipped,
            unchanged=plan.unchanged,
            appended=plan.appended,
            notes=plan.notes,
        )
        return _confirm(plan.to_send, plan.senders, yes=self._yes, sandbox=self._sandbox)

    @contextmanager
    def progress(
        self, total: int, shares: Sequence[SenderShare]
    ) -> Iterator[Callable[[DispatchEvent], None]]:
        with SendProgress(out, total=total, senders=self._manifest.senders, clock=self._clock) as progress:
            for share in shares:
                progress.set_share(share.sender, share.messages, budget_left=share.budget_left)
            yield progress.handle

    def stopping(self, signals: int) -> None:
        _say_stopping(signals)

    def checking(self) -> AbstractContextManager[Callable[[int, int], None]]:
        return show_checking(err, clock=self._clock)

    def waiting(
        self, until: datetime, scheduled: int, *, waiting: Sequence[str] = ()
    ) -> AbstractContextManager[None]:
        return show_waiting(out, until=until, scheduled=scheduled, waiting=waiting, clock=self._clock)


def _confirm(count: int, senders: int, *, yes: bool, sandbox: bool) -> bool:
    if yes or count == 0:
        return True
    where = "to the sandbox" if sandbox else "for real"
    question = (
        f"Send {count:,} {plural(count, 'message')} from {senders} {plural(senders, 'sender')} {where}?"
    )
    if not sys.stdin.isatty():
        message = f"{question} There is no terminal to confirm on; pass --yes to send"
        raise UsageError(message)
    return typer.confirm(question)


def _say_stopping(signals: int) -> None:
    if signals == 1:
        err.print(
            "Stopping: no new sends; waiting for the sends in flight to finish and be recorded "
            "(Ctrl-C again to quit at once)"
        )
    else:
        err.print("Quitting now: rows in flight stay in flight; `campaign resume` settles them")


def _print_sync(content: ContentCheck, sync: SyncReport) -> None:
    newly_skipped, restored, undoubled = sync.newly_skipped, sync.restored, sync.undoubled
    if content.changed:
        out.print("The content changed since sending began: sent with --allow-changed-content, and recorded.")
    if newly_skipped == 1:
        out.print("1 row not sent yet is now skipped (suppressed, unsubscribed or invalid).")
    elif newly_skipped:
        out.print(f"{newly_skipped} rows not sent yet are now skipped (suppressed, unsubscribed or invalid).")
    if restored == 1:
        out.print("1 row skipped earlier as invalid now validates and is pending again.")
    elif restored:
        out.print(f"{restored} rows skipped earlier as invalid now validate and are pending again.")
    if undoubled == 1:
        out.print("1 row skipped earlier as a duplicate no longer is one and is pending again.")
    elif undoubled:
        out.print(f"{undoubled} rows skipped earlier as duplicates no longer are and are pending again.")


def _exit_code(result: DispatchResult, states: Mapping[str, int]) -> int:
    if result.auth_refused:
        return EXIT_AUTH
    if result.remaining or states["pending"] or states["inflight"]:
        # Rows left by a sender stopped for refused messages wait for a fix, not for time.
        return EXIT_REFUSED if result.rejecting else EXIT_RESUMABLE
    if states["failed"] or states["unknown"]:
        return EXIT_NOT_ALL_SENT
    return EXIT_DONE
