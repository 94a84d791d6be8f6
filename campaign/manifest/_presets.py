"""Default limits per mailbox provider, from reference/nylas-api.md §10 and email-standards.md §3. Pure data.

A sender's explicit keys always override its preset. The numbers err on the safe side:
an account locked for a day costs more than a campaign that takes an hour longer.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

__all__ = ["PROVIDERS_WITHOUT_CUSTOM_HEADERS", "PROVIDER_PRESETS"]

PROVIDER_PRESETS: MappingProxyType[str, MappingProxyType[str, Any]] = MappingProxyType(
    {
        # Consumer Gmail: ~500 recipients a day; Nylas advises ~2 sends/s per Gmail user at most.
        "gmail": MappingProxyType({"per_second": 1.0, "per_day": 500, "concurrency": 2}),
        # Workspace: 2,000 messages and 10,000 recipients in a rolling 24 h (one recipient per message here).
        "google-workspace": MappingProxyType(
            {"per_second": 2.0, "per_day": 2000, "per_day_messages": 2000, "concurrency": 2}
        ),
        # Exchange Online: 10,000 recipients a day, 30 messages a minute; Graph allows few concurrent
        # requests per mailbox and one send is several Graph calls, so one at a time.
        "microsoft": MappingProxyType({"per_minute": 30.0, "per_day": 10_000, "concurrency": 1}),
        # Yahoo Business Mail: 500 recipients a day; consumer limits are unpublished.
        "yahoo": MappingProxyType({"per_minute": 20.0, "per_day": 500, "concurrency": 1}),
        # iCloud: 1,000 messages and 1,000 recipients a day.
        "icloud": MappingProxyType(
            {"per_minute": 20.0, "per_day": 1000, "per_day_messages": 1000, "concurrency": 1}
        ),
        # Generic IMAP/SMTP servers: limits are the admin's; start gently.
        "imap": MappingProxyType({"per_minute": 20.0, "per_day": 500, "concurrency": 1}),
    }
)

# Microsoft Graph and iCloud grants drop List-Unsubscribe custom headers (nylas-api.md §1.2).
PROVIDERS_WITHOUT_CUSTOM_HEADERS = frozenset({"microsoft", "icloud"})
