"""Resuming a campaign whose inputs have not changed: the plan stamp, and the open jobs read back.

A full preflight checks and renders every row of the list, which for a million rows
takes minutes. The plan stamp hashes every input that decides which rows are sent, by
whom, and whether they pass preflight (the manifest's settings, the content fingerprint,
the list and suppression files, --skip-invalid, this version of campaign). `run` records
it with the plan; a later run whose stamp matches knows the earlier preflight still
holds, so it reads back only the ledger's open rows instead of checking the list again.
Rows unsubscribed since then are caught before each send, as in any run. Sends nothing
and writes nothing.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from pathlib import Path

from campaign import __version__
from campaign.ledger import Ledger
from campaign.manifest import STORE_SUFFIXES, Manifest
from campaign.plan import Job
from campaign.recipients import scan_audience

__all__ = ["load_open_jobs", "load_plan_stamp", "load_rules_stamp"]

# Bump when preflight's rules change, so that a stamp recorded under the old rules no longer matches.
_RULES = 2


def load_rules_stamp(manifest: Manifest, *, content: str, skip_invalid: bool) -> str:
    """SHA-256 over every input that decides how a row is checked, but the list's rows themselves:
    the manifest, the content, the suppression files, --skip-invalid, this version (reads files).

    Under the same rules stamp, a row whose cells did not change passes as it passed before (its
    digest is in the ledger: `cells_digest`), so a run re-checks only rows added or changed.
    `content` is the run's content fingerprint (`campaign.pipeline.ContentCheck.combined`).
    """
    digest = hashlib.sha256()
    settings = manifest.model_dump(mode="json")
    header = [_RULES, __version__, skip_invalid, content, settings]
    digest.update(json.dumps(header, sort_keys=True, default=str).encode())
    # Unsubscribe stores change while a campaign runs; each send checks them: they are not part of the plan.
    lists = [path for path in manifest.recipients.suppress if path.suffix.lower() not in STORE_SUFFIXES]
    for path in lists:
        digest.update(f"\0{path}\0".encode())
        digest.update(_file_digest(path))
    return digest.hexdigest()


def load_plan_stamp(manifest: Manifest, *, content: str, skip_invalid: bool) -> str:
    """SHA-256 over every input that decides the plan and its preflight: the rules stamp and the list
    file (reads the files)."""
    digest = hashlib.sha256(load_rules_stamp(manifest, content=content, skip_invalid=skip_invalid).encode())
    source = manifest.recipients.source
    digest.update(f"\0{source}\0".encode())
    digest.update(_file_digest(source))
    return digest.hexdigest()


def load_open_jobs(manifest: Manifest, ledger: Ledger, now: datetime | None = None) -> list[Job]:
    """The ledger's open rows of step 1 (due at `now`, if given) as jobs, their fields read back from
    the list; rows left in flight first.

    Only valid when the ledger's plan stamp matches this run's: the rows are taken as the
    earlier preflight checked them (row number, key, normalised address, sender).
    """
    scan = scan_audience(manifest.recipients, sender_names=[sender.name for sender in manifest.senders])
    open_rows = ledger.open_rows(now)
    recipients = scan.recipients_at([(row.row, row.key, row.email) for row in open_rows])
    return [Job(recipient, row.sender) for row, recipient in zip(open_rows, recipients, strict=True)]


def _file_digest(path: Path) -> bytes:
    try:
        with path.open("rb") as file:
            return hashlib.file_digest(file, "sha256").digest()
    except OSError:
        return b"unreadable"  # matches no recorded stamp: the full preflight then says what is wrong
