"""What a ledger keeps about its campaign as a whole: stamps, fingerprints, the key scheme, the parks.

Every backend keeps them the same way, as meta keys (their names never leave this package); a
backend gives the three ways to reach its meta table (`_meta`, `_metas_under`, `_set_meta`),
its transactions (`_write`) and its journal (`record_event`), and `KeptFacts` does the rest.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any

from campaign.ledger._read import (
    CONTENT_FINGERPRINT,
    KEY_SCHEME,
    LIST_EXTENT,
    PARKED_PREFIX,
    PLAN_STAMP,
    READ_STORES,
    RULES_STAMP,
    STEP_ORDER,
    TIMING_PREFIX,
    content_key,
)
from campaign.models import FIRST_STEP

__all__ = ["KeptFacts"]


class KeptFacts:
    """The kept facts of a ledger, on top of its meta table (a mixin of both backends)."""

    def _meta(self, key: str) -> str | None:
        raise NotImplementedError

    def _metas_under(self, prefix: str) -> dict[str, str]:
        """Key (without `prefix`) -> value of the meta keys starting with `prefix`, empty values left out."""
        raise NotImplementedError

    def _set_meta(self, key: str, value: str) -> None:
        raise NotImplementedError

    def _write(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def record_event(self, kind: str, detail: str) -> None:
        raise NotImplementedError

    def plan_stamp(self) -> str | None:
        """The stamp of the last plan recorded (`pipeline.load_plan_stamp`), or None."""
        return self._meta(PLAN_STAMP)

    def rules_stamp(self) -> str | None:
        """The stamp of what decided the last plan besides the list's rows (`pipeline.load_rules_stamp`)."""
        return self._meta(RULES_STAMP)

    def list_extent(self) -> str | None:
        """The last plan's list file as the pipeline recorded it (its size, digest and rows), or None."""
        return self._meta(LIST_EXTENT)

    def content_fingerprint(self, step: str = FIRST_STEP) -> str | None:
        """The content fingerprint of `step` recorded so far (`pipeline.load_content_fingerprint`)."""
        return self._meta(content_key(step))

    def followup_fingerprints(self) -> dict[str, str]:
        """Follow-up step -> the content fingerprint recorded for it, of every follow-up the ledger kept
        one for: steps the manifest no longer names (removed, or renamed) included."""
        return self._metas_under(f"{CONTENT_FINGERPRINT}:")

    def key_scheme(self) -> str | None:
        """How the ledger's recipients are keyed ("address" or "column:<name>"); None before it was kept."""
        return self._meta(KEY_SCHEME)

    def timing_stamp(self, step: str) -> str | None:
        """What decided the due times of follow-up `step`'s scheduled rows (`followups.timing_stamp`);
        None before it was kept."""
        return self._meta(f"{TIMING_PREFIX}{step}")

    def record_timing_stamp(self, stamp: str, step: str) -> None:
        """Keep what decides follow-up `step`'s due times now."""
        if self.timing_stamp(step) != stamp:
            self._set_meta(f"{TIMING_PREFIX}{step}", stamp)

    def step_order(self) -> tuple[str, ...] | None:
        """The campaign's steps in order when follow-ups were last scheduled; None before it was kept."""
        kept = self._meta(STEP_ORDER)
        return None if not kept else tuple(json.loads(kept))

    def record_step_order(self, steps: Sequence[str]) -> None:
        """Keep the campaign's steps in order, as follow-ups are scheduled now."""
        kept = json.dumps(list(steps))
        if self._meta(STEP_ORDER) != kept:
            self._set_meta(STEP_ORDER, kept)

    def parked_senders(self) -> dict[str, datetime]:
        """Senders a quota refusal parked, and until when: kept, so that a resume does not retry early."""
        return {
            sender: datetime.fromisoformat(until)
            for sender, until in self._metas_under(PARKED_PREFIX).items()
        }

    def record_content_fingerprint(
        self, fingerprint: str, *, changed_from: str | None = None, step: str = FIRST_STEP
    ) -> None:
        """Keep this run's content fingerprint of `step`; journal a change allowed after sending began."""
        with self._write():
            if changed_from is not None:
                which = "" if step == FIRST_STEP else f" of step {step}"
                detail = (
                    f"content fingerprint{which} {changed_from} -> {fingerprint} (--allow-changed-content)"
                )
                self.record_event("content_changed", detail)
            if self.content_fingerprint(step) != fingerprint:
                self._set_meta(content_key(step), fingerprint)

    def record_key_scheme(self, scheme: str) -> None:
        """Keep how this campaign keys its recipients (once `check_key_scheme` allowed it)."""
        if self.key_scheme() != scheme:
            self._set_meta(KEY_SCHEME, scheme)

    def read_stores(self) -> tuple[str, ...]:
        """The unsubscribe stores the last run read, as `record_read_stores` kept them (none before)."""
        kept = self._meta(READ_STORES)
        return () if not kept else tuple(json.loads(kept))

    def record_read_stores(self, stores: Sequence[str]) -> None:
        """Keep the unsubscribe stores this run reads (`pipeline.record_read_stores` names them)."""
        kept = json.dumps(list(stores))
        if self._meta(READ_STORES) != kept:
            self._set_meta(READ_STORES, kept)

    def record_parks(self, parks: Mapping[str, datetime | None]) -> None:
        """Keep until when each sender is parked by a quota refusal (None: not parked)."""
        with self._write():
            for sender, until in parks.items():
                self._set_meta(f"{PARKED_PREFIX}{sender}", "" if until is None else until.isoformat())
