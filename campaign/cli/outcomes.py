"""Settling and acting on a run's outcomes: `reconcile` (ask the API about unknown rows), `retry` (move
failed or unknown rows back to pending) and `report` (one row per recipient to CSV or Parquet).

They work on an existing ledger and send nothing. Each command parses its options, calls its use case
(`campaign.reconcile`, `campaign.retry`, `campaign.report`), prints what it returns and picks the exit code.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Annotated

import typer

from campaign.cli.base import (
    EXIT_DONE,
    EXIT_NOT_ALL_SENT,
    EXIT_RESUMABLE,
    LedgerOpt,
    ManifestArg,
    err,
    exit_codes,
    options,
    out,
)
from campaign.cli.output import (
    print_json,
    print_next_steps,
    print_reconciled,
    print_report_written,
    print_retried,
)
from campaign.cli.wiring import command_path, connect_api, load_campaign, read_api_key, require_ledger
from campaign.errors import UsageError
from campaign.models import RowState
from campaign.reconcile import reconcile_campaign
from campaign.report import write_report
from campaign.retry import retry_rows
from campaign.timetext import parse_duration

__all__ = ["reconcile", "report", "retry"]

LedgerSandboxOpt = Annotated[bool, typer.Option("--sandbox", help="Use the sandbox run's ledger.")]


def reconcile(
    manifest: ManifestArg,
    as_json: Annotated[bool, typer.Option("--json", help="Print the decisions as JSON.")] = False,
    min_age: Annotated[
        str,
        typer.Option(
            "--min-age",
            help="Conclude 'not sent' only for rows last sent longer ago than this (90s, 15m, 1h).",
        ),
    ] = "15m",
    ledger: LedgerOpt = None,
) -> None:
    """Settle rows whose fate is unknown: ask the API whether each message went out. Sends nothing."""
    with exit_codes():
        try:
            settle = parse_duration(min_age)
        except ValueError as exc:
            raise UsageError(f"--min-age: {exc}") from exc
        loaded = load_campaign(manifest)
        site = require_ledger(loaded, manifest, sandbox=False, url=ledger)
        clock = options.clock
        connect = partial(connect_api, loaded, api_key=read_api_key(loaded), clock=clock)
        done = reconcile_campaign(
            loaded,
            site,
            connect=connect,
            clock=clock,
            min_age=settle,
            command_path=command_path(manifest, ledger),
        )
        if as_json:
            print_json(out, done.as_json())
        else:
            print_reconciled(out, done.report)
            print_next_steps(out, done.next_steps)
        # Rows left unknown only for now (the API down or asking to wait): "try again later", as a run's.
        raise typer.Exit(
            EXIT_DONE if done.settled else EXIT_RESUMABLE if done.retry_later else EXIT_NOT_ALL_SENT
        )


def retry(
    manifest: ManifestArg,
    failed: Annotated[bool, typer.Option("--failed", help="Retry the rows that failed permanently.")] = False,
    unknown: Annotated[
        bool, typer.Option("--unknown", help="Retry unknown rows unchecked (`reconcile` checks them first).")
    ] = False,
    sandbox: LedgerSandboxOpt = False,
    ledger: LedgerOpt = None,
) -> None:
    """Move failed (or unknown) rows back to pending with a new key; then `resume` sends them."""
    with exit_codes():
        states = [s for s, wanted in ((RowState.FAILED, failed), (RowState.UNKNOWN, unknown)) if wanted]
        if not states:
            raise UsageError("say which rows to retry: --failed, --unknown, or both")
        loaded = load_campaign(manifest)
        site = require_ledger(loaded, manifest, sandbox=sandbox, url=ledger)
        moved = retry_rows(loaded, site, states=states, clock=options.clock)
        if unknown and moved:
            err.print(
                "note: unknown rows may have gone out already; retried unchecked, they can be mailed twice "
                "(`campaign reconcile` checks each one first)"
            )
        resume_command = f"campaign resume {command_path(manifest, ledger)}" + (
            " --sandbox" if sandbox else ""
        )
        print_retried(out, moved=moved, states=[s.value for s in states], resume_command=resume_command)


def report(
    manifest: ManifestArg,
    out_file: Annotated[
        Path, typer.Option("--out", help="The file to write: .csv or .parquet.", show_default=False)
    ],
    state: Annotated[
        list[RowState] | None, typer.Option("--state", help="Only rows in this state (repeatable).")
    ] = None,
    sandbox: LedgerSandboxOpt = False,
    ledger: LedgerOpt = None,
) -> None:
    """Write one row per recipient (state, sender, attempts, message id, error, times) to CSV or Parquet."""
    with exit_codes():
        loaded = load_campaign(manifest)
        site = require_ledger(loaded, manifest, sandbox=sandbox, url=ledger)
        written = write_report(loaded, site, out_file, states=state, clock=options.clock)
        print_report_written(out, written)
