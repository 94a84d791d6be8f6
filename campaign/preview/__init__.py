"""The dry run: every recipient checked and rendered, as a report, a static site, or JSON.

`run_preview` streams the list through the same checks as a run and keeps a bounded sample of
rendered messages and the exact requests they would make; `write_site` writes the browsable
site (owner-only files; list data escaped) and `build_preview_json` the `--json` form. Never
sends and never writes the ledger.
"""

from __future__ import annotations

from campaign.preview._json import build_preview_json
from campaign.preview._report import PreviewReport, run_preview
from campaign.preview._site import write_site

__all__ = ["PreviewReport", "build_preview_json", "run_preview", "write_site"]
