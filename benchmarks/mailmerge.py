"""Side by side with mailmerge (from PyPI, in the benchmark's own virtualenv), as peers.md §4 measured it.

The same 10,000-row list (email, name, number) and the same message (subject
"Hello {{name}}", a three-line text body): mailmerge's `--dry-run` against our
`campaign preview --json`, and mailmerge's SMTP send to a local aiosmtpd sink (a
counting handler) against our `campaign run` to the fake API (`campaign sandbox`),
in one run, printed as ratios (their wall time over ours: above 1 means we are faster).
The virtualenv is `benchmarks/.venv-mailmerge` (git-ignored), made on first use.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import procs
from benchmarks.child import Options
from benchmarks.data import API_KEY

__all__ = [
    "VENV",
    "MailmergeLog",
    "build_comparison",
    "ensure_mailmerge",
    "parse_mailmerge_log",
    "run_mailmerge",
]

VENV = Path(__file__).resolve().parent / ".venv-mailmerge"
REQUIREMENTS = ("mailmerge>=2.3,<3", "aiosmtpd>=1.4,<2")
TIMEOUT_S = 900.0
_SENT = re.compile(r"^>>> message (\d+) sent$", re.MULTILINE)
_DRY = ">>> This was a dry run."
_ERROR = re.compile(r"^Error on message (\d+)$", re.MULTILINE)
COUNTING_SINK = '''\
class CountingSink:
    """Accept and discard every message (peers.md §4: the Debugging handler would slow the sink)."""

    def __init__(self):
        self.count = 0

    async def handle_DATA(self, server, session, envelope):
        self.count += 1
        return "250 OK"
'''


@dataclass(frozen=True, slots=True)
class MailmergeLog:
    """What a mailmerge run printed: messages it reports sent, whether it was a dry run, its error."""

    sent: int
    last: int  # the highest message number seen
    dry_run: bool
    error_at: int | None


def parse_mailmerge_log(text: str) -> MailmergeLog:
    """Read mailmerge's `--output-format text` output (">>> message N sent" after each message)."""
    numbers = [int(found) for found in _SENT.findall(text)]
    error = _ERROR.search(text)
    return MailmergeLog(
        sent=len(numbers),
        last=max(numbers, default=0),
        dry_run=_DRY in text,
        error_at=int(error.group(1)) if error else None,
    )


def build_comparison(rows: int, walls: dict[str, float]) -> dict[str, Any]:
    """Rates and ratios from the four wall times (mailmerge_dry, ours_preview, mailmerge_send, ours_send)."""
    rates = {name: rows / wall for name, wall in walls.items()}
    dry_ratio = walls["mailmerge_dry"] / walls["ours_preview"]
    send_ratio = walls["mailmerge_send"] / walls["ours_send"]
    return {
        "rates_per_s": {name: round(rate) for name, rate in rates.items()},
        "dry_ratio": round(dry_ratio, 2),
        "send_ratio": round(send_ratio, 2),
        "figure": f"preview {dry_ratio:.1f}x mailmerge's dry run ({rates['ours_preview']:,.0f} vs "
        f"{rates['mailmerge_dry']:,.0f} rows/s); send {send_ratio:.1f}x ({rates['ours_send']:,.0f} vs "
        f"{rates['mailmerge_send']:,.0f} msg/s)",
    }


def ensure_mailmerge(*, log: Path) -> Path:
    """The virtualenv's `bin` folder, creating the venv and installing mailmerge and aiosmtpd if needed."""
    bin_dir = VENV / "bin"
    if (bin_dir / "mailmerge").exists() and (bin_dir / "aiosmtpd").exists():
        return bin_dir
    with log.open("ab") as out:
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, stdout=out, stderr=out)
        install = [str(bin_dir / "python"), "-m", "pip", "install", "--quiet", *REQUIREMENTS]
        subprocess.run(install, check=True, stdout=out, stderr=out, timeout=600)
    return bin_dir


def _mailmerge(bin_dir: Path, folder: Path, *, dry_run: bool, name: str) -> tuple[float, float, MailmergeLog]:
    command = [str(bin_dir / "mailmerge"), "--template", "template.txt", "--database", "db.csv"]
    command += ["--config", "server.conf", "--dry-run" if dry_run else "--no-dry-run", "--no-limit"]
    command += ["--output-format", "text"]
    out = folder / f"{name}.log"
    code, wall, usage = procs.run_timed(
        command, cwd=folder, out=out, env={"PYTHONPATH": ""}, timeout_s=TIMEOUT_S
    )
    parsed = parse_mailmerge_log(out.read_text(encoding="utf-8", errors="replace"))
    if code != 0 or parsed.error_at is not None:
        raise RuntimeError(f"mailmerge exited {code} (error at message {parsed.error_at}); see {out}")
    return wall, usage.get("cpu_s", 0.0), parsed


def run_mailmerge(options: Options) -> dict[str, Any]:
    """Case mailmerge: four commands on the same list, timed in this one run."""
    folder, rows = options.folder, options.params["rows"]
    bin_dir = ensure_mailmerge(log=folder / "venv.log")
    (folder / "countsink.py").write_text(COUNTING_SINK, encoding="utf-8")
    smtp_port = procs.free_port()
    (folder / "server.conf").write_text(
        f"[smtp_server]\nhost = 127.0.0.1\nport = {smtp_port}\nratelimit = 0\n", encoding="utf-8"
    )
    manifest = str(folder / "campaign.toml")
    walls: dict[str, float] = {}
    cpu: dict[str, float] = {}
    walls["mailmerge_dry"], cpu["mailmerge_dry"], dry = _mailmerge(
        bin_dir, folder, dry_run=True, name="mm-dry"
    )
    preview = procs.run_measured(["preview", manifest, "--json"], folder=folder, name="preview")
    walls["ours_preview"], cpu["ours_preview"] = preview.wall_s, preview.rusage.get("cpu_s", 0.0)
    sink_args = ["-m", "aiosmtpd", "-n", "-l", f"127.0.0.1:{smtp_port}", "-c", "countsink.CountingSink"]
    sink_env = {"PYTHONPATH": str(folder)}
    with procs.serve(
        sink_args, port=smtp_port, log=folder / "sink.log", python=str(bin_dir / "python"), env=sink_env
    ):
        walls["mailmerge_send"], cpu["mailmerge_send"], sent = _mailmerge(
            bin_dir, folder, dry_run=False, name="mm-send"
        )
    for path in folder.glob("campaign.ledger.sqlite*"):
        path.unlink()
    api_port = procs.free_port()
    sandbox = ["-m", "campaign", "sandbox", manifest, "--port", str(api_port)]
    env = {"NYLAS_API_URI": f"http://127.0.0.1:{api_port}", "NYLAS_API_KEY": API_KEY}
    with procs.serve(sandbox, port=api_port, log=folder / "sandbox.log"):
        ours = procs.run_measured(
            ["run", manifest, "--yes"],
            folder=folder,
            name="send",
            env=env,
            patches=options.patches,
            timeout_s=TIMEOUT_S,
        )
    walls["ours_send"], cpu["ours_send"] = ours.wall_s, ours.rusage.get("cpu_s", 0.0)
    if dry.sent != rows or sent.sent != rows:
        raise RuntimeError(f"mailmerge did {dry.sent} dry and {sent.sent} sent of {rows}")
    comparison = build_comparison(rows, walls)
    return {
        "value": comparison["send_ratio"],
        "figure": comparison["figure"],
        "passed": comparison["dry_ratio"] > 1 and comparison["send_ratio"] > 1,
        "details": comparison | {"walls_s": walls, "cpu_s": cpu},
        "rusage": ours.rusage,
        "wall_s": ours.wall_s,
    }
