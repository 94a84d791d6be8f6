"""The manifest's [message] table: what every recipient gets.

Frozen pydantic models of the subject and body templates, custom headers (refusing those
campaign sets itself), tracking, and attachments with their content ids. Part of the
manifest (`campaign.manifest._load` joins the tables); like the other tables it checks shapes
and values only and never opens the files it names.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, Field, ValidationInfo, field_validator, model_validator

from campaign.headers import header_name_problem
from campaign.manifest._settings import (
    FROZEN,
    EmailAddress,
    HeaderValue,
    ManifestPath,
    TimeOfDay,
    check_one_body,
    quoted,
)

__all__ = ["AttachmentSettings", "MessageSettings", "TrackingSettings"]

# Headers campaign (or Nylas) sets from other keys; a custom copy would clash or be dropped.
_RESERVED_HEADERS = {
    **dict.fromkeys(("list-unsubscribe", "list-unsubscribe-post"), "they come from the [unsubscribe] table"),
    **dict.fromkeys(("to", "cc", "bcc"), "recipients come from the list"),
    **dict.fromkeys(("date", "message-id", "mime-version", "content-type"), "the mail provider sets it"),
    "content-transfer-encoding": "the mail provider sets it",
    "from": "set it with senders[].email and from_name",
    "reply-to": "use message.reply_to",
    "subject": "use message.subject",
}


def _check_header_name(name: str) -> str:
    problem = header_name_problem(name)
    if problem is not None:
        raise ValueError(problem)
    reason = _RESERVED_HEADERS.get(name.lower())
    if reason is not None:
        raise ValueError(f"campaign sets this header itself; {reason}")
    return name


_HeaderName = Annotated[str, AfterValidator(_check_header_name)]


class TrackingSettings(BaseModel):
    """message.tracking: Nylas open/link/reply tracking."""

    model_config = FROZEN
    opens: bool = Field(default=False, strict=True, description="Track opens (adds a tracking pixel).")
    links: bool = Field(default=False, strict=True, description="Track link clicks (rewrites links).")
    thread_replies: bool = Field(default=False, strict=True, description="Track replies in the thread.")
    label: str | None = Field(default=None, description="Label Nylas attaches to tracking events.")


# --- attachments (issue 7) ---

_TEMPLATE_MARKERS = ("{{", "{%", "{#")
_CONTENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_MEDIA_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*")


class AttachmentSettings(BaseModel):
    """[[message.attachments]]: a file sent with every message, or a per-recipient file."""

    model_config = FROZEN
    path: str = Field(
        min_length=1,
        description="The file, relative to message.attachments_dir (default: the manifest's folder); "
        "a Jinja template for per-recipient files, e.g. 'invoices/{{ invoice_id }}.pdf'.",
    )
    filename: str | None = Field(
        default=None,
        min_length=1,
        description="The name the recipient sees (a Jinja template); default: the file's own name.",
    )
    content_type: str | None = Field(
        default=None,
        description="MIME type, e.g. 'application/pdf'; if absent, guessed from the file's path (its "
        "extension), else from filename.",
    )
    inline: bool | None = Field(
        default=None,
        strict=True,
        description='Show the file inside the HTML body, where it says <img src="cid:CONTENT_ID">.',
    )
    content_id: str | None = Field(
        default=None,
        description="The id the HTML refers to as cid:<id> (letters, digits, '.', '_', '-'); makes the file "
        "inline. Default for an inline file: its name without the extension.",
    )

    @field_validator("content_type")
    @classmethod
    def _check_content_type(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and not _MEDIA_TYPE.fullmatch(value):
            raise ValueError(
                f"{quoted(value, info)} is not a MIME type such as 'application/pdf' or 'image/png'"
            )
        return value

    @field_validator("content_id")
    @classmethod
    def _check_content_id(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            _check_cid(value, info)
        return value

    @model_validator(mode="after")
    def _check_inline(self, info: ValidationInfo) -> AttachmentSettings:
        if self.inline is False and self.content_id is not None:
            raise ValueError("a content_id makes the file inline; drop `inline = false` or the content_id")
        if self.inline and self.content_id is None:
            if self.per_recipient:
                raise ValueError("give a content_id for an inline file whose path is a template")
            _check_cid(self.cid or "", info, derived=True)
        return self

    @property
    def per_recipient(self) -> bool:
        """Whether the path is a template: each recipient's own file, not one file for everyone."""
        return any(marker in self.path for marker in _TEMPLATE_MARKERS)

    @property
    def cid(self) -> str | None:
        """The content id: `content_id`, or for an inline file its file name up to the first dot."""
        if self.content_id is not None or not self.inline:
            return self.content_id
        return self.path.rsplit("/", 1)[-1].split(".", 1)[0]


def _check_cid(value: str, info: ValidationInfo, *, derived: bool = False) -> None:
    shown = quoted(value, info)
    what = f"the file name gives the content id {shown}, which" if derived else shown
    hint = "; set content_id" if derived else ""
    if not _CONTENT_ID.fullmatch(value):
        raise ValueError(f"{what} must be letters, digits, '.', '_' or '-' (at most 100){hint}")
    if value == "message" or re.fullmatch(r"file\d+", value):
        raise ValueError(
            f"{what} would clash with Nylas's multipart part names ('message', 'file0', …){hint}"
        )


class MessageSettings(BaseModel):
    """[message]: what every recipient gets (Jinja templates)."""

    model_config = FROZEN
    subject: HeaderValue = Field(
        min_length=1, description="Subject line; a Jinja template, e.g. 'News for {{ first_name }}'."
    )
    html: ManifestPath | None = Field(
        default=None, description="HTML body template file, relative to the manifest."
    )
    text: ManifestPath | None = Field(
        default=None, description="Plain-text body template file, relative to the manifest."
    )
    reply_to: EmailAddress | None = Field(default=None, description="Address replies should go to.")
    tracking: TrackingSettings | None = Field(default=None, description="Open/link tracking options.")
    headers: dict[_HeaderName, HeaderValue] = Field(
        default={},
        description='Extra custom headers, e.g. { "X-Campaign" = "spring" }; values are Jinja '
        "templates. List-Unsubscribe comes from [unsubscribe].",
    )
    markdown: ManifestPath | None = Field(
        default=None,
        description="Markdown body template file (Jinja first, then Markdown), placed in `layout`; "
        "instead of `html`. The plain-text version comes from it too, unless `text` is given.",
    )
    layout: ManifestPath | None = Field(
        default=None,
        description="The HTML layout a Markdown body goes into, a template with {% block content %}; "
        "default: the built-in base.html.j2.",
    )
    inline_css: bool = Field(
        default=False,
        strict=True,
        description="Move <style> rules into style attributes (css-inline), so the styles survive Gmail.",
    )
    attachments_dir: ManifestPath | None = Field(
        default=None,
        description="The folder attachment paths start from (default: the manifest's folder); "
        "no attachment may lie outside it.",
    )
    attachments: tuple[AttachmentSettings, ...] = Field(
        default=(), description="Files sent with each message, one [[message.attachments]] table each."
    )
    deliver_at: TimeOfDay | None = Field(
        default=None,
        description="Local time of day to deliver step 1 at, e.g. '09:30': in the recipient's zone "
        "(recipients.timezone_column), else the sender's; always inside the sender's window.",
    )

    @field_validator("headers")
    @classmethod
    def _unique_headers(cls, value: dict[str, str]) -> dict[str, str]:
        seen: dict[str, str] = {}
        for name in value:
            if name.lower() in seen:
                raise ValueError(f'"{seen[name.lower()]}" and "{name}" are the same header; keep one')
            seen[name.lower()] = name
        return value

    @property
    def own_files(self) -> bool:
        """Whether a message attaches a file of its recipient's own (a path template)."""
        return any(attachment.per_recipient for attachment in self.attachments)

    @model_validator(mode="after")
    def _needs_a_body(self) -> MessageSettings:
        check_one_body(self.html, self.text, self.markdown)
        if self.layout is not None and self.markdown is None:
            raise ValueError("`layout` is the page a `markdown` body goes into; give `markdown` too")
        return self

    @model_validator(mode="after")
    def _unique_content_ids(self, info: ValidationInfo) -> MessageSettings:
        first: dict[str, int] = {}
        for index, attachment in enumerate(self.attachments, start=1):
            cid = attachment.cid
            if cid is not None and cid in first:
                raise ValueError(
                    f"attachments[{index}] and attachments[{first[cid]}] both have content id "
                    f"{quoted(cid, info)}; "
                    "give each inline file its own content_id"
                )
            if cid is not None:
                first[cid] = index
        return self
