"""What every recipient is sent, as a fingerprint, so that an edit in the middle of a campaign is noticed.

The fingerprint hashes the [message] and [unsubscribe] settings (subject, headers,
reply-to, tracking, …) with the text of the body templates and of every template
they extend, include or import. The ledger keeps the fingerprint of the first run;
a run whose content differs after sending began is refused unless the user allows
it, and the change is then recorded in the ledger's journal. Sends nothing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from campaign.errors import UsageError
from campaign.ledger import Ledger
from campaign.manifest import Manifest
from campaign.models import RowState
from campaign.render import BUILTIN_TEMPLATES, read_template_file, walk_template_tree

__all__ = ["ContentCheck", "check_content", "load_content_fingerprint", "record_content"]

# Rows in these states mean sending began: the content can no longer change silently.
_STARTED = (RowState.INFLIGHT, RowState.SENT, RowState.FAILED, RowState.UNKNOWN)


@dataclass(frozen=True, slots=True)
class ContentCheck:
    """How this run's content compares with the ledger's."""

    fingerprint: str
    stored: str | None  # None: the ledger has no fingerprint yet
    sends_began: bool

    @property
    def changed(self) -> bool:
        """The content differs from the one recorded when sending began."""
        return self.stored is not None and self.stored != self.fingerprint and self.sends_began


def load_content_fingerprint(manifest: Manifest) -> str:
    """SHA-256 over the message settings and the text of every template they use."""
    settings = {
        "message": manifest.message.model_dump(mode="json"),
        "unsubscribe": None if manifest.unsubscribe is None else manifest.unsubscribe.model_dump(mode="json"),
    }
    # Paths count relative to the campaign's folder, so that moving the folder changes nothing.
    text = json.dumps(settings, sort_keys=True, default=str).replace(
        json.dumps(f"{manifest.base_dir}/")[1:-1], ""
    )
    digest = hashlib.sha256(text.encode())
    message = manifest.message
    bodies = (
        ("message.html", message.html),
        ("message.text", message.text),
        ("message.markdown", message.markdown),
        ("message.layout", message.layout),
    )
    for key, path in bodies:
        if path is not None:
            for name, text in _template_tree(key, path, manifest.base_dir):
                digest.update(f"\0{name}\0{text}".encode())
    return digest.hexdigest()


def check_content(
    ledger: Ledger | None, fingerprint: str, *, allow_changed: bool, manifest: Manifest
) -> ContentCheck:
    """Compare with the ledger's fingerprint; UsageError if it changed after sending began, unless allowed."""
    if ledger is None:
        return ContentCheck(fingerprint, None, sends_began=False)
    counts = ledger.counts()
    check = ContentCheck(fingerprint, ledger.content_fingerprint(), any(counts[state] for state in _STARTED))
    if check.changed and not allow_changed:
        started = sum(counts[state] for state in _STARTED)
        message = (
            f"{manifest.path.name}: the subject, a template or a header changed since sending began "
            f"({started} recipients already sent or attempted with the old content); pass "
            "--allow-changed-content to send the rest with the new content (the change is recorded), "
            "or restore the old content"
        )
        raise UsageError(message)
    return check


def record_content(ledger: Ledger, check: ContentCheck) -> None:
    """Store this run's fingerprint; journal the change when the content changed after sending began."""
    ledger.record_content_fingerprint(check.fingerprint, changed_from=check.stored if check.changed else None)


def _template_tree(key: str, path: Path, base_dir: Path) -> list[tuple[str, str]]:
    """(name, text) of a template and every template it references, found as the renderer finds them."""
    root = str(path)

    def load_root(name: str) -> tuple[str, str, Any] | None:
        return (read_template_file(key, path), root, lambda: True) if name == root else None

    loader = jinja2.ChoiceLoader(
        [jinja2.FunctionLoader(load_root), jinja2.FileSystemLoader([base_dir, BUILTIN_TEMPLATES])]
    )
    env = jinja2.Environment(loader=loader, autoescape=False)  # parsing only: nothing is rendered
    return sorted(walk_template_tree(env, root, base_dir))
