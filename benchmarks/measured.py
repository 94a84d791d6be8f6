"""Run the `campaign` command in this process and, as it exits, report its own getrusage as one JSON line.

    python -m benchmarks.measured --report FILE [--patch NAME]… [--profile OUT] -- run MANIFEST --yes

The command runs exactly as `python -m campaign …` would (same argv, same exit code);
only the report is added: user and system CPU seconds and peak RSS (RUSAGE_SELF)
appended to FILE, so the command's own output stays untouched. `--patch` applies one
of the transport experiments of `benchmarks.patches` before campaign is imported
(the code under test is never edited for a benchmark). `--profile OUT` samples the
command with pyinstrument (when installed) and writes OUT.txt, OUT.html and OUT.pyisession.
"""

from __future__ import annotations

import argparse
import json
import resource
import runpy
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.patches import PATCHES, apply_patches

__all__ = ["main", "read_rusage"]


def read_rusage() -> dict[str, float]:
    """This process's CPU seconds (user + system) and peak RSS in MiB (Linux reports KiB)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "user_s": round(usage.ru_utime, 3),
        "sys_s": round(usage.ru_stime, 3),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
    }


def _start_profiler() -> Any:
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.001, async_mode="disabled")
    profiler.start()
    return profiler


def _write_profile(profiler: Any, out: Path) -> None:
    profiler.stop()
    out.with_suffix(".txt").write_text(profiler.output_text(unicode=True, show_all=False), encoding="utf-8")
    out.with_suffix(".html").write_text(profiler.output_html(), encoding="utf-8")
    profiler.last_session.save(out.with_suffix(".pyisession"))  # `pyinstrument --load` re-renders it


def main(argv: list[str] | None = None) -> int:
    """Run `campaign ARGS…` in-process; write the rusage line to --report whatever its exit."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--patch", action="append", default=[], choices=sorted(PATCHES))
    parser.add_argument("--profile", type=Path, help="write a pyinstrument profile to PROFILE.txt/.html")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    options = parser.parse_args(argv)
    args = options.args[1:] if options.args[:1] == ["--"] else options.args
    started = time.monotonic()
    apply_patches(options.patch)
    sys.argv = ["campaign", *args]
    code: int | str | None = 0
    profiler = _start_profiler() if options.profile else None
    try:
        runpy.run_module("campaign", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code
    finally:
        if profiler is not None:
            _write_profile(profiler, options.profile)
        report = read_rusage() | {"in_process_s": round(time.monotonic() - started, 3)}
        with options.report.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(report) + "\n")
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    sys.stderr.write(f"{code}\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
