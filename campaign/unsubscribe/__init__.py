"""Opt-outs: unsubscribe tokens and headers, and the store of who asked not to be mailed.

`TokenSigner` makes and opens the opaque per-recipient tokens (AES-GCM-SIV, rotation);
`build_unsubscribe_headers` gives RFC 2369/8058 headers. The store (`open_store`) records opt-outs,
bounces and the notifications `campaign serve` receives; it is shared across campaigns and with the
endpoint: one SQLite file (the default), or a PostgreSQL database (a `postgresql://` URL, schema
`campaign_store`) when the endpoint and campaigns run on several machines. Both behave alike:
`SuppressionStore` is written once, over each backend's SQL (`_sqlitestore`, `_pgstore`).
`UnsubscribeWatch` re-reads the stores during a run so an opt-out stops the next send;
`open_existing_stores` opens a campaign's stores for one read (`load_unsubscribed`; status and report
read the engagement, `find_engagement`, and the bounces from the same open stores). The endpoint
that serves the links is in `campaign.web`: nothing in the core imports a web server.
"""

from __future__ import annotations

from campaign.unsubscribe._store import (
    BLOCK_KIND,
    BOUNCE_SOURCE,
    INBOX_EVENT_PREFIX,
    BounceRecord,
    BounceRules,
    Engagement,
    InboxCursor,
    StoreEntry,
    StoreError,
    StoreFollower,
    SuppressionStore,
    ThreadReply,
    Unsubscribed,
    UnsubscribeWatch,
    describe_entry,
    find_engagement,
    is_store_path,
    list_store_paths,
    load_unsubscribed,
    lookup_unsubscribed,
    notification_time,
    open_existing_stores,
    open_store,
    storable_text,
    store_exists,
    store_location,
)
from campaign.unsubscribe._tokens import (
    TOKEN_SHAPE,
    TokenClaims,
    TokenSigner,
    build_unsubscribe_headers,
    find_mailto_token,
    make_token,
    parse_secrets,
    token_candidates,
    url_carries_token,
    verify_token,
)

__all__ = [
    "BLOCK_KIND",
    "BOUNCE_SOURCE",
    "INBOX_EVENT_PREFIX",
    "TOKEN_SHAPE",
    "BounceRecord",
    "BounceRules",
    "Engagement",
    "InboxCursor",
    "StoreEntry",
    "StoreError",
    "StoreFollower",
    "SuppressionStore",
    "ThreadReply",
    "TokenClaims",
    "TokenSigner",
    "UnsubscribeWatch",
    "Unsubscribed",
    "build_unsubscribe_headers",
    "describe_entry",
    "find_engagement",
    "find_mailto_token",
    "is_store_path",
    "list_store_paths",
    "load_unsubscribed",
    "lookup_unsubscribed",
    "make_token",
    "notification_time",
    "open_existing_stores",
    "open_store",
    "parse_secrets",
    "storable_text",
    "store_exists",
    "store_location",
    "token_candidates",
    "url_carries_token",
    "verify_token",
]
