"""Times as people read them: a duration as '3 h 5 min', a moment in the local time zone.

Pure text for the terminal output (`campaign.cli.output`, `campaign.cli.progress`); it reads no
clock: callers pass the seconds or the moment.
"""

from __future__ import annotations

from datetime import datetime

__all__ = ["format_duration", "format_local_time"]


def format_duration(seconds: float) -> str:
    """A short human duration: '45 s', '12 min', '3 h 5 min', '2 days 4 h'."""
    if seconds < 60:
        return f"{max(seconds, 0):.0f} s"
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} day{'s' if days > 1 else ''} {hours} h"


def format_local_time(moment: datetime) -> str:
    """`moment` in the local time zone, e.g. '2025-05-01 14:03:00 CEST'."""
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
