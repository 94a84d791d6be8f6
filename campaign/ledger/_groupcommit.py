"""Group commit: ledger writes asked for at about the same moment share one transaction.

Each caller awaits its own write and gets its own result or error back, only after
the transaction holding it is committed; so a claim is on disk before its caller
goes on to send. While one batch is being written (off the event loop), new writes
queue up and go together in the next. It decides nothing about what is written.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Generic, TypeVar, cast

import anyio

__all__ = ["GroupCommit"]

_T = TypeVar("_T")


@dataclass(slots=True)
class _Write(Generic[_T]):
    call: Callable[[], _T]
    done: anyio.Event = field(default_factory=anyio.Event)
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
        write: _Write[_T] = _Write(call)
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
        with self._batch():
            for write in writes:
                try:
                    write.value = write.call()
                except Exception as exc:  # this write failed (and was undone); the others stand
                    write.error = exc
