"""`campaign events pull` as one call: which store, which grants, since when; then `pull_bounces`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path

import anyio
import anyio.to_thread

from campaign.clock import Clock
from campaign.errors import UsageError
from campaign.events._pull import InboxReader, PullReport, pull_bounces
from campaign.ledger import LedgerSite
from campaign.manifest import Manifest
from campaign.unsubscribe import list_store_paths, open_store

__all__ = ["PULL_SKEW", "events_store_path", "pull_campaign_bounces", "pull_senders_inboxes"]

# Look back a little before the first claim: the provider's clock and ours may differ.
PULL_SKEW = timedelta(minutes=5)


def events_store_path(manifest: Manifest) -> Path | str | None:
    """The store what comes back is recorded in: `unsubscribe.store`, else the first store in
    `recipients.suppress`; None when the manifest names none."""
    if manifest.unsubscribe is not None and manifest.unsubscribe.store is not None:
        return manifest.unsubscribe.store
    stores = list_store_paths(manifest)
    return stores[0] if stores else None


async def pull_campaign_bounces(
    manifest: Manifest,
    site: LedgerSite,
    *,
    connect: Callable[[], AbstractAsyncContextManager[InboxReader]],
    clock: Clock,
    secrets: Sequence[bytes] = (),
) -> PullReport | None:
    """Pull the bounce reports of a campaign's senders into its store, and with the unsubscribe `secrets`
    the unsubscribe requests mailed to a sender's inbox (`unsubscribe.mailto`); None when nothing was
    sent yet.

    The store is `unsubscribe.store`, else the first store in `recipients.suppress` (UsageError
    when the manifest names none).
    """
    store_path = events_store_path(manifest)
    if store_path is None:
        message = (
            f"{manifest.path.name}: no unsubscribe store to record bounces in; name one with "
            "unsubscribe.store (or a .sqlite file or a postgresql:// URL in recipients.suppress)"
        )
        raise UsageError(message)
    ledger = site.open(clock=clock, campaign=manifest.campaign.name, create=False, read_only=True)
    try:
        first = ledger.first_claim()
    finally:
        ledger.close()
    if first is None:
        return None
    async with connect() as client:
        return await pull_senders_inboxes(
            client, manifest, store_path, first_claim=first, clock=clock, secrets=secrets
        )


async def pull_senders_inboxes(
    client: InboxReader,
    manifest: Manifest,
    store_path: Path | str,
    *,
    first_claim: datetime,
    clock: Clock,
    secrets: Sequence[bytes] = (),
) -> PullReport:
    """Walk the inboxes of the campaign's grant senders since its first claim (less `PULL_SKEW`) and
    record what they hold in the store at `store_path`: bounce reports, and with `secrets` the
    unsubscribe requests mailed to a sender. Domain senders have no inbox and are left out."""
    grants = [sender.grant_id for sender in manifest.senders if sender.grant_id is not None]
    store = await anyio.to_thread.run_sync(partial(open_store, store_path, clock=clock))
    try:
        return await pull_bounces(client, grants, store, since=first_claim - PULL_SKEW, secrets=secrets)
    finally:
        store.close()
