"""The statements an unsubscribe store runs, as each database backend offers them.

`SuppressionStore` (in `_store`) holds the behaviour: who an entry is for, what a notification
does, when bounces suppress an address, what tracking events mean. It reaches its database only
through a `StoreSql`: `_sqlitestore` (a file) and `_pgstore` (PostgreSQL) each implement it in
their own SQL, and nothing else. A backend turns its library's errors into `StoreError` (or
`InputFileError` for what is not a store), naming the store by its `where`.

Both keep the same promises: an entry is kept once per (campaign, recipient key); ids grow with
every entry and event, and a reader paging by id (`entries_since`, `events_since`) never misses a
row written by a transaction that had not committed yet (writers go one at a time); `write()` is
one transaction, all of it kept or none.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Protocol

from campaign.unsubscribe._values import BounceRecord

__all__ = ["BounceRow", "EntryRow", "EventRow", "NumberedEntryRow", "StoreSql", "StoreWrites"]

# campaign ('' for entries by hand, imported or from a bounce), recipient_key, email, recorded_at, source
EntryRow = tuple[str, str, str | None, str, str]
# an entry's id, then its EntryRow's columns
NumberedEntryRow = tuple[int, str, str, str | None, str, str]
# an event's sequence number (or its type), its body as received, when it was received
EventRow = tuple[int, str, str]
# email, hard, bounced_at, code, kind, reason, message_id
BounceRow = tuple[str, bool, str, str | None, str | None, str | None, str | None]


class StoreWrites(Protocol):
    """The writes of one transaction (`StoreSql.write`)."""

    def add_entries(self, rows: Sequence[EntryRow]) -> int:
        """Insert entries in order, leaving out any whose (campaign, recipient_key) is there; how many
        were new."""
        ...

    def add_event(self, event_id: str, kind: str, grant_id: str | None, received_at: str, body: str) -> bool:
        """Insert a notification; False if its id is there already (nothing inserted)."""
        ...

    def add_bounce(self, bounce: BounceRecord, event_id: str) -> None:
        """Insert a bounce of `event_id` (its email lower-cased by the caller); one per (event, email)."""
        ...

    def soft_bounces_between(self, email: str, start: str, end: str) -> list[tuple[str, str]]:
        """(bounced_at, event_id) of the soft bounces of `email` (blocks left out) dated from `start` to
        `end` (ISO: compared as text)."""
        ...

    def set_setting(self, name: str, value: str) -> None:
        """Insert or replace one setting."""
        ...


class StoreSql(Protocol):
    """One store's database: reads, each one statement on its own, and `write()` transactions."""

    @property
    def where(self) -> str:
        """The store for messages: its file's path, or its database URL (never holding a password)."""
        ...

    @property
    def notes(self) -> tuple[str, ...]:
        """What the user should know of the store as opened (a SQLite file without WAL), for a command to
        show; never an error."""
        ...

    def close(self) -> None:
        """Close the connections."""
        ...

    def find(self, campaign: str, recipient_key: str) -> EntryRow | None:
        """The entry for (campaign, recipient_key), if there is one."""
        ...

    def entries(self) -> list[EntryRow]:
        """Every entry, by id."""
        ...

    def entries_for(self, keys: Sequence[str], emails: Sequence[str]) -> list[EntryRow]:
        """The entries whose recipient_key is one of `keys` or whose email is one of `emails`, by id."""
        ...

    def entries_since(self, last_id: int) -> list[NumberedEntryRow]:
        """The entries after id `last_id`, by id."""
        ...

    def newest_id(self) -> int:
        """The newest entry's id (0: none)."""
        ...

    def count(self) -> int:
        """How many entries there are."""
        ...

    def events_since(self, kind: str, last_seq: int) -> list[EventRow]:
        """The events of type `kind` after sequence number `last_seq`, in the order they were kept."""
        ...

    def events_of(self, kinds: Sequence[str]) -> list[tuple[str, str, str]]:
        """(type, body, received_at) of every event of these types, by received_at, then as kept."""
        ...

    def event_count(self) -> int:
        """How many events there are."""
        ...

    def bounces(self, email: str) -> list[BounceRow]:
        """The bounces of `email` (lower-cased by the caller), by bounced_at, then as kept."""
        ...

    def bounces_since(self, since: str) -> list[BounceRow]:
        """Every bounce dated at or after `since` (ISO UTC: compared as text), by bounced_at, then as kept."""
        ...

    def settings(self) -> dict[str, str]:
        """Every setting by name."""
        ...

    def write(self) -> AbstractContextManager[StoreWrites]:
        """One write transaction, writers one at a time: committed when the block ends, rolled back
        if it raises."""
        ...
