"""Grant leases: which worker sends from which mailbox, when several share a campaign in PostgreSQL.

A worker (`campaign run` on some machine) joins the campaign's `workers` rows and takes leases on
grants (`leases`: a sender, its owner, an expiry). A grant is sent from by its lease's owner alone,
so its pace, concurrency, rolling-24 h budget and idempotency keys stay with one process, exactly as
with one machine. The owner renews its leases and its heartbeat every few seconds; a worker that
dies stops renewing, and its grants are free once their leases expire, never before. Each worker
holds at most its share: the grants with work, divided by the live workers, rounded up; so a
worker that joins finds grants given back to it. Times are the workers' clocks (`Clock`), in Unix
seconds: their machines keep time (NTP), which the 30 s expiry allows a little slack for.

Plain SQL over one connection of its own (autocommit: every statement is its own transaction), so
that a heartbeat never waits behind the ledger's writes. The connection is psycopg's async one, on the
event loop beside the sends: the heartbeat's deadline cancels a renewal the database does not answer
(psycopg cancels the query), where a thread could only be abandoned with its connection. Nothing else
on that loop waits on a database (the ledger's and the stores' calls go to worker threads), so a slow
ledger or store does not hold the heartbeat; and a worker whose loop is stuck stops renewing, so its
grants go to another worker instead of waiting on it for good. Claims check
the lease in the ledger's own transaction (`PostgresLedger.claim`), so a worker that lost its lease
cannot claim a row.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from campaign.clock import Clock
from campaign.errors import LedgerError

if TYPE_CHECKING:
    import psycopg

__all__ = ["LEASE_EXPIRY_S", "GrantLeases", "WorkerView", "read_workers", "share_of"]

# A renewal past its deadline is cancelled, and psycopg then warns on stderr that it closed the
# connection: the worker's own error says what happened, in one line.
logging.getLogger("psycopg").addHandler(logging.NullHandler())

# A lease lasts this long after its last renewal (`[ledger] lease_s`); `dispatch` renews it well before.
LEASE_EXPIRY_S = 30.0


@dataclass(frozen=True, slots=True)
class WorkerView:
    """A worker of the campaign, as `status` shows it."""

    id: str
    host: str
    pid: int
    grants: tuple[str, ...]  # the senders it holds a live lease on
    heartbeat_at: float  # Unix time of its last heartbeat
    live: bool  # its heartbeat is younger than a lease's expiry


def share_of(grants: int, workers: int) -> int:
    """How many of `grants` one of `workers` live workers holds at most: the division, rounded up."""
    return math.ceil(grants / max(1, workers))


# The campaign's id, looked up by name in each statement: the leases know the campaign by its name.
_CAMPAIGN = "(SELECT id FROM campaign_ledger.campaigns WHERE name = %(campaign)s)"


class GrantLeases:
    """One worker's leases on one campaign's grants, used from one event loop (asyncio)."""

    def __init__(
        self,
        conninfo: str,
        *,
        where: str,
        campaign: str,
        clock: Clock,
        expiry_s: float = LEASE_EXPIRY_S,
        connect_timeout_s: float = 5.0,
    ) -> None:
        self._conninfo = conninfo
        self._where = where
        self._clock = clock
        self.expiry_s = expiry_s
        self.id = uuid.uuid4().hex[:12]
        self.host = socket.gethostname()
        self._params: dict[str, Any] = {"campaign": campaign, "worker": self.id}
        self._connect_timeout_s = connect_timeout_s
        self._db: psycopg.AsyncConnection[Any] | None = None
        self._lock = anyio.Lock()

    # --- the worker -----------------------------------------------------------------------------

    async def join(self) -> None:
        """Add this worker to the campaign's workers (its heartbeat starts now)."""
        now = self._now()
        await self._run(
            "INSERT INTO campaign_ledger.workers (campaign_id, id, host, pid, started_at, heartbeat_at) "
            f"VALUES ({_CAMPAIGN}, %(worker)s, %(host)s, %(pid)s, %(now)s, %(now)s)",
            host=self.host,
            pid=os.getpid(),
            now=now,
        )

    async def leave(self) -> None:
        """Give back every lease, leave the campaign's workers (on a stop, or when done) and close the
        connection."""
        try:
            await self._run(
                f"DELETE FROM campaign_ledger.leases WHERE campaign_id = {_CAMPAIGN} AND owner = %(worker)s"
            )
            await self._run(
                f"DELETE FROM campaign_ledger.workers WHERE campaign_id = {_CAMPAIGN} AND id = %(worker)s"
            )
        finally:
            await self.close()

    async def live_workers(self) -> int:
        """How many workers' heartbeats are younger than a lease's expiry (this one included)."""
        rows = await self._run(
            "SELECT count(*) FROM campaign_ledger.workers "
            f"WHERE campaign_id = {_CAMPAIGN} AND heartbeat_at > %(since)s",
            since=self._now() - self.expiry_s,
        )
        return max(1, int(rows[0][0]))

    # --- leases ---------------------------------------------------------------------------------

    async def acquire(self, wanted: Sequence[str], share: int) -> tuple[str, ...]:
        """Hold up to `share` of the grants `wanted`: those held already first, then free ones (never
        leased, given back, or expired), in the order given; returns the grants held, in that order.

        A lease changes owner only once it has expired: the take is one statement that checks it."""
        now = self._now()
        held = [name for name in await self.renew() if name in wanted][:share]
        for name in wanted:
            if len(held) >= share:
                break
            if name in held:
                continue
            taken = await self._run(
                "INSERT INTO campaign_ledger.leases AS l "
                "(campaign_id, sender, owner, expires_at, acquired_at) "
                f"VALUES ({_CAMPAIGN}, %(sender)s, %(worker)s, %(expires)s, %(now)s) "
                "ON CONFLICT (campaign_id, sender) DO UPDATE SET owner = excluded.owner, "
                "expires_at = excluded.expires_at, acquired_at = excluded.acquired_at "
                "WHERE l.expires_at <= %(now)s OR l.owner = excluded.owner RETURNING sender",
                sender=name,
                expires=now + self.expiry_s,
                now=now,
            )
            if taken:
                held.append(name)
        return tuple(name for name in wanted if name in held)

    async def renew(self) -> tuple[str, ...]:
        """The heartbeat: this worker's live leases extended and its heartbeat recorded; returns the
        grants it still holds. A lease that expired meanwhile is not revived: another worker may have
        it (or take it), so its grant is no longer this worker's to send from."""
        now = self._now()
        await self._run(
            "UPDATE campaign_ledger.workers SET heartbeat_at = %(now)s "
            f"WHERE campaign_id = {_CAMPAIGN} AND id = %(worker)s",
            now=now,
        )
        rows = await self._run(
            "UPDATE campaign_ledger.leases SET expires_at = %(expires)s "
            f"WHERE campaign_id = {_CAMPAIGN} AND owner = %(worker)s AND expires_at > %(now)s "
            "RETURNING sender",
            expires=now + self.expiry_s,
            now=now,
        )
        return tuple(sorted(str(sender) for (sender,) in rows))

    async def free(self, wanted: Sequence[str]) -> tuple[str, ...]:
        """Of the grants `wanted`, those nobody holds a live lease on, in that order."""
        rows = await self._run(
            f"SELECT sender FROM campaign_ledger.leases WHERE campaign_id = {_CAMPAIGN} "
            "AND sender = ANY(%(names)s) AND expires_at > %(now)s",
            names=list(wanted),
            now=self._now(),
        )
        taken = {str(sender) for (sender,) in rows}
        return tuple(name for name in wanted if name not in taken)

    async def release(self, senders: Iterable[str]) -> None:
        """Give the leases on `senders` back at once (their sends in flight are settled and recorded)."""
        names = list(senders)
        if names:
            await self._run(
                "DELETE FROM campaign_ledger.leases "
                f"WHERE campaign_id = {_CAMPAIGN} AND owner = %(worker)s AND sender = ANY(%(names)s)",
                names=names,
            )

    async def close(self) -> None:
        """Close the connection (the leases stay until they expire, unless given back first)."""
        async with self._lock:
            await self._drop()

    # --- the connection -------------------------------------------------------------------------

    def _now(self) -> float:
        return self._clock.now().timestamp()

    async def _run(self, query: str, **params: object) -> list[tuple[Any, ...]]:
        import psycopg  # only where a database is used: a SQLite ledger never loads it

        async with self._lock:
            try:
                if self._db is None or self._db.closed:
                    self._db = await psycopg.AsyncConnection.connect(
                        self._conninfo, autocommit=True, connect_timeout=int(self._connect_timeout_s)
                    )
                cursor = await self._db.execute(query, {**self._params, **params})
                return await cursor.fetchall() if cursor.description is not None else []
            except psycopg.Error as exc:
                await self._drop()
                name = type(exc).__name__  # its text may name the server's address and user: not shown
                message = f"{self._where}: lost the database while keeping this worker's leases ({name})"
                raise LedgerError(message) from None
            except (
                BaseException
            ):  # cancelled (a renewal past its deadline): the connection's state is unknown
                await self._drop()
                raise

    async def _drop(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            with anyio.move_on_after(1, shield=True):
                await db.close()


def read_workers(
    read: Callable[[str, Mapping[str, object]], list[tuple[Any, ...]]],
    campaign: str,
    now: float,
    expiry_s: float,
) -> list[WorkerView]:
    """The workers of `campaign` and their live leases, through `read(query, params)`."""
    rows = read(
        "SELECT w.id, w.host, w.pid, w.heartbeat_at, "
        "COALESCE(array_agg(l.sender ORDER BY l.sender) FILTER (WHERE l.sender IS NOT NULL), '{}') "
        "FROM campaign_ledger.workers AS w LEFT JOIN campaign_ledger.leases AS l "
        "ON l.campaign_id = w.campaign_id AND l.owner = w.id AND l.expires_at > %(now)s "
        f"WHERE w.campaign_id = {_CAMPAIGN} GROUP BY w.id, w.host, w.pid, w.heartbeat_at "
        "ORDER BY w.heartbeat_at DESC, w.id",
        {"campaign": campaign, "now": now},
    )
    return [
        WorkerView(
            id=str(worker),
            host=str(host),
            pid=int(pid),
            grants=tuple(str(name) for name in grants),
            heartbeat_at=float(beat),
            live=float(beat) > now - expiry_s,
        )
        for worker, host, pid, beat, grants in rows
    ]
