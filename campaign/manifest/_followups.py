"""The manifest's [[followups]] tables: the steps after [message], each sent in the same thread.

A follow-up goes through the grant that sent step 1, as a reply to the previous step, `after` a
delay counted from when the previous step was sent to that recipient. It has its own body and
(optionally) subject; everything else (recipients, headers, unsubscribe, tracking) is [message]'s.
Like the other tables it checks shapes and values only; `campaign.sendtime` parses the times.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator

from campaign.manifest._settings import FROZEN, HeaderValue, ManifestPath, TimeOfDay, check_one_body, quoted
from campaign.models import FIRST_STEP
from campaign.sendtime import Delay, parse_delay

__all__ = ["FIRST_STEP", "FollowupSettings"]

_STEP_NAME = r"^[A-Za-z0-9_-]{1,40}$"


class FollowupSettings(BaseModel):
    """[[followups]]: one step after [message], sent as a reply in the same thread."""

    model_config = FROZEN
    name: str = Field(
        description="Identifies the step in the ledger, status and reports (letters, digits, '_', '-').",
        json_schema_extra={"pattern": _STEP_NAME},
    )
    after: str = Field(
        description="How long after the previous step was sent to the recipient: '90s', '2h', '3d' or "
        "'3 business days' (weekends and campaign.holidays skipped, in the sender's time zone)."
    )
    subject: HeaderValue | None = Field(
        default=None,
        description="Subject template; default 'Re: ' + [message]'s subject (threading needs it).",
    )
    html: ManifestPath | None = Field(default=None, description="HTML body template file.")
    text: ManifestPath | None = Field(default=None, description="Plain-text body template file.")
    markdown: ManifestPath | None = Field(
        default=None, description="Markdown body template file, placed in message.layout."
    )
    stop_on: tuple[Literal["reply", "bounce", "unsubscribe"], ...] = Field(
        default=("reply", "bounce", "unsubscribe"),
        description="What stops the sequence for a recipient before this step. An unsubscribe always "
        "stops it, listed or not.",
    )
    auto_replies: Literal["ignore", "stop"] = Field(
        default="ignore",
        description="'ignore': an out-of-office or other auto-reply does not stop the sequence; "
        "'stop': it does.",
    )
    deliver_at: TimeOfDay | None = Field(
        default=None,
        description="Local time of day to deliver at, e.g. '09:30': in the recipient's zone "
        "(recipients.timezone_column), else the sender's; always inside the sender's window.",
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str, info: ValidationInfo) -> str:
        if not re.fullmatch(_STEP_NAME, value):
            raise ValueError(f"{quoted(value, info)} may only use letters, digits, '_' and '-' (at most 40)")
        if value == FIRST_STEP:
            raise ValueError(f"{FIRST_STEP!r} names step 1 ([message]); give the follow-up another name")
        return value

    @field_validator("after")
    @classmethod
    def _check_after(cls, value: str) -> str:
        parse_delay(value)
        return value

    @model_validator(mode="after")
    def _one_body(self) -> FollowupSettings:
        check_one_body(self.html, self.text, self.markdown)
        return self

    @property
    def delay(self) -> Delay:
        """`after` as a Delay."""
        return parse_delay(self.after)
