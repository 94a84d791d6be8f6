"""The unsubscribe store: who asked not to be mailed, shared by the endpoint and campaigns.

The one-click endpoint and `campaign suppress` write it; preflight and a running campaign read
it. A row records the campaign the link came from, the recipient key (and the address when the key
is one), when, and how (one-click, the confirmation page, by hand, an import, a bounce). Every
campaign that names the store skips everyone in it: the store is the list. It also keeps the Nylas
notifications `campaign serve` receives (once per envelope id) and the bounces they report: a hard
bounce suppresses its address at once, soft bounces once `BounceRules` say so. It never holds a
secret, never sends and never renders.

A store lives in one SQLite file (the default; `_sqlitestore`) or in a PostgreSQL database shared by
several machines (`open_store` given a `postgresql://` URL; `_pgstore`). `SuppressionStore` is the
behaviour, written once; it reaches its database through a `StoreSql` (`_sql`), so the backends
differ only in their SQL. A store's place is a `Path` or a URL string (`Path | str`): `where` says it
for messages, never with a password.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from email_validator import EmailNotValidError, validate_email

from campaign.clock import Clock, SystemClock
from campaign.errors import InputFileError
from campaign.manifest import STORE_SUFFIXES, Manifest, check_store_url, is_store_url
from campaign.models import Recipient, SkipReason
from campaign.unsubscribe._sql import StoreSql, StoreWrites
from campaign.unsubscribe._sqlitestore import open_sqlite_store
from campaign.unsubscribe._values import (
    BLOCK_KIND,
    BOUNCE_SOURCE,
    DEFAULT_SOFT_BOUNCE_DAYS,
    DEFAULT_SOFT_BOUNCE_LIMIT,
    INBOX_EVENT_PREFIX,
    BounceRecord,
    BounceRules,
    Engagement,
    InboxCursor,
    StoreEntry,
    StoreError,
    ThreadReply,
    notification_time,
)

__all__ = [
    "BLOCK_KIND",
    "BOUNCE_SOURCE",
    "INBOX_EVENT_PREFIX",
    "BounceRecord",
    "BounceRules",
    "Engagement",
    "InboxCursor",
    "StoreEntry",
    "StoreError",
    "StoreFollower",
    "SuppressionStore",
    "ThreadReply",
    "UnsubscribeWatch",
    "Unsubscribed",
    "describe_entry",
    "find_engagement",
    "is_store_path",
    "list_store_paths",
    "load_unsubscribed",
    "lookup_unsubscribed",
    "notification_time",
    "open_existing_stores",
    "open_store",
    "storable_text",
    "store_exists",
    "store_location",
]

# The tracking notifications `engagement` reads.
_TRACKING = ("message.opened", "message.link_clicked", "thread.replied")
# The setting that keeps a grant's InboxCursor: this, then the grant id.
_INBOX_PULL = "inbox_pull:"
# A report `events pull` found in the inbox and a webhook's bounce of the same address this close are one
# bounce seen twice (both come from the same report, dated alike).
_SAME_REPORT = timedelta(hours=1)


def store_location(value: str, *, known: Iterable[str] = ()) -> Path | str:
    """A store named on a command line: a `postgresql://` URL as given, else a file's path; ValueError
    (never repeating the value) for a URL of another kind or one holding a password or other secret
    (`known`: the secret values it may not hold)."""
    return check_store_url(value, known=known) if is_store_url(value) else Path(value)


def is_store_path(where: Path | str) -> bool:
    """Whether a suppression source names an unsubscribe store (a PostgreSQL URL, or a file by its
    suffix) rather than a list file."""
    if isinstance(where, str):
        if is_store_url(where):
            return True
        where = Path(where)
    return where.suffix.lower() in STORE_SUFFIXES


def list_store_paths(manifest: Manifest) -> tuple[Path | str, ...]:
    """The unsubscribe stores a manifest names: stores in `recipients.suppress`, then `unsubscribe.store`."""
    found = [where for where in manifest.recipients.suppress if is_store_path(where)]
    store = None if manifest.unsubscribe is None else manifest.unsubscribe.store
    if store is not None and store not in found:
        found.append(store)
    return tuple(found)


def store_exists(where: Path | str) -> bool:
    """Whether there is a store at `where` yet (a file; a database holding the store's schema): one
    that does not exist holds no one. StoreError when a database cannot be asked."""
    if isinstance(where, str) and not is_store_url(where):
        where = Path(where)
    if isinstance(where, Path):
        return where.exists()
    from campaign.unsubscribe._pgstore import postgres_store_exists

    return postgres_store_exists(_checked_url(where))


def open_store(where: Path | str, *, clock: Clock, create: bool = True) -> SuppressionStore:
    """Open the store at `where`: a file (created, mode 0600, when `create`), or a PostgreSQL database
    given by a `postgresql://` URL (its schema created when `create`). InputFileError if there is no
    store there (and none is to be created) or it is not one; StoreError if it cannot be reached."""
    if isinstance(where, str) and not is_store_url(where):
        where = Path(where)
    if isinstance(where, Path):
        return SuppressionStore(open_sqlite_store(where, create=create), path=where, clock=clock)
    # psycopg is imported only for a database: a campaign on SQLite stores never loads it.
    from campaign.unsubscribe._pgstore import open_postgres_store

    url = _checked_url(where)
    return SuppressionStore(open_postgres_store(url, create=create), path=url, clock=clock)


def _checked_url(url: str) -> str:
    try:
        return check_store_url(url)
    except ValueError as exc:  # the message never repeats the URL: it may hold a password
        raise InputFileError(f"the unsubscribe store's URL {exc}") from exc


class SuppressionStore:
    """Reads and writes one unsubscribe store, whatever database keeps it (`StoreSql`); safe to share
    between threads."""

    def __init__(self, sql: StoreSql, *, path: Path | str, clock: Clock) -> None:
        self._sql = sql
        self._path = path
        self._clock = clock

    def __repr__(self) -> str:
        return f"SuppressionStore({self.where!r})"

    @property
    def path(self) -> Path | str:
        """Where the store is: its file, or its database's URL (without a password)."""
        return self._path

    @property
    def where(self) -> str:
        """Where the store is, for messages: its file's path, or its database's URL (never a password)."""
        return self._sql.where

    @property
    def notes(self) -> tuple[str, ...]:
        """What the user should know of the store as opened (a SQLite file that could not use WAL), for
        the command that opened it to show once."""
        return self._sql.notes

    def close(self) -> None:
        """Close the connection(s)."""
        self._sql.close()

    def record(self, campaign: str, recipient_key: str, *, email: str | None = None, source: str) -> bool:
        """Record that `recipient_key` unsubscribed from `campaign`; False if it already had (harmless)."""
        entry = self._entry(campaign, recipient_key, email, source)
        return self.record_many([entry]) == 1

    def record_many(self, entries: Iterable[StoreEntry]) -> int:
        """Record several entries in one transaction; returns how many were new."""
        rows = [(e.campaign, e.recipient_key, e.email, e.recorded_at, e.source) for e in entries]
        with self._sql.write() as db:
            return db.add_entries(rows)

    def build_entry(self, campaign: str, recipient_key: str, *, email: str | None, source: str) -> StoreEntry:
        """An entry stamped with the store's clock (for `record_many`)."""
        return self._entry(campaign, recipient_key, email, source)

    def find(self, campaign: str, recipient_key: str) -> StoreEntry | None:
        """The entry for `recipient_key` from `campaign`, if it is recorded."""
        found = self._sql.find(campaign, recipient_key)
        return None if found is None else StoreEntry(*found)

    def entries(self) -> list[StoreEntry]:
        """Every entry, oldest first."""
        return [StoreEntry(*row) for row in self._sql.entries()]

    def entries_for(self, keys: Iterable[str], emails: Iterable[str]) -> list[StoreEntry]:
        """The entries for any of `keys` or (lower-cased) `emails`, oldest first: a batch's lookup."""
        rows = self._sql.entries_for(list(keys), [email.lower() for email in emails])
        return [StoreEntry(*row) for row in rows]

    def newest_id(self) -> int:
        """The row id of the newest entry (0: none); `read_since` it to read only what comes after."""
        return self._sql.newest_id()

    def read_since(self, last_id: int) -> tuple[int, list[StoreEntry]]:
        """Entries recorded after row id `last_id`, and the newest id seen (for cheap re-reads)."""
        rows = self._sql.entries_since(last_id)
        newest = rows[-1][0] if rows else last_id
        return int(newest), [StoreEntry(*row[1:]) for row in rows]

    def replies_since(self, last_rowid: int) -> tuple[int, list[ThreadReply]]:
        """`thread.replied` notifications kept after `last_rowid` (replies the sender wrote left out),
        and the newest rowid seen, for cheap re-reads."""
        rows = self._sql.events_since("thread.replied", last_rowid)
        found = []
        for _, body, received_at in rows:
            try:
                obj = json.loads(body)["data"]["object"]
            except (ValueError, KeyError, TypeError):
                continue
            if not isinstance(obj, dict) or obj.get("from_self") is True:
                continue
            found.append(
                ThreadReply(
                    label=str(obj.get("label") or ""),
                    root_message_id=str(obj.get("root_message_id") or ""),
                    message_id=str(obj.get("message_id") or ""),
                    at=str(received_at),
                )
            )
        return (int(rows[-1][0]) if rows else last_rowid), found

    def count(self) -> int:
        """How many entries the store holds."""
        return self._sql.count()

    def record_event(
        self,
        event_id: str,
        kind: str,
        *,
        grant_id: str | None,
        body: str,
        bounces: Sequence[BounceRecord] = (),
    ) -> bool:
        """Keep a notification (raw) and its bounces, suppressing what they call for, in one transaction.

        False, and nothing written, when the notification was recorded before (a redelivery).
        """
        rules = self.bounce_rules()
        with self._sql.write() as db:
            if not db.add_event(event_id, kind, grant_id, self._stamp(), body):
                return False
            for bounce in bounces:
                self._record_bounce(db, bounce, event_id, rules)
            return True

    def bounces(self, email: str) -> list[BounceRecord]:
        """The bounces recorded for `email`, oldest first."""
        return [BounceRecord(*row) for row in self._sql.bounces(email.lower())]

    def bounces_since(self, since: datetime) -> list[BounceRecord]:
        """Every bounce dated at or after `since`, oldest first."""
        stamp = since.astimezone(UTC).isoformat(timespec="seconds")
        return [BounceRecord(*row) for row in self._sql.bounces_since(stamp)]

    def engagement(self) -> dict[str, Engagement]:
        """Opens, clicks and replies per sent message id, from the tracking notifications kept.

        A reply (`thread.replied`) counts for its `root_message_id`, the tracked message, unless the
        sender wrote it (`from_self`).
        """
        found: dict[str, Engagement] = {}
        for kind, body, stored_at in self._sql.events_of(_TRACKING):
            try:
                document = json.loads(body)
                obj = document["data"]["object"]
            except (ValueError, KeyError, TypeError):
                continue
            if not isinstance(obj, dict) or (kind == "thread.replied" and obj.get("from_self") is True):
                continue
            message_id = obj.get("root_message_id" if kind == "thread.replied" else "message_id")
            if not isinstance(message_id, str) or not message_id:
                continue
            # When it happened (the envelope's Unix time), else when the notification arrived.
            happened = notification_time(document.get("time"))
            at = stored_at if happened is None else happened.isoformat(timespec="seconds")
            found[message_id] = _engaged(found.get(message_id) or Engagement(), kind, str(at), obj)
        return found

    def event_count(self) -> int:
        """How many notifications the store holds."""
        return self._sql.event_count()

    def bounce_rules(self) -> BounceRules:
        """The soft-bounce rule this store applies (defaults unless `set_bounce_rules` changed them)."""
        found = self._sql.settings()
        return BounceRules(
            limit=int(found.get("soft_bounce_limit", DEFAULT_SOFT_BOUNCE_LIMIT)),
            days=int(found.get("soft_bounce_days", DEFAULT_SOFT_BOUNCE_DAYS)),
        )

    def set_bounce_rules(self, rules: BounceRules) -> None:
        """Keep a soft-bounce rule with the store, for every process that records bounces in it."""
        with self._sql.write() as db:
            for name, value in (("soft_bounce_limit", rules.limit), ("soft_bounce_days", rules.days)):
                db.set_setting(name, str(value))

    def inbox_cursor(self, grant_id: str) -> InboxCursor | None:
        """How far `events pull` read `grant_id`'s inbox into this store; None before its first pull."""
        text = self._sql.settings().get(_INBOX_PULL + grant_id)
        if text is None:
            return None
        found = json.loads(text)

        def date(name: str) -> datetime | None:
            return None if found.get(name) is None else datetime.fromisoformat(found[name])

        start, through = date("start"), date("through")
        if start is None or through is None:
            return None
        return InboxCursor(start, through, date("gap_before"), date("gap_through"))

    def record_inbox_cursor(self, grant_id: str, cursor: InboxCursor) -> None:
        """Keep how far `events pull` read `grant_id`'s inbox (after what it found there is recorded)."""
        fields = ("start", "through", "gap_before", "gap_through")
        dates = {name: getattr(cursor, name) for name in fields}
        text = json.dumps({name: None if at is None else at.isoformat() for name, at in dates.items()})
        with self._sql.write() as db:
            db.set_setting(_INBOX_PULL + grant_id, text)

    def _record_bounce(
        self, db: StoreWrites, bounce: BounceRecord, event_id: str, rules: BounceRules
    ) -> None:
        """Keep one bounce; suppress its address when it is hard, or the soft ones reach the rule (a block
        never does: it says nothing of the address)."""
        email = bounce.email.lower()
        db.add_bounce(replace(bounce, email=email), event_id)
        if bounce.kind == BLOCK_KIND:
            return
        suppress = bounce.hard
        if not suppress:
            at, span = datetime.fromisoformat(bounce.bounced_at), timedelta(days=rules.days)
            found = db.soft_bounces_between(
                email, _shifted(at, -span).isoformat(), _shifted(at, span).isoformat()
            )
            suppress = soft_limit_reached(found, event_id, rules)
        if suppress:
            db.add_entries([("", email, email, self._stamp(), BOUNCE_SOURCE)])

    def _stamp(self) -> str:
        return self._clock.now().isoformat(timespec="seconds")

    def _entry(self, campaign: str, recipient_key: str, email: str | None, source: str) -> StoreEntry:
        if email is None and "@" in recipient_key:
            email = recipient_key
        return StoreEntry(
            campaign, recipient_key, None if email is None else email.lower(), self._stamp(), source
        )


def soft_limit_reached(found: Sequence[tuple[str, str]], event_id: str, rules: BounceRules) -> bool:
    """Whether the soft bounce of `event_id`, among `found` ((bounced_at, event_id) of one address), makes
    `rules.limit` of them within less than `rules.days`. Pure.

    Each bounce counts once: a report `events pull` found and a webhook's less than `_SAME_REPORT` apart
    are the same bounce (a report found again adds nothing). Whatever order they were recorded in, the
    answer is the same: any span that holds the new bounce counts, not only the days before it.
    """
    dated = [(datetime.fromisoformat(at), eid) for at, eid in found]
    counted = [(at, eid) for at, eid in dated if not eid.startswith(INBOX_EVENT_PREFIX)]
    unmatched = [at for at, _ in counted]
    for at, eid in sorted(item for item in dated if item[1].startswith(INBOX_EVENT_PREFIX)):
        twin = min(unmatched, key=lambda other: abs(other - at), default=None)
        if twin is not None and abs(twin - at) < _SAME_REPORT:
            unmatched.remove(twin)
        else:
            counted.append((at, eid))
    times = sorted(at for at, _ in counted)
    new = next((at for at, eid in counted if eid == event_id), None)
    if new is None:  # seen before, through the other channel
        return False
    span = timedelta(days=rules.days)
    # Differences, not `start + span`: a bounce dated at the end of the calendar (9999) still counts.
    return any(
        start <= new
        and new - start < span
        and sum(timedelta(0) <= at - start < span for at in times) >= rules.limit
        for start in times
    )


def _shifted(at: datetime, span: timedelta) -> datetime:
    """`at` moved by `span`, stopping at the ends of the calendar: a bounce may be dated in the year 9999
    (a sender's clock, a forged report), and its window is then cut there, never an OverflowError."""
    try:
        return at + span
    except OverflowError:
        return (datetime.max if span > timedelta(0) else datetime.min).replace(tzinfo=UTC)


class Unsubscribed:
    """Who is in a set of stores, by recipient key and by address: `match` says whether a recipient is."""

    def __init__(self) -> None:
        self._by_key: dict[str, StoreEntry] = {}
        self._by_email: dict[str, StoreEntry] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def add(self, entries: Iterable[StoreEntry]) -> None:
        """Take in entries (the first entry for a key or address is kept)."""
        for entry in entries:
            self._by_key.setdefault(entry.recipient_key, entry)
            if entry.email:
                self._by_email.setdefault(entry.email, entry)

    def match(self, recipient: Recipient) -> StoreEntry | None:
        """The entry that unsubscribes `recipient` (same key, or same address), or None."""
        found = self._by_key.get(recipient.key)
        if found is not None:
            return found
        email = recipient.address.email.lower()
        found = self._by_email.get(email)
        for form in _older_forms(email) if found is None else ():
            found = self._by_email.get(form) or self._by_key.get(form)
        return found


def _older_forms(email: str) -> tuple[str, ...]:
    """Another form a store may hold this (normalised, lower-cased) address in: before addresses went
    to the API in ASCII, an internationalised domain was kept in Unicode (ann@bücher.example for
    ann@xn--bcher-kva.example), the form email_validator's `normalized` gives."""
    if "xn--" not in email:
        return ()
    try:
        unicode = validate_email(email, check_deliverability=False).normalized.lower()
    except EmailNotValidError:
        return ()
    return () if unicode == email else (unicode,)


def lookup_unsubscribed(paths: Sequence[Path | str], recipients: Sequence[Recipient]) -> Unsubscribed:
    """Who of `recipients` is in the stores at `paths` (by key or address), looked up for this batch
    only: a store may hold millions, and a campaign never holds more of it than one batch needs."""
    found = Unsubscribed()
    stores = StoreFollower(paths, clock=SystemClock())  # reading stamps nothing
    try:
        found.add(stores.look_up(recipients))
    finally:
        stores.close()
    return found


@contextmanager
def open_existing_stores(paths: Iterable[Path | str], *, clock: Clock) -> Iterator[list[SuppressionStore]]:
    """The stores at `paths` that exist, opened for the block and closed after it; a store that does not
    exist yet holds nothing, so none is created."""
    with ExitStack() as stack:
        stores: list[SuppressionStore] = []
        for path in paths:
            if store_exists(path):
                stores.append(open_store(path, clock=clock, create=False))
                stack.callback(stores[-1].close)
        yield stores


def find_engagement(stores: Iterable[SuppressionStore]) -> dict[str, Engagement]:
    """Opens, clicks and replies by message id from a campaign's open `stores` (none: no tracking kept).
    A store is shared: its messages may be other campaigns'."""
    found: dict[str, Engagement] = {}
    for store in stores:
        found |= store.engagement()
    return found


def load_unsubscribed(paths: Sequence[Path | str]) -> Unsubscribed:
    """Everyone in the stores at `paths`; a store that does not exist yet holds no one (none is created)."""
    found = Unsubscribed()
    with open_existing_stores(paths, clock=SystemClock()) as stores:  # reading stamps nothing
        for store in stores:
            found.add(store.entries())
    return found


def describe_entry(entry: StoreEntry) -> str:
    """A skip detail for the user, e.g. `unsubscribed 2026-01-05 (one-click, campaign spring)`, or
    `bounced 2026-01-06` for an address a bounce suppressed."""
    if entry.source == BOUNCE_SOURCE:
        return f"bounced {entry.recorded_at[:10]}"
    origin = f", campaign {entry.campaign}" if entry.campaign else ""
    return f"unsubscribed {entry.recorded_at[:10]} ({entry.source}{origin})"


_Found = TypeVar("_Found")


class StoreFollower:
    """Stores followed while a run goes on: each opened (for reading) once it exists, and each read
    from where the last read of it stopped, so that a re-read costs only what was added."""

    def __init__(self, paths: Sequence[Path | str], *, clock: Clock, from_now: bool = False) -> None:
        """With `from_now`, the first `read_new` of a store that exists already reads only what is
        added after this (what is there now is looked up as needed: `look_up`)."""
        self._paths = tuple(paths)
        self._clock = clock
        self._stores: dict[Path | str, SuppressionStore] = {}
        self._opening = threading.Lock()
        self._last: dict[Path | str, int] = dict.fromkeys(self._paths, 0)
        # When each store was last read through (or found absent, with nothing in it to read).
        self._read_at: dict[Path | str, float] = dict.fromkeys(self._paths, clock.monotonic())
        if from_now:
            for path in self._paths:
                store = self._store(path)
                if store is not None:
                    self._last[path] = store.newest_id()

    def read_new(
        self,
        read: Callable[[SuppressionStore, int], tuple[int, list[_Found]]],
        *,
        stale_after_s: float | None = None,
    ) -> list[_Found]:
        """What `read(store, last_id)` finds in each store since the last call; a busy store is read
        next time (what is known still holds), but with `stale_after_s` a store not read for longer than
        that raises its StoreError: what is known of it is too old to be taken as all there is."""
        found: list[_Found] = []
        for path in self._paths:
            try:
                store = self._store(path)
                if store is not None:
                    self._last[path], items = read(store, self._last[path])
                    found.extend(items)
            except StoreError:  # a database out of reach for a moment, too
                unread_s = self._clock.monotonic() - self._read_at[path]
                if stale_after_s is not None and unread_s > stale_after_s:
                    raise
                continue
            self._read_at[path] = self._clock.monotonic()
        return found

    def look_up(self, recipients: Sequence[Recipient]) -> list[StoreEntry]:
        """The entries of every store for any of `recipients` (by key or address), whenever recorded
        (StoreError if a store cannot be read: an opt-out that cannot be read is never taken as none)."""
        if not recipients:
            return []
        keys = [recipient.key for recipient in recipients]
        emails = [recipient.address.email for recipient in recipients]
        older = [form for email in emails for form in _older_forms(email.lower())]
        keys, emails = keys + older, emails + older
        found: list[StoreEntry] = []
        for path in self._paths:
            store = self._store(path)
            if store is not None:
                found.extend(store.entries_for(keys, emails))
        return found

    def _store(self, path: Path | str) -> SuppressionStore | None:
        """The store at `path`, opened for reading once it exists (once: a run looks pages up from the
        ledger's thread while the loop re-reads)."""
        with self._opening:
            store = self._stores.get(path)
            if store is None and store_exists(path):
                store = self._stores[path] = open_store(path, clock=self._clock, create=False)
            return store

    def close(self) -> None:
        """Close the stores opened for reading."""
        for store in self._stores.values():
            store.close()
        self._stores.clear()


# A store the watch cannot re-read for longer than this stops the sends (StoreError): an opt-out recorded
# meanwhile, e.g. by `campaign serve` on another machine, would be missed. A blip of a few reads passes.
_STALE_AFTER_S = 10.0


class UnsubscribeWatch:
    """Answers "has this recipient unsubscribed?" during a run, re-reading the stores every `refresh_s`.

    It holds what was added to the stores since it began (each re-read fetches only rows added since
    the last one, so checking before every send stays cheap; a store that appears while the campaign
    runs is picked up), and what `look_up` found for the recipients about to be sent: a store may hold
    millions, and a run never holds more of it than its pages of work need. On an event loop, a check
    first awaits `reread_when_due`, which re-reads in a worker thread: a slow store (a database far
    away, or busy) then holds the checks that need its answer, not the loop's other work.
    """

    def __init__(self, paths: Sequence[Path | str], *, clock: Clock, refresh_s: float = 1.0) -> None:
        self._clock = clock
        self._refresh_s = refresh_s
        self._stores = StoreFollower(paths, clock=clock, from_now=True)
        self._known = Unsubscribed()
        # When the last re-read ended (None: one is due now). Timed from its end: a re-read slower than
        # `refresh_s` is not due again at once, so `opt_out` does not make one more on the event loop.
        self._read_at: float | None = None
        self._asked = 0  # re-reads asked for (`reread_next`): one asked for during a re-read still holds
        self._rereading: anyio.Lock | None = None  # made on the event loop that first needs it

    async def reread_when_due(self) -> None:
        """Re-read the stores, as `opt_out` would, if `refresh_s` passed since the last re-read; in a
        worker thread, so that the event loop goes on meanwhile (the other sends, a worker's lease
        heartbeat), however long the store takes to answer. Every check that finds a re-read due waits
        for it: an opt-out recorded before then is known to the `opt_out` that follows."""
        if not self._reread_due():
            return
        if self._rereading is None:
            self._rereading = anyio.Lock()
        async with self._rereading:
            if self._reread_due():  # else the re-read another check waited for was this one's
                asked = self._asked
                try:
                    self._known.add(await anyio.to_thread.run_sync(self._read_new))
                finally:
                    self._read_done(asked)

    def look_up(self, recipients: Sequence[Recipient]) -> None:
        """Take in what the stores hold for `recipients` (a page of a lane's work, before any is sent)."""
        self._known.add(self._stores.look_up(recipients))

    def is_unsubscribed(self, recipient: Recipient) -> bool:
        """Whether `recipient` is in a store now (as of the last re-read, at most `refresh_s` ago)."""
        return self.opt_out(recipient) is not None

    def opt_out(self, recipient: Recipient) -> SkipReason | None:
        """Why `recipient` must not be mailed now (`unsubscribed`, or `bounced`), or None; re-reads the
        stores first, in this thread, when a re-read is due (`reread_when_due` has it done elsewhere)."""
        if self._reread_due():
            asked = self._asked
            try:
                self._known.add(self._read_new())
            finally:
                self._read_done(asked)
        entry = self._known.match(recipient)
        if entry is None:
            return None
        return SkipReason.BOUNCED if entry.source == BOUNCE_SOURCE else SkipReason.UNSUBSCRIBED

    def reread_next(self) -> None:
        """Re-read the stores at the next check, however recent the last re-read (something was added);
        asked for while one is under way, the one after it (that one may have read before the addition)."""
        self._read_at = None
        self._asked += 1

    def _reread_due(self) -> bool:
        return self._read_at is None or self._clock.monotonic() - self._read_at >= self._refresh_s

    def _read_done(self, asked: int) -> None:
        """A re-read begun when `asked` re-reads had been asked for has ended."""
        if self._asked == asked:
            self._read_at = self._clock.monotonic()

    def _read_new(self) -> list[StoreEntry]:
        return self._stores.read_new(SuppressionStore.read_since, stale_after_s=_STALE_AFTER_S)

    def close(self) -> None:
        """Close the stores opened for reading."""
        self._stores.close()


def storable_text(text: str) -> str:
    """`text` with each lone surrogate (JSON may escape one: "\\ud83d" cut from its pair) as U+FFFD, so
    that SQLite and PostgreSQL can keep it, and a report or terminal can write it: neither stores a
    surrogate (their text is UTF-8). U+FFFD is Unicode's mark for a character that could not be read, as
    a decoder puts it for bad bytes; not "replace" on encoding, which writes "?", a real character; not
    "surrogatepass", whose bytes are not UTF-8 either. Through UTF-16, a pair given as two characters is
    joined into the one it stands for."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def _engaged(seen: Engagement, kind: str, at: str, obj: dict[str, Any]) -> Engagement:
    """`seen` with one more open, click (and its URLs) or reply."""
    if kind == "message.opened":
        return replace(seen, opens=seen.opens + 1, first_open=seen.first_open or at, last_open=at)
    if kind == "thread.replied":
        return replace(seen, replies=seen.replies + 1, first_reply=seen.first_reply or at)
    links = obj.get("link_data")
    # A kept notification is its body as it came: its JSON may escape a lone surrogate.
    urls = (
        [storable_text(str(link["url"])) for link in links if isinstance(link, dict) and link.get("url")]
        if isinstance(links, list)
        else []
    )
    return replace(seen, clicks=seen.clicks + 1, urls=tuple(dict.fromkeys((*seen.urls, *urls))))
