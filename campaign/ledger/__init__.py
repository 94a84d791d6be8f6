"""The progress ledger: the source of truth for "sent exactly once", in a SQLite file per campaign or
in a PostgreSQL database holding many.

`Ledger` is the interface every use case is written against, a Protocol with two backends:
`open_ledger` opens the SQLite one, `SqliteLedger` (creating, migrating, locking for one writer), and
`PostgresSite.open` the PostgreSQL one (`_postgres`, loaded only for a database), each the only code
that changes a row's state, every change checked against the allowed transitions. `LedgerSite` is
where a ledger lives (`SqliteSite`, a file; `PostgresSite`, a database); `ledger_site` picks one from
a path or a URL. `GrantLeases` is one worker's leases on the grants of a campaign several workers
share in PostgreSQL.
`PlanSpool` holds a checked plan on disk until it is recorded; `FirstPlan` writes a new ledger's
first plan aside while the list is checked, and puts it in place once the run is confirmed.
`GroupCommit` batches writes asked for together into one transaction, each caller resuming
only after its own write is on disk. `check_no_orphaned_ledger` and `check_key_scheme` keep a
renamed manifest, a switch between a file and a database, or a changed key from mailing anyone twice
(a database named on the command line leaves a ledger marker, `ledger_marker_path`, beside the
manifest for it). Never sends.
"""

from __future__ import annotations

from campaign.ledger._firstplan import FirstPlan
from campaign.ledger._groupcommit import GroupCommit
from campaign.ledger._identity import (
    check_key_scheme,
    check_no_orphaned_ledger,
    ledger_marker_path,
    record_key_scheme,
)
from campaign.ledger._interface import Ledger
from campaign.ledger._leases import LEASE_EXPIRY_S, GrantLeases, WorkerView, share_of
from campaign.ledger._ledger import SqliteLedger, open_ledger
from campaign.ledger._read import ALREADY_MAILED, ErrorGroup, LedgerRow, PlannedRow
from campaign.ledger._schema import check_ledger_free, lock_ledger, unlock_ledger
from campaign.ledger._site import LedgerSite, SqliteSite, ledger_site
from campaign.ledger._spool import PlanSink, PlanSpool
from campaign.ledger._values import (
    Claim,
    ClaimRequest,
    DueStep,
    OutcomeReport,
    ScheduledStep,
    SentMessage,
    SentStep,
    StepCounts,
    SyncReport,
)

__all__ = [
    "ALREADY_MAILED",
    "LEASE_EXPIRY_S",
    "Claim",
    "ClaimRequest",
    "DueStep",
    "ErrorGroup",
    "FirstPlan",
    "GrantLeases",
    "GroupCommit",
    "Ledger",
    "LedgerRow",
    "LedgerSite",
    "OutcomeReport",
    "PlanSink",
    "PlanSpool",
    "PlannedRow",
    "ScheduledStep",
    "SentMessage",
    "SentStep",
    "SqliteLedger",
    "SqliteSite",
    "StepCounts",
    "SyncReport",
    "WorkerView",
    "check_key_scheme",
    "check_ledger_free",
    "check_no_orphaned_ledger",
    "ledger_marker_path",
    "ledger_site",
    "lock_ledger",
    "open_ledger",
    "record_key_scheme",
    "share_of",
    "unlock_ledger",
]
