"""The collector's pace during the long passes: the check, the send loop (test_dispatch) and the fake."""

from __future__ import annotations

import gc

import pytest
import uvicorn

from campaign.collector import YOUNG_THRESHOLD, collecting_less, old_objects_frozen
from campaign.testing import FakeNylas
from campaign.testing.server import run_sandbox_server


def test_collecting_less_raises_the_young_threshold_and_restores_it():
    before = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    try:
        with collecting_less():
            assert gc.get_threshold() == (YOUNG_THRESHOLD, 10, 10)
        assert gc.get_threshold() == (700, 10, 10)
        gc.set_threshold(YOUNG_THRESHOLD * 2, 10, 10)  # a caller that already collects less keeps its pace
        with collecting_less():
            assert gc.get_threshold()[0] == YOUNG_THRESHOLD * 2
    finally:
        gc.set_threshold(*before)


def test_collecting_less_restores_the_thresholds_when_the_pass_fails():
    before = gc.get_threshold()
    with pytest.raises(RuntimeError), collecting_less():
        raise RuntimeError("a pass that stops")
    assert gc.get_threshold() == before


def test_old_objects_frozen_only_inside_and_a_callers_freeze_is_kept():
    gc.unfreeze()
    with old_objects_frozen():
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0
    gc.freeze()
    try:
        with old_objects_frozen():
            pass
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_the_sandbox_server_serves_with_old_objects_frozen_and_young_passes_rarer(monkeypatch):
    """The fake keeps every message and holds each request for its latency: at the default pace its
    full passes took two fifths of its CPU with 2,000 senders (benchmarks/README.md)."""
    gc.unfreeze()
    default = gc.get_threshold()
    seen: list[tuple[int, int]] = []

    def run(server: uvicorn.Server) -> None:
        seen.append((gc.get_freeze_count(), gc.get_threshold()[0]))

    monkeypatch.setattr(uvicorn.Server, "run", run)
    run_sandbox_server(FakeNylas(api_key="k"), host="127.0.0.1", port=0)
    assert len(seen) == 1
    frozen, threshold = seen[0]
    assert frozen > 0
    assert threshold == YOUNG_THRESHOLD
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == default
