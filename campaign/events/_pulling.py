"""`campaign events pull` as one call: which store, which grants, since when; then `pull_bounces`."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from datetime import timedelta
from pathlib import Path

from campaign.clock import Clock
from campaign.errors import UsageError
from campaign.events._pull import InboxReader, PullReport, pull_bounces
from campaign.ledger import open_ledger
from campaign.manifest import Manifest
from campaign.unsubscribe import list_store_paths, open_store

__all__ = ["pull_campaign_bounces"]

# Look back a little before the first claim: the provider's clock and ours may differ.
_SKEW = timedelta(minutes=5)


async def pull_campaign_bounces(
    manifest: Manifest,
    ledger_path: Path,
    *,
    connect: Callable[[], AbstractAsyncContextManager[InboxReader]],
    clock: Clock,
) -> PullReport | None:
    """Pull the bounce reports of a campaign's senders into its store; None when nothing was sent yet.

    The store is `unsubscribe.store`, else the first store in `recipients.suppress` (UsageError
    when the manifest names none). Only grants have an inbox: domain senders are left out.
    """
    stores = list_store_paths(manifest)
    if not stores:
        message = (
            f"{manifest.path.name}: no unsubscribe store to record bounces in; name one with "
            "unsubscribe.store (or a .sqlite file in recipients.suppress)"
        )
        raise UsageError(message)
    ledger = open_ledger(
        ledger_path, clock=clock, campaign=manifest.campaign.name, create=False, read_only=True
    )
    try:
        first = ledger.first_claim()
    finally:
        ledger.close()
    if first is None:
        return None
    store_path = (
        manifest.unsubscribe.store if manifest.unsubscribe and manifest.unsubscribe.store else stores[0]
    )
    grants = [sender.grant_id for sender in manifest.senders if sender.grant_id is not None]
    store = open_store(store_path, clock=clock)
    try:
        async with connect() as client:
            return await pull_bounces(client, grants, store, since=first - _SKEW)
    finally:
        store.close()
