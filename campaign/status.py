"""Where a campaign stands, as plain data: what `campaign status` prints and `--json` emits.

Reads the ledger; writes nothing. The keys are a contract documented in the README.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from campaign.clock import Clock
from campaign.ledger import Ledger
from campaign.manifest import Manifest
from campaign.models import RowState
from campaign.nextsteps import build_next_steps
from campaign.plan import build_schedule
from campaign.ratelimit import DAY_S

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
    counts = ledger.counts()
    by_sender = ledger.counts_by_sender()
    since = clock.now().timestamp() - DAY_S
    senders: dict[str, dict[str, Any]] = {}
    for sender in manifest.senders:
        sent_24h = sum(count for _, count in ledger.sent_recipients_since(sender.name, since))
        senders[sender.name] = {
            "grant_id": sender.grant_id,
            "domain": sender.domain,
            "email": sender.email,
            "states": _named(by_sender.get(sender.name, dict.fromkeys(RowState, 0))),
            "sent_last_24h": sent_24h,
            "per_day": sender.per_day,
            "budget_left": None if sender.per_day is None else max(0, sender.per_day - sent_24h),
        }
    skipped: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    last_error: dict[str, tuple[str, str]] = {}  # cause -> (when, message) of its latest row
    for row in ledger.rows(states=(RowState.SKIPPED, RowState.FAILED, RowState.UNKNOWN)):
        if row.state == RowState.SKIPPED:
            skipped[(row.reason or "unknown").split(":", 1)[0]] += 1
        else:
            cause = f"{row.error_status or '-'} {row.error_type or row.state.value}"
            errors[cause] += 1
            said = row.error_message or row.note or ""
            if said and row.updated_at >= last_error.get(cause, ("", ""))[0]:
                last_error[cause] = (row.updated_at, said)
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
    listed = ledger.counts(listed=True)  # rows removed from the list are left alone: not open work
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
        "skipped": dict(sorted(skipped.items())),
        "errors": dict(errors.most_common()),
        "last_errors": {
            cause: last_error[cause][1] for cause, _ in errors.most_common() if cause in last_error
        },
        "removed_from_list": sum(counts.values()) - sum(listed.values()),
        "next": [
            step.as_json()
            for step in build_next_steps(
                listed,
                manifest=command_path or str(manifest.path),
                sandbox=sandbox,
                removed=sum(counts.values()) - sum(listed.values()),
                examples=ledger.sample_emails((*OPEN_STATES, RowState.FAILED), listed=True),
            )
        ],
        "senders": senders,
    }


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


def _named(counts: dict[RowState, int]) -> dict[str, int]:
    return {state.value: counts.get(state, 0) for state in RowState}
