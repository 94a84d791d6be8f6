"""The suppression files of a running campaign, re-read when they change.

The plan applies the suppression files once, to step 1's rows it checks. Rows it does not check
again still reach the send loop: follow-ups of a recipient mailed before being listed, a failed row
put back by `retry --failed` or reconcile, a resume that found nothing changed. `SuppressionFiles`
answers for those right before each claim, as `UnsubscribeWatch` does for the stores: it reads the
files when the run starts and again when one changes (looked at, a `stat` each, at most once every
`refresh_s`), during a run in a worker thread (`reread_when_due`). A recipient is listed as the plan
finds it: by address, or by the key of an entry that holds a key and no address (`SuppressionList`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import anyio
import anyio.to_thread

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
        self._stamp = _stat(self._paths)
        self._listed: SuppressionList = load_suppression_list(self._paths)
        self._looked_at = clock.monotonic()
        self._looking: anyio.Lock | None = None  # made on the event loop that first needs it

    async def reread_when_due(self) -> None:
        """Look at the files again, as `is_listed` would, if `refresh_s` passed since the last look; in a
        worker thread, so that the event loop goes on meanwhile (the other sends, a worker's lease
        heartbeat), however long a file on a slow or network disk takes. Every check that finds a look
        due waits for it: an entry saved before then is known to the `is_listed` that follows."""
        if not self._look_due():
            return
        if self._looking is None:
            self._looking = anyio.Lock()
        async with self._looking:
            if self._look_due():  # else the look another check waited for was this one's
                self._take(await anyio.to_thread.run_sync(_read_changed, self._paths, self._stamp))

    def is_listed(self, recipient: Recipient) -> bool:
        """Whether a suppression file lists `recipient` now, by address or key (as of at most `refresh_s`
        ago); looks at the files first, in this thread, when a look is due (`reread_when_due` has it
        done elsewhere)."""
        if self._look_due():
            self._take(_read_changed(self._paths, self._stamp))
        return self._listed.lists(recipient)

    def _look_due(self) -> bool:
        return bool(self._paths) and self._clock.monotonic() - self._looked_at >= self._refresh_s

    def _take(self, read: tuple[_Stamp, SuppressionList] | None) -> None:
        # Timed from the look's end: a look slower than `refresh_s` is not due again at once.
        self._looked_at = self._clock.monotonic()
        if read is not None:
            self._stamp, self._listed = read


def _read_changed(paths: tuple[Path, ...], stamp: _Stamp) -> tuple[_Stamp, SuppressionList] | None:
    """The files' stamp and what they list, if one changed since `stamp`; None if none did, or if one
    cannot be read (half-saved or mistyped: what was read is kept, and read again at the next look)."""
    now = _stat(paths)
    if now == stamp:
        return None
    try:
        return now, load_suppression_list(paths)
    except CampaignError:
        return None


def _stat(paths: tuple[Path, ...]) -> _Stamp:
    found: list[tuple[int, int] | None] = []
    for path in paths:
        try:
            info = path.stat()
        except OSError:
            found.append(None)
        else:
            found.append((info.st_mtime_ns, info.st_size))
    return tuple(found)
