"""The dry run: what a run would send, to whom, from which mailbox, and how long it would take.

`build_preview` is pure (a report from a preflight); `write_preview` writes
the sampled messages' exact JSON payloads and bodies to a folder. Nothing is
sent and the ledger is not written.
"""

from __future__ import annotations

import html
import json
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from campaign.models import Message, SkipReason
from campaign.payload import build_send_payload
from campaign.plan import daily_capacity, estimate_duration_s
from campaign.preflight import Preflight

__all__ = ["PreviewReport", "Sample", "SenderPlan", "build_preview", "write_preview"]


@dataclass(frozen=True, slots=True)
class SenderPlan:
    """One sender's share of the campaign and its effective limits."""

    name: str
    grant_id: str
    email: str | None
    messages: int
    rate_per_s: float
    per_day: int | None
    concurrency: int
    duration_s: float


@dataclass(frozen=True, slots=True)
class Sample:
    """A rendered message and the exact JSON payload a run would POST for it."""

    message: Message
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class PreviewReport:
    """Everything `campaign preview` shows."""

    campaign: str
    to_send: int
    already_done: int
    skipped: dict[SkipReason, int]
    problems: tuple[str, ...]
    senders: tuple[SenderPlan, ...]
    samples: tuple[Sample, ...]
    warnings: tuple[str, ...]

    @property
    def duration_s(self) -> float:
        """How long the whole campaign takes: the slowest sender decides."""
        return max((sender.duration_s for sender in self.senders), default=0.0)


def build_preview(preflight: Preflight, *, sample: int, done_keys: Collection[str] = ()) -> PreviewReport:
    """Summarise a preflight: counts, per-sender allocation and timing, warnings, and `sample` messages."""
    todo = [job for job in preflight.jobs if job.recipient.key not in done_keys]
    per_sender = Counter(job.sender for job in todo)
    senders = tuple(
        SenderPlan(
            name=sender.name,
            grant_id=sender.route,
            email=sender.email,
            messages=per_sender[sender.name],
            rate_per_s=sender.rate_per_s,
            per_day=sender.per_day,
            concurrency=sender.concurrency,
            duration_s=estimate_duration_s(
                per_sender[sender.name], rate_per_s=sender.rate_per_s, per_day=sender.per_day
            ),
        )
        for sender in preflight.manifest.senders
    )
    samples = []
    for job in todo[: max(0, sample)]:
        message = preflight.render(job)
        samples.append(Sample(message=message, payload=build_send_payload(message)))
    return PreviewReport(
        campaign=preflight.manifest.campaign.name,
        to_send=len(todo),
        already_done=len(preflight.jobs) - len(todo),
        skipped=dict(Counter(skip.reason for skip in preflight.skips)),
        problems=preflight.problems,
        senders=senders,
        samples=tuple(samples),
        warnings=_warnings(preflight, per_sender),
    )


def write_preview(report: PreviewReport, directory: Path) -> list[Path]:
    """Write each sample's JSON payload and HTML body, plus an index page; return the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    rows = []
    for number, sample in enumerate(report.samples, start=1):
        stem = f"{number:04d}-{sample.message.to[0].email}"
        payload_path = directory / f"{stem}.json"
        payload_path.write_text(
            json.dumps(sample.payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        written.append(payload_path)
        if sample.message.html is not None:
            body_path = directory / f"{stem}.html"
            body_path.write_text(sample.message.html, encoding="utf-8")
            written.append(body_path)
        cells = (sample.message.to[0].email, sample.message.sender, sample.message.subject)
        link = f'<a href="{html.escape(payload_path.name)}">payload</a>'
        rows.append(
            "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in cells) + f"<td>{link}</td></tr>"
        )
    index = directory / "index.html"
    index.write_text(
        "<!doctype html><meta charset='utf-8'>"
        f"<title>Preview: {html.escape(report.campaign)}</title>"
        f"<h1>{html.escape(report.campaign)}: {report.to_send} to send</h1>"
        "<table><tr><th>To</th><th>Sender</th><th>Subject</th><th></th></tr>" + "".join(rows) + "</table>\n",
        encoding="utf-8",
    )
    written.append(index)
    return written


def _warnings(preflight: Preflight, per_sender: Counter[str]) -> tuple[str, ...]:
    manifest = preflight.manifest
    found: list[str] = []
    if manifest.unsubscribe is None:
        found.append(
            "no [unsubscribe] section: messages carry no List-Unsubscribe header "
            "(Gmail and Yahoo require one-click unsubscribe from bulk senders)"
        )
    for sender in manifest.senders:
        if per_sender[sender.name] > daily_capacity(sender):
            found.append(
                f"sender {sender.name!r} has {per_sender[sender.name]} messages but can send "
                f"{int(daily_capacity(sender))} a day: the run stops at that quota; resume it later"
            )
    return tuple(found)
