"""Where the lanes take their work from, a page at a time, so that no lane holds a whole list.

A `JobSource` gives a sender's next jobs in order (the run's reads them from the ledger; a list of
jobs is one too, `source_of`). `JobFeed` sits in front of it: a lane takes its own jobs first; once a
sender stops (parked, or its credentials refused), what it held comes back (`release`) and its
movable jobs may be taken by any other sender, from what it gave back and then from its source.
Rows pinned to their sender, follow-ups (their thread is in that mailbox), rows whose key may have
been used (`bound`: Nylas scopes keys per grant) and rows the taker may not send (`movable_to`: a
Microsoft sender's message must link to unsubscribe in its body) are kept for their own sender. Pure
bookkeeping: it reads no clock and does no I/O but its source's.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Protocol

from campaign.plan import Job

__all__ = ["JobFeed", "JobSource", "chain_sources", "source_of"]


class JobSource(Protocol):
    """The jobs of a round, each sender's in order."""

    def __call__(self, sender: str, count: int) -> Sequence[Job]:
        """Up to `count` of `sender`'s next jobs; fewer once it has no more."""
        ...

    def left(self) -> int:
        """How many jobs have not been read yet."""
        ...


# Jobs a stopped sender keeps (pinned, follow-ups, bound) that the others have read past, at most; beyond
# it they stop looking through that sender's rows, which stay in the source for it.
_KEPT_MAX = 10_000


class _Listed:
    def __init__(self, jobs: Iterable[Job]) -> None:
        self._queues: dict[str, deque[Job]] = defaultdict(deque)
        for job in jobs:
            self._queues[job.sender].append(job)

    def __call__(self, sender: str, count: int) -> list[Job]:
        queue = self._queues[sender]
        return [queue.popleft() for _ in range(min(count, len(queue)))]

    def left(self) -> int:
        return sum(len(queue) for queue in self._queues.values())


def source_of(jobs: Iterable[Job]) -> JobSource:
    """A source over jobs already in memory (a follow-up round's, a test's), each sender's in order."""
    return _Listed(jobs)


class _Chained:
    def __init__(self, sources: Sequence[JobSource]) -> None:
        self._sources = sources

    def __call__(self, sender: str, count: int) -> list[Job]:
        jobs: list[Job] = []
        for source in self._sources:
            if len(jobs) < count:
                jobs += source(sender, count - len(jobs))
        return jobs

    def left(self) -> int:
        return sum(source.left() for source in self._sources)


def chain_sources(*sources: JobSource) -> JobSource:
    """Each sender's jobs of the first source, then of the next (step 1's rows, then follow-ups due)."""
    return _Chained(sources)


class JobFeed:
    """The lanes' shared view of the work; see the module's docstring."""

    def __init__(
        self,
        source: JobSource,
        *,
        bound: Collection[str],
        movable_to: Callable[[Job, str], bool] | None = None,
    ) -> None:
        self._source = source
        self._bound = bound  # the loop's own set: it grows as keys are used
        self._movable_to = movable_to
        self._kept: dict[str, deque[Job]] = defaultdict(deque)  # read, or given back, not yet taken
        self._staying: dict[str, deque[Job]] = defaultdict(deque)  # a stopped sender's, others read past
        self._drained: set[str] = set()  # senders whose source has nothing more
        self._released: list[str] = []  # stopped senders whose movable jobs others may take
        # Keys read and not finished: a source that reads a ledger may meet such a row again (claimed,
        # then back to pending under another sender); it is in a lane already, and must not be twice.
        self._out: set[str] = set()

    def take(self, sender: str, count: int) -> list[Job]:
        """Up to `count` jobs for `sender`: its own first, then movable ones of stopped senders (now its)."""
        taken = self._own(sender, count)
        for other in self._released:
            if len(taken) >= count:
                break
            if other != sender:
                taken += [
                    job._replace(sender=sender) for job in self._movable(other, count - len(taken), sender)
                ]
        return taken

    def finished(self, key: str) -> None:
        """The loop is done with this job (sent, failed, unknown, skipped or held): forget it."""
        self._out.discard(key)

    def release(self, sender: str, jobs: Iterable[Job]) -> None:
        """`sender` stopped: the jobs it held come back (ahead of the rest), its movable jobs go to others."""
        self._kept[sender].extendleft(reversed(list(jobs)))
        if sender not in self._released:
            self._released.append(sender)

    def holds(self, sender: str) -> bool:
        """Whether jobs of `sender` may be left here (given back, or not read from the source yet)."""
        return bool(self._staying[sender] or self._kept[sender]) or sender not in self._drained

    def left(self) -> int:
        """The jobs not taken: given back, kept for a stopped sender, or not read from the source yet."""
        held = sum(len(queue) for queues in (self._kept, self._staying) for queue in queues.values())
        return held + self._source.left()

    def _own(self, sender: str, count: int) -> list[Job]:
        taken: list[Job] = []
        for queue in (self._staying[sender], self._kept[sender]):  # in order: `staying` came first
            taken += [queue.popleft() for _ in range(min(count - len(taken), len(queue)))]
        if len(taken) < count:
            taken += self._read(sender, count - len(taken))
        return taken

    def _movable(self, sender: str, count: int, to: str) -> list[Job]:
        """Up to `count` of a stopped sender's jobs that may move to sender `to`; the others stay for it,
        in order."""
        found: list[Job] = []
        kept, staying = self._kept[sender], self._staying[sender]
        while len(found) < count and len(staying) < _KEPT_MAX:
            if not kept:
                kept.extend(self._read(sender, count - len(found)))
                if not kept:
                    break
            job = kept.popleft()
            moves = job.movable and job.key not in self._bound
            if moves and self._movable_to is not None:
                moves = self._movable_to(job, to)
            (found if moves else staying).append(job)
        return found

    def _read(self, sender: str, count: int) -> list[Job]:
        if sender in self._drained:
            return []
        jobs = self._source(sender, count)
        if len(jobs) < count:
            self._drained.add(sender)
        fresh = [job for job in jobs if job.key not in self._out]
        self._out.update(job.key for job in fresh)
        return fresh
