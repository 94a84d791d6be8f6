"""Which ledger is this campaign's, and whether its rows are keyed as the manifest keys them.

A campaign is known by `[campaign] name`, not by its manifest's file name: a run that finds no
ledger beside a renamed manifest, while another ledger there belongs to the same campaign, is
refused rather than mailing everyone again. A recipient's key is its address, or the
`key_column` value: once sending began, a change of key scheme would give every row a new key
(and a second message), so it is refused too. Reads only; `record_key_scheme` writes the one
meta value.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from campaign.errors import UsageError
from campaign.ledger._interface import Ledger
from campaign.ledger._ledger import read_ledger_campaign
from campaign.manifest import Manifest

__all__ = ["check_key_scheme", "check_no_orphaned_ledger", "key_scheme", "record_key_scheme"]

_ADDRESS = "address"
_ANY_COLUMN = "column"  # inferred from the rows of a ledger older than this meta value: the name is unknown


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


def check_no_orphaned_ledger(manifest: Manifest, path: Path, candidates: Iterable[Path]) -> None:
    """UsageError when `path` is missing but one of `candidates` is a ledger of this same campaign."""
    if path.exists():
        return
    for other in sorted(candidates):
        if other != path and read_ledger_campaign(other) == manifest.campaign.name:
            message = (
                f"{path}: no ledger, but {other} belongs to campaign {manifest.campaign.name!r} "
                f"(was the manifest renamed?); nothing was sent: {_adopting(other, path)} "
                "to go on with it, or change campaign.name to start another campaign"
            )
            raise UsageError(message)


def _adopting(other: Path, path: Path) -> str:
    """How to make the ledger at `other` the one at `path`: the renames, in words."""
    if other.name == path.name:  # a sandbox ledger: its folder carries the manifest's name
        return f"rename the folder {other.parent.name} to {path.parent.name}"
    wal = other.with_name(f"{other.name}-wal")
    if wal.exists():  # an unclean stop: the latest records are in the write-ahead log, not the file yet
        return f"rename {other.name} to {path.name} and {wal.name} to {path.name}-wal"
    return f"rename {other.name} to {path.name}"


def _describe(scheme: str) -> str:
    if scheme == _ADDRESS:
        return "email address (no key_column)"
    if scheme == _ANY_COLUMN:
        return "a key column"
    return f"key_column {scheme.partition(':')[2]!r}"
