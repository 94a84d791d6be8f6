"""The progress ledger: one SQLite file per campaign, the source of truth for "sent exactly once".

`Ledger` is the interface every use case is written against (a Protocol: a PostgreSQL backend
implements it too). `open_ledger` opens the SQLite one, `SqliteLedger` (creating, migrating,
locking for one writer), the only code that changes a row's state, each change checked against
the allowed transitions.
`GroupCommit` batches writes asked for together into one transaction, each caller resuming
only after its own write is on disk. `check_no_orphaned_ledger` and `check_key_scheme` keep a
renamed manifest or a changed key from mailing anyone twice. Never sends.
"""

from __future__ import annotations

from campaign.ledger._groupcommit import GroupCommit
from campaign.ledger._identity import check_key_scheme, check_no_orphaned_ledger, record_key_scheme
from campaign.ledger._interface import Ledger
from campaign.ledger._ledger import SqliteLedger, open_ledger
from campaign.ledger._read import ErrorGroup, LedgerRow, PlannedRow
from campaign.ledger._schema import check_ledger_free, lock_ledger, unlock_ledger
from campaign.ledger._spool import PlanSpool
from campaign.ledger._values import Claim, DueStep, ScheduledStep, SentStep, StepCounts, SyncReport

__all__ = [
    "Claim",
    "DueStep",
    "ErrorGroup",
    "GroupCommit",
    "Ledger",
    "LedgerRow",
    "PlanSpool",
    "PlannedRow",
    "ScheduledStep",
    "SentStep",
    "SqliteLedger",
    "StepCounts",
    "SyncReport",
    "check_key_scheme",
    "check_ledger_free",
    "check_no_orphaned_ledger",
    "lock_ledger",
    "open_ledger",
    "record_key_scheme",
    "unlock_ledger",
]
