"""The `campaign` command: the typer app, its root options, and the table of its commands.

Each command lives in the module of its concept (sending, inspecting, outcomes, unsubscribes, authoring),
which is imported only when that command runs (or `--help` lists them all): `campaign status` then
loads neither the send path, the preview's renderers nor polars. This package is the only place that
imports typer and turns a CampaignError into an exit code (base).
"""

from __future__ import annotations

import importlib
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from campaign.cli.base import options

__all__ = ["COMMANDS", "app", "main"]

# Name -> (module, attribute): a command function, or a typer app of subcommands.
# The order here is the order `campaign --help` lists the commands in.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("campaign.cli.sending", "run"),
    "resume": ("campaign.cli.sending", "resume"),
    "preview": ("campaign.cli.inspecting", "preview"),
    "send-test": ("campaign.cli.inspecting", "send_test"),
    "status": ("campaign.cli.inspecting", "status"),
    "schema": ("campaign.cli.authoring", "schema"),
    "init": ("campaign.cli.authoring", "init"),
    "sandbox": ("campaign.cli.authoring", "sandbox"),
    "reconcile": ("campaign.cli.outcomes", "reconcile"),
    "retry": ("campaign.cli.outcomes", "retry"),
    "report": ("campaign.cli.outcomes", "report"),
    "serve": ("campaign.cli.unsubscribes", "serve"),
    "events": ("campaign.cli.events", "events_app"),
    "unsubscribe": ("campaign.cli.unsubscribes", "unsubscribe_app"),
    "suppress": ("campaign.cli.unsubscribes", "suppress_app"),
}


class _LazyGroup(TyperGroup):
    """The root group: builds a command (importing its module) when it is first looked up."""

    def list_commands(self, _ctx: Any) -> list[str]:
        return list(COMMANDS)

    def get_command(self, _ctx: Any, cmd_name: str) -> Any:
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            self.commands[cmd_name] = _build_command(cmd_name)
        return self.commands.get(cmd_name)

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        if args and args[0] not in COMMANDS:  # a typo: "did you mean" picks from the commands built
            for name in COMMANDS:
                self.get_command(ctx, name)
        return super().resolve_command(ctx, args)


def _build_command(name: str) -> Any:
    module, attribute = COMMANDS[name]
    target = getattr(importlib.import_module(module), attribute)
    if isinstance(target, typer.Typer):
        group = typer.main.get_group(target)
        group.name = name
        return group
    single = typer.Typer(add_completion=False)
    single.command(name)(target)
    return typer.main.get_command(single)


app = typer.Typer(
    cls=_LazyGroup,
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


def main() -> None:
    """Entry point of the `campaign` console script."""
    app()
