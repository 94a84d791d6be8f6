"""Settling and acting on a run's outcomes: `reconcile` (ask the API about unknown rows), `retry` (move
failed or unknown rows back to pending) and `report` (one row per recipient to CSV or Parquet).

They work on an existing ledger and send nothing.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Annotated

import anyio
import typer

from campaign.cli.base import EXIT_DONE, EXIT_NOT_ALL_SENT, ManifestArg, err, exit_codes, options, out
from campaign.cli.output import (
    print_json,
    print_next_steps,
    print_reconciled,
    print_report_written,
    print_retried,
)
from campaign.cli.wiring import connect_api, open_campaign_ledger, read_api_key, require_ledger
from campaign.errors import UsageError
from campaign.ledger import Ledger
from campaign.manifest import Manifest, load_manifest
from campaign.models import RowState
from campaign.reconcile import ReconcileReport, Verdict, reconcile_unknown
from campaign.report import build_report, write_report
from campaign.status import build_status
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
) -> None:
    """Settle rows whose fate is unknown: ask the API whether each message went out. Sends nothing."""
    with exit_codes():
        try:
            settle = parse_duration(min_age)
        except ValueError as exc:
            raise UsageError(f"--min-age: {exc}") from exc
        loaded = load_manifest(manifest)
        path = require_ledger(loaded, manifest, sandbox=False)
        api_key = read_api_key(loaded)
        ledger = open_campaign_ledger(loaded, path, exclusive=True)
        try:
            ledger.record_expired_claims()
            found = anyio.run(_reconcile, loaded, ledger, api_key, settle)
            steps = build_status(loaded, ledger, clock=options.clock, command_path=str(manifest))["next"]
        finally:
            ledger.close()
        decisions = [asdict(decision) for decision in found.decisions]
        if as_json:
            decide_after = None if found.decide_after is None else found.decide_after.isoformat()
            print_json(
                out,
                {
                    "decisions": decisions,
                    "in_flight": found.in_flight,
                    "decide_after": decide_after,
                    "next": steps,
                },
            )
        else:
            print_reconciled(out, decisions, in_flight=found.in_flight, decide_after=found.decide_after)
            print_next_steps(out, steps)
        raise typer.Exit(EXIT_NOT_ALL_SENT if found.count(Verdict.UNKNOWN) else EXIT_DONE)


def retry(
    manifest: ManifestArg,
    failed: Annotated[bool, typer.Option("--failed", help="Retry the rows that failed permanently.")] = False,
    unknown: Annotated[
        bool, typer.Option("--unknown", help="Retry unknown rows unchecked (`reconcile` checks them first).")
    ] = False,
    sandbox: LedgerSandboxOpt = False,
) -> None:
    """Move failed (or unknown) rows back to pending with a new key; then `resume` sends them."""
    with exit_codes():
        states = [s for s, wanted in ((RowState.FAILED, failed), (RowState.UNKNOWN, unknown)) if wanted]
        if not states:
            raise UsageError("say which rows to retry: --failed, --unknown, or both")
        loaded = load_manifest(manifest)
        path = require_ledger(loaded, manifest, sandbox=sandbox)
        ledger = open_campaign_ledger(loaded, path, exclusive=True)
        try:
            flags = " ".join(f"--{state.value}" for state in states)
            moved = ledger.record_retry_all(states, note=f"campaign retry {flags}")
        finally:
            ledger.close()
        if unknown and moved:
            err.print(
                "note: unknown rows may have gone out already; retried unchecked, they can be mailed twice "
                "(`campaign reconcile` checks each one first)"
            )
        resume_command = f"campaign resume {manifest}" + (" --sandbox" if sandbox else "")
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
) -> None:
    """Write one row per recipient (state, sender, attempts, message id, error, times) to CSV or Parquet."""
    with exit_codes():
        loaded = load_manifest(manifest)
        path = require_ledger(loaded, manifest, sandbox=sandbox)
        ledger = open_campaign_ledger(loaded, path, read_only=True)
        try:
            frame = build_report(ledger.rows(states=state or None))
        finally:
            ledger.close()
        write_report(frame, out_file)
        held = Counter(str(value) for value in frame["state"])
        print_report_written(out, path=out_file, rows=frame.height, states=dict(held))


async def _reconcile(manifest: Manifest, ledger: Ledger, api_key: str, min_age: timedelta) -> ReconcileReport:
    clock = options.clock
    async with connect_api(manifest, api_key=api_key, clock=clock) as client:
        return await reconcile_unknown(
            ledger,
            campaign=manifest.campaign.name,
            senders=manifest.senders,
            client=client,
            now=clock.now(),
            min_age=min_age,
        )
