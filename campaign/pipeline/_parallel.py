"""Checking a big list on every core: its messages rendered in worker processes, a batch each.

Rendering and checking a row's messages (Jinja, the unsubscribe token and headers, the attachments'
sizes) is most of a check's time, and it depends on the row alone. So for a big list `checked_rows`
hands each batch's rows to a pool of processes, each with its own composer, while this process goes
on scanning, deduplicating and assigning the next batches in list order (those depend on the rows
before). A worker sends back only each row's error line, or None: planning needs no message. The
processes are spawned, not forked (polars' threads do not survive a fork). Sends nothing, writes
nothing.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager

from campaign.errors import DataError
from campaign.manifest import Manifest
from campaign.pipeline._rows import RowCheck, RowPipeline, check_steps
from campaign.plan import Job
from campaign.recipients import BATCH_ROWS
from campaign.render import Composer, build_composer

__all__ = ["checked_rows"]

# Rows: below this, starting the processes (each imports campaign and compiles the templates: about a
# second) costs more than it saves.
PARALLEL_FROM = 20_000
BATCH = BATCH_ROWS  # rows a worker renders at a time (and the scan's batch)
_AHEAD = 2  # batches in flight per worker: the workers never wait for this process, nor it for them

# A worker process's own manifest and composer (set once by `_start_worker`).
_worker: tuple[Manifest, Composer] | None = None


def checked_rows(
    pipeline: RowPipeline, secrets: Sequence[bytes] | None
) -> Iterator[list[tuple[RowCheck, str | None]]]:
    """Every row of `pipeline` with its error line (None: it passed, or needs no check), a batch at a
    time in list order; on every core when the list is big enough to pay for it."""
    workers = _cores()
    if workers < 2 or pipeline.scan.row_count < PARALLEL_FROM:
        for batch in pipeline.batches(BATCH):
            yield [(row, None if row.error is None else str(row.error)) for row in batch]
        return
    context = multiprocessing.get_context("spawn")
    secret_list = None if secrets is None else tuple(secrets)
    pool = ProcessPoolExecutor(
        workers, mp_context=context, initializer=_start_worker, initargs=(pipeline.manifest, secret_list)
    )
    try:
        waiting: deque[tuple[list[RowCheck], Future[list[str | None]]]] = deque()
        for batch in pipeline.batches(BATCH, render=False):
            jobs = [row.job for row in batch if row.job is not None and _to_render(row)]
            with _children_ignore_ctrl_c():  # a submit may start a worker
                waiting.append((batch, pool.submit(_check_batch, jobs)))
            if len(waiting) > workers * _AHEAD:
                yield _joined(*waiting.popleft())
        while waiting:
            yield _joined(*waiting.popleft())
    finally:
        pool.shutdown(cancel_futures=True)


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


def _joined(batch: list[RowCheck], errors: Future[list[str | None]]) -> list[tuple[RowCheck, str | None]]:
    """The batch's rows with the errors its rendered rows came back with (in the same order)."""
    found = iter(errors.result())
    return [(row, next(found) if _to_render(row) else None) for row in batch]


def _to_render(row: RowCheck) -> bool:
    """Whether a worker checks `row`: a row to mail that an earlier run's check does not cover."""
    return row.job is not None and not row.reused


def _start_worker(manifest: Manifest, secrets: Sequence[bytes] | None) -> None:
    global _worker  # a pool worker's state, set once as it starts
    # Ctrl-C reaches the whole process group: the parent stops the check and shuts the pool down; a
    # worker that raised KeyboardInterrupt too would print its own traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker = (manifest, build_composer(manifest, secrets=secrets))


def _check_batch(jobs: list[Job]) -> list[str | None]:
    """In a worker: each job's messages rendered and checked; its error line, or None."""
    assert _worker is not None
    manifest, composer = _worker
    return [_error(check_steps(composer, manifest, job)) for job in jobs]


def _error(outcome: object) -> str | None:
    return str(outcome) if isinstance(outcome, DataError) else None
