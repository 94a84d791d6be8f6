"""Checking a big list on every core: its messages rendered in worker processes, a batch each.

Rendering and checking a row's messages (Jinja, the unsubscribe token and headers, the attachments'
sizes) is most of a check's time, and it depends on the row alone. So for a big list `checked_rows`
hands each batch's rows to a pool of processes, each with its own composer, while this process goes
on scanning, deduplicating and assigning the next batches in list order (those depend on the rows
before). A worker sends back only what its caller needs of each row's messages (`summarise`: a run
needs the error line or None, a preview the subject and the warnings), never the messages. The
processes are spawned, not forked (polars' threads do not survive a fork). Sends nothing, writes
nothing.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

from campaign.errors import DataError
from campaign.manifest import Manifest
from campaign.models import Address, Message, Recipient
from campaign.pipeline._rows import RowCheck, RowPipeline, check_steps
from campaign.plan import Job
from campaign.recipients import BATCH_ROWS
from campaign.render import Composer, build_composer

__all__ = ["Rendered", "checked_rows", "error_line"]

# Rows: below this, starting the processes (each imports campaign and compiles the templates: about a
# second) costs more than it saves.
PARALLEL_FROM = 20_000
BATCH = BATCH_ROWS  # rows a worker renders at a time (and the scan's batch)
_AHEAD = 2  # batches in flight per worker: the workers never wait for this process, nor it for them

# A row's messages as rendered (step 1, then each follow-up), or the error that stops the row.
Rendered = tuple[Message, ...] | DataError
_Summary = TypeVar("_Summary")

# What a worker needs of a job, as plain values (key, row, address, name, cells, pinned sender, sender):
# a frozen dataclass pickles through `dataclasses.fields` for every object, which cost this process a
# quarter of its time.
_JobParts = tuple[str, int, str, str | None, Mapping[str, object], str | None, str]

# A worker process's own manifest and composer (set once by `_start_worker`).
_worker: tuple[Manifest, Composer] | None = None


def checked_rows(
    pipeline: RowPipeline,
    secrets: Sequence[bytes] | None,
    summarise: Callable[[Rendered], _Summary],
    *,
    size: int | None = None,
) -> Iterator[list[tuple[RowCheck, _Summary | None]]]:
    """Every row of `pipeline` with `summarise` of its rendered messages (None: a row not rendered, being
    no row to mail or one an earlier run's check covers), `size` rows at a time in list order; on every
    core when the list is big enough to pay for it. `summarise` must be a module-level function (the
    workers receive it by name)."""
    size = size or BATCH
    workers = _cores()
    if workers < 2 or pipeline.scan.row_count < PARALLEL_FROM:
        for batch in pipeline.batches(size):
            yield [(row, summarise(_rendered(row)) if _to_render(row) else None) for row in batch]
        return
    context = multiprocessing.get_context("spawn")
    secret_list = None if secrets is None else tuple(secrets)
    pool = ProcessPoolExecutor(
        workers, mp_context=context, initializer=_start_worker, initargs=(pipeline.manifest, secret_list)
    )
    try:
        waiting: deque[tuple[list[RowCheck], Future[list[_Summary]]]] = deque()
        for batch in pipeline.batches(size, render=False):
            jobs = [_parts(row.job) for row in batch if row.job is not None and _to_render(row)]
            with _children_ignore_ctrl_c():  # a submit may start a worker
                waiting.append((batch, pool.submit(_check_batch, jobs, summarise)))
            if len(waiting) > workers * _AHEAD:
                yield _joined(*waiting.popleft())
        while waiting:
            yield _joined(*waiting.popleft())
    finally:
        pool.shutdown(cancel_futures=True)


def error_line(rendered: Rendered) -> str | None:
    """A run's summary of a row's messages: the error line that stops the row, or None."""
    return str(rendered) if isinstance(rendered, DataError) else None


def _rendered(row: RowCheck) -> Rendered:
    if row.error is not None:
        return row.error
    assert row.message is not None  # a rendered row has its message or its error
    return (row.message, *row.followups)


@contextmanager
def _children_ignore_ctrl_c() -> Iterator[None]:
    """Processes started inside begin with SIGINT ignored. An ignored signal stays ignored across exec,
    and Python then installs no KeyboardInterrupt handler, so a terminal's Ctrl-C (which reaches the
    whole process group) is the parent's to handle even while a worker is still importing. The parent
    ignores it only for the milliseconds a start takes. Only the main thread may change handlers: the
    workers' own `_start_worker` covers other callers once a worker has started."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        if before is not None:
            signal.signal(signal.SIGINT, before)


def _cores() -> int:
    """The cores this process may run on (all of them where the OS cannot say: macOS)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _joined(batch: list[RowCheck], found: Future[list[_Summary]]) -> list[tuple[RowCheck, _Summary | None]]:
    """The batch's rows with the summaries its rendered rows came back with (in the same order)."""
    summaries = iter(found.result())
    return [(row, next(summaries) if _to_render(row) else None) for row in batch]


def _to_render(row: RowCheck) -> bool:
    """Whether a worker checks `row`: a row to mail that an earlier run's check does not cover."""
    return row.job is not None and not row.reused


def _start_worker(manifest: Manifest, secrets: Sequence[bytes] | None) -> None:
    global _worker  # a pool worker's state, set once as it starts
    # Ctrl-C reaches the whole process group: the parent stops the check and shuts the pool down; a
    # worker that raised KeyboardInterrupt too would print its own traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker = (manifest, build_composer(manifest, secrets=secrets))
    # What start-up made lives as long as the worker: full collections skip it (they walked it a dozen
    # times a million rows, 2 % of a worker's time).
    gc.freeze()


def _parts(job: Job) -> _JobParts:
    recipient = job.recipient
    address = recipient.address
    return (
        recipient.key,
        recipient.row,
        address.email,
        address.name,
        recipient.fields,
        recipient.sender,
        job.sender,
    )


def _check_batch(jobs: list[_JobParts], summarise: Callable[[Rendered], _Summary]) -> list[_Summary]:
    """In a worker: each job's messages rendered and checked, and summarised for the caller."""
    assert _worker is not None
    manifest, composer = _worker
    found = []
    for key, row, email, name, fields, pinned, sender in jobs:
        job = Job(Recipient(key, row, Address(email, name), fields, pinned), sender)
        found.append(summarise(check_steps(composer, manifest, job)))
    return found
