"""Which ledger is this campaign's, and whether its rows are keyed as the manifest keys them.

A campaign is known by `[campaign] name`, not by its manifest's file name, nor by the ledger a command
names now: a command that finds no ledger of the campaign where it looks, while its ledger is
elsewhere, is refused rather than taking the campaign for one that never ran (and a run mailing
everyone again). Elsewhere is another ledger beside a renamed manifest, the SQLite ledger beside the
manifest when the command names a PostgreSQL database, or the database a ledger marker names when it
names none. A ledger marker (`<manifest stem>.ledger.url`, beside where the SQLite ledger would be) is
left by a command that writes the campaign's ledger in a database the manifest does not name, only
`--ledger` (first of all, the run that creates it there): the campaign's name and the database's URL,
never a password or a query parameter that may hold a secret.

A recipient's key is its address, or the `key_column` value: once sending began, a change of key
scheme would give every row a new key (and a second message), so it is refused too. Reads only;
`record_key_scheme` writes the one meta value, and `write_ledger_marker` the marker.
"""

from __future__ import annotations

import json
import os
import shlex
import tomllib
from collections.abc import Iterable
from contextlib import suppress
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit

from campaign.errors import UsageError
from campaign.ledger._interface import Ledger
from campaign.ledger._ledger import read_ledger_campaign
from campaign.manifest import Manifest

__all__ = [
    "check_key_scheme",
    "check_no_orphaned_ledger",
    "key_scheme",
    "ledger_marker_path",
    "record_key_scheme",
    "write_ledger_marker",
]

_ADDRESS = "address"
_ANY_COLUMN = "column"  # inferred from the rows of a ledger older than this meta value: the name is unknown

_MARKER_SUFFIX = ".url"  # `campaign.ledger.sqlite` -> `campaign.ledger.url`
# The query parameters a marker keeps: libpq's that never hold a secret (password and sslpassword do;
# any other, unknown, is dropped too).
_SHAREABLE_PARAMETERS = frozenset(
    {
        "host",
        "hostaddr",
        "port",
        "dbname",
        "user",
        "options",
        "application_name",
        "connect_timeout",
        "sslmode",
        "sslrootcert",
        "sslcert",
        "sslkey",
        "target_session_attrs",
        "service",
    }
)


class _Database(Protocol):
    """A database's ledgers, as far as the check needs them (a `LedgerSite`)."""

    @property
    def where(self) -> str: ...

    def exists(self, campaign: str) -> bool: ...


def key_scheme(manifest: Manifest) -> str:
    """How this manifest keys recipients: "address", or "column:<key_column>"."""
    column = manifest.recipients.key_column
    return _ADDRESS if column is None else f"{_ANY_COLUMN}:{column}"


def check_key_scheme(ledger: Ledger, manifest: Manifest) -> None:
    """UsageError when sending began under another key scheme than the manifest's (nothing is written)."""
    stored = ledger.key_scheme()
    started = ledger.started_row()
    if started is None:
        return  # nothing went out yet: the rows may be keyed anew
    if stored is None:  # a ledger from before the scheme was recorded: tell from a row
        key, email = started
        stored = _ADDRESS if key == email.lower() or key == email else _ANY_COLUMN
    wanted = key_scheme(manifest)
    if stored == wanted or (stored == _ANY_COLUMN and wanted.startswith(f"{_ANY_COLUMN}:")):
        return
    message = (
        f"{manifest.path.name}: recipients.key_column: the ledger's recipients are keyed by "
        f"{_describe(stored)}, this manifest keys them by {_describe(wanted)}; sending began, so every "
        "row would get a new key and be mailed again: restore recipients.key_column"
    )
    raise UsageError(message)


def record_key_scheme(ledger: Ledger, manifest: Manifest) -> None:
    """Remember how this campaign keys its recipients (after `check_key_scheme` allowed it)."""
    ledger.record_key_scheme(key_scheme(manifest))


def check_no_orphaned_ledger(
    manifest: Manifest,
    path: Path,
    candidates: Iterable[Path],
    *,
    database: _Database | None = None,
    named_by_option: bool = True,
) -> None:
    """UsageError when the command would take the campaign for one that never ran, its ledger being
    elsewhere; nothing is read from `database` unless a file beside the manifest says so.

    `path` is the SQLite ledger the manifest's name makes, `candidates` the ledgers and ledger markers
    beside it (`ledger_marker_path`). On the file (`database` None): `path` is missing, but another
    ledger belongs to this campaign (a renamed manifest), or a marker says the campaign is in a
    database. In `database` (named by `--ledger` when `named_by_option`, else by `[ledger] url`): it
    holds no ledger of the campaign, but a SQLite ledger beside the manifest does, or a marker names
    another database. The line names both ledgers, how to go on with the one that holds the campaign,
    and how to start over where the command looks (mailing everyone again)."""
    campaign = manifest.campaign.name
    if database is None and path.exists():
        return
    for other in sorted({path, *candidates}):
        refusal = _elsewhere(manifest, path, other, database, named_by_option=named_by_option)
        if refusal is None:
            continue
        if database is not None and database.exists(campaign):
            return  # the database holds the campaign: it is its ledger
        raise UsageError(refusal)


def _elsewhere(
    manifest: Manifest, path: Path, other: Path, database: _Database | None, *, named_by_option: bool
) -> str | None:
    """Why `other`, beside the manifest, says the campaign's ledger is not where the command looks
    (`path`, or `database`): the refusal's line; None when it says nothing of the kind."""
    campaign = manifest.campaign.name
    if other.suffix == _MARKER_SUFFIX:
        marked = _read_ledger_marker(other)
        if marked is None or marked[0] != campaign:
            return None
        url = marked[1]
        if database is None:
            return (
                f"{path}: no ledger, but {other} says campaign {campaign!r} keeps its ledger in the "
                f"database {url}; nothing was sent: add `--ledger {shlex.quote(url)}` (or set [ledger] url) "
                f"to go on with it, or remove {other.name} to start the campaign over in a new SQLite "
                "ledger, mailing everyone in it again"
            )
        if _shareable_url(database.where) == url:
            return None
        return (
            f"{database.where}: no ledger of campaign {campaign!r}, but {other} says it keeps its ledger in "
            f"the database {url}; nothing was sent: use `--ledger {shlex.quote(url)}` to go on with it, or "
            f"remove {other.name} to start the campaign over in this database, mailing everyone in it again"
        )
    if (database is None and other == path) or not other.exists() or read_ledger_campaign(other) != campaign:
        return None
    if database is None:
        return (
            f"{path}: no ledger, but {other} belongs to campaign {campaign!r} "
            f"(was the manifest renamed?); nothing was sent: {_adopting(other, path)} "
            "to go on with it, or change campaign.name to start another campaign"
        )
    keep = "leave out --ledger"
    if manifest.ledger.url is not None:
        keep = f"remove [ledger] url from {manifest.path.name}" + (
            " and leave out --ledger" * named_by_option
        )
    return (
        f"{database.where}: no ledger of campaign {campaign!r}, but the SQLite ledger {other} holds it; "
        f"nothing was sent: {keep} to go on with that file, or move {_moved(other)} away to start the "
        "campaign over in this database, mailing everyone in it again"
    )


def ledger_marker_path(ledger: Path) -> Path:
    """Where the marker of a campaign whose SQLite ledger would be `ledger` goes, beside it."""
    return ledger.with_suffix(_MARKER_SUFFIX)


def _shareable_url(url: str) -> str:
    """A database's URL without anything that may be a secret: its password, and every query parameter
    but those known to hold none (`_SHAREABLE_PARAMETERS`)."""
    parts = urlsplit(url)
    user, _, host = parts.netloc.rpartition("@")
    netloc = f"{user.partition(':')[0]}@{host}" if user else host
    kept = [(name, value) for name, value in parse_qsl(parts.query) if name in _SHAREABLE_PARAMETERS]
    return parts._replace(netloc=netloc, query=urlencode(kept), fragment="").geturl()


def _read_ledger_marker(path: Path) -> tuple[str, str] | None:
    """The campaign and database URL the ledger marker at `path` names; None when it is not one."""
    try:
        found = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    campaign, url = found.get("campaign"), found.get("url")
    if not isinstance(campaign, str) or not isinstance(url, str):
        return None
    return campaign, url


def write_ledger_marker(path: Path, *, campaign: str, url: str) -> None:
    """Leave the marker saying that `campaign` keeps its ledger in the database at `url` (without its
    secrets), unless it says so already. Best effort: a folder that cannot be written (a manifest
    mounted read-only) keeps the command going without it."""
    url = _shareable_url(url)
    if _read_ledger_marker(path) == (campaign, url):
        return
    # json's strings are TOML basic strings: quotes, backslashes and control characters escaped (a
    # manifest's name and URL hold no DEL, which json would leave as it is).
    text = (
        "# campaign keeps this campaign's ledger in a PostgreSQL database (never a password here): a\n"
        "# command without --ledger refuses to start a new SQLite ledger for it while this file is here.\n"
        f"campaign = {json.dumps(campaign, ensure_ascii=False)}\n"
        f"url = {json.dumps(url, ensure_ascii=False)}\n"
    )
    aside = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        aside.write_text(text, encoding="utf-8")
        aside.replace(path)
    except OSError:
        with suppress(OSError):
            aside.unlink(missing_ok=True)


def _adopting(other: Path, path: Path) -> str:
    """How to make the ledger at `other` the one at `path`: the renames, in words."""
    if other.name == path.name:  # a sandbox ledger: its folder carries the manifest's name
        return f"rename the folder {other.parent.name} to {path.parent.name}"
    wal = other.with_name(f"{other.name}-wal")
    if wal.exists():  # an unclean stop: the latest records are in the write-ahead log, not the file yet
        return f"rename {other.name} to {path.name} and {wal.name} to {path.name}-wal"
    return f"rename {other.name} to {path.name}"


def _moved(ledger: Path) -> str:
    """The files that make the SQLite ledger `ledger`, in words: with its write-ahead log if it has one
    (a new ledger at its place would take the old one's log for its own)."""
    wal = ledger.with_name(f"{ledger.name}-wal")
    return f"{ledger.name} and {wal.name}" if wal.exists() else ledger.name


def _describe(scheme: str) -> str:
    if scheme == _ADDRESS:
        return "email address (no key_column)"
    if scheme == _ANY_COLUMN:
        return "a key column"
    return f"key_column {scheme.partition(':')[2]!r}"
