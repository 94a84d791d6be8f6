"""Writing and trying a campaign before it sends anything: `init` (a starter campaign), `schema` (the
manifest's JSON Schema for editors) and `sandbox` (the fake Nylas API served on this machine).

None of them reads a ledger or the real API.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from campaign.cli.base import exit_codes, out
from campaign.cli.wiring import SANDBOX_API_KEY, register_sandbox_grants
from campaign.manifest import build_manifest_schema, load_manifest, write_starter
from campaign.testing import FakeNylas
from campaign.testing.server import run_sandbox_server

__all__ = ["init", "sandbox", "schema"]


def schema() -> None:
    """Print the manifest's JSON Schema (for editors)."""
    out.file.write(json.dumps(build_manifest_schema(), indent=2) + "\n")


def init(directory: Annotated[Path, typer.Argument(help="Folder for the new campaign.")]) -> None:
    """Write a starter campaign into DIRECTORY (never overwrites a file)."""
    with exit_codes():
        for path in write_starter(directory):
            out.print(f"wrote {path}")
        out.print(f"Next: campaign preview {directory / 'campaign.toml'}")


def sandbox(
    manifest: Annotated[
        Path | None, typer.Argument(help="Register this manifest's senders as grants.", show_default=False)
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8765,
) -> None:
    """Serve the fake Nylas API on this machine, for trying tools against it."""
    with exit_codes():
        fake = FakeNylas(api_key=SANDBOX_API_KEY)
        if manifest is not None:
            register_sandbox_grants(fake, load_manifest(manifest))
        out.print(f"Fake Nylas API on http://{host}:{port}  (API key: {SANDBOX_API_KEY}); Ctrl-C stops it")
        run_sandbox_server(fake, host=host, port=port)
