"""Running cases in child processes, several times, and the table of medians.

Each run is `python -m benchmarks.child CASE …` in a fresh process; the harness
times it from spawn to exit and reads its last JSON line. Per case it keeps the run
whose `value` is the median (its figure and pass/fail stand for the case) and the
medians of wall time, CPU time and peak RSS over the runs.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.cases import Case
from benchmarks.procs import REPO

__all__ = ["CaseResult", "format_table", "judge_against_send", "run_case", "run_once"]

CHILD_TIMEOUT_S = 3600.0
HEADER = ("case", "figure", "target", "pass", "wall s", "CPU s", "peak RSS MB")


@dataclass
class CaseResult:
    """A case's runs (their JSON lines), or why it has none (skipped, or the error)."""

    case: Case
    runs: list[dict[str, Any]] = field(default_factory=list)
    skipped: str | None = None
    error: str | None = None

    def median_run(self) -> dict[str, Any] | None:
        """The run whose value is the median (the lower middle one for an even count)."""
        if not self.runs:
            return None
        ordered = sorted(self.runs, key=lambda run: run["value"])
        return ordered[(len(ordered) - 1) // 2]

    def median(self, key: str) -> float | None:
        """The median over runs of wall_s, or of an rusage figure (cpu_s, peak_rss_mb)."""
        values = [run["wall_s"] if key == "wall_s" else run["rusage"].get(key) for run in self.runs]
        present = [value for value in values if value is not None]
        return statistics.median(present) if present else None

    def cells(self) -> tuple[str, ...]:
        """The table row."""
        case = self.case
        if self.skipped is not None:
            return (case.name, f"skipped ({self.skipped})", case.target, "-", "-", "-", "-")
        chosen = self.median_run()
        if chosen is None:
            return (case.name, f"ERROR: {self.error}", case.target, "ERROR", "-", "-", "-")
        runs = len(self.runs)
        figure = chosen["figure"] + (f" (median of {runs})" if runs > 1 else "")
        numbers = (self.median("wall_s"), self.median("cpu_s"), self.median("peak_rss_mb"))
        shown = tuple("-" if value is None else f"{value:,.1f}" for value in numbers)
        return (case.name, figure, case.target, "pass" if chosen["passed"] else "FAIL", *shown)


def run_once(
    case: Case, folder: Path, *, quick: bool, patches: Sequence[str], profile: Path | None
) -> dict[str, Any]:
    """One child run of `case`; its JSON line, with `wall_s` filled in from our own timing if absent."""
    command = [sys.executable, "-m", "benchmarks.child", case.name, "--folder", str(folder)]
    command += ["--quick"] if quick else []
    command += [arg for patch in patches for arg in ("--patch", patch)]
    command += ["--profile", str(profile)] if profile is not None else []
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    started = time.monotonic()
    result = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=CHILD_TIMEOUT_S, check=False, cwd=REPO
    )
    wall = time.monotonic() - started
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        tail = (result.stderr or result.stdout).strip().splitlines()[-12:]
        raise RuntimeError(f"child exited {result.returncode}: " + " | ".join(tail))
    run: dict[str, Any] = json.loads(lines[-1])
    run.setdefault("wall_s", round(wall, 3))
    run["load_avg_1m"] = round(os.getloadavg()[0], 2)
    return run


def run_case(
    case: Case,
    folder: Path,
    *,
    runs: int,
    quick: bool,
    patches: Sequence[str] = (),
    profile: Path | None = None,
) -> CaseResult:
    """Run `case` `runs` times (the profile, if asked for, is taken in the first run only)."""
    result = CaseResult(case)
    for number in range(runs):
        try:
            run = run_once(
                case, folder, quick=quick, patches=patches, profile=profile if number == 0 else None
            )
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            result.error = str(exc)
            break
        result.runs.append(run)
    if result.error is not None:
        result.runs.clear()
    return result


def judge_against_send(results: Sequence[CaseResult]) -> None:
    """send-postgres's target is a share of the send case's rate: judged when both ran (medians), its
    figure given the share; run alone, it only says whether every message went."""
    by_name = {result.case.name: result.median_run() for result in results}
    sqlite, postgres = by_name.get("send"), by_name.get("send-postgres")
    if sqlite is None or postgres is None or not sqlite["value"]:
        return
    share = postgres["value"] / sqlite["value"]
    postgres["figure"] += f" = {share:.0%} of send's {sqlite['value']:,}"
    postgres["passed"] = postgres["passed"] and share >= 0.8


def format_table(results: Sequence[CaseResult]) -> str:
    """A Markdown table: case, figure, target, pass/fail, wall s, CPU s, peak RSS MB."""
    rows = [HEADER, *(result.cells() for result in results)]
    widths = [max(len(row[column]) for row in rows) for column in range(len(HEADER))]
    right = {4, 5, 6}

    def line(row: Sequence[str]) -> str:
        pairs = enumerate(zip(row, widths, strict=True))
        cells = (cell.rjust(w) if n in right else cell.ljust(w) for n, (cell, w) in pairs)
        return "| " + " | ".join(cells) + " |"

    rule = "|" + "|".join(("-" * (w + 1)) + (":" if n in right else "-") for n, w in enumerate(widths)) + "|"
    return "\n".join([line(rows[0]), rule, *(line(row) for row in rows[1:])])
