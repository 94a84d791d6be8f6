"""The manifest: one TOML file that says who is mailed, with what, from which mailboxes, how fast.

`load_manifest` reads and validates it into a frozen `Manifest` (pydantic only here, at the
edge: every error names the key and what to do). The tables are in `_settings` ([campaign],
[api], [recipients], [unsubscribe], [[senders]], [ledger]), `_message` ([message]) and `_followups`
([[followups]]); `_presets` holds each provider's default limits; `_starter` is what `campaign
init` writes. Reads files, sends nothing, writes nothing but the starter.
"""

from __future__ import annotations

from campaign.manifest._followups import FIRST_STEP, FollowupSettings
from campaign.manifest._load import Manifest, SenderSettings, build_manifest_schema, load_manifest
from campaign.manifest._message import AttachmentSettings, MessageSettings
from campaign.manifest._settings import (
    HEADERLESS_PROVIDERS,
    IMAP_PROVIDERS,
    STORE_SUFFIXES,
    TOKEN_IN_URL_RULE,
    LedgerSettings,
    RecipientsSettings,
    check_env_name,
    check_ledger_url,
    check_store_url,
    is_store_url,
    normalize_sendable_address,
    postgres_keepalives,
)
from campaign.manifest._starter import write_starter

__all__ = [
    "FIRST_STEP",
    "HEADERLESS_PROVIDERS",
    "IMAP_PROVIDERS",
    "STORE_SUFFIXES",
    "TOKEN_IN_URL_RULE",
    "AttachmentSettings",
    "FollowupSettings",
    "LedgerSettings",
    "Manifest",
    "MessageSettings",
    "RecipientsSettings",
    "SenderSettings",
    "build_manifest_schema",
    "check_env_name",
    "check_ledger_url",
    "check_store_url",
    "is_store_url",
    "load_manifest",
    "normalize_sendable_address",
    "postgres_keepalives",
    "write_starter",
]
