"""Where a campaign stands, as plain data: what `campaign status` prints and `--json` emits.

Reads the ledger; writes nothing. The keys are a contract documented in the README.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from campaign.clock import Clock
from campaign.ledger import ErrorGroup, Ledger
from campaign.manifest import Manifest
from campaign.models import RowState
from campaign.nextsteps import DEFAULT_MIN_AGE, build_next_steps
from campaign.plan import DAY_S, build_schedule

__all__ = ["OPEN_STATES", "build_status", "build_unstarted_status"]

# A campaign is not done while any row is in one of these.
OPEN_STATES = (RowState.PENDING, RowState.INFLIGHT, RowState.UNKNOWN)


def build_status(
    manifest: Manifest,
    ledger: Ledger,
    *,
    clock: Clock,
    command_path: str | None = None,
    sandbox: bool = False,
) -> dict[str, Any]:
    """The status of a started campaign (`command_path`: the manifest as the user named it, for `next`)."""
    per_sender = ledger.counts_per_sender()  # one pass over the state index gives the totals too
    counts = {state: sum(tally[state] for tally in per_sender.values()) for state in RowState}
    unlisted = ledger.counts(listed=False)
    listed = {state: counts[state] - unlisted[state] for state in RowState}  # removed rows: not open work
    since = clock.now().timestamp() - DAY_S
    senders: dict[str, dict[str, Any]] = {}
    for sender in manifest.senders:
        sent_24h = ledger.sent_recipients_total(sender.name, since)
        senders[sender.name] = {
            "grant_id": sender.grant_id,
            "domain": sender.domain,
            "email": sender.email,
            "states": _named(per_sender.get(sender.name, dict.fromkeys(RowState, 0))),
            "sent_last_24h": sent_24h,
            "per_day": sender.per_day,
            "budget_left": None if sender.per_day is None else max(0, sender.per_day - sent_24h),
        }
    errors, last_errors = _error_causes(ledger.error_groups())
    schedule = build_schedule(
        manifest.senders,
        remaining={
            name: info["states"]["pending"] + info["states"]["inflight"] for name, info in senders.items()
        },
        used_24h={name: info["sent_last_24h"] for name, info in senders.items()},
    )
    for plan in schedule.senders:
        senders[plan.name]["next_24h"] = plan.next_24h
        senders[plan.name]["eta_s"] = plan.duration_s
    sampled = tuple(state for state in (*OPEN_STATES, RowState.FAILED) if listed[state])  # steps need no more
    return {
        "campaign": manifest.campaign.name,
        "manifest": str(manifest.path),
        "ledger": str(ledger.path),
        "per_day": schedule.per_day,
        "eta_s": schedule.duration_s,
        "started": True,
        "done": all(listed[state] == 0 for state in OPEN_STATES),
        "total": sum(counts.values()),
        "states": _named(counts),
        "skipped": dict(sorted(ledger.skip_causes().items())),
        "errors": errors,
        "last_errors": last_errors,
        "removed_from_list": sum(counts.values()) - sum(listed.values()),
        "next": [
            step.as_json()
            for step in build_next_steps(
                listed,
                manifest=command_path or str(manifest.path),
                sandbox=sandbox,
                removed=sum(counts.values()) - sum(listed.values()),
                examples=ledger.sample_emails(sampled, listed=True),
                reconcile_decides_at=_reconcile_decides_at(ledger, clock.now()),
            )
        ],
        "senders": senders,
    }


def _reconcile_decides_at(ledger: Ledger, now: datetime) -> datetime | None:
    """When reconcile can conclude "not sent" for every unknown row, if that is still ahead of `now`."""
    latest = ledger.latest_claim(RowState.UNKNOWN)
    if latest is None or latest + DEFAULT_MIN_AGE <= now:
        return None
    return (latest + DEFAULT_MIN_AGE).astimezone(UTC)


def build_unstarted_status(manifest: Manifest) -> dict[str, Any]:
    """The status of a campaign that has no ledger yet."""
    zero = _named(dict.fromkeys(RowState, 0))
    return {
        "campaign": manifest.campaign.name,
        "manifest": str(manifest.path),
        "ledger": None,
        "started": False,
        "done": False,
        "total": 0,
        "states": zero,
        "skipped": {},
        "errors": {},
        "last_errors": {},
        "removed_from_list": 0,
        "next": [],
        "senders": {
            sender.name: {
                "grant_id": sender.grant_id,
                "email": sender.email,
                "states": dict(zero),
                "sent_last_24h": 0,
                "per_day": sender.per_day,
                "budget_left": sender.per_day,
            }
            for sender in manifest.senders
        },
    }


def _error_causes(groups: Iterable[ErrorGroup]) -> tuple[dict[str, int], dict[str, str]]:
    """Rows per cause ("402 message_rejected", "- unknown"), most first, and each cause's latest message.

    Equal counts keep the order in which the causes first occur in the list, and the
    latest message is the last updated one (the last in list order among equals), as
    a pass over the rows in list order would find them.
    """
    counts: dict[str, int] = {}
    first: dict[str, tuple[int, str]] = {}
    latest: dict[str, tuple[str, int, str, str]] = {}
    for group in groups:
        cause = f"{group.status or '-'} {group.error_type or group.state.value}"
        counts[cause] = counts.get(cause, 0) + group.count
        first[cause] = min(first.get(cause, group.first), group.first)
        if group.latest is not None and (cause not in latest or group.latest[:3] > latest[cause][:3]):
            latest[cause] = group.latest
    ranked = sorted(sorted(counts, key=first.__getitem__), key=counts.__getitem__, reverse=True)
    return {cause: counts[cause] for cause in ranked}, {
        cause: latest[cause][3] for cause in ranked if cause in latest
    }


def _named(counts: dict[RowState, int]) -> dict[str, int]:
    return {state.value: counts.get(state, 0) for state in RowState}
