"""`campaign events pull`: bounce reports from the senders' inboxes into the campaign's store."""

from __future__ import annotations

from functools import partial
from typing import Annotated

import anyio
import typer

from campaign.cli.base import LedgerOpt, ManifestArg, exit_codes, options, out
from campaign.cli.output import plural
from campaign.cli.wiring import (
    build_sandbox_api,
    connect_api,
    load_campaign,
    read_api_key,
    read_secrets,
    require_ledger,
)
from campaign.errors import ManifestError
from campaign.events import MAX_PAGES, pull_campaign_bounces
from campaign.manifest import Manifest

__all__ = ["events_app"]

events_app = typer.Typer(no_args_is_help=True, help="What comes back after sending: bounces, replies.")


@events_app.command("pull")
def pull(
    manifest: ManifestArg,
    sandbox: Annotated[
        bool,
        typer.Option(
            "--sandbox",
            help="Use the sandbox run's ledger, and look in the built-in fake Nylas API's inboxes instead of "
            "the real ones.",
        ),
    ] = False,
    ledger: LedgerOpt = None,
) -> None:
    """Find bounce reports in each sender's inbox since the first send and record them in the store."""
    with exit_codes():
        clock = options.clock
        loaded = load_campaign(manifest)
        site = require_ledger(loaded, manifest, sandbox=sandbox, url=ledger)
        api_key = read_api_key(loaded, sandbox=sandbox)
        fake = build_sandbox_api(loaded) if sandbox else None
        connect = partial(connect_api, loaded, api_key=api_key, clock=clock, fake=fake)
        secrets = _unsubscribe_secrets(loaded, sandbox=sandbox)
        pulling = partial(pull_campaign_bounces, loaded, site, connect=connect, clock=clock, secrets=secrets)
        report = anyio.run(pulling)
        if report is None:
            out.print("Nothing was sent yet: no bounce to look for.")
            return
        grants, listed, reports, hard = report.grants, report.listed, report.reports, len(report.hard)
        mailboxes, addresses = plural(grants, "mailbox", "mailboxes"), plural(hard, "address", "addresses")
        out.print(
            f"{grants} {mailboxes}, {listed:,} inbox {plural(listed, 'message')} looked at, {reports} bounce "
            f"{plural(reports, 'report')} ({report.recorded} new); {hard} {addresses} failed for good "
            f"(suppressed), {len(report.soft)} for now; {report.calls} API {plural(report.calls, 'request')}",
            soft_wrap=True,
        )
        if report.unsubscribed:
            mailed = len(report.unsubscribed)
            out.print(
                f"{mailed} unsubscribe {plural(mailed, 'request')} by mail recorded (unsubscribe.mailto)"
            )
        for grant in report.cut_short:
            out.print(f"grant {grant}: more than {MAX_PAGES * 200:,} inbox messages; pull again for the rest")


def _unsubscribe_secrets(manifest: Manifest, *, sandbox: bool) -> tuple[bytes, ...]:
    """The secrets that verify the tokens of mailto unsubscribe requests; none without [unsubscribe] or
    its variable, which bounces do not need (then such requests are said to wait for a pull with it)."""
    if manifest.unsubscribe is None:
        return ()
    try:
        return read_secrets(manifest, sandbox=sandbox) or ()
    except ManifestError:
        if manifest.unsubscribe.mailto is not None:
            name = manifest.unsubscribe.secret_env
            out.print(f"{name} is not set: unsubscribe requests mailed to unsubscribe.mailto were not read")
        return ()
