"""`campaign events pull`: bounce reports from the senders' inboxes into the campaign's store."""

from __future__ import annotations

from functools import partial

import anyio
import typer

from campaign.cli.base import LedgerOpt, ManifestArg, SandboxOpt, exit_codes, options, out
from campaign.cli.wiring import build_sandbox_api, connect_api, load_campaign, read_api_key, require_ledger
from campaign.events import MAX_PAGES, pull_campaign_bounces

__all__ = ["events_app"]

events_app = typer.Typer(no_args_is_help=True, help="What comes back after sending: bounces, replies.")


@events_app.command("pull")
def pull(manifest: ManifestArg, sandbox: SandboxOpt = False, ledger: LedgerOpt = None) -> None:
    """Find bounce reports in each sender's inbox since the first send and record them in the store."""
    with exit_codes():
        clock = options.clock
        loaded = load_campaign(manifest)
        site = require_ledger(loaded, manifest, sandbox=sandbox, url=ledger)
        api_key = read_api_key(loaded, sandbox=sandbox)
        fake = build_sandbox_api(loaded) if sandbox else None
        connect = partial(connect_api, loaded, api_key=api_key, clock=clock, fake=fake)
        report = anyio.run(partial(pull_campaign_bounces, loaded, site, connect=connect, clock=clock))
        if report is None:
            out.print("Nothing was sent yet: no bounce to look for.")
            return
        out.print(
            f"{report.grants} mailboxes, {report.listed:,} inbox messages looked at, {report.reports} bounce "
            f"reports ({report.recorded} new); {len(report.hard)} addresses failed for good (suppressed), "
            f"{len(report.soft)} for now; {report.calls} API requests",
            soft_wrap=True,
        )
        for grant in report.cut_short:
            out.print(f"grant {grant}: more than {MAX_PAGES * 200:,} inbox messages; pull again for the rest")
