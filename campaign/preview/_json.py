"""`campaign preview --json`: the preview report as plain JSON values, for CI pipelines. Pure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from campaign.preview._report import PreviewReport

__all__ = ["build_preview_json"]


def build_preview_json(report: PreviewReport, *, site: Path | None) -> dict[str, Any]:
    """The summary `preview --json` prints: counts, senders, schedule, warnings, problems, samples."""
    return {
        "campaign": report.campaign,
        "manifest": str(report.manifest),
        "source": report.source,
        "site": None if site is None else str(site),
        "rows": report.rows,
        "to_send": report.to_send,
        "already_done": sum(report.already_done.values()),
        "already_done_by_state": dict(report.already_done),
        "skipped": {reason.value: count for reason, count in report.skipped.items()},
        "problem_rows": len(report.problems),
        "problems": [
            {
                "row": problem.row,
                "email": problem.email,
                "issues": [{"where": issue.where, "message": issue.message} for issue in problem.issues],
            }
            for problem in report.problems
        ],
        "warnings": list(report.warnings),
        "starts_at": report.started_at.isoformat(),
        "duration_s": report.duration_s,
        "finishes_at": report.finishes_at.isoformat(),
        "senders": [
            {
                "name": plan.name,
                "grant_id": plan.route,
                "email": plan.email,
                "provider": plan.provider,
                "messages": plan.messages,
                "rate_per_s": plan.rate_per_s,
                "burst": plan.burst,
                "per_day": plan.per_day,
                "concurrency": plan.concurrency,
                "used_last_24h": plan.used_24h,
                "next_24h": plan.next_24h,
                "duration_s": plan.duration_s,
            }
            | ({} if plan.window is None else plan.window.as_json())
            for plan in report.senders
        ],
        "samples": [
            {
                "row": sample.message.row,
                "to": sample.message.to[0].email,
                "sender": sample.message.sender,
                "subject": sample.message.subject,
                "url": sample.request.url,
                "payload": sample.payload,
            }
            | (
                {
                    "steps": [
                        {"step": step.step, "subject": step.message.subject, "after": step.after}
                        | {"payload": step.payload}
                        for step in sample.steps
                    ]
                }
                if sample.steps
                else {}
            )
            for sample in report.samples
        ],
    } | ({"steps": [step.name for step in report.steps]} if report.steps else {})
