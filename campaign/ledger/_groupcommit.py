"""Group commit: ledger writes asked for at about the same moment share one transaction.

Each caller awaits its own write and gets its own result or error back, only after
the transaction holding it is committed; so a claim is on disk before its caller
goes on to send. While one batch is being written (off the event loop), new writes
queue up and go together in the next. A write asked for with `each` goes with the others of its
kind in the batch to one call (`Ledger.claim_many`: one statement for many rows, so one round trip
to a database server). It decides nothing about what is written.

The writes of one batch were asked for concurrently, none waiting on another, so any order of them
is one they could have happened in.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Generic, TypeVar, cast

import anyio

__all__ = ["GroupCommit"]

_T = TypeVar("_T")
_A = TypeVar("_A")

# Takes the items asked for together, gives each its result or its own error, in their order.
Together = Callable[[Sequence[_A]], Sequence[_T | Exception]]


@dataclass(slots=True)
class _Write(Generic[_T]):
    call: Callable[[], _T] | None
    together: Together[Any, _T] | None = None
    item: object = None
    done: anyio.Event = field(default_factory=lambda: anyio.Event())  # anyio loads its parts on first use
    value: _T | None = None
    error: BaseException | None = None


class GroupCommit:
    """Runs writes through `offload` in batches, each batch inside one `batch()` transaction."""

    def __init__(
        self,
        offload: Callable[[Callable[[], None]], Awaitable[None]],
        batch: Callable[[], AbstractContextManager[object]],
    ) -> None:
        self._offload = offload
        self._batch = batch
        self._queue: list[_Write[Any]] = []
        self._writing = False
        self.batches = 0

    async def __call__(self, call: Callable[[], _T]) -> _T:
        """Queue `call`, wait until the transaction holding it is committed; return its result."""
        return await self._queued(_Write(call))

    async def each(self, together: Together[_A, _T], item: _A) -> _T:
        """Queue `item` for `together`, called once a batch with every item queued for it; wait as
        `__call__` does, and return this item's result (or raise its error)."""
        return await self._queued(_Write(None, together, item))

    async def _queued(self, write: _Write[_T]) -> _T:
        self._queue.append(write)
        if not self._writing:
            await self._write_queued()
        if not write.done.is_set():  # no needless checkpoint: an inline offload never yields here
            await write.done.wait()
        if write.error is not None:
            raise write.error
        return cast(_T, write.value)

    async def _write_queued(self) -> None:
        # The first caller writes for everyone until the queue is empty. Shielded: the
        # writes of others must not be stranded if this caller is cancelled meanwhile.
        self._writing = True
        try:
            with anyio.CancelScope(shield=True):
                while self._queue:
                    writes, self._queue = self._queue, []
                    try:
                        await self._offload(partial(self._apply, writes))
                    except BaseException as exc:  # the transaction failed: nothing in it holds
                        stranded, self._queue = writes + self._queue, []
                        for write in stranded:
                            write.error = exc
                            write.done.set()
                        raise
                    self.batches += 1
                    for write in writes:
                        write.done.set()
        finally:
            self._writing = False

    def _apply(self, writes: list[_Write[Any]]) -> None:
        kinds: dict[Together[Any, Any], list[_Write[Any]]] = {}
        with self._batch():
            for write in writes:
                if write.call is None:
                    assert write.together is not None
                    kinds.setdefault(write.together, []).append(write)
                    continue
                try:
                    write.value = write.call()
                except Exception as exc:  # this write failed (and was undone); the others stand
                    write.error = exc
            for together, alike in kinds.items():
                try:
                    results = together([write.item for write in alike])
                except Exception as exc:
                    results = [exc] * len(alike)
                for write, result in zip(alike, results, strict=True):
                    if isinstance(result, Exception):
                        write.error = result
                    else:
                        write.value = result
