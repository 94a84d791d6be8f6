"""What every command shares: the consoles, the exit codes, the option types several commands take, and
the one place where a CampaignError becomes an exit code (its line, and a traceback with --debug, are
printed with every secret the command knows of masked: `campaign.redaction.scrub_secrets`).

Only the `campaign.cli` package imports typer and decides exit codes; this module holds no command.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from campaign.cli.output import print_error
from campaign.clock import Clock, SystemClock
from campaign.errors import ApiError, CampaignError
from campaign.redaction import scrub_secrets, secret_values

__all__ = [
    "EXIT_AUTH",
    "EXIT_DONE",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_ALL_SENT",
    "EXIT_REFUSED",
    "EXIT_RESUMABLE",
    "LedgerOpt",
    "ManifestArg",
    "PortOpt",
    "SandboxOpt",
    "SkipInvalidOpt",
    "err",
    "exit_codes",
    "note_secret_envs",
    "options",
    "out",
]

EXIT_DONE = 0
EXIT_NOT_ALL_SENT = 1
EXIT_REFUSED = ApiError.exit_code  # 69: the API refused what was sent; a retry as it is would not help
EXIT_RESUMABLE = 75
EXIT_AUTH = 77
EXIT_INTERRUPTED = 130

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

ManifestArg = Annotated[Path, typer.Argument(help="The campaign's manifest (TOML).", show_default=False)]
SandboxOpt = Annotated[
    bool, typer.Option("--sandbox", help="Send to a built-in fake Nylas API instead of the real one.")
]
LedgerOpt = Annotated[
    str | None,
    typer.Option(
        "--ledger",
        metavar="URL",
        help="Keep the ledger in this PostgreSQL database (postgresql://user@host/db; the password from "
        "PGPASSWORD) instead of \\[ledger] url or the SQLite file beside the manifest.",
        show_default=False,
    ),
]
PortOpt = Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on (0: any free one).")]
SkipInvalidOpt = Annotated[
    bool, typer.Option("--skip-invalid", help="Skip rows that do not validate or render, recording why.")
]


@dataclass(slots=True)
class _Options:
    debug: bool = False
    # Every command's one clock. Tests of the CLI set a FakeClock here, so that pacing, back-offs
    # and waits take no real time; nothing else changes it.
    clock: Clock = field(default_factory=SystemClock)
    # The environment variables a command was told hold secrets (a manifest's api.key_env, …), besides
    # campaign.redaction.DEFAULT_SECRET_ENVS: their values are masked in any error printed.
    secret_envs: set[str] = field(default_factory=set)


options = _Options()
"""The root command's options (set by its callback, read when an error is reported), its clock, and the
variables known to hold secrets."""


def note_secret_envs(*names: str) -> None:
    """Remember that the variables `names` hold secrets, so that no error printed shows their values."""
    options.secret_envs.update(names)


@contextmanager
def exit_codes() -> Iterator[None]:
    """Turn our errors into one red line and their exit code; Ctrl-C into 130."""
    try:
        yield
    except CampaignError as exc:
        known = secret_values(options.secret_envs)
        if options.debug:
            _print_traceback(known)
        print_error(err, scrub_secrets(str(exc), known))
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        # A run's sends are stopped gracefully elsewhere (`run_interruptible`, with its own report); this
        # is a Ctrl-C anywhere else, e.g. during the check, before anything was recorded.
        print_error(err, "interrupted; nothing recorded is lost: run the command again to continue")
        raise typer.Exit(EXIT_INTERRUPTED) from None


def _print_traceback(known: tuple[str, ...]) -> None:
    """The traceback of the error being handled, secrets masked (a foreign error's text, such as
    pydantic's, may repeat a value given)."""
    with err.capture() as captured:
        err.print_exception()
    err.file.write(scrub_secrets(captured.get(), known))
