"""The cyclic garbage collector during the long passes: the rows' check, the send loop, the fake API.

Reference counting frees almost everything these passes make at once; the cyclic collector only
finds cycles. At its default pace (a young pass every 700 new objects) it also promotes whatever
is briefly alive: a request in flight for a second outlives dozens of young passes and lands in
the oldest generation, and the full passes that follow walk the whole heap. With 2,000 senders
at 1 s of latency that was a third of the client's CPU and two fifths of the fake's; a check, which
keeps its plan, spent about 15 % of its time so. Young passes every 100,000 objects let such objects
die young, and cycles wait only a little longer.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["YOUNG_THRESHOLD", "collecting_less", "old_objects_frozen"]

YOUNG_THRESHOLD = 100_000


@contextmanager
def collecting_less() -> Iterator[None]:
    """Run the young pass every `YOUNG_THRESHOLD` new objects (or less often, if already so);
    restore the thresholds after."""
    before = gc.get_threshold()
    gc.set_threshold(max(before[0], YOUNG_THRESHOLD), *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)


@contextmanager
def old_objects_frozen() -> Iterator[None]:
    """Leave what exists now (modules, a plan's setup) out of the collector's full passes.

    A full pass over them stops every thread for 30 ms or more: a paced request that was about
    to leave goes out with the next one, and Nylas, counting arrivals by the second, sees both in
    the same second. Frozen, a full pass walks only what was made since. A caller that froze its
    own objects keeps them frozen.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
