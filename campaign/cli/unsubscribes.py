"""Unsubscribes: `unsubscribe serve` (the one-click endpoint) and `suppress add/import/export/list`
(managing the unsubscribe store that every campaign reading it skips).

`--store` names a store file (e.g. unsubscribes.sqlite) or a PostgreSQL database (`postgresql://…`,
no password in it: libpq reads PGPASSWORD); a URL is checked before anything is opened, and an error
never repeats it.

The two command groups are typer sub-apps; the package registers them on the root command.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from campaign.cli.base import PortOpt, err, exit_codes, note_secret_envs, options, out
from campaign.cli.output import plural, print_notes, show
from campaign.errors import DataError, UsageError
from campaign.manifest import check_env_name
from campaign.recipients import (
    load_import_addresses,
    locate_suppression_entry,
    parse_suppression_entry,
    write_entries,
)
from campaign.redaction import holds_secret, quote_value, secret_values
from campaign.unsubscribe import BounceRules, SuppressionStore, is_store_path, open_store, store_location
from campaign.web import (
    DEFAULT_SECRET_ENV,
    DEFAULT_WEBHOOK_SECRET_ENV,
    EventService,
    ServerLimits,
    load_endpoint,
    read_webhook_secrets,
    serve_endpoint,
    serve_service,
)

__all__ = ["serve", "suppress_app", "unsubscribe_app"]

_T = TypeVar("_T")
_DEFAULT_LIMITS = ServerLimits()

unsubscribe_app = typer.Typer(no_args_is_help=True, help="The one-click unsubscribe endpoint (RFC 8058).")
suppress_app = typer.Typer(
    no_args_is_help=True, help="Manage an unsubscribe store: add, import, export, list."
)
StoreOpt = Annotated[
    str,
    typer.Option(
        "--store",
        help="The unsubscribe store, e.g. unsubscribes.sqlite, or a PostgreSQL database, e.g. "
        "postgresql://campaign@db.example.com/campaigns (its password in PGPASSWORD, never here).",
        show_default=False,
    ),
]
# The options `unsubscribe serve` and `serve` share.
HostOpt = Annotated[str, typer.Option(help="Address to listen on.")]
SecretEnvOpt = Annotated[
    str, typer.Option("--secret-env", help="Environment variable with the secret(s) links are signed with.")
]
HeaderTimeoutOpt = Annotated[
    float, typer.Option(min=0.01, max=3600, help="Seconds a client has to send a request's headers.")
]
BodyTimeoutOpt = Annotated[
    float, typer.Option(min=0.01, max=3600, help="Seconds a client has to send a request's body.")
]
MaxConnectionsOpt = Annotated[
    int,
    typer.Option(
        min=1, help="Open connections at most; at the cap a new one closes the oldest half-sent request."
    ),
]


@unsubscribe_app.command("serve")
def unsubscribe_serve(
    store: StoreOpt,
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8080,
    secret_env: SecretEnvOpt = DEFAULT_SECRET_ENV,
    max_connections: MaxConnectionsOpt = _DEFAULT_LIMITS.max_connections,
    header_timeout: HeaderTimeoutOpt = _DEFAULT_LIMITS.header_timeout_s,
    body_timeout: BodyTimeoutOpt = _DEFAULT_LIMITS.body_timeout_s,
) -> None:
    """Serve the one-click unsubscribe endpoint, recording unsubscribes in --store (put https in front)."""
    with exit_codes():
        try:
            check_env_name(secret_env)
        except ValueError as exc:  # its message never repeats the value: it may be the secret itself
            raise UsageError(f"--secret-env: {exc}") from exc
        note_secret_envs(secret_env)
        endpoint = load_endpoint(_store_path(store), secret_env=secret_env)
        limits = ServerLimits(
            max_connections=max_connections, header_timeout_s=header_timeout, body_timeout_s=body_timeout
        )
        try:
            out.print(f"Unsubscribe endpoint on http://{host}:{port}, recording to {store}; Ctrl-C stops it")
            serve_endpoint(endpoint, host=host, port=port, limits=limits)
        finally:
            endpoint.store.close()


def serve(
    store: StoreOpt,
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8080,
    secret_env: SecretEnvOpt = DEFAULT_SECRET_ENV,
    webhook_secret_env: Annotated[
        str,
        typer.Option(
            "--webhook-secret-env",
            help="Environment variable with the Nylas webhook's secret (comma-separated).",
        ),
    ] = DEFAULT_WEBHOOK_SECRET_ENV,
    soft_bounce_limit: Annotated[
        int | None,
        typer.Option(
            min=1, max=1000, help="Soft bounces that suppress an address (kept with the store; default 3)."
        ),
    ] = None,
    soft_bounce_days: Annotated[
        int | None,
        # A window past ten years is a typo; a vast one overflowed the date of every soft bounce (503).
        typer.Option(min=1, max=3650, help="Within this many days (kept with the store; default 30)."),
    ] = None,
    max_connections: MaxConnectionsOpt = _DEFAULT_LIMITS.max_connections,
    header_timeout: HeaderTimeoutOpt = _DEFAULT_LIMITS.header_timeout_s,
    body_timeout: BodyTimeoutOpt = _DEFAULT_LIMITS.body_timeout_s,
) -> None:
    """Serve one-click unsubscribes and Nylas webhooks (bounces, replies, opens, clicks) into --store."""
    with exit_codes():
        for option, name in (("--secret-env", secret_env), ("--webhook-secret-env", webhook_secret_env)):
            try:
                check_env_name(name)
            except ValueError as exc:  # its message never repeats the value: it may be the secret itself
                raise UsageError(f"{option}: {exc}") from exc
        note_secret_envs(secret_env, webhook_secret_env)
        webhook_secrets = read_webhook_secrets(webhook_secret_env)
        endpoint = load_endpoint(_store_path(store), secret_env=secret_env)
        try:
            print_notes(err, endpoint.store.notes)
            if soft_bounce_limit is not None or soft_bounce_days is not None:
                rules = endpoint.store.bounce_rules()
                endpoint.store.set_bounce_rules(
                    BounceRules(soft_bounce_limit or rules.limit, soft_bounce_days or rules.days)
                )
            service = EventService(endpoint, webhook_secrets=webhook_secrets, clock=options.clock)
            out.print(f"Serving /unsubscribe and /nylas/webhook on http://{host}:{port}; Ctrl-C stops it")
            limits = ServerLimits(
                max_connections=max_connections, header_timeout_s=header_timeout, body_timeout_s=body_timeout
            )
            serve_service(service, host=host, port=port, limits=limits)
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
    with exit_codes():
        keys: list[str] = []
        hint = "give one address per argument (or use --key)"
        for number, value in enumerate(values, start=1):
            _refuse_a_secret(f"argument {number}", [value])
            try:
                found = value.strip() if key else _one_address(value)
            except DataError as exc:  # an address that does not validate: the line says why
                raise DataError(f"{exc}; {hint}") from exc
            if not found:
                raise DataError(f"{value!r} is not a valid address; {hint}")
            keys.append(found)
        added = _with_store(
            store, lambda s: s.record_many(s.build_entry("", k, email=None, source="manual") for k in keys)
        )
        out.print(f"{added} added, {len(set(keys)) - added} already there ({store})", markup=False)


@suppress_app.command("import")
def suppress_import(
    source: Annotated[
        str,
        typer.Argument(
            help="A .csv/.parquet (column email) or text list, or a store (a file or a postgresql:// URL).",
            show_default=False,
        ),
    ],
    store: StoreOpt,
) -> None:
    """Add every address of a suppression list, an export or another store (and its key-only entries)."""
    with exit_codes():
        origin = _location("SOURCE", source)
        name = origin.name if isinstance(origin, Path) else origin
        found = load_import_addresses(origin, clock=options.clock)
        _refuse_a_secret(name, found.entries, source=origin)
        added = _with_store(
            store,
            lambda s: s.record_many(
                [
                    *(s.build_entry("", a, email=a, source="import") for a in found.addresses),
                    *(s.build_entry("", k, email=None, source="import") for k in found.keys),
                ]
            ),
        )
        keys = f", {len(found.keys)} recipient {plural(len(found.keys), 'key')}" if found.keys else ""
        left_out = ""
        if len(found.invalid) == 1:
            left_out = "; 1 value is not an address and was left out"
        elif found.invalid:
            left_out = f"; {len(found.invalid)} values are not addresses and were left out"
        addresses = len(found.addresses)
        out.print(
            f"{name}: {addresses} {plural(addresses, 'address', 'addresses')}{keys}, {added} new{left_out}",
            markup=False,
            soft_wrap=True,
        )


@suppress_app.command("export")
def suppress_export(
    target: Annotated[
        Path, typer.Argument(help="A .csv or .parquet file (every column), or text (addresses).")
    ],
    store: StoreOpt,
) -> None:
    """Write the store's entries to a file."""
    with exit_codes():
        entries = _with_store(store, lambda s: s.entries(), create=False)
        left = write_entries(entries, target, store=_store_path(store))
        entry = plural(left, "entry", "entries")
        note = f"; left out {left} key-only {entry} (text holds addresses): export to .csv to keep them"
        wrote = len(entries) - left
        out.print(
            f"wrote {wrote} {plural(wrote, 'entry', 'entries')} to {target}{note if left else ''}",
            markup=False,
            soft_wrap=True,
        )


@suppress_app.command("list")
def suppress_list(
    store: StoreOpt,
    as_json: Annotated[bool, typer.Option("--json", help="Print the entries as JSON.")] = False,
) -> None:
    """Show who is in the store: when, how, from which campaign."""
    with exit_codes():
        entries = _with_store(store, lambda s: s.entries(), create=False)
        if as_json:
            out.file.write(json.dumps([asdict(entry) for entry in entries], indent=2) + "\n")
            return
        for e in entries:
            who = show(e.email or e.recipient_key)
            out.print(f"{show(e.recorded_at)}  {show(e.source):<9}  {show(e.campaign or '-'):<20}  {who}")
        out.print(f"{len(entries)} {plural(len(entries), 'entry', 'entries')} in {store}", markup=False)


def _refuse_a_secret(where: str, values: Iterable[str], *, source: Path | str | None = None) -> None:
    """DataError, before anything is added, if one of `values` holds a secret (an API key, the value of a
    secret variable): an entry is shown by `suppress list` and written by `suppress export`. The values
    of a list file `source` (not a store): the line (or row) of the first that holds one is named too."""
    known = secret_values(options.secret_envs)
    if any(holds_secret(value, known) for value in values):
        if isinstance(source, Path) and not is_store_path(source):
            line = locate_suppression_entry(source, lambda value: holds_secret(value, known))
            where = where if line is None else f"{where}: {line}"
        raise DataError(
            f"{where}: holds a secret (an API key, or the value of a secret variable such as NYLAS_API_KEY), "
            "which the store would keep and show; remove it: secrets live only in environment variables "
            "(nothing was added)"
        )


def _one_address(value: str) -> str | None:
    """The one address in `value` (normalised, lower-cased), written as a suppression file may (`Ann
    <ann@example.com>`, …); None if it holds none or several, DataError if it does not validate."""
    parsed = parse_suppression_entry(value)
    return parsed[0] if parsed is not None and len(parsed) == 1 else None


def _location(option: str, value: str) -> Path | str:
    """A store or list named on the command line: a file's path, or a checked PostgreSQL URL."""
    try:
        return store_location(value, known=secret_values(options.secret_envs))
    except ValueError as exc:  # its message never repeats the value: a URL may hold a password
        raise UsageError(f"{option}: the URL {exc}") from exc


def _store_path(value: str) -> Path | str:
    where = _location("--store", value)
    if not is_store_path(where):
        shown = quote_value(where, secret_values(options.secret_envs), bare=True)
        raise UsageError(
            f"--store {shown}: give an SQLite file ending in .sqlite, e.g. unsubscribes.sqlite, or a "
            "PostgreSQL URL, e.g. postgresql://campaign@db.example.com/campaigns"
        )
    return where


def _with_store(path: str, use: Callable[[SuppressionStore], _T], *, create: bool = True) -> _T:
    store = open_store(_store_path(path), clock=options.clock, create=create)
    try:
        print_notes(err, store.notes)
        return use(store)
    finally:
        store.close()
