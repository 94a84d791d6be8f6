"""What every recipient is sent, as a fingerprint, so that an edit in the middle of a campaign is noticed.

The fingerprint hashes the [message] and [unsubscribe] settings (subject, headers,
reply-to, tracking, …) with the text of the body templates and of every template
they extend, include or import. The ledger keeps the fingerprint of the first run;
a run whose content differs after sending began is refused unless the user allows
it, and the change is then recorded in the ledger's journal. A follow-up renamed after it began
sending (its content under a name new to the ledger) is refused outright: its rows' keys hold its name.
Sends nothing.

Paths count relative to the campaign's folder (`portable_path`): the same files in another
folder (moved, renamed, or a second machine's copy of a shared campaign) are the same content.
Ledgers begun before kept a fingerprint that named each body template by its absolute path, and
those begun before follow-ups one without [message]'s `deliver_at` (the key did not exist);
`check_content` takes one of those, when it is this very content in this folder
(`load_legacy_content_fingerprints`), as unchanged, and the run then records today's form: an
upgrade of campaign in the middle of a campaign is no change of its content.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from campaign.errors import UsageError
from campaign.ledger import Ledger
from campaign.manifest import Manifest
from campaign.models import FIRST_STEP, RowState
from campaign.pipeline._portable import portable_path, portable_settings
from campaign.render import BUILTIN_TEMPLATES, read_template_file, walk_template_tree

__all__ = ["ContentCheck", "check_content", "load_content_fingerprint", "record_content"]

# Rows in these states mean sending began: the content can no longer change silently.
_STARTED = (RowState.INFLIGHT, RowState.SENT, RowState.FAILED, RowState.UNKNOWN)


@dataclass(frozen=True, slots=True)
class ContentCheck:
    """How this run's content compares with the ledger's: step 1's, and each follow-up's."""

    fingerprint: str
    # The ledger's (one recorded in the legacy form for this very content counts as `fingerprint`);
    # None: the ledger has no fingerprint yet.
    stored: str | None
    sends_began: bool
    # Follow-ups: step -> (this run's fingerprint, the ledger's as `stored`, whether the step began sending).
    steps: Mapping[str, tuple[str, str | None, bool]] = field(default_factory=dict)

    @property
    def combined(self) -> str:
        """Every step's fingerprint in one (step 1's alone without follow-ups): what the plan stamp covers."""
        return ":".join((self.fingerprint, *(now for now, _, _ in self.steps.values())))

    @property
    def changed_steps(self) -> tuple[str, ...]:
        """The steps whose content changed after they began sending ("message" for step 1)."""
        changed = [FIRST_STEP] if self.changed else []
        changed += [
            step for step, (now, stored, began) in self.steps.items() if stored not in (None, now) and began
        ]
        return tuple(changed)

    @property
    def changed(self) -> bool:
        """Step 1's content differs from the one recorded when sending began."""
        return self.stored is not None and self.stored != self.fingerprint and self.sends_began


def load_content_fingerprint(manifest: Manifest, step: str = FIRST_STEP) -> str:
    """SHA-256 over the message settings of `step` (default: [message]) and the text of every template
    they use, paths counted from the campaign's folder (`portable_path`): wherever the folder is, the
    same files give the same fingerprint."""
    base_dir = manifest.base_dir
    settings = {
        "message": portable_settings(manifest.step_message(step).model_dump(), base_dir),
        "unsubscribe": (
            None
            if manifest.unsubscribe is None
            else portable_settings(manifest.unsubscribe.model_dump(), base_dir)
        ),
    }
    text = json.dumps(settings, sort_keys=True, default=str)
    return _fingerprint(manifest, step, text, lambda path: portable_path(path, base_dir))


def load_legacy_content_fingerprint(manifest: Manifest, step: str = FIRST_STEP) -> str:
    """The fingerprint as campaign computed it before paths counted from the campaign's folder: each body
    template named by its absolute path (so another folder gave another fingerprint), the settings with
    the folder's path taken out of their text. Only for telling a ledger that recorded it that its
    content is unchanged (`check_content`); never recorded."""
    return _legacy_fingerprint(manifest, step, manifest.step_message(step).model_dump(mode="json"))


def load_legacy_content_fingerprints(manifest: Manifest, step: str = FIRST_STEP) -> tuple[str, ...]:
    """Every form an earlier campaign recorded this very content in: `load_legacy_content_fingerprint`,
    and, for step 1 without `deliver_at`, that form without the key, as campaign computed it before
    follow-ups added it to [message] (a dump of the settings holds every key, so a key added changed
    every fingerprint, and a campaign begun before was refused as edited by the first run after the
    upgrade). Only for `check_content`; never recorded."""
    message = manifest.step_message(step).model_dump(mode="json")
    forms = [_legacy_fingerprint(manifest, step, message)]
    if step == FIRST_STEP and message.get("deliver_at") is None:
        forms.append(
            _legacy_fingerprint(manifest, step, {k: v for k, v in message.items() if k != "deliver_at"})
        )
    return tuple(forms)


def _legacy_fingerprint(manifest: Manifest, step: str, message: Mapping[str, Any]) -> str:
    settings = {
        "message": message,
        "unsubscribe": None if manifest.unsubscribe is None else manifest.unsubscribe.model_dump(mode="json"),
    }
    text = json.dumps(settings, sort_keys=True, default=str).replace(
        json.dumps(f"{manifest.base_dir}/")[1:-1], ""
    )
    return _fingerprint(manifest, step, text, str)


def _fingerprint(manifest: Manifest, step: str, settings: str, root_name: Callable[[Path], str]) -> str:
    """SHA-256 over `settings` (the settings' text) and each template of `step`'s bodies, a body's own
    file named by `root_name` (the templates it names, by the names it gives them)."""
    digest = hashlib.sha256(settings.encode())
    message = manifest.step_message(step)
    where = "message" if step == FIRST_STEP else f"followups.{step}"
    bodies = (
        (f"{where}.html", message.html),
        (f"{where}.text", message.text),
        (f"{where}.markdown", message.markdown),
        ("message.layout", message.layout),
    )
    for key, path in bodies:
        if path is not None:
            # Renamed after the walk, which finds the body by its absolute path (as the renderer does).
            walked = _template_tree(key, path, manifest.base_dir)
            for name, text in sorted(
                (root_name(path) if name == str(path) else name, text) for name, text in walked
            ):
                digest.update(f"\0{name}\0{text}".encode())
    return digest.hexdigest()


def check_content(
    ledger: Ledger | None, fingerprint: str, *, allow_changed: bool, manifest: Manifest
) -> ContentCheck:
    """Compare with the ledger's fingerprint; UsageError if it changed after sending began, unless allowed."""
    steps = {step: load_content_fingerprint(manifest, step) for step in manifest.steps[1:]}
    if ledger is None:
        return ContentCheck(
            fingerprint, None, False, {step: (now, None, False) for step, now in steps.items()}
        )
    # Counted per step only with follow-ups: without, every row is step 1's (and the count by state alone
    # reads an index, not a million rows).
    started = (
        {step: _started(ledger.counts(step=step)) for step in manifest.steps}
        if manifest.followups
        else {FIRST_STEP: _started(ledger.counts())}
    )
    check = ContentCheck(
        fingerprint,
        _recorded(ledger, manifest, FIRST_STEP, fingerprint),
        started[FIRST_STEP] > 0,
        {
            step: (now, _recorded(ledger, manifest, step, now), started[step] > 0)
            for step, now in steps.items()
        },
    )
    _refuse_renamed_steps(ledger, manifest, steps)
    if check.changed_steps and not allow_changed:
        step = check.changed_steps[0]
        what = "the subject, a template or a header" if step == FIRST_STEP else f"follow-up {step!r}"
        # [unsubscribe] is step 1's content too: a changed store is refused as a changed template is.
        also = " (step 1's content counts [unsubscribe] too, its store included)" * (step == FIRST_STEP)
        recipients = "recipient" if started[step] == 1 else "recipients"
        message = (
            f"{manifest.path.name}: {what} changed since sending began "
            f"({started[step]} {recipients} already sent or attempted with the old content); pass "
            "--allow-changed-content to send the rest with the new content (the change is recorded), "
            f"or restore the old content{also}"
        )
        raise UsageError(message)
    return check


def _refuse_renamed_steps(ledger: Ledger, manifest: Manifest, steps: Mapping[str, str]) -> None:
    """UsageError if a follow-up new to the ledger has the content of a step the manifest no longer names
    that began sending: that step renamed. A row's key holds its step's name, so under the new name every
    recipient who got the step would be sent it again; no flag allows it."""
    gone = {
        fingerprint: step
        for step, fingerprint in ledger.followup_fingerprints().items()
        if step not in manifest.steps
    }
    for step, now in steps.items():
        old = gone.get(now)
        if old is None or ledger.content_fingerprint(step) is not None:
            continue
        began = _started(ledger.counts(step=old))
        if began:
            recipients = "1 recipient was" if began == 1 else f"{began} recipients were"
            raise UsageError(
                f"{manifest.path.name}: follow-up {step!r} is follow-up {old!r} renamed (the same content), "
                f"which {recipients} already sent or attempted; a step's name is part of each "
                f"of its rows' keys, so the new name would send it to them again: name it {old!r} again"
            )


def _recorded(ledger: Ledger, manifest: Manifest, step: str, now: str) -> str | None:
    """The ledger's fingerprint of `step`, or `now` when it recorded this very content in a legacy form
    (a ledger begun before paths counted from the campaign's folder, or before follow-ups:
    `load_legacy_content_fingerprints`). That one counts as unchanged, and `record_content` then keeps
    `now`, which other folders agree on."""
    stored = ledger.content_fingerprint(step)
    if stored is not None and stored != now and stored in load_legacy_content_fingerprints(manifest, step):
        return now
    return stored


def _started(counts: Mapping[RowState, int]) -> int:
    return sum(counts[state] for state in _STARTED)


def record_content(ledger: Ledger, check: ContentCheck) -> None:
    """Store this run's fingerprints; journal a change when the content changed after sending began."""
    ledger.record_content_fingerprint(check.fingerprint, changed_from=check.stored if check.changed else None)
    for step, (now, stored, began) in check.steps.items():
        changed_from = stored if began and stored not in (None, now) else None
        ledger.record_content_fingerprint(now, changed_from=changed_from, step=step)


def _template_tree(key: str, path: Path, base_dir: Path) -> list[tuple[str, str]]:
    """(name, text) of a template and every template it references, found as the renderer finds them."""
    root = str(path)

    def load_root(name: str) -> tuple[str, str, Any] | None:
        return (read_template_file(key, path), root, lambda: True) if name == root else None

    loader = jinja2.ChoiceLoader(
        [jinja2.FunctionLoader(load_root), jinja2.FileSystemLoader([base_dir, BUILTIN_TEMPLATES])]
    )
    env = jinja2.Environment(loader=loader, autoescape=False)  # parsing only: nothing is rendered
    return list(walk_template_tree(env, root, base_dir))
