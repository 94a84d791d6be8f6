"""The checked-row pipeline and the run's continuity checks: what is sent, to whom, and whether it changed.

`run_preflight` scans the list, skips opt-outs, assigns senders and renders and checks every
message before the first send (`check_job` is the same check for one row). The content
fingerprint (`load_content_fingerprint`, `check_content`) notices edits after sending began; the
plan stamp (`load_plan_stamp`, `load_open_jobs`) lets an unchanged resume skip the full check.
`build_unsubscribe_warnings` lists the compliance warnings a preview shows. Sends nothing.
"""

from __future__ import annotations

from campaign.pipeline._compliance import build_unsubscribe_warnings
from campaign.pipeline._content import ContentCheck, check_content, load_content_fingerprint, record_content
from campaign.pipeline._optouts import skip_unsubscribed_row
from campaign.pipeline._preflight import Preflight, check_job, raise_for_problems, render_job, run_preflight
from campaign.pipeline._resume import load_open_jobs, load_plan_stamp

__all__ = [
    "ContentCheck",
    "Preflight",
    "build_unsubscribe_warnings",
    "check_content",
    "check_job",
    "load_content_fingerprint",
    "load_open_jobs",
    "load_plan_stamp",
    "raise_for_problems",
    "record_content",
    "render_job",
    "run_preflight",
    "skip_unsubscribed_row",
]
