"""The checked-row pipeline and the run's continuity checks: what is sent, to whom, and whether it changed.

`check_rows` opens the one checked-row pipeline (scan, opt-outs, sender, render, checks) that
`run_preflight`, the preview and `send-test` all consume, a batch at a time. The content
fingerprint (`load_content_fingerprint`, `check_content`) notices edits after sending began; the
plan stamp (`load_plan_stamp`, `LedgerJobs`) lets an unchanged resume skip the full check.
`build_unsubscribe_warnings` lists the compliance warnings a preview shows. Sends nothing.
"""

from __future__ import annotations

from campaign.pipeline._compliance import build_unsubscribe_warnings
from campaign.pipeline._content import ContentCheck, check_content, load_content_fingerprint, record_content
from campaign.pipeline._parallel import Rendered, checked_rows
from campaign.pipeline._preflight import (
    Preflight,
    find_skipped_invalid,
    may_move_to,
    raise_for_problems,
    render_job,
    run_preflight,
)
from campaign.pipeline._resume import (
    LedgerJobs,
    ListExtent,
    find_appended,
    load_list_extent,
    load_plan_stamp,
    load_recipients,
    load_rules_stamp,
    record_rows_given_away,
)
from campaign.pipeline._rows import (
    Reuse,
    RowCheck,
    RowPipeline,
    check_job,
    check_rows,
    describe_mailed_elsewhere,
    load_row_cells,
)
from campaign.pipeline._stores import find_store_notes, record_read_stores

__all__ = [
    "ContentCheck",
    "LedgerJobs",
    "ListExtent",
    "Preflight",
    "Rendered",
    "Reuse",
    "RowCheck",
    "RowPipeline",
    "build_unsubscribe_warnings",
    "check_content",
    "check_job",
    "check_rows",
    "checked_rows",
    "describe_mailed_elsewhere",
    "find_appended",
    "find_skipped_invalid",
    "find_store_notes",
    "load_content_fingerprint",
    "load_list_extent",
    "load_plan_stamp",
    "load_recipients",
    "load_row_cells",
    "load_rules_stamp",
    "may_move_to",
    "raise_for_problems",
    "record_content",
    "record_read_stores",
    "record_rows_given_away",
    "render_job",
    "run_preflight",
]
