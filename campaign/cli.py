"""The `campaign` command: parse options, build the objects, run, and turn errors into exit codes.

The only module that imports typer, and the only one that decides exit codes.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated

import anyio
import httpx
import typer
from rich.console import Console

from campaign.clock import Clock, SystemClock
from campaign.dispatch import DispatchResult, DispatchSettings, dispatch
from campaign.errors import CampaignError, InputFileError, ManifestError, UsageError
from campaign.ledger import Ledger, PlannedRow, open_ledger
from campaign.manifest import Manifest, build_manifest_schema, load_manifest
from campaign.models import RowState
from campaign.nylas import DEFAULT_API_URI, NylasClient, build_http_client
from campaign.output import (
    SendProgress,
    print_checked,
    print_deliveries,
    print_error,
    print_json,
    print_preview,
    print_run_summary,
    print_status,
)
from campaign.plan import Job
from campaign.preflight import Preflight, run_preflight
from campaign.preview import PreviewReport, build_preview, write_preview
from campaign.ratelimit import DAY_S
from campaign.starter import write_starter
from campaign.status import OPEN_STATES, build_status, build_unstarted_status
from campaign.testing import FakeNylas
from campaign.testing.server import run_sandbox_server
from campaign.unsubscribe import parse_secrets

__all__ = ["app", "main"]

EXIT_DONE = 0
EXIT_NOT_ALL_SENT = 1
EXIT_RESUMABLE = 75
EXIT_AUTH = 77
EXIT_INTERRUPTED = 130

# Nylas replays an idempotency key's answer for one hour; an in-flight row older
# than that cannot be re-sent safely with its key, so it becomes `unknown`.
IDEMPOTENCY_WINDOW_S = 3600.0
SANDBOX_API_KEY = "sandbox-key"
SANDBOX_SECRET = "sandbox-unsubscribe-secret-not-for-real-mail"

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Send personalised bulk email through people's own mailboxes (Nylas v3 Send API).",
    pretty_exceptions_enable=False,
)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

ManifestArg = Annotated[Path, typer.Argument(help="The campaign's manifest (TOML).", show_default=False)]
SandboxOpt = Annotated[
    bool, typer.Option("--sandbox", help="Send to a built-in fake Nylas API instead of the real one.")
]
WaitOpt = Annotated[
    bool,
    typer.Option(
        "--wait", help="When every sender is at its quota, wait (with a countdown) instead of stopping."
    ),
]
SkipInvalidOpt = Annotated[
    bool, typer.Option("--skip-invalid", help="Skip rows that do not validate or render, recording why.")
]


@dataclass(slots=True)
class _Options:
    debug: bool = False


_options = _Options()


def main() -> None:
    """Entry point of the `campaign` console script."""
    app()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
) -> None:
    _options.debug = debug


@app.command()
def run(
    manifest: ManifestArg,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    limit: Annotated[int | None, typer.Option(min=1, help="Send at most N messages this run.")] = None,
    sandbox: SandboxOpt = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Same as `campaign preview`.")] = False,
    skip_invalid: SkipInvalidOpt = False,
    wait: WaitOpt = False,
) -> None:
    """Send the campaign (continues where an earlier run stopped)."""
    if dry_run:
        preview(manifest, sandbox=sandbox, skip_invalid=skip_invalid)
        return
    with _exit_codes():
        code = _run(manifest, yes=yes, limit=limit, sandbox=sandbox, skip_invalid=skip_invalid, wait=wait)
        raise typer.Exit(code)


@app.command()
def resume(
    manifest: ManifestArg,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    limit: Annotated[int | None, typer.Option(min=1, help="Send at most N messages this run.")] = None,
    sandbox: SandboxOpt = False,
    skip_invalid: SkipInvalidOpt = False,
    wait: WaitOpt = False,
) -> None:
    """Continue a campaign after a quota stop, crash or Ctrl-C (needs its ledger)."""
    with _exit_codes():
        code = _run(
            manifest,
            yes=yes,
            limit=limit,
            sandbox=sandbox,
            skip_invalid=skip_invalid,
            wait=wait,
            resuming=True,
        )
        raise typer.Exit(code)


@app.command()
def preview(
    manifest: ManifestArg,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Write the sampled messages' payloads and bodies here.")
    ] = None,
    sample: Annotated[int, typer.Option(min=0, help="How many rendered messages to show.")] = 3,
    sandbox: SandboxOpt = False,
    skip_invalid: SkipInvalidOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Check every recipient and render every message without sending anything."""
    with _exit_codes():
        loaded = load_manifest(manifest)
        ledger_path = _ledger_path(loaded, sandbox=sandbox)
        done: set[str] = set()
        assigned: dict[str, str] = {}
        if ledger_path.exists():
            ledger = _open(loaded, ledger_path)
            assigned = ledger.assigned_senders()
            done = {row.key for row in ledger.rows(states=(RowState.SENT, RowState.FAILED, RowState.SKIPPED))}
            ledger.close()
        preflight = run_preflight(
            loaded, secrets=_secrets(loaded, sandbox=sandbox), skip_invalid=skip_invalid, assigned=assigned
        )
        report = build_preview(preflight, sample=sample, done_keys=done)
        written = write_preview(report, out_dir) if out_dir is not None else []
        if as_json:
            print_json(out, _preview_json(report))
        else:
            print_preview(out, report, out_files=written)
        preflight.raise_for_problems()


@app.command()
def status(
    manifest: ManifestArg,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
    sandbox: Annotated[bool, typer.Option("--sandbox", help="Show the sandbox run's ledger.")] = False,
) -> None:
    """Show progress: counts per state and per sender, budgets, and why rows were not sent."""
    with _exit_codes():
        loaded = load_manifest(manifest)
        path = _ledger_path(loaded, sandbox=sandbox)
        if path.exists():
            ledger = _open(loaded, path)
            data = build_status(loaded, ledger, clock=SystemClock())
            ledger.close()
        else:
            data = build_unstarted_status(loaded)
        if as_json:
            print_json(out, data)
        else:
            print_status(out, data)


@app.command()
def schema() -> None:
    """Print the manifest's JSON Schema (for editors)."""
    out.file.write(json.dumps(build_manifest_schema(), indent=2) + "\n")


@app.command()
def init(directory: Annotated[Path, typer.Argument(help="Folder for the new campaign.")]) -> None:
    """Write a starter campaign into DIRECTORY (never overwrites a file)."""
    with _exit_codes():
        for path in write_starter(directory):
            out.print(f"wrote {path}")
        out.print(f"Next: campaign preview {directory / 'campaign.toml'}")


@app.command()
def sandbox(
    manifest: Annotated[
        Path | None, typer.Argument(help="Register this manifest's senders as grants.", show_default=False)
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8765,
) -> None:
    """Serve the fake Nylas API on this machine, for trying tools against it."""
    with _exit_codes():
        fake = FakeNylas(api_key=SANDBOX_API_KEY)
        if manifest is not None:
            _register_grants(fake, load_manifest(manifest))
        out.print(f"Fake Nylas API on http://{host}:{port}  (API key: {SANDBOX_API_KEY}); Ctrl-C stops it")
        run_sandbox_server(fake, host=host, port=port)


# --- the run -----------------------------------------------------------------


def _run(
    path: Path,
    *,
    yes: bool,
    limit: int | None,
    sandbox: bool,
    skip_invalid: bool,
    wait: bool = False,
    resuming: bool = False,
) -> int:
    clock = SystemClock()
    manifest = load_manifest(path)
    ledger_path = _ledger_path(manifest, sandbox=sandbox)
    if resuming and not ledger_path.exists():
        message = f"{ledger_path}: no ledger, so nothing to resume; start with `campaign run {path}`"
        raise InputFileError(message)
    api_key = SANDBOX_API_KEY if sandbox else _api_key(manifest)
    secrets = _secrets(manifest, sandbox=sandbox)
    assigned: dict[str, str] = {}
    settled: set[str] = set()
    if ledger_path.exists():
        ledger = _open(manifest, ledger_path)
        assigned = ledger.assigned_senders()
        settled = {row.key for row in ledger.rows() if row.state not in OPEN_STATES}
        ledger.close()
    preflight = run_preflight(manifest, secrets=secrets, skip_invalid=skip_invalid, assigned=assigned)
    preflight.raise_for_problems()
    todo = [job for job in preflight.jobs if job.recipient.key not in settled]
    print_checked(
        out,
        source=manifest.recipients.source.name,
        to_send=len(todo),
        skipped=Counter(skip.reason.value for skip in preflight.skips),
    )
    _confirm(len(todo), manifest, yes=yes, sandbox=sandbox)

    ledger_path.parent.mkdir(parents=True, exist_ok=True)
    ledger = _open(manifest, ledger_path)
    try:
        ledger.record_plan(
            [
                PlannedRow(j.recipient.key, j.recipient.row, j.recipient.address.email, j.sender)
                for j in preflight.jobs
            ],
            preflight.skips,
        )
        ledger.record_expired_claims(older_than_s=IDEMPOTENCY_WINDOW_S)
        open_keys = {row.key for row in ledger.rows(states=(RowState.PENDING, RowState.INFLIGHT))}
        jobs = [job for job in preflight.jobs if job.recipient.key in open_keys]
        fake = _sandbox_api(manifest) if sandbox else None
        result = anyio.run(_send, preflight, jobs, ledger, api_key, clock, limit, wait, fake)
        _record_parks(ledger, result, manifest)
        states = {state.value: count for state, count in ledger.counts().items()}
    finally:
        ledger.close()
    if fake is not None:
        outbox = ledger_path.parent / "outbox"
        fake.write_outbox(outbox)
        grants = {sender.route: sender.name for sender in manifest.senders}
        print_deliveries(
            out,
            [
                (
                    grants.get(d.grant_id, d.grant_id),
                    d.payload["to"][0]["email"],
                    d.payload.get("subject", ""),
                )
                for d in fake.deliveries
            ],
            outbox,
        )
    resume = f"campaign resume {path}" + (" --sandbox" if sandbox else "")
    print_run_summary(out, result, states=states, resume_command=resume)
    return _exit_code(result, states)


async def _send(
    preflight: Preflight,
    jobs: Sequence[Job],
    ledger: Ledger,
    api_key: str,
    clock: Clock,
    limit: int | None,
    wait: bool,
    fake: FakeNylas | None,
) -> DispatchResult:
    manifest = preflight.manifest
    transport = httpx.ASGITransport(app=fake.app) if fake is not None else None
    base_url = "http://sandbox.nylas.test" if fake is not None else _api_uri(manifest)
    since = clock.now().timestamp() - DAY_S
    history = {sender.name: ledger.sent_recipients_since(sender.name, since) for sender in manifest.senders}
    async with build_http_client(
        base_url=base_url, timeout_s=manifest.api.timeout_s, transport=transport
    ) as http:
        client = NylasClient(http, api_key=api_key, clock=clock)
        with SendProgress(out, total=len(jobs), senders=manifest.senders, clock=clock) as progress:
            for sender in manifest.senders:
                used = sum(count for _, count in history[sender.name])
                left = None if sender.per_day is None else max(0, sender.per_day - used)
                share = sum(1 for job in jobs if job.sender == sender.name)
                progress.set_share(sender.name, share, budget_left=left)
            return await dispatch(
                jobs,
                senders=manifest.senders,
                render=preflight.render,
                client=client,
                ledger=ledger,
                clock=clock,
                history=history,
                parked=_load_parks(ledger, manifest),
                on_event=progress.handle,
                settings=DispatchSettings(limit=limit, wait=wait),
            )


def _load_parks(ledger: Ledger, manifest: Manifest) -> dict[str, datetime]:
    """Senders parked by an earlier run (a quota refusal), persisted so a resume does not retry early."""
    parks = {}
    for sender in manifest.senders:
        stored = ledger.get_meta(f"parked_until:{sender.name}")
        if stored:
            parks[sender.name] = datetime.fromisoformat(stored)
    return parks


def _record_parks(ledger: Ledger, result: DispatchResult, manifest: Manifest) -> None:
    for sender in manifest.senders:
        until = result.parked.get(sender.name)
        ledger.set_meta(f"parked_until:{sender.name}", until.isoformat() if until is not None else "")


def _exit_code(result: DispatchResult, states: dict[str, int]) -> int:
    if result.auth_refused:
        return EXIT_AUTH
    if result.remaining or states["pending"] or states["inflight"]:
        return EXIT_RESUMABLE
    if states["failed"] or states["unknown"]:
        return EXIT_NOT_ALL_SENT
    return EXIT_DONE


# --- helpers -----------------------------------------------------------------


def _confirm(count: int, manifest: Manifest, *, yes: bool, sandbox: bool) -> None:
    if yes or count == 0:
        return
    where = "to the sandbox" if sandbox else "for real"
    question = f"Send {count:,} messages from {len(manifest.senders)} senders {where}?"
    if not sys.stdin.isatty():
        message = f"{question} There is no terminal to confirm on; pass --yes to send"
        raise UsageError(message)
    if not typer.confirm(question):
        raise typer.Exit(EXIT_DONE)


def _ledger_path(manifest: Manifest, *, sandbox: bool) -> Path:
    # A sandbox run keeps its own ledger, so that trying a campaign in the sandbox
    # never marks real recipients as sent.
    if sandbox:
        return manifest.base_dir / f"{manifest.path.stem}.sandbox" / "ledger.sqlite"
    return manifest.ledger_path


def _open(manifest: Manifest, path: Path) -> Ledger:
    return open_ledger(path, clock=SystemClock(), campaign=manifest.campaign.name)


def _api_key(manifest: Manifest) -> str:
    name = manifest.api.key_env
    value = os.environ.get(name, "").strip()
    if not value:
        message = (
            f"{manifest.path.name}: api.key_env: the environment variable {name} is not set; "
            "export your Nylas API key in it (or try the campaign with --sandbox)"
        )
        raise ManifestError(message)
    return value


def _api_uri(manifest: Manifest) -> str:
    return manifest.api.uri or os.environ.get("NYLAS_API_URI") or DEFAULT_API_URI


def _secrets(manifest: Manifest, *, sandbox: bool) -> tuple[bytes, ...] | None:
    if manifest.unsubscribe is None:
        return None
    name = manifest.unsubscribe.secret_env
    value = os.environ.get(name, "")
    if not value.strip() and sandbox:
        return parse_secrets(SANDBOX_SECRET)
    if not value.strip():
        message = (
            f"{manifest.path.name}: unsubscribe.secret_env: the environment variable {name} is not set; "
            "set it to a long random secret, e.g. from `openssl rand -base64 32`"
        )
        raise ManifestError(message)
    try:
        return parse_secrets(value)
    except ManifestError as exc:
        message = f"{manifest.path.name}: unsubscribe.secret_env ({name}): {exc}"
        raise ManifestError(message) from exc


def _sandbox_api(manifest: Manifest) -> FakeNylas:
    fake = FakeNylas(api_key=SANDBOX_API_KEY)
    _register_grants(fake, manifest)
    return fake


def _register_grants(fake: FakeNylas, manifest: Manifest) -> None:
    for sender in manifest.senders:
        if sender.domain is not None:
            fake.add_domain(sender.domain)
        else:
            assert sender.grant_id is not None  # the manifest requires one of the two
            fake.add_grant(sender.grant_id, sender.email or f"{sender.name}@sandbox.example.com")


def _preview_json(report: PreviewReport) -> dict[str, object]:
    return {
        "campaign": report.campaign,
        "to_send": report.to_send,
        "already_done": report.already_done,
        "skipped": {reason.value: count for reason, count in report.skipped.items()},
        "problems": list(report.problems),
        "warnings": list(report.warnings),
        "duration_s": report.duration_s,
        "senders": [
            {
                "name": s.name,
                "grant_id": s.grant_id,
                "messages": s.messages,
                "rate_per_s": s.rate_per_s,
                "per_day": s.per_day,
                "concurrency": s.concurrency,
                "duration_s": s.duration_s,
            }
            for s in report.senders
        ],
    }


@contextmanager
def _exit_codes() -> Iterator[None]:
    """Turn our errors into one red line and their exit code; Ctrl-C into 130."""
    try:
        yield
    except CampaignError as exc:
        if _options.debug:
            err.print_exception()
        print_error(err, str(exc))
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        print_error(err, "interrupted; rows in flight are kept in the ledger and `campaign resume` continues")
        raise typer.Exit(EXIT_INTERRUPTED) from None
