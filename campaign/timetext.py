"""Times as people read and write them: a duration as '3 h 5 min', a moment in the local time zone,
and a duration given on the command line ('90s', '15m', '1h').

Pure text for the terminal, the preview site and the options; it reads no clock: callers pass the
seconds or the moment.
"""

from __future__ import annotations

from datetime import datetime, timedelta

__all__ = ["format_duration", "format_local_time", "parse_duration"]

_UNITS = {"s": 1, "m": 60, "h": 3600}


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


def parse_duration(text: str) -> timedelta:
    """`90s`, `15m` or `1h` as a timedelta; ValueError (saying the forms) for anything else."""
    value = text.strip().lower()
    number, unit = value[:-1], value[-1:]
    if unit not in _UNITS or not number.isdigit():
        message = f"{text!r} is not a duration; write seconds, minutes or hours, e.g. 90s, 15m or 1h"
        raise ValueError(message)
    return timedelta(seconds=int(number) * _UNITS[unit])
