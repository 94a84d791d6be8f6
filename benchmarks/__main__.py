"""`python -m benchmarks`: generate the data, run every case in its own process, print the table.

    python -m benchmarks                      # every case at the issue's sizes, 3 runs each
    python -m benchmarks --quick              # tiny sizes, 1 run (what the test suite runs)
    python -m benchmarks --case send --case latency --runs 5
    python -m benchmarks --case send --patch httpcore --profile /tmp/send-profile
    python -m benchmarks --quick --skip-mailmerge

Data goes into a temporary folder (or --data DIR, kept and reused). The table is
Markdown: case, figure (of the median run), target, pass/fail, and the medians of wall
seconds, CPU seconds and peak RSS in MB of the process that did the work.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

from benchmarks.cases import CASES, case_named, prepare_data
from benchmarks.harness import CaseResult, format_table, judge_against_send, run_case
from benchmarks.patches import PATCHES


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 1 run: checks that it all works")
    parser.add_argument("--runs", type=int, help="runs per case (default 3; 1 with --quick)")
    parser.add_argument("--case", action="append", default=[], help="run only this case (repeatable)")
    parser.add_argument("--skip-mailmerge", action="store_true", help="leave out the mailmerge comparison")
    parser.add_argument(
        "--patch", action="append", default=[], choices=sorted(PATCHES), help="a transport experiment"
    )
    parser.add_argument("--profile", type=Path, help="pyinstrument profile of each CLI case's first run")
    parser.add_argument("--data", type=Path, help="keep the generated data here (reused when present)")
    parser.add_argument("--json", type=Path, help="also write every run's figures to this file")
    return parser.parse_args(argv)


def _describe_machine() -> str:
    import os

    return f"{os.cpu_count()} cores, Python {platform.python_version()}, {platform.platform(terse=True)}"


def main(argv: list[str] | None = None) -> int:
    """Run the chosen cases and print the table; exit 1 if a case could not run."""
    args = _parse(argv)
    runs = args.runs or (1 if args.quick else 3)
    try:
        cases = [case_named(name) for name in args.case] or list(CASES)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"machine: {_describe_machine()}; {runs} run(s) per case{' (quick sizes)' if args.quick else ''}")
    results: list[CaseResult] = []
    with tempfile.TemporaryDirectory(prefix="campaign-bench-") as scratch:
        root = args.data or Path(scratch)
        root = root / ("quick" if args.quick else "full")
        for case in cases:
            if case.needs_mailmerge and args.skip_mailmerge:
                results.append(CaseResult(case, skipped="--skip-mailmerge"))
                continue
            print(f"[{case.name}] {case.title}", flush=True)
            folder = prepare_data(case, root, quick=args.quick)
            profile = (
                None if args.profile is None else args.profile.with_name(f"{args.profile.name}-{case.name}")
            )
            result = run_case(case, folder, runs=runs, quick=args.quick, patches=args.patch, profile=profile)
            for run in result.runs:
                print(
                    f"  {run['figure']}  (wall {run['wall_s']:.2f} s, load {run['load_avg_1m']})", flush=True
                )
            if result.error:
                print(f"  ERROR: {result.error}", flush=True)
            results.append(result)
    judge_against_send(results)
    print()
    print(format_table(results))
    if args.json is not None:
        document = {
            "machine": _describe_machine(),
            "patches": args.patch,
            "cases": {r.case.name: {"runs": r.runs, "skipped": r.skipped, "error": r.error} for r in results},
        }
        args.json.write_text(json.dumps(document, indent=2), encoding="utf-8")
    return 1 if any(result.error for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
