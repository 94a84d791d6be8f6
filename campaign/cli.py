"""The `campaign` command: parse options, build the objects, run, and turn errors into exit codes.

The only module that imports typer, and the only one that decides exit codes.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Annotated, TypeVar

import anyio
import httpx
import typer
from rich.console import Console

from campaign.clock import Clock, SystemClock
from campaign.content import ContentCheck, check_content, load_content_fingerprint, record_content
from campaign.dispatch import DispatchResult, DispatchSettings, dispatch
from campaign.endpoint import DEFAULT_SECRET_ENV, load_endpoint, serve_endpoint
from campaign.errors import CampaignError, DataError, InputFileError, ManifestError, UsageError
from campaign.interrupt import run_interruptible
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
    print_next_steps,
    print_preview,
    print_reconciled,
    print_report_written,
    print_retried,
    print_run_summary,
    print_status,
    print_test_sent,
)
from campaign.plan import Job
from campaign.preflight import Preflight, raise_for_problems, run_preflight
from campaign.preview import LedgerView, run_preview
from campaign.preview_json import build_preview_json
from campaign.ratelimit import DAY_S
from campaign.reconcile import ReconcileReport, Verdict, reconcile_unknown
from campaign.report import build_report, write_report
from campaign.sendtest import find_test_message, send_test_message
from campaign.site import write_site
from campaign.starter import write_starter
from campaign.status import OPEN_STATES, build_status, build_unstarted_status
from campaign.suppression import (
    SuppressionStore,
    UnsubscribeWatch,
    is_store_path,
    list_store_paths,
    open_store,
)
from campaign.suppression_io import load_import_addresses, normalize_address, write_entries
from campaign.testing import FakeNylas
from campaign.testing.server import run_sandbox_server
from campaign.unsubscribe import parse_secrets

__all__ = ["app", "main"]

EXIT_DONE = 0
EXIT_NOT_ALL_SENT = 1
EXIT_RESUMABLE = 75
EXIT_AUTH = 77
EXIT_INTERRUPTED = 130

SANDBOX_API_KEY = "sandbox-key"
SANDBOX_SECRET = "sandbox-unsubscribe-secret-not-for-real-mail"
_T = TypeVar("_T")

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
AllowChangedOpt = Annotated[
    bool,
    typer.Option(
        "--allow-changed-content",
        help="Send the rest even though the subject, a template or a header changed since sending "
        "began (the change is recorded in the ledger).",
    ),
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
    allow_changed_content: AllowChangedOpt = False,
) -> None:
    """Send the campaign (continues where an earlier run stopped)."""
    if dry_run:
        preview(manifest, sandbox=sandbox, skip_invalid=skip_invalid)
        return
    with _exit_codes():
        code = _run(
            manifest,
            yes=yes,
            limit=limit,
            sandbox=sandbox,
            skip_invalid=skip_invalid,
            wait=wait,
            allow_changed_content=allow_changed_content,
        )
        raise typer.Exit(code)


@app.command()
def resume(
    manifest: ManifestArg,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    limit: Annotated[int | None, typer.Option(min=1, help="Send at most N messages this run.")] = None,
    sandbox: SandboxOpt = False,
    skip_invalid: SkipInvalidOpt = False,
    wait: WaitOpt = False,
    allow_changed_content: AllowChangedOpt = False,
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
            allow_changed_content=allow_changed_content,
        )
        raise typer.Exit(code)


@app.command()
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
    sandbox: SandboxOpt = False,
    skip_invalid: SkipInvalidOpt = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Check and render every recipient, write a browsable preview site, send nothing."""
    with _exit_codes():
        clock = SystemClock()
        loaded = load_manifest(manifest)
        report = run_preview(
            loaded,
            secrets=_secrets(loaded, sandbox=sandbox),
            skip_invalid=skip_invalid,
            sample=sample,
            ledger=_ledger_view(loaded, _ledger_path(loaded, sandbox=sandbox), clock=clock),
            api_uri="http://sandbox.nylas.test" if sandbox else _api_uri(loaded),
            clock=clock,
        )
        site = write_site(report, out_dir or loaded.base_dir / f"{loaded.path.stem}.preview")
        if as_json:
            print_json(out, build_preview_json(report, site=site))
        else:
            print_preview(out, report, site=site)
        raise_for_problems(report.problem_texts)


@app.command("send-test")
def send_test(
    manifest: ManifestArg,
    to: Annotated[str, typer.Option("--to", help="The address to send the test to.", show_default=False)],
    row: Annotated[int, typer.Option("--row", min=1, help="The row of the list to render.")] = 1,
    sender_name: Annotated[
        str | None, typer.Option("--sender", help="Send from this sender instead of the row's own.")
    ] = None,
    sandbox: SandboxOpt = False,
) -> None:
    """Send row N, rendered exactly as the campaign would, to ADDR with "[TEST] " before the subject."""
    with _exit_codes():
        clock = SystemClock()
        loaded = load_manifest(manifest)
        api_key = SANDBOX_API_KEY if sandbox else _api_key(loaded)
        ledger = _ledger_view(loaded, _ledger_path(loaded, sandbox=sandbox), clock=clock)
        test = find_test_message(
            loaded,
            row=row,
            to=to,
            sender_name=sender_name,
            secrets=_secrets(loaded, sandbox=sandbox),
            assigned=ledger.assigned,
        )
        fake = _sandbox_api(loaded) if sandbox else None

        async def send() -> str:
            transport = httpx.ASGITransport(app=fake.app) if fake is not None else None
            base_url = "http://sandbox.nylas.test" if fake is not None else _api_uri(loaded)
            async with build_http_client(
                base_url=base_url, timeout_s=loaded.api.timeout_s, transport=transport
            ) as http:
                return await send_test_message(NylasClient(http, api_key=api_key, clock=clock), test)

        message_id = anyio.run(send)
        print_test_sent(
            out,
            message_id=message_id,
            to=test.message.to[0].email,
            sender=test.sender.name,
            row=row,
            recipient=test.recipient_email,
        )


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
            data = build_status(
                loaded, ledger, clock=SystemClock(), command_path=str(manifest), sandbox=sandbox
            )
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


# --- the unsubscribe endpoint and the suppression store (issue 5) ------------

unsubscribe_app = typer.Typer(no_args_is_help=True, help="The one-click unsubscribe endpoint (RFC 8058).")
suppress_app = typer.Typer(
    no_args_is_help=True, help="Manage an unsubscribe store: add, import, export, list."
)
app.add_typer(unsubscribe_app, name="unsubscribe")
app.add_typer(suppress_app, name="suppress")
StoreOpt = Annotated[
    Path, typer.Option("--store", help="The unsubscribe store, e.g. unsubscribes.sqlite.", show_default=False)
]


@unsubscribe_app.command("serve")
def unsubscribe_serve(
    store: StoreOpt,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    secret_env: Annotated[
        str,
        typer.Option("--secret-env", help="Environment variable with the secret(s) links are signed with."),
    ] = DEFAULT_SECRET_ENV,
) -> None:
    """Serve the one-click unsubscribe endpoint, recording unsubscribes in --store (put https in front)."""
    with _exit_codes():
        endpoint = load_endpoint(_store_path(store), secret_env=secret_env)
        try:
            out.print(f"Unsubscribe endpoint on http://{host}:{port}, recording to {store}; Ctrl-C stops it")
            serve_endpoint(endpoint, host=host, port=port)
        finally:
            endpoint.store.close()


@suppress_app.command("add")
def suppress_add(
    values: Annotated[
        list[str], typer.Argument(help="Addresses (recipient keys with --key).", show_default=False)
    ],
    store: StoreOpt,
    key: Annotated[bool, typer.Option("--key", help="The values are recipient keys, not addresses.")] = False,
) -> None:
    """Add addresses to the store: no campaign that reads the store mails them again."""
    with _exit_codes():
        keys: list[str] = []
        for value in values:
            found = value.strip() if key else normalize_address(value)
            if not found:
                raise DataError(
                    f"{value!r} is not a valid address; give one address per argument (or use --key)"
                )
            keys.append(found)
        added = _with_store(
            store, lambda s: s.record_many(s.build_entry("", k, email=None, source="manual") for k in keys)
        )
        out.print(f"{added} added, {len(set(keys)) - added} already there ({store})", markup=False)


@suppress_app.command("import")
def suppress_import(
    source: Annotated[Path, typer.Argument(help="A .csv/.parquet (column email) or text list, or a store.")],
    store: StoreOpt,
) -> None:
    """Add every address of a suppression list (or of another store) to the store."""
    with _exit_codes():
        found = load_import_addresses(source, clock=SystemClock())
        added = _with_store(
            store,
            lambda s: s.record_many(s.build_entry("", a, email=a, source="import") for a in found.addresses),
        )
        left_out = (
            f"; {len(found.invalid)} values are not addresses and were left out" if found.invalid else ""
        )
        out.print(f"{source.name}: {len(found.addresses)} addresses, {added} new{left_out}", markup=False)


@suppress_app.command("export")
def suppress_export(
    target: Annotated[
        Path, typer.Argument(help="A .csv or .parquet file (every column), or text (addresses).")
    ],
    store: StoreOpt,
) -> None:
    """Write the store's entries to a file."""
    with _exit_codes():
        entries = _with_store(store, lambda s: s.entries(), create=False)
        write_entries(entries, target)
        out.print(f"wrote {len(entries)} entries to {target}", markup=False)


@suppress_app.command("list")
def suppress_list(
    store: StoreOpt,
    as_json: Annotated[bool, typer.Option("--json", help="Print the entries as JSON.")] = False,
) -> None:
    """Show who is in the store: when, how, from which campaign."""
    with _exit_codes():
        entries = _with_store(store, lambda s: s.entries(), create=False)
        if as_json:
            out.file.write(json.dumps([asdict(entry) for entry in entries], indent=2) + "\n")
            return
        for e in entries:
            who = e.email or e.recipient_key
            out.print(f"{e.recorded_at}  {e.source:<9}  {e.campaign or '-':<20}  {who}", markup=False)
        out.print(f"{len(entries)} entries in {store}", markup=False)


def _store_path(path: Path) -> Path:
    if not is_store_path(path):
        raise UsageError(f"--store {path}: give an SQLite file ending in .sqlite, e.g. unsubscribes.sqlite")
    return path


def _with_store(path: Path, use: Callable[[SuppressionStore], _T], *, create: bool = True) -> _T:
    store = open_store(_store_path(path), clock=SystemClock(), create=create)
    try:
        return use(store)
    finally:
        store.close()


# --- settling and acting on outcomes: reconcile, retry, report (issue 3) ---------

LedgerSandboxOpt = Annotated[bool, typer.Option("--sandbox", help="Use the sandbox run's ledger.")]


@app.command()
def reconcile(
    manifest: ManifestArg,
    as_json: Annotated[bool, typer.Option("--json", help="Print the decisions as JSON.")] = False,
) -> None:
    """Settle rows whose fate is unknown: ask the API whether each message went out. Sends nothing."""
    with _exit_codes():
        loaded = load_manifest(manifest)
        path = _existing_ledger(loaded, manifest, sandbox=False)
        api_key = _api_key(loaded)
        ledger = _open(loaded, path, exclusive=True)
        try:
            ledger.record_expired_claims()
            found = anyio.run(_reconcile, loaded, ledger, api_key)
            steps = build_status(loaded, ledger, clock=SystemClock(), command_path=str(manifest))["next"]
        finally:
            ledger.close()
        decisions = [asdict(decision) for decision in found.decisions]
        if as_json:
            print_json(out, {"decisions": decisions, "in_flight": found.in_flight, "next": steps})
        else:
            print_reconciled(out, decisions, in_flight=found.in_flight)
            print_next_steps(out, steps)
        raise typer.Exit(EXIT_NOT_ALL_SENT if found.count(Verdict.UNKNOWN) else EXIT_DONE)


@app.command()
def retry(
    manifest: ManifestArg,
    failed: Annotated[bool, typer.Option("--failed", help="Retry the rows that failed permanently.")] = False,
    unknown: Annotated[
        bool, typer.Option("--unknown", help="Retry unknown rows unchecked (`reconcile` checks them first).")
    ] = False,
    sandbox: LedgerSandboxOpt = False,
) -> None:
    """Move failed (or unknown) rows back to pending with a new key; then `resume` sends them."""
    with _exit_codes():
        states = [s for s, wanted in ((RowState.FAILED, failed), (RowState.UNKNOWN, unknown)) if wanted]
        if not states:
            raise UsageError("say which rows to retry: --failed, --unknown, or both")
        loaded = load_manifest(manifest)
        path = _existing_ledger(loaded, manifest, sandbox=sandbox)
        ledger = _open(loaded, path, exclusive=True)
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


@app.command()
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
    with _exit_codes():
        loaded = load_manifest(manifest)
        path = _existing_ledger(loaded, manifest, sandbox=sandbox)
        ledger = _open(loaded, path)
        try:
            frame = build_report(ledger.rows(states=state or None))
        finally:
            ledger.close()
        write_report(frame, out_file)
        held = Counter(str(value) for value in frame["state"])
        print_report_written(out, path=out_file, rows=frame.height, states=dict(held))


def _existing_ledger(manifest: Manifest, given: Path, *, sandbox: bool) -> Path:
    path = _ledger_path(manifest, sandbox=sandbox)
    if not path.exists():
        message = f"{path}: no ledger yet (the campaign has not run); start with `campaign run {given}`"
        raise InputFileError(message)
    return path


async def _reconcile(manifest: Manifest, ledger: Ledger, api_key: str) -> ReconcileReport:
    clock = SystemClock()
    async with build_http_client(base_url=_api_uri(manifest), timeout_s=manifest.api.timeout_s) as http:
        client = NylasClient(http, api_key=api_key, clock=clock)
        return await reconcile_unknown(
            ledger, campaign=manifest.campaign.name, senders=manifest.senders, client=client
        )


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
    allow_changed_content: bool = False,
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
        # Only pending and in-flight rows are sent; unknown ones wait for `campaign reconcile`.
        settled = {row.key for row in ledger.rows() if row.state not in (RowState.PENDING, RowState.INFLIGHT)}
        ledger.close()
    preflight = run_preflight(manifest, secrets=secrets, skip_invalid=skip_invalid, assigned=assigned)
    preflight.raise_for_problems()
    content = _check_content(manifest, ledger_path, allow=allow_changed_content)
    todo = [job for job in preflight.jobs if job.recipient.key not in settled]
    print_checked(
        out,
        source=manifest.recipients.source.name,
        to_send=len(todo),
        skipped=Counter(skip.reason.value for skip in preflight.skips),
    )
    _confirm(len(todo), manifest, yes=yes, sandbox=sandbox)

    ledger_path.parent.mkdir(parents=True, exist_ok=True)
    ledger = _open(manifest, ledger_path, exclusive=True)
    try:
        sync = ledger.record_plan(
            [
                PlannedRow(j.recipient.key, j.recipient.row, j.recipient.address.email, j.sender)
                for j in preflight.jobs
            ],
            preflight.skips,
        )
        record_content(ledger, content)
        ledger.record_expired_claims()
        jobs = _open_jobs(ledger, preflight.jobs)
        fake = _sandbox_api(manifest) if sandbox else None
        work = partial(_send, preflight, jobs, ledger, api_key, clock, limit, wait, fake)
        interrupted = anyio.run(partial(run_interruptible, work, on_signal=_say_stopping))
        result = interrupted.result
        if result is not None:
            _record_parks(ledger, result, manifest)
        states = {state.value: count for state, count in ledger.counts(listed=True).items()}
        steps = build_status(manifest, ledger, clock=clock, command_path=str(path), sandbox=sandbox)["next"]
    finally:
        ledger.close()
    _print_sync(content, sync.newly_skipped, sync.restored)
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
    if result is None:  # a second Ctrl-C: cancelled at once
        out.print("Stopped at once (second Ctrl-C): sends in flight stay in flight; resume settles them.")
        print_next_steps(out, steps)
        return EXIT_INTERRUPTED
    print_run_summary(out, result, states=states, next_steps=steps)
    return EXIT_INTERRUPTED if interrupted.signals else _exit_code(result, states)


async def _send(
    preflight: Preflight,
    jobs: Sequence[Job],
    ledger: Ledger,
    api_key: str,
    clock: Clock,
    limit: int | None,
    wait: bool,
    fake: FakeNylas | None,
    stop: anyio.Event | None = None,
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
            # Issue 5: re-read the unsubscribe stores (about once a second) so a mid-run unsubscribe holds.
            stores = list_store_paths(manifest)
            watch = UnsubscribeWatch(stores, clock=clock)
            try:
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
                    unsubscribed=watch.is_unsubscribed if stores else None,
                    stop=stop,
                    # Rows in flight from an earlier run keep their grant (their key may be used).
                    bound={row.key for row in ledger.rows(states=(RowState.INFLIGHT,))},
                )
            finally:
                watch.close()


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


def _check_content(manifest: Manifest, ledger_path: Path, *, allow: bool) -> ContentCheck:
    """Compare this run's content with the ledger's (read only: recorded after confirmation)."""
    fingerprint = load_content_fingerprint(manifest)
    if not ledger_path.exists():
        return check_content(None, fingerprint, allow_changed=allow, manifest=manifest)
    ledger = _open(manifest, ledger_path)
    try:
        return check_content(ledger, fingerprint, allow_changed=allow, manifest=manifest)
    finally:
        ledger.close()


def _open_jobs(ledger: Ledger, jobs: Sequence[Job]) -> list[Job]:
    """The jobs whose rows still need a send; rows left in flight first (their keys age)."""
    states = {row.key: row.state for row in ledger.rows(states=(RowState.PENDING, RowState.INFLIGHT))}
    wanted = [job for job in jobs if job.recipient.key in states]
    return sorted(wanted, key=lambda job: states[job.recipient.key] != RowState.INFLIGHT)


def _say_stopping(signals: int) -> None:
    if signals == 1:
        err.print(
            "Stopping: no new sends; waiting for the sends in flight to finish and be recorded "
            "(Ctrl-C again to quit at once)"
        )
    else:
        err.print("Quitting now: rows in flight stay in flight; `campaign resume` settles them")


def _print_sync(content: ContentCheck, newly_skipped: int, restored: int) -> None:
    if content.changed:
        out.print("The content changed since sending began: sent with --allow-changed-content, and recorded.")
    if newly_skipped:
        out.print(f"{newly_skipped} rows not sent yet are now skipped (suppressed, unsubscribed or invalid).")
    if restored:
        out.print(f"{restored} rows skipped earlier as invalid now validate and are pending again.")


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


def _open(manifest: Manifest, path: Path, *, exclusive: bool = False) -> Ledger:
    return open_ledger(path, clock=SystemClock(), campaign=manifest.campaign.name, exclusive=exclusive)


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


def _ledger_view(manifest: Manifest, path: Path, *, clock: Clock) -> LedgerView:
    """What preview and send-test need from the ledger (read only; nothing when there is none)."""
    if not path.exists():
        return LedgerView()
    ledger = _open(manifest, path)
    try:
        since = clock.now().timestamp() - DAY_S
        return LedgerView(
            assigned=ledger.assigned_senders(),
            settled={row.key: row.state.value for row in ledger.rows() if row.state not in OPEN_STATES},
            used_24h={
                sender.name: sum(count for _, count in ledger.sent_recipients_since(sender.name, since))
                for sender in manifest.senders
            },
        )
    finally:
        ledger.close()


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
