"""The cases of issue 8's table: what each measures, its target, its sizes, and how to judge one run.

A `Case` is data: its name (for `--case`), the figure it reports, the target, its
parameters at full size (the issue's) and for `--quick` (tiny, for the test suite),
and the data set it needs (built once per harness run by `prepare_data`). Running a
case is `benchmarks.child`'s job; this module never starts a process.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import data, preview_memory

__all__ = ["CASES", "Case", "case_named", "prepare_data"]

Params = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Case:
    """One row of the table."""

    name: str
    title: str
    target: str
    full: Params
    quick: Params
    data: str  # the data set (see prepare_data); cases with the same data share one folder
    needs_mailmerge: bool = False
    notes: tuple[str, ...] = field(default=())

    def params(self, *, quick: bool) -> Params:
        """The sizes to run at."""
        return self.quick if quick else self.full


CASES: tuple[Case, ...] = (
    Case(
        "render",
        "Preflight + render, 100,000 CSV recipients, 6-variable newsletter",
        ">= 20,000 recipients/s",
        {"rows": 100_000},
        {"rows": 300},
        "newsletter",
    ),
    Case(
        "preview",
        "Preview of 1,000,000 recipients (benchmarks/preview_memory.py)",
        "peak RSS <= 400 MB, completes",
        {"rows": 1_000_000},
        {"rows": 2_000},
        "preview",
    ),
    Case(
        "send",
        "Send 20,000, no limits (10 senders x 200/s), uvicorn fake in another process, durable ledger",
        ">= 1,500 messages/s",
        {"rows": 20_000, "senders": 10, "per_second": 200, "burst": 1, "concurrency": 8},
        {"rows": 300, "senders": 2, "per_second": 200, "burst": 1, "concurrency": 8},
        "send",
    ),
    Case(
        "latency",
        "Send 20,000, 200 ms server latency, 20 senders x 10/s",
        ">= 99% of 200/s",
        {"rows": 20_000, "senders": 20, "per_second": 10, "burst": 1, "concurrency": 4, "latency_ms": 200},
        {"rows": 100, "senders": 20, "per_second": 10, "burst": 1, "concurrency": 4, "latency_ms": 20},
        "latency",
    ),
    Case(
        "many-senders",
        "Send 40,000, 1 s server latency, 2,000 senders x 1/s",
        ">= 99% of 2,000/s",
        {"rows": 40_000, "senders": 2_000, "per_second": 1, "burst": 1, "concurrency": 2, "latency_ms": 1000},
        {"rows": 200, "senders": 100, "per_second": 1, "burst": 1, "concurrency": 2, "latency_ms": 10},
        "many-senders",
    ),
    Case(
        "limiter",
        "Limiter accuracy: 1 sender at 50/s for 20 s, 100 ms latency (benchmarks/limiter_accuracy.py)",
        "within +-1%, no 1 s window > 50 + burst",
        {"rate": 50, "seconds": 20, "latency_ms": 100},
        {"rate": 20, "seconds": 1, "latency_ms": 10},
        "none",
    ),
    Case(
        "resume",
        "Resume: ledger of 1,000,000 rows, 900,000 sent; start to first request at the fake",
        "<= 3 s",
        {"rows": 1_000_000, "sent": 900_000, "senders": 10},
        {"rows": 2_000, "sent": 1_800, "senders": 10},
        "ledger",
    ),
    Case(
        "resume-appended",
        "Resume after 10,000 rows were appended to the resume case's list (only they are checked)",
        "<= 10 s",
        {"rows": 1_000_000, "sent": 900_000, "senders": 10, "appended": 10_000, "limit_s": 10},
        {"rows": 2_000, "sent": 1_800, "senders": 10, "appended": 100, "limit_s": 10},
        "appended-ledger",
    ),
    Case(
        "resume-appended-invalid",
        "The same, the list's every 10,000th row skipped as invalid by the run before (--skip-invalid)",
        "<= 10 s",
        {
            "rows": 1_000_000,
            "sent": 900_000,
            "senders": 10,
            "appended": 10_000,
            "limit_s": 10,
            "invalid_every": 10_000,
        },
        {"rows": 2_000, "sent": 1_800, "senders": 10, "appended": 100, "limit_s": 10, "invalid_every": 100},
        "appended-invalid-ledger",
    ),
    Case(
        "resume-open",
        "Resume: ledger of 1,000,000 rows, none sent yet; start to first request at the fake",
        "<= 3 s",
        {"rows": 1_000_000, "sent": 0, "senders": 10},
        {"rows": 2_000, "sent": 0, "senders": 10},
        "fresh-ledger",
    ),
    Case(
        "fresh-run",
        "First run of 1,000,000 rows, 10 senders x 200/s: start to first request at the fake, peak RSS",
        "<= 40 s, peak RSS <= 300 MB",
        {"rows": 1_000_000, "senders": 10, "first_s": 40, "peak_mb": 300},
        {"rows": 2_000, "senders": 10, "first_s": 40, "peak_mb": 300},
        "fresh",
    ),
    Case(
        "fresh-run-10m",
        "First run of 10,000,000 rows, 10 senders x 200/s: peak RSS (memory flat in list size)",
        "peak RSS <= 400 MB",
        {"rows": 10_000_000, "senders": 10, "first_s": 600, "peak_mb": 400},
        {"rows": 3_000, "senders": 10, "first_s": 600, "peak_mb": 400},
        "fresh-10m",
    ),
    Case(
        "status",
        "`campaign status --json` on the 1,000,000-row ledger",
        "<= 1 s",
        {"rows": 1_000_000, "sent": 900_000, "senders": 10},
        {"rows": 2_000, "sent": 1_800, "senders": 10},
        "ledger",
    ),
    Case(
        "status-fresh",
        "`campaign status --json` on a fresh campaign's 1,000,000-row ledger (nothing sent yet)",
        "<= 0.5 s",
        {"rows": 1_000_000, "sent": 0, "senders": 10, "limit_s": 0.5},
        {"rows": 2_000, "sent": 0, "senders": 10, "limit_s": 0.5},
        "fresh-ledger",
    ),
    Case(
        "send-postgres",
        "The send case with the ledger in PostgreSQL, 1 worker",
        ">= 80% of the send case's msg/s",
        {"rows": 20_000, "senders": 10, "per_second": 200, "burst": 1, "concurrency": 8, "workers": 1},
        {"rows": 300, "senders": 2, "per_second": 200, "burst": 1, "concurrency": 8, "workers": 1},
        "send",
    ),
    Case(
        "send-postgres-3",
        "The send case with the ledger in PostgreSQL, 3 workers on this machine sharing the grants",
        "recorded (2 cores: the workers share them with the fake and the database)",
        {"rows": 20_000, "senders": 10, "per_second": 200, "burst": 1, "concurrency": 8, "workers": 3},
        {"rows": 300, "senders": 2, "per_second": 200, "burst": 1, "concurrency": 8, "workers": 3},
        "send",
    ),
    Case(
        "takeover",
        "2 workers, 4 grants x 10/s; one killed (SIGKILL): until its grants send again under the other",
        "<= lease expiry + 5 s",
        {"rows": 4_000, "senders": 4, "per_second": 10, "concurrency": 2, "lease_s": 30},
        {"rows": 200, "senders": 4, "per_second": 10, "concurrency": 2, "lease_s": 2},
        "takeover",
    ),
    Case(
        "mailmerge",
        "Side by side with mailmerge 2.3 (own venv), 10,000 rows: dry run vs preview, SMTP sink vs fake",
        "ours faster in both (ratio > 1)",
        {"rows": 10_000, "senders": 10},
        {"rows": 100, "senders": 2},
        "mailmerge",
        needs_mailmerge=True,
    ),
)


def case_named(name: str) -> Case:
    """The case called `name` (ValueError naming the known ones otherwise)."""
    for case in CASES:
        if case.name == name:
            return case
    known = ", ".join(case.name for case in CASES)
    raise ValueError(f"no benchmark case {name!r}; known: {known}")


def prepare_data(case: Case, root: Path, *, quick: bool) -> Path:
    """Write the case's data set under `root` (once: a folder already there is reused); its folder."""
    params = case.params(quick=quick)
    folder = root / case.data
    done = folder / ".prepared"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    if case.data in ("newsletter", "send", "latency", "many-senders", "fresh", "fresh-10m", "takeover"):
        data.write_newsletter_campaign(
            folder,
            params["rows"],
            senders=params.get("senders", 1),
            per_second=params.get("per_second", 200),
            burst=params.get("burst", 1),
            concurrency=params.get("concurrency", 8),
        )
    elif case.data in ("ledger", "fresh-ledger", "appended-ledger", "appended-invalid-ledger"):
        invalid = params.get("invalid_every")
        manifest = data.write_newsletter_campaign(
            folder, params["rows"], senders=params["senders"], invalid_every=invalid
        )
        data.build_resume_ledger(
            manifest,
            folder / "pristine.ledger.sqlite",
            rows=params["rows"],
            sent=params["sent"],
            invalid_every=invalid,
        )
        if "appended" in params:  # after the ledger: its plan is of the list before
            first = params["rows"] + 1
            data.write_newsletter_list(folder / "recipients.csv", params["appended"], first=first)
    elif case.data == "mailmerge":
        data.write_mailmerge_campaign(folder, params["rows"], senders=params["senders"])
    elif case.data == "preview":
        preview_memory.write_campaign(folder, params["rows"])
    # "none": the limiter case makes its own (in memory).
    done.touch()
    return folder
