"""The benchmark scripts run (on tiny sizes, untimed) so that they cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_limiter_accuracy_benchmark_reports_its_figures():
    """limiter_accuracy.py sends for a second at 20/s and reports rate, error and busiest second."""
    script = REPO / "benchmarks" / "limiter_accuracy.py"
    result = subprocess.run(
        [sys.executable, str(script), "--rate", "20", "--seconds", "1", "--latency-ms", "10", "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    figures = json.loads(result.stdout)
    assert figures["sent"] == 20
    assert figures["busiest_second"] <= figures["allowed_per_second"]
    assert figures["achieved_per_s"] > 0
