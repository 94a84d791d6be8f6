"""Looking at a campaign without sending it: `preview` (check and render every row, write the preview
site), `send-test` (one row, to a test address) and `status` (the ledger's progress).

None of these writes the ledger; send-test sends one message outside the campaign's ledger. The
preview and send-test engines (renderers, list readers, HTTP client) are imported inside those two
commands: `status` needs none of them and is run often, on large ledgers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import anyio
import typer

from campaign.cli.base import LedgerOpt, ManifestArg, SandboxOpt, SkipInvalidOpt, exit_codes, options, out
from campaign.cli.output import print_deliveries, print_json, print_preview, print_status, print_test_sent
from campaign.cli.wiring import (
    SANDBOX_API_URI,
    build_sandbox_api,
    command_path,
    connect_api,
    load_campaign,
    locate_ledger,
    prepare_sandbox_outbox,
    read_api_key,
    read_api_uri,
    read_secrets,
    sandbox_outbox_path,
    write_sandbox_outbox,
)
from campaign.ledger import check_key_scheme
from campaign.manifest import Manifest
from campaign.status import load_status

if TYPE_CHECKING:
    from campaign.ledger import Ledger, LedgerSite

__all__ = ["preview", "send_test", "status"]


def preview(
    manifest: ManifestArg,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Where to write the preview site (default: <manifest stem>.preview/ beside the manifest).",
        ),
    ] = None,
    sample: Annotated[
        int, typer.Option(min=0, help="How many rendered messages to show and give pages.")
    ] = 3,
    sandbox: Annotated[
        bool,
        typer.Option(
            "--sandbox",
            help="Preview what a --sandbox run would send: its ledger, the fake API's URLs, and a built-in "
            "unsubscribe secret when none is set. Sends nothing.",
        ),
    ] = False,
    skip_invalid: SkipInvalidOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    ledger: LedgerOpt = None,
) -> None:
    """Check and render every recipient, write a browsable preview site, send nothing."""
    from campaign.pipeline import raise_for_problems
    from campaign.preview import build_preview_json, run_preview, write_site

    with exit_codes():
        clock = options.clock
        loaded = load_campaign(manifest)
        with _reading_ledger(loaded, locate_ledger(loaded, sandbox=sandbox, url=ledger)) as reading:
            report = run_preview(
                loaded,
                secrets=read_secrets(loaded, sandbox=sandbox),
                skip_invalid=skip_invalid,
                sample=sample,
                ledger=reading,
                api_uri=SANDBOX_API_URI if sandbox else read_api_uri(loaded),
                clock=clock,
            )
        site = write_site(report, out_dir or loaded.base_dir / f"{loaded.path.stem}.preview")
        if as_json:
            print_json(out, build_preview_json(report, site=site))
        else:
            print_preview(out, report, site=site)
        raise_for_problems(report.problem_texts)


def send_test(
    manifest: ManifestArg,
    to: Annotated[str, typer.Option("--to", help="The address to send the test to.", show_default=False)],
    row: Annotated[int, typer.Option("--row", min=1, help="The row of the list to render.")] = 1,
    sender_name: Annotated[
        str | None, typer.Option("--sender", help="Send from this sender instead of the row's own.")
    ] = None,
    sandbox: SandboxOpt = False,
    ledger: LedgerOpt = None,
) -> None:
    """Send row N, rendered exactly as the campaign would, to ADDR with "[TEST] " before the subject."""
    from campaign.send_test import find_test_message, send_test_message

    with exit_codes():
        clock = options.clock
        loaded = load_campaign(manifest)
        api_key = read_api_key(loaded, sandbox=sandbox)
        with _reading_ledger(loaded, locate_ledger(loaded, sandbox=sandbox, url=ledger)) as reading:
            test = find_test_message(
                loaded,
                row=row,
                to=to,
                sender_name=sender_name,
                secrets=read_secrets(loaded, sandbox=sandbox),
                ledger=reading,
            )
        if sandbox:  # an outbox it cannot write stops the test before it is sent
            prepare_sandbox_outbox(loaded)
        fake = build_sandbox_api(loaded) if sandbox else None

        async def send() -> str:
            async with connect_api(loaded, api_key=api_key, clock=clock, fake=fake) as client:
                return await send_test_message(client, test)

        message_id = anyio.run(send)
        if fake is not None:
            first = write_sandbox_outbox(fake, loaded)
            print_deliveries(out, fake, loaded, sandbox_outbox_path(loaded), first=first)
        print_test_sent(
            out,
            message_id=message_id,
            to=test.message.to[0].email,
            sender=test.sender.name,
            row=row,
            recipient=test.recipient_email,
        )


def status(
    manifest: ManifestArg,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
    sandbox: Annotated[bool, typer.Option("--sandbox", help="Show the sandbox run's ledger.")] = False,
    ledger: LedgerOpt = None,
) -> None:
    """Show progress: counts per state and per sender, budgets, and why rows were not sent."""
    with exit_codes():
        loaded = load_campaign(manifest)
        site = locate_ledger(loaded, sandbox=sandbox, url=ledger)
        found = load_status(
            loaded, site, clock=options.clock, command_path=command_path(manifest, ledger), sandbox=sandbox
        )
        if as_json:
            print_json(out, found.as_json())
        else:
            print_status(out, found)


@contextmanager
def _reading_ledger(manifest: Manifest, site: LedgerSite) -> Iterator[Ledger | None]:
    """The campaign's ledger opened read-only for preview and send-test (None before a first run)."""
    if not site.exists(manifest.campaign.name):
        yield None
        return
    ledger = site.open(clock=options.clock, campaign=manifest.campaign.name, read_only=True)
    try:
        check_key_scheme(ledger, manifest)  # else every row would look unsent under its new key
        yield ledger
    finally:
        ledger.close()
