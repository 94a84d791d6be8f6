"""Writing and trying a campaign before it sends anything: `init` (a starter campaign), `schema` (the
manifest's JSON Schema for editors) and `sandbox` (the fake Nylas API served on this machine).

None of them reads a ledger or the real API.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import httpx
import typer
from rich.markup import escape

from campaign.cli.base import PortOpt, exit_codes, out
from campaign.cli.wiring import SANDBOX_API_KEY, build_sandbox_api, command_path, load_campaign
from campaign.errors import UsageError
from campaign.manifest import build_manifest_schema, write_starter
from campaign.testing.server import run_sandbox_server
from campaign.timetext import parse_duration
from campaign.web import DEFAULT_WEBHOOK_SECRET_ENV, read_webhook_secrets

__all__ = ["init", "sandbox", "schema"]


def schema() -> None:
    """Print the manifest's JSON Schema (for editors)."""
    out.file.write(json.dumps(build_manifest_schema(), indent=2) + "\n")


def init(directory: Annotated[Path, typer.Argument(help="Folder for the new campaign.")]) -> None:
    """Write a starter campaign into DIRECTORY (never overwrites a file)."""
    with exit_codes():
        for path in write_starter(directory):
            out.print(f"wrote {path}")
        manifest = escape(command_path(directory / "campaign.toml", None))
        # The sandbox needs no account and no secrets: the first step works as written.
        out.print(f"Next: campaign preview {manifest} --sandbox", soft_wrap=True)
        out.print(
            "Then put your grant id in it, set the environment variables it names (the API key, the "
            f"unsubscribe secret), and: campaign run {manifest}",
            soft_wrap=True,
        )


def sandbox(
    manifest: Annotated[
        Path | None, typer.Argument(help="Register this manifest's senders as grants.", show_default=False)
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: PortOpt = 8765,
    listing_lag: Annotated[
        str | None,
        typer.Option(
            "--listing-lag",
            help="List a sent message only this long after its send (e.g. 10s), as real Sent folders lag.",
            show_default=False,
        ),
    ] = None,
    broken_to_filter: Annotated[
        bool,
        typer.Option("--broken-to-filter", help="The `to` filter finds nothing, as on Microsoft grants."),
    ] = False,
    gzip: Annotated[bool, typer.Option("--gzip", help="Answer gzip-compressed, as Nylas can.")] = False,
    bounce_share: Annotated[
        float,
        typer.Option(
            "--bounce-share",
            min=0.0,
            max=1.0,
            help="Bounce this share of recipients (the same ones each time): a DSN in the sender's inbox.",
        ),
    ] = 0.0,
    reply_share: Annotated[
        float,
        typer.Option(
            "--reply-share",
            min=0.0,
            max=1.0,
            help="Answer this share of sent messages with a reply in their thread (a share more with an "
            "out-of-office auto-reply, --auto-reply-share), as follow-ups meet them.",
        ),
    ] = 0.0,
    auto_reply_share: Annotated[
        float,
        typer.Option("--auto-reply-share", min=0.0, max=1.0, help="Answer this share with an auto-reply."),
    ] = 0.0,
    webhook: Annotated[
        str | None,
        typer.Option(
            "--webhook",
            help="Send signed notifications (bounces) to this URL, e.g. `campaign serve`'s /nylas/webhook; "
            "the secret is NYLAS_WEBHOOK_SECRET's.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Serve the fake Nylas API on this machine, for trying tools against it."""
    with exit_codes():
        lag = _parse_lag(listing_lag)
        if manifest is None and (listing_lag is not None or broken_to_filter or bounce_share):
            message = "--listing-lag, --broken-to-filter and --bounce-share apply to grants: give MANIFEST"
            raise UsageError(message)
        fake = build_sandbox_api(
            None if manifest is None else load_campaign(manifest),
            listing_lag_s=lag,
            to_filter_broken=broken_to_filter,
            gzip=gzip,
            bounce_share=bounce_share,
            reply_share=reply_share,
            auto_reply_share=auto_reply_share,
        )
        if webhook is not None:
            secrets = read_webhook_secrets(DEFAULT_WEBHOOK_SECRET_ENV)
            try:
                fake.add_webhook(webhook, secrets[0], ["message.bounce_detected", "thread.replied"])
            except (ValueError, httpx.HTTPError) as exc:
                raise UsageError(f"--webhook {webhook}: {exc}; start `campaign serve` first") from exc
        out.print(f"Fake Nylas API on http://{host}:{port}  (API key: {SANDBOX_API_KEY}); Ctrl-C stops it")
        run_sandbox_server(fake, host=host, port=port, every_second=fake.deliver_webhooks)


def _parse_lag(text: str | None) -> float:
    if text is None:
        return 0.0
    try:
        return parse_duration(text).total_seconds()
    except ValueError as exc:
        raise UsageError(f"--listing-lag: {exc}") from exc
