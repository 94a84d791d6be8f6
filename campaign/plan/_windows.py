"""A sender's send window as a plan shows it: when it next opens, and when its work is done counting
only the time it is open. Pure: the caller passes the moment."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, date, datetime

from campaign.manifest import SenderSettings
from campaign.sendtime import finish_within, next_open

__all__ = ["WindowPlan", "plan_window"]


@dataclass(frozen=True, slots=True)
class WindowPlan:
    """A sender's window (`Mon-Fri 09:00-17:30 Europe/Berlin`), its next opening, and the finish."""

    window: str
    opens: datetime | None  # None: open now
    finishes_at: datetime  # `duration_s` of sending from now, counting only open time

    def as_json(self) -> dict[str, object]:
        """The keys a sender with a window has in `status --json` and `preview --json`."""
        return {
            "window": self.window,
            "window_opens": None if self.opens is None else _iso(self.opens),
            "finishes_at": _iso(self.finishes_at),
        }


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds")


def plan_window(
    sender: SenderSettings, *, now: datetime, duration_s: float, holidays: Collection[date] = ()
) -> WindowPlan | None:
    """The window plan of `sender` at `now` for `duration_s` of sending; None when it has no window."""
    window = sender.send_window
    if window is None:
        return None
    opens = next_open(window, now, holidays=holidays)
    return WindowPlan(
        window=f"{sender.window} {sender.timezone}",
        opens=opens if opens > now else None,
        finishes_at=finish_within(window, now, duration_s, holidays=holidays),
    )
