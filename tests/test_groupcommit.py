"""Group commit: writes asked for while a batch is written go together in the next one; writes of one
kind (`each`) reach their call together, each getting back its own result or its own error."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import anyio
import pytest

from campaign.ledger import GroupCommit

pytestmark = pytest.mark.anyio


async def test_writes_of_one_kind_asked_for_together_reach_their_call_once_each_with_its_own_result():
    batches: list[list[str]] = []
    calls: list[list[int]] = []
    release = threading.Event()

    @contextmanager
    def batch() -> Iterator[None]:
        batches.append([])
        yield

    def first_write() -> str:  # holds the first batch open while the others queue up behind it
        release.wait(timeout=30)
        batches[-1].append("first")
        return "first"

    def tenfold(items: Sequence[int]) -> list[int | Exception]:
        calls.append(list(items))
        batches[-1].append("tenfold")
        return [ValueError(f"item {item}") if item == 3 else item * 10 for item in items]

    group = GroupCommit(anyio.to_thread.run_sync, batch)
    results: dict[int, object] = {}

    async def each(item: int) -> None:
        try:
            results[item] = await group.each(tenfold, item)
        except ValueError as exc:
            results[item] = str(exc)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(group, first_write)
        await anyio.wait_all_tasks_blocked()
        for item in (1, 2, 3, 4):
            tasks.start_soon(each, item)
        await anyio.wait_all_tasks_blocked()
        release.set()
    assert calls == [[1, 2, 3, 4]]  # one call for the four
    assert results == {1: 10, 2: 20, 3: "item 3", 4: 40}  # item 3's error is its alone
    assert batches == [["first"], ["tenfold"]]
    assert group.batches == 2


async def test_a_call_for_many_that_fails_as_a_whole_fails_each_of_its_writes():
    @contextmanager
    def batch() -> Iterator[None]:
        yield

    def broken(items: Sequence[int]) -> list[int | Exception]:
        raise RuntimeError("the statement failed")

    async def inline(call):
        call()

    group = GroupCommit(inline, batch)
    with pytest.raises(RuntimeError, match="the statement failed"):
        await group.each(broken, 1)
    assert await group(lambda: "the next write") == "the next write"
