"""Turning a recipient into a `Message`: templates, Markdown, CSS inlining, text, attachments, headers.

`build_composer` prepares a campaign's templates once; `Composer.render` is pure per row and
escapes every list value for HTML and Markdown (list data never becomes markup). Attachments
are found and sized here (`check_message_attachments`) and read once per run. `_checks` are
the per-message warnings a preview shows. Nothing here sends or writes the ledger.
"""

from __future__ import annotations

from campaign.render._attachments import (
    AttachmentLoader,
    check_message_attachments,
    describe_shared_files,
    load_message_attachments,
)
from campaign.render._checks import MESSAGE_CHECKS
from campaign.render._compose import BUILTIN_TEMPLATES, Composer, build_composer
from campaign.render._markup import build_text_from_html
from campaign.render._templating import read_template_file, walk_template_tree

__all__ = [
    "BUILTIN_TEMPLATES",
    "MESSAGE_CHECKS",
    "AttachmentLoader",
    "Composer",
    "build_composer",
    "build_text_from_html",
    "check_message_attachments",
    "describe_shared_files",
    "load_message_attachments",
    "read_template_file",
    "walk_template_tree",
]
