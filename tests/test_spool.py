"""The plan spool: a check's plan on disk, read back in the order written, leaving no file behind."""

from __future__ import annotations

import tempfile
from datetime import UTC, datetime, timedelta

import pytest

from campaign.ledger import PlannedRow, PlanSpool
from campaign.models import Skip, SkipReason


def _planned(n: int) -> PlannedRow:
    due = None if n % 3 else datetime(2026, 12, 6, 9, tzinfo=UTC) + timedelta(minutes=n)
    return PlannedRow(f"k{n}", n, f"p{n}@example.com", f"s{n % 2}", due_at=due, cells=f'{{"n": "{n}"}}')


def _skip(n: int) -> Skip:
    reason = SkipReason.DUPLICATE if n % 2 else SkipReason.SUPPRESSED
    return Skip(n, f"k{n}", f"p{n}@example.com", reason, f"detail {n}")


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_the_plan_comes_back_as_written_batch_after_batch_and_again(private_tmp):
    """Rows and skips, across batches (some empty), come back in order with their due times, twice."""
    batches = [(list(map(_planned, range(0, 50))), [_skip(1000)]), ([], []), ([_planned(50)], [])]
    batches.append(([], list(map(_skip, range(2000, 2010)))))
    with PlanSpool() as spool:
        for planned, skips in batches:
            spool.add(planned, skips)
        for _ in range(2):  # record_plan may read it again after a failure of its own
            assert list(spool.planned()) == [row for planned, _ in batches for row in planned]
            assert list(spool.skips()) == [skip for _, skips in batches for skip in skips]


def test_an_empty_spool_reads_nothing(private_tmp):
    with PlanSpool() as spool:
        assert list(spool.planned()) == []
        assert list(spool.skips()) == []


def test_the_spool_never_names_a_file(private_tmp):
    """Its files are anonymous from the start: nothing to clean up after a crash, even kill -9."""
    with PlanSpool() as spool:
        spool.add([_planned(1)], [_skip(2)])
        assert list(private_tmp.iterdir()) == []
        assert list(spool.planned()) == [_planned(1)]
    assert list(private_tmp.iterdir()) == []
