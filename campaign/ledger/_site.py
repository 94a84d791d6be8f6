"""Where a campaign's ledger lives: a SQLite file beside the manifest, or a PostgreSQL database.

A `LedgerSite` is what the use cases are handed instead of a path: it says whether the campaign
has a ledger there yet, holds the one-writer lock, and opens the ledger. `SqliteSite` is a file (the
default); `PostgresSite` (in `_postgres`) is a database that holds many campaigns, each in its own
rows. `ledger_site` picks one from what the manifest or the command line named, and for a database
named on the command line leaves a ledger marker beside the manifest (`_identity`) when a command
writes the campaign's ledger there, so that a command that names none does not start it over in a file.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from campaign.clock import Clock
from campaign.errors import LedgerError
from campaign.ledger._firstplan import FirstPlan, remove_abandoned_plans
from campaign.ledger._interface import Ledger
from campaign.ledger._leases import LEASE_EXPIRY_S, GrantLeases
from campaign.ledger._ledger import open_ledger
from campaign.ledger._schema import check_ledger_free, lock_ledger, unlock_ledger

__all__ = ["LedgerSite", "SqliteSite", "ledger_site"]


class LedgerSite(Protocol):
    """Where one or many campaigns' ledgers are kept."""

    @property
    def where(self) -> str:
        """The place, for messages: a path, or a database URL without its password."""
        ...

    def exists(self, campaign: str) -> bool:
        """Whether `campaign` has a ledger here (it has run, or at least recorded a plan)."""
        ...

    def check_free(self, campaign: str) -> None:
        """LedgerError if another command holds `campaign`'s writer lock; creates and changes nothing."""
        ...

    def hold(self, campaign: str, *, wait: bool = False) -> AbstractContextManager[None]:
        """Hold `campaign`'s writer lock until the block ends: LedgerError if another command has it, or,
        with `wait` where workers share the campaign, once it gave the lock back."""
        ...

    def open(
        self,
        *,
        clock: Clock,
        campaign: str,
        exclusive: bool = False,
        create: bool = True,
        read_only: bool = False,
    ) -> Ledger:
        """Open `campaign`'s ledger (`open_ledger` says what each flag does); the caller closes it."""
        ...

    def first_plan(self, campaign: str, clock: Clock) -> FirstPlan | None:
        """Where a first run writes `campaign`'s first plan while it checks the list, to be put in place as
        its ledger once the run is confirmed (`FirstPlan`); None where a first plan is recorded like any
        other, after the check."""
        ...

    def leases(self, campaign: str, clock: Clock) -> GrantLeases | None:
        """A new worker's leases on `campaign`'s grants, where several workers may share the campaign;
        None where one sending command at a time has it all (its writer lock)."""
        ...


@dataclass(frozen=True, slots=True)
class SqliteSite:
    """One campaign's ledger in one SQLite file."""

    path: Path

    @property
    def where(self) -> str:
        return str(self.path)

    def exists(self, campaign: str) -> bool:  # noqa: ARG002 - a file holds one campaign
        return self.path.exists()

    def check_free(self, campaign: str) -> None:  # noqa: ARG002 - a file holds one campaign
        check_ledger_free(self.path)

    @contextmanager
    def hold(self, campaign: str, *, wait: bool = False) -> Iterator[None]:  # noqa: ARG002 - a file holds one campaign, sent from by one command: never waited for
        # The folder is made here: the sandbox ledger's may not exist yet.
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            message = f"{self.path.parent}: cannot make the ledger's folder ({exc.strerror or exc})"
            raise LedgerError(message) from exc
        lock = lock_ledger(self.path)
        try:
            yield
        finally:
            unlock_ledger(lock)

    def open(
        self,
        *,
        clock: Clock,
        campaign: str,
        exclusive: bool = False,
        create: bool = True,
        read_only: bool = False,
    ) -> Ledger:
        if not read_only:
            remove_abandoned_plans(self.path)
        return open_ledger(
            self.path, clock=clock, campaign=campaign, exclusive=exclusive, create=create, read_only=read_only
        )

    def first_plan(self, campaign: str, clock: Clock) -> FirstPlan:  # noqa: ARG002 - a file holds one campaign
        return FirstPlan(self.path, clock=clock)

    def leases(self, campaign: str, clock: Clock) -> None:  # noqa: ARG002 - one writer has every grant
        return None


def ledger_site(
    where: Path | str,
    *,
    password: str | None = None,
    lease_s: float = LEASE_EXPIRY_S,
    marker: Path | None = None,
    named_by_option: bool = False,
) -> LedgerSite:
    """The site `where` names: a path is a SQLite file; a `postgresql://` URL (checked by the manifest,
    with no password in it) a database, reached with `password` if given (else libpq's own PGPASSWORD).
    With `marker`, a database's command that writes a campaign's ledger leaves the campaign's ledger
    marker there first (`write_ledger_marker`). `named_by_option`: a command's `--ledger` gave the URL,
    which is what a failure to connect then says to fix (else the manifest's `[ledger] url`)."""
    if isinstance(where, Path):
        return SqliteSite(where)
    # psycopg is imported only for a database: commands on a SQLite ledger never load it.
    from psycopg.conninfo import make_conninfo

    from campaign.ledger._postgres import PostgresSite

    conninfo = where if password is None else make_conninfo(where, password=password)
    return PostgresSite(
        conninfo, where=where, lease_s=lease_s, marker=marker, named_by_option=named_by_option
    )
