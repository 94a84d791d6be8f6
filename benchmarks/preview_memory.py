"""Peak memory of `campaign preview` over a generated list (default: 1,000,000 rows).

Writes a campaign (a CSV of N rows with a duplicate every 1,000 rows, the built-in
newsletter template, one-click unsubscribe, two senders) into a folder, runs
`python -m campaign preview MANIFEST --sandbox --json` in a child process, and prints
the child's peak resident set size (getrusage RUSAGE_CHILDREN, Linux) and the wall time.
The preview streams the list, so the figure should stay roughly flat as N grows.

    python benchmarks/preview_memory.py                 # 1,000,000 rows
    python benchmarks/preview_memory.py --rows 100000 --dir /tmp/bench-preview
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MANIFEST = """\
[campaign]
name = "preview-memory"

[recipients]
source = "recipients.csv"
name_column = "name"

[message]
subject = "Spring news for {{ first_name }}"
html = "spring.html.j2"                # extends the built-in newsletter.html.j2

[unsubscribe]
url = "https://example.com/unsubscribe?t={{ unsubscribe_token }}"
mailto = "unsubscribe@example.com"

[[senders]]
name = "alice"
grant_id = "grant-alice"
email = "alice@example.com"
from_name = "Alice Park"
provider = "google-workspace"

[[senders]]
name = "bob"
grant_id = "grant-bob"
email = "bob@example.com"
provider = "microsoft"
"""
TEMPLATE = """\
{% extends "newsletter.html.j2" %}
{% block headline %}Spring at Example{% endblock %}
{% block stories %}<ul><li>Faster exports</li><li>Shared folders</li></ul>{% endblock %}
"""
CITIES = ("Lisbon", "Leeds", "Taipei", "Cork", "Oslo", "Berlin", "Quito", "Accra")


def write_campaign(folder: Path, rows: int) -> Path:
    """The manifest and an N-row CSV (every 1,000th row repeats an earlier address)."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "recipients.csv").open("w", encoding="utf-8", newline="") as handle:
        handle.write("email,name,first_name,city\n")
        for number in range(1, rows + 1):
            who = number - 1 if number % 1000 == 0 else number
            handle.write(f"user{who:07d}@example.com,User {who},U{who},{CITIES[who % len(CITIES)]}\n")
    (folder / "spring.html.j2").write_text(TEMPLATE, encoding="utf-8")
    manifest = folder / "campaign.toml"
    manifest.write_text(MANIFEST, encoding="utf-8")
    return manifest


def measure(manifest: Path) -> tuple[dict[str, object], float, float]:
    """Run the preview in a child; its JSON summary, peak RSS in MiB, and wall seconds."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "campaign", "preview", str(manifest), "--sandbox", "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.monotonic() - started
    if result.returncode != 0:
        sys.stderr.write(result.stderr)
        raise SystemExit(f"campaign preview exited {result.returncode}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    return json.loads(result.stdout), peak_kib / 1024, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows in the generated list")
    parser.add_argument(
        "--dir", type=Path, help="write the campaign here (kept) instead of a temporary folder"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.dir or Path(scratch)
        summary, peak_mib, wall = measure(write_campaign(folder, args.rows))
        print(f"rows: {args.rows}")
        print(f"to send: {summary['to_send']}, skipped: {summary['skipped']}")
        print(f"peak RSS: {peak_mib:.1f} MiB")
        print(f"wall: {wall:.1f} s ({args.rows / wall:,.0f} rows/s)")


if __name__ == "__main__":
    main()
