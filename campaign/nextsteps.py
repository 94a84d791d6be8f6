"""What is not done in a campaign, and the exact commands that continue it.

From the counts of the rows still in the list it names each open or failed state,
what it means and what to run (e.g. `campaign reconcile M` for unknown rows), in
the order to run them. The run summary, `campaign status` and `campaign reconcile` print these.
`build_next_steps` is pure; `load_next_steps` reads the few addresses and times it adds from a ledger.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from campaign.ledger import Ledger
from campaign.models import RowState

__all__ = ["DEFAULT_MIN_AGE", "NextStep", "build_next_steps", "load_next_steps"]


# "Not found" means "not sent" only this long after the last send: real mailboxes list a sent
# message in the Sent folder, and Nylas in its metadata index, seconds to minutes after the send.
DEFAULT_MIN_AGE = timedelta(minutes=15)


@dataclass(frozen=True, slots=True)
class NextStep:
    """Rows in one state (None: rows removed from the list), what that means, and what to run."""

    state: RowState | None
    count: int
    what: str
    commands: tuple[str, ...]
    examples: tuple[str, ...] = ()  # a few of the addresses concerned

    def as_json(self) -> dict[str, object]:
        """The step as plain data (`status --json` key `next`)."""
        return {
            "state": None if self.state is None else self.state.value,
            "count": self.count,
            "what": self.what,
            "commands": list(self.commands),
            "examples": list(self.examples),
        }


def build_next_steps(
    counts: Mapping[RowState, int],
    *,
    manifest: str,
    sandbox: bool = False,
    removed: int = 0,
    examples: Mapping[RowState, Sequence[str]] | None = None,
    reconcile_decides_at: datetime | None = None,
    next_due: datetime | None = None,
) -> list[NextStep]:
    """The steps that finish the campaign, given the state counts of the rows still in the list.

    `manifest`: the arguments naming the campaign, as a shell takes them (the manifest's path, quoted,
    and a `--ledger URL` the user gave).
    `reconcile_decides_at`: when reconcile can call the youngest unknown row not sent, if that is
    still ahead (before then it finds the ones that went out, and leaves the others unknown).
    `next_due`: when the next pending row scheduled for later (a follow-up) comes due, if one is.
    """
    flag = " --sandbox" if sandbox else ""
    resume = f"campaign resume {manifest}{flag}"
    reconcile = f"campaign reconcile {manifest}"
    # The sandbox forgets what it received when its command ends, so reconcile has nothing to look up
    # there (it takes no --sandbox); retry re-sends to the sandbox only. The words say so, so that the
    # sandbox never teaches `retry --unknown` as the step for a real campaign, where it may mail twice.
    settle = f"campaign retry {manifest} --unknown{flag}" if sandbox else reconcile
    looked_up = (
        "in the sandbox reconcile cannot look messages up (the sandbox forgets what it received), so "
        f"retry sends them to the sandbox again; for a real campaign the step is `{reconcile}`, never "
        "retry --unknown first: one may have gone out, and would be mailed twice"
        if sandbox
        else "reconcile asks the API and re-queues those that did not"
    )
    wanted: list[tuple[RowState, str, tuple[str, ...]]] = [
        (
            RowState.INFLIGHT,
            "in flight when the run stopped; resume re-sends each with its own idempotency key, "
            "so none is mailed twice",
            (resume,),
        ),
        (
            RowState.PENDING,
            "not sent yet"
            + (
                ""
                if next_due is None
                else f" (some are scheduled: the next is due {next_due.astimezone(UTC):%Y-%m-%d %H:%M} UTC; "
                "resume then, or keep a run going with --wait)"
            ),
            (resume,),
        ),
        (
            RowState.UNKNOWN,
            f"may or may not have gone out; {looked_up}"
            + (
                ""
                if reconcile_decides_at is None or sandbox
                else f" (it finds sent ones at once; it can call the others not sent from "
                f"{reconcile_decides_at:%Y-%m-%d %H:%M} UTC, when a late Sent folder would show them)"
            ),
            (settle, resume),
        ),
        (
            RowState.FAILED,
            "refused permanently (`campaign status` groups the causes); after fixing the cause, retry them",
            (
                f"campaign report {manifest} --out failed.csv --state failed{flag}",
                f"campaign retry {manifest} --failed{flag}",
                resume,
            ),
        ),
    ]
    steps = [
        NextStep(state, counts.get(state, 0), what, commands, tuple((examples or {}).get(state, ())))
        for state, what, commands in wanted
        if counts.get(state, 0)
    ]
    if removed:
        left = "left as it was" if removed == 1 else "left as they were"
        steps.append(NextStep(None, removed, f"{left} (not mailed, not forgotten)", ()))
    return steps


def load_next_steps(
    ledger: Ledger,
    *,
    listed: Mapping[RowState, int],
    removed: int,
    manifest: str,
    now: datetime,
    sandbox: bool = False,
) -> list[NextStep]:
    """The steps for `ledger`, given its counts (`listed`: rows still in the list; `removed`: the others).

    The caller passes the counts it has (status reads them in one pass per sender); this reads only
    a few addresses per state and, for unknown rows, when reconcile can decide them.
    """
    sampled = tuple(state for state in _SAMPLED if listed.get(state, 0))  # the steps need no more
    return build_next_steps(
        listed,
        manifest=manifest,
        sandbox=sandbox,
        removed=removed,
        examples=ledger.sample_emails(sampled, listed=True),
        reconcile_decides_at=_reconcile_decides_at(ledger, now),
        next_due=ledger.next_due(now),
    )


# The states whose step names a few of its addresses.
_SAMPLED = (RowState.PENDING, RowState.INFLIGHT, RowState.UNKNOWN, RowState.FAILED)


def _reconcile_decides_at(ledger: Ledger, now: datetime) -> datetime | None:
    """When reconcile can conclude "not sent" for every unknown row, if that is still ahead of `now`."""
    latest = ledger.latest_claim(RowState.UNKNOWN)
    if latest is None or latest + DEFAULT_MIN_AGE <= now:
        return None
    return (latest + DEFAULT_MIN_AGE).astimezone(UTC)
