"""One run of one case, in its own process: do the work, print one JSON line with the figures.

    python -m benchmarks.child CASE --folder DATA [--quick] [--patch NAME]… [--profile OUT]

The line holds `value` (the number medians are taken of), `figure` (as the table shows
it), `passed`, `details`, `rusage` (CPU seconds and peak RSS of the process that did
the work: this one for in-process cases, else the `campaign` command's own report)
and `wall_s` when the work ran in a command this process timed (else the harness's
own timing of this process is used). The cases that send live in `benchmarks.sending`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import resource
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.cases import case_named
from benchmarks.measured import read_rusage
from benchmarks.patches import apply_patches

__all__ = ["Options", "main", "run_render"]

SECRET = (b"bench-unsubscribe-secret-0123456789abcdef",)


class Options:
    """What every case runner gets: its data folder, sizes, patches and profile path."""

    def __init__(
        self, folder: Path, params: dict[str, Any], patches: Sequence[str], profile: Path | None
    ) -> None:
        self.folder = folder
        self.params = params
        self.patches = tuple(patches)
        self.profile = profile


def run_render(options: Options) -> dict[str, Any]:
    """Case render: `run_preflight` (load, validate, assign, render every row) in this process."""
    apply_patches(options.patches)
    from campaign.ledger import PlanSpool
    from campaign.manifest import load_manifest
    from campaign.pipeline import run_preflight

    manifest = load_manifest(options.folder / "campaign.toml")
    started = time.perf_counter()
    with PlanSpool() as spool:  # the plan written as a run writes it
        checked = run_preflight(manifest, spool, secrets=SECRET, skip_invalid=False)
    elapsed = time.perf_counter() - started
    rows = options.params["rows"]
    if checked.problems or checked.planned != rows:
        raise RuntimeError(f"preflight found problems: {checked.problems[:3]}, {checked.planned} jobs")
    rate = rows / elapsed
    return {
        "value": round(rate),
        "figure": f"{rate:,.0f} recipients/s",
        "passed": rate >= 20_000,
        "details": {"rows": rows, "preflight_s": round(elapsed, 3)},
        "rusage": read_rusage(),
    }


def run_preview(options: Options) -> dict[str, Any]:
    """Case preview: benchmarks/preview_memory.py's measurement of `campaign preview --json`."""
    from benchmarks import preview_memory

    summary, peak_mib, wall = preview_memory.measure(options.folder / "campaign.toml")
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # the preview was this process's only child
    rows = options.params["rows"]
    expected = rows - rows // 1000  # every 1,000th row repeats an earlier address
    completes = summary["to_send"] == expected
    return {
        "value": round(peak_mib, 1),
        "figure": f"{peak_mib:,.0f} MB peak, {rows / wall:,.0f} rows/s"
        + ("" if completes else " (INCOMPLETE)"),
        "passed": completes and peak_mib <= 400,
        "details": {"rows": rows, "to_send": summary["to_send"], "skipped": summary["skipped"]},
        "rusage": {
            "cpu_s": round(children.ru_utime + children.ru_stime, 3),
            "peak_rss_mb": round(peak_mib, 1),
        },
        "wall_s": round(wall, 3),
    }


def run_limiter(options: Options) -> dict[str, Any]:
    """Case limiter: benchmarks/limiter_accuracy.py, in this process (the fake serves from a thread)."""
    from benchmarks import limiter_accuracy

    params = options.params
    argv = ["--rate", str(params["rate"]), "--seconds", str(params["seconds"])]
    argv += ["--latency-ms", str(params["latency_ms"]), "--json"]
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        limiter_accuracy.main(argv)
    figures = json.loads(captured.getvalue().strip().splitlines()[-1])
    within = abs(figures["error_pct"]) <= 1.0
    bounded = figures["busiest_second"] <= figures["allowed_per_second"]
    return {
        "value": figures["error_pct"],
        "figure": f"{figures['achieved_per_s']}/s ({figures['error_pct']:+.2f}%), busiest 1 s: "
        f"{figures['busiest_second']} (max {figures['allowed_per_second']:g})",
        "passed": within and bounded,
        "details": figures,
        "rusage": read_rusage(),
    }


def _runner(name: str) -> Any:
    from benchmarks import mailmerge, sending, workers

    runners = {
        "render": run_render,
        "preview": run_preview,
        "limiter": run_limiter,
        "send": sending.run_send,
        "latency": sending.run_latency,
        "resume": sending.run_resume,
        "resume-open": sending.run_resume,
        "resume-appended": sending.run_resume,
        "resume-appended-invalid": sending.run_resume,
        "fresh-run": sending.run_fresh,
        "fresh-run-10m": sending.run_fresh,
        "status": sending.run_status,
        "many-senders": sending.run_latency,
        "status-fresh": sending.run_status,
        "send-postgres": workers.run_send_postgres,
        "send-postgres-3": workers.run_send_postgres,
        "takeover": workers.run_takeover,
        "mailmerge": mailmerge.run_mailmerge,
    }
    return runners[name]


def main(argv: list[str] | None = None) -> int:
    """Run the case once and print its JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case")
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--patch", action="append", default=[])
    parser.add_argument("--profile", type=Path)
    args = parser.parse_args(argv)
    case = case_named(args.case)
    params = dict(case.params(quick=args.quick))
    with tempfile.TemporaryDirectory(prefix=f"bench-{case.name}-") as scratch:
        params["scratch"] = scratch
        result = _runner(case.name)(Options(args.folder, params, args.patch, args.profile))
    print(json.dumps({"case": case.name, **result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
