"""The suppression files of a running campaign, re-read when they change.

The plan applies the suppression files once, to step 1's rows it checks. Rows it does not check
again still reach the send loop: follow-ups of a recipient mailed before being listed, a failed row
put back by `retry --failed` or reconcile, a resume that found nothing changed. `SuppressionFiles`
answers for those right before each claim, as `UnsubscribeWatch` does for the stores: it reads the
files when the run starts and again when one changes (looked at, a `stat` each, at most once every
`refresh_s`). A recipient is listed as the plan finds it: by address, or by the key of an entry that
holds a key and no address (`SuppressionList`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from campaign.clock import Clock
from campaign.errors import CampaignError
from campaign.manifest import STORE_SUFFIXES
from campaign.models import Recipient
from campaign.recipients._audience import SuppressionList, load_suppression_list

__all__ = ["SuppressionFiles"]

_Stamp = tuple[tuple[int, int] | None, ...]


class SuppressionFiles:
    """Who the suppression files (not the stores) of `sources` list, kept current while a run goes on.

    Reading them when built raises what `load_suppression_list` raises (a bad entry names its file and
    line): a run never starts on an opt-out it cannot read. A file edited into a bad state mid-run
    keeps what was read before, and is read again at the next change.
    """

    def __init__(self, sources: Sequence[Path | str], *, clock: Clock, refresh_s: float = 1.0) -> None:
        self._paths = tuple(
            path for path in sources if isinstance(path, Path) and path.suffix.lower() not in STORE_SUFFIXES
        )
        self._clock = clock
        self._refresh_s = refresh_s
        self._stamp = self._stat()
        self._listed: SuppressionList = load_suppression_list(self._paths)
        self._looked_at = clock.monotonic()

    def is_listed(self, recipient: Recipient) -> bool:
        """Whether a suppression file lists `recipient` now, by address or key (as of at most `refresh_s`
        ago)."""
        if not self._paths:
            return False
        now = self._clock.monotonic()
        if now - self._looked_at >= self._refresh_s:
            self._looked_at = now
            self._reread()
        return self._listed.lists(recipient)

    def _reread(self) -> None:
        stamp = self._stat()
        if stamp == self._stamp:
            return
        try:
            self._listed = load_suppression_list(self._paths)
        except CampaignError:
            return  # half-saved or mistyped: keep what was read, try again at the next change
        self._stamp = stamp

    def _stat(self) -> _Stamp:
        found: list[tuple[int, int] | None] = []
        for path in self._paths:
            try:
                info = path.stat()
            except OSError:
                found.append(None)
            else:
                found.append((info.st_mtime_ns, info.st_size))
        return tuple(found)
