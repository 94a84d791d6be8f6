"""The `campaign` command: the typer app, its root options, and the table of its commands.

Each command lives in the module of its concept (sending, inspecting, outcomes, unsubscribes, authoring);
this package is the only place that imports typer and turns a CampaignError into an exit code (base).
"""

from __future__ import annotations

from typing import Annotated

import typer

from campaign.cli.authoring import init, sandbox, schema
from campaign.cli.base import options
from campaign.cli.inspecting import preview, send_test, status
from campaign.cli.outcomes import reconcile, report, retry
from campaign.cli.sending import resume, run
from campaign.cli.unsubscribes import suppress_app, unsubscribe_app

__all__ = ["app", "main"]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Send personalised bulk email through people's own mailboxes (Nylas v3 Send API).",
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
) -> None:
    options.debug = debug


# The order here is the order `campaign --help` lists the commands in.
app.command()(run)
app.command()(resume)
app.command()(preview)
app.command("send-test")(send_test)
app.command()(status)
app.command()(schema)
app.command()(init)
app.command()(sandbox)
app.add_typer(unsubscribe_app, name="unsubscribe")
app.add_typer(suppress_app, name="suppress")
app.command()(reconcile)
app.command()(retry)
app.command()(report)


def main() -> None:
    """Entry point of the `campaign` console script."""
    app()
