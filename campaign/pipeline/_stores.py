"""Which unsubscribe stores a campaign read, so that one it stops reading is not forgotten in silence.

A store holds the opt-outs a campaign honours before each send (a follow-up, a row added to the list or
put back). A manifest naming another store, or a store file gone, would drop them without a word: the
ledger keeps the stores each run read (paths counted from the campaign's folder, a database by its URL,
which holds no password), and the next run names in a note each one it no longer reads, or finds gone.
Sends nothing.
"""

from __future__ import annotations

from pathlib import Path

from campaign.ledger import Ledger
from campaign.manifest import Manifest
from campaign.pipeline._portable import portable_path
from campaign.unsubscribe import list_store_paths, store_exists

__all__ = ["find_store_notes", "record_read_stores"]


def find_store_notes(manifest: Manifest, ledger: Ledger | None) -> tuple[str, ...]:
    """What the user should know before sending: each store an earlier run of this campaign read that this
    one will not (no longer named, or its file gone), with how to keep its opt-outs."""
    if ledger is None:
        return ()
    named = dict(_named_stores(manifest))
    notes = []
    for kept in ledger.read_stores():
        where = named.get(kept)
        # A file's name counts from the campaign's folder; shown whole, so the command works from anywhere.
        shown = kept if "://" in kept else str(manifest.base_dir / kept)
        if where is None:
            into = next(iter(named.values()), None)
            how = (
                f"`campaign suppress import {shown} --store {into}`"
                if into is not None
                else "naming it in unsubscribe.store or recipients.suppress"
            )
            notes.append(
                f"unsubscribe store {shown}, read by this campaign's earlier runs, is no longer named: its "
                f"opt-outs will not stop anyone this run mails; keep them with {how}"
            )
        elif not store_exists(where):
            notes.append(
                f"unsubscribe store {shown}, read by this campaign's earlier runs, is gone: its opt-outs "
                "will not stop anyone this run mails; put the file back (or import its entries with "
                "`campaign suppress import`)"
            )
    return tuple(notes)


def record_read_stores(ledger: Ledger, manifest: Manifest) -> None:
    """Keep the stores this run reads, for the next run's `find_store_notes`."""
    ledger.record_read_stores([name for name, _ in _named_stores(manifest)])


def _named_stores(manifest: Manifest) -> list[tuple[str, Path | str]]:
    """(name as the ledger keeps it, where) of each store the manifest names."""
    return [
        (where if isinstance(where, str) else portable_path(where, manifest.base_dir), where)
        for where in list_store_paths(manifest)
    ]
