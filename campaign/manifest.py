"""The campaign manifest: one TOML file naming the list, the templates, the senders and their limits.

`parse_manifest` turns TOML text into frozen pydantic models, resolving every path
against the manifest's folder; every mistake becomes one `ManifestError` line naming
the file and the dotted key. This module checks shapes and values only: it never
opens the files the manifest names (the loaders do) and never reads the environment.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from email_validator import EmailNotValidError, validate_email
from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import ErrorDetails

from campaign.errors import InputFileError, ManifestError
from campaign.headers import header_name_problem, header_value_problem
from campaign.presets import PROVIDER_PRESETS

__all__ = [
    "STORE_SUFFIXES",
    "ApiSettings",
    "AttachmentSettings",
    "CampaignSettings",
    "Manifest",
    "MessageSettings",
    "RecipientsSettings",
    "SenderSettings",
    "TrackingSettings",
    "UnsubscribeSettings",
    "build_manifest_schema",
    "load_manifest",
    "parse_manifest",
]

DEFAULT_PER_SECOND = 2.0
# A suppression source with one of these suffixes is an unsubscribe store (SQLite), not a list file.
STORE_SUFFIXES = (".sqlite", ".sqlite3", ".db")
_NAME_PATTERN = r"^[A-Za-z0-9._-]+$"
_ENV_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
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
_FROZEN = ConfigDict(extra="forbid", frozen=True)


def _check_name(value: str) -> str:
    if not re.fullmatch(_NAME_PATTERN, value):
        raise ValueError(f"{value!r} may only use letters, digits, '.', '_' and '-'")
    return value


def _check_env_name(value: str) -> str:
    # Never echo the value: a user may have pasted the secret itself here.
    if not re.fullmatch(_ENV_PATTERN, value):
        raise ValueError("must be the NAME of an environment variable (e.g. MY_VAR), never the secret itself")
    return value


def _check_address(value: str) -> str:
    try:
        return validate_email(value.strip(), check_deliverability=False).normalized
    except EmailNotValidError as exc:
        raise ValueError(f"{value!r} is not a valid address ({str(exc).rstrip('.')})") from exc


def _check_header_value(value: str) -> str:
    problem = header_value_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def _check_header_name(name: str) -> str:
    problem = header_name_problem(name)
    if problem is not None:
        raise ValueError(problem)
    reason = _RESERVED_HEADERS.get(name.lower())
    if reason is not None:
        raise ValueError(f"campaign sets this header itself; {reason}")
    return name


def _resolve(value: Path, info: ValidationInfo) -> Path:
    """Make a manifest path absolute against the manifest's folder (given as validation context)."""
    base = info.context.get("base_dir") if isinstance(info.context, dict) else None
    value = value.expanduser()
    return value if base is None else Path(os.path.normpath(Path(base) / value))


_Name = Annotated[str, AfterValidator(_check_name)]
_EnvName = Annotated[str, AfterValidator(_check_env_name)]
_Addr = Annotated[str, AfterValidator(_check_address)]
_HeaderName = Annotated[str, AfterValidator(_check_header_name)]
_HeaderValue = Annotated[str, AfterValidator(_check_header_value)]
_File = Annotated[Path, AfterValidator(_resolve)]


class CampaignSettings(BaseModel):
    """[campaign]: what identifies this campaign."""

    model_config = _FROZEN
    name: _Name = Field(
        min_length=1,
        max_length=64,
        description="Identifies the campaign in the ledger, unsubscribe tokens and message metadata; "
        "1–64 letters, digits, '.', '_' or '-'. Changing it starts a new campaign.",
        json_schema_extra={"pattern": _NAME_PATTERN},
    )


class ApiSettings(BaseModel):
    """[api]: how to reach the Nylas API. The key itself is never in the file."""

    model_config = _FROZEN
    uri: str | None = Field(
        default=None,
        description="Nylas API base URL, e.g. https://api.eu.nylas.com; else env NYLAS_API_URI; "
        "else the US region.",
    )
    key_env: _EnvName = Field(
        default="NYLAS_API_KEY", description="NAME of the environment variable holding the API key."
    )
    timeout_s: float = Field(
        default=90, gt=0, le=600, strict=True, description="Seconds to wait for one API request."
    )

    @field_validator("uri")
    @classmethod
    def _check_uri(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"https?://\S+", value):
            raise ValueError(f"{value!r} must be an https:// URL such as https://api.us.nylas.com")
        return None if value is None else value.rstrip("/")


class RecipientsSettings(BaseModel):
    """[recipients]: the list to mail and the lists never to mail."""

    model_config = _FROZEN
    source: _File = Field(description="The recipient list, .csv or .parquet, relative to the manifest.")
    email_column: str = Field(default="email", min_length=1, description="Column holding the address.")
    name_column: str | None = Field(
        default=None, min_length=1, description="Optional column holding the recipient's display name."
    )
    sender_column: str | None = Field(
        default=None,
        min_length=1,
        description="Optional column naming (by senders[].name) the sender that must mail the row; "
        "an empty cell lets any sender mail it.",
    )
    key_column: str | None = Field(
        default=None,
        min_length=1,
        description="Optional column identifying the recipient instead of the address (e.g. a customer id).",
    )
    delimiter: str = Field(
        default=",",
        description='CSV field separator, one character, e.g. ";" or "\\t".',
        json_schema_extra={"minLength": 1, "maxLength": 1},
    )
    suppress: tuple[_File, ...] = Field(
        default=(),
        description="Files of addresses never to mail (.csv/.parquet with an `email` column, "
        "or text with one address per line), or unsubscribe stores (.sqlite).",
    )

    @field_validator("suppress", mode="before")
    @classmethod
    def _one_as_list(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("delimiter")
    @classmethod
    def _check_delimiter(cls, value: str) -> str:
        if len(value) != 1:
            raise ValueError(f'{value!r} must be one character, e.g. ";" or "\\t"')
        if value in {'"', "\n", "\r"}:
            raise ValueError(f'{value!r} cannot separate fields; use e.g. ",", ";" or "\\t"')
        return value


class TrackingSettings(BaseModel):
    """message.tracking: Nylas open/link/reply tracking."""

    model_config = _FROZEN
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

    model_config = _FROZEN
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
        default=None, description="MIME type, e.g. 'application/pdf'; guessed from the file name if absent."
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
    def _check_content_type(cls, value: str | None) -> str | None:
        if value is not None and not _MEDIA_TYPE.fullmatch(value):
            raise ValueError(f"{value!r} is not a MIME type such as 'application/pdf' or 'image/png'")
        return value

    @field_validator("content_id")
    @classmethod
    def _check_content_id(cls, value: str | None) -> str | None:
        if value is not None:
            _check_cid(value)
        return value

    @model_validator(mode="after")
    def _check_inline(self) -> AttachmentSettings:
        if self.inline is False and self.content_id is not None:
            raise ValueError("a content_id makes the file inline; drop `inline = false` or the content_id")
        if self.inline and self.content_id is None:
            if any(marker in self.path for marker in _TEMPLATE_MARKERS):
                raise ValueError("give a content_id for an inline file whose path is a template")
            _check_cid(self.cid or "", derived=True)
        return self

    @property
    def cid(self) -> str | None:
        """The content id: `content_id`, or for an inline file its file name up to the first dot."""
        if self.content_id is not None or not self.inline:
            return self.content_id
        return self.path.rsplit("/", 1)[-1].split(".", 1)[0]


def _check_cid(value: str, *, derived: bool = False) -> None:
    what = f"the file name gives the content id {value!r}, which" if derived else f"{value!r}"
    hint = "; set content_id" if derived else ""
    if not _CONTENT_ID.fullmatch(value):
        raise ValueError(f"{what} must be letters, digits, '.', '_' or '-' (at most 100){hint}")
    if value == "message" or re.fullmatch(r"file\d+", value):
        raise ValueError(
            f"{what} would clash with Nylas's multipart part names ('message', 'file0', …){hint}"
        )


class MessageSettings(BaseModel):
    """[message]: what every recipient gets (Jinja templates)."""

    model_config = _FROZEN
    subject: _HeaderValue = Field(
        min_length=1, description="Subject line; a Jinja template, e.g. 'News for {{ first_name }}'."
    )
    html: _File | None = Field(default=None, description="HTML body template file, relative to the manifest.")
    text: _File | None = Field(
        default=None, description="Plain-text body template file, relative to the manifest."
    )
    reply_to: _Addr | None = Field(default=None, description="Address replies should go to.")
    tracking: TrackingSettings | None = Field(default=None, description="Open/link tracking options.")
    headers: dict[_HeaderName, _HeaderValue] = Field(
        default={},
        description='Extra custom headers, e.g. { "X-Campaign" = "spring" }; values are Jinja '
        "templates. List-Unsubscribe comes from [unsubscribe].",
    )
    markdown: _File | None = Field(
        default=None,
        description="Markdown body template file (Jinja first, then Markdown), placed in `layout`; "
        "instead of `html`. The plain-text version comes from it too, unless `text` is given.",
    )
    layout: _File | None = Field(
        default=None,
        description="The HTML layout a Markdown body goes into, a template with {% block content %}; "
        "default: the built-in base.html.j2.",
    )
    inline_css: bool = Field(
        default=False,
        strict=True,
        description="Move <style> rules into style attributes (css-inline), so the styles survive Gmail.",
    )
    attachments_dir: _File | None = Field(
        default=None,
        description="The folder attachment paths start from (default: the manifest's folder); "
        "no attachment may lie outside it.",
    )
    attachments: tuple[AttachmentSettings, ...] = Field(
        default=(), description="Files sent with each message, one [[message.attachments]] table each."
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

    @model_validator(mode="after")
    def _needs_a_body(self) -> MessageSettings:
        if self.html is None and self.text is None and self.markdown is None:
            raise ValueError("give `html`, `markdown` or `text` (a template file)")
        if self.html is not None and self.markdown is not None:
            raise ValueError("give `html` or `markdown`, not both (a Markdown body becomes the HTML)")
        if self.layout is not None and self.markdown is None:
            raise ValueError("`layout` is the page a `markdown` body goes into; give `markdown` too")
        return self

    @model_validator(mode="after")
    def _unique_content_ids(self) -> MessageSettings:
        first: dict[str, int] = {}
        for index, attachment in enumerate(self.attachments, start=1):
            cid = attachment.cid
            if cid is not None and cid in first:
                raise ValueError(
                    f"attachments[{index}] and attachments[{first[cid]}] both have content id {cid!r}; "
                    "give each inline file its own content_id"
                )
            if cid is not None:
                first[cid] = index
        return self


class UnsubscribeSettings(BaseModel):
    """[unsubscribe]: one-click unsubscribe (RFC 8058) links and headers."""

    model_config = _FROZEN
    url: _HeaderValue = Field(
        description="One-click unsubscribe URL, a Jinja template that must start with https://, "
        "e.g. 'https://example.com/u?t={{ unsubscribe_token }}'."
    )
    mailto: _Addr | None = Field(
        default=None,
        description="Optional unsubscribe mailbox, e.g. unsubscribe@example.com (Outlook.com only acts "
        "on mailto).",
    )
    secret_env: _EnvName = Field(
        default="CAMPAIGN_UNSUBSCRIBE_SECRET",
        description="NAME of the environment variable holding the token secret(s).",
    )
    store: _File | None = Field(
        default=None,
        description="The unsubscribe store (.sqlite) the endpoint writes, e.g. 'unsubscribes.sqlite'; "
        "everyone in it is skipped (reason `unsubscribed`), also while the campaign runs.",
    )
    require_body_link: bool = Field(
        default=True,
        strict=True,
        description="Refuse to send from Microsoft/iCloud senders (which drop List-Unsubscribe headers) "
        "a body without a link to unsubscribe_url.",
    )

    @field_validator("store")
    @classmethod
    def _check_store(cls, value: Path | None) -> Path | None:
        if value is not None and value.suffix.lower() not in STORE_SUFFIXES:
            raise ValueError("must name an SQLite file ending in .sqlite, e.g. 'unsubscribes.sqlite'")
        return value

    @field_validator("url")
    @classmethod
    def _check_https(cls, value: str) -> str:
        if not value.startswith("https://"):
            raise ValueError(
                "must be an https:// URL (mail providers require https for one-click unsubscribe)"
            )
        return value

    @field_validator("mailto", mode="before")
    @classmethod
    def _drop_scheme(cls, value: object) -> object:
        if isinstance(value, str) and value[:7].lower() == "mailto:":
            return value[7:]
        return value


class SenderSettings(BaseModel):
    """[[senders]]: one sending mailbox (a Nylas grant) and its limits."""

    model_config = _FROZEN
    name: _Name = Field(description="Short unique name for this sender (letters, digits, '.', '_', '-').")
    grant_id: str | None = Field(
        default=None, min_length=1, description="The Nylas grant id of the mailbox (or give `domain`)."
    )
    domain: str | None = Field(
        default=None,
        min_length=3,
        description="A domain verified in Nylas, to send application mail through "
        "POST /v3/domains/{domain}/messages/send instead of a mailbox (needs `email`, the From address).",
    )
    email: _Addr | None = Field(
        default=None,
        validation_alias=AliasChoices("email", "from"),
        description="The mailbox address (shown in output; used as From); `from` is accepted too.",
    )
    from_name: _HeaderValue | None = Field(default=None, description="Display name for the From header.")
    provider: Literal["gmail", "google-workspace", "microsoft", "yahoo", "icloud", "imap"] | None = Field(
        default=None, description="Mailbox provider, for sensible default limits."
    )
    per_second: float | None = Field(
        default=None,
        gt=0,
        strict=True,
        description=f"Sustained sends per second (default {DEFAULT_PER_SECOND:g} when per_minute is unset).",
    )
    per_minute: float | None = Field(
        default=None, gt=0, strict=True, description="Sustained sends per minute (instead of per_second)."
    )
    burst: int = Field(default=1, ge=1, strict=True, description="Sends allowed back to back above the rate.")
    per_day: int | None = Field(
        default=None, ge=1, strict=True, description="Recipients this mailbox may mail in any rolling 24 h."
    )
    per_day_messages: int | None = Field(
        default=None, ge=1, strict=True, description="Messages this mailbox may send in any rolling 24 h."
    )
    concurrency: int = Field(default=2, ge=1, le=64, strict=True, description="Sends in flight at once.")

    @field_validator("grant_id", "domain")
    @classmethod
    def _check_grant(cls, value: str | None) -> str | None:
        if value is not None and re.search(r"[\s/?#]", value):
            raise ValueError("must be a Nylas grant id or domain name (no spaces, '/', '?' or '#')")
        return value

    @model_validator(mode="before")
    @classmethod
    def _fill_defaults(cls, data: Any) -> Any:
        # The provider's preset first (explicit keys win), then the generic default pace.
        if not isinstance(data, dict):
            return data
        preset: Mapping[str, Any] = PROVIDER_PRESETS.get(str(data.get("provider")), {})
        explicit_pace = "per_second" in data or "per_minute" in data
        filled = {key: value for key, value in preset.items() if key not in data}
        if explicit_pace:
            filled.pop("per_second", None)
            filled.pop("per_minute", None)
        data = {**data, **filled}
        if "per_second" not in data and "per_minute" not in data:
            data["per_second"] = DEFAULT_PER_SECOND
        return data

    @model_validator(mode="after")
    def _one_rate(self) -> SenderSettings:
        if self.per_second is not None and self.per_minute is not None:
            raise ValueError("give per_second or per_minute, not both")
        if (self.grant_id is None) == (self.domain is None):
            raise ValueError("give grant_id (a mailbox) or domain (a verified domain), exactly one")
        if self.domain is not None and self.email is None:
            raise ValueError("a domain sender needs `from` (or `email`): the address it sends from")
        return self

    @property
    def route(self) -> str:
        """Where its sends go: the grant id, or `domain:<domain>` for a domain sender."""
        return self.grant_id if self.grant_id is not None else f"domain:{self.domain}"

    @property
    def rate_per_s(self) -> float:
        """The sustained send rate in messages per second."""
        if self.per_second is not None:
            return self.per_second
        return self.per_minute / 60 if self.per_minute is not None else DEFAULT_PER_SECOND


class Manifest(BaseModel):
    """A campaign manifest: the list, the message, the unsubscribe settings and the senders."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="campaign manifest")
    path: SkipJsonSchema[Path] = Field(description="Absolute path of the manifest file.")
    campaign: CampaignSettings = Field(description="What identifies this campaign.")
    api: ApiSettings = Field(default=ApiSettings(), description="How to reach the Nylas API.")
    recipients: RecipientsSettings = Field(description="The recipient list and suppression lists.")
    message: MessageSettings = Field(description="Subject, body templates, tracking and custom headers.")
    unsubscribe: UnsubscribeSettings | None = Field(
        default=None, description="One-click unsubscribe link and headers (recommended for bulk mail)."
    )
    senders: tuple[SenderSettings, ...] = Field(
        min_length=1, description="The sending mailboxes, one [[senders]] table each."
    )

    @model_validator(mode="after")
    def _unique_senders(self) -> Manifest:
        first: dict[str, int] = {}
        for index, sender in enumerate(self.senders, start=1):  # counted as users count tables
            if sender.name in first:
                raise ValueError(
                    f"senders[{index}].name: {sender.name!r} is already the name of "
                    f"senders[{first[sender.name]}]; sender names must be unique"
                )
            first[sender.name] = index
        return self

    @property
    def base_dir(self) -> Path:
        """The folder holding the manifest; relative paths start here."""
        return self.path.parent

    @property
    def ledger_path(self) -> Path:
        """Where this campaign's ledger lives: beside the manifest."""
        return self.base_dir / f"{self.path.stem}.ledger.sqlite"

    def sender(self, name: str) -> SenderSettings:
        """The sender called `name`; ManifestError if the manifest has none by that name."""
        for sender in self.senders:
            if sender.name == name:
                return sender
        known = ", ".join(s.name for s in self.senders)
        raise ManifestError(f"{self.path.name}: no sender named {name!r} (senders: {known})")


_TABLES: dict[tuple[str, ...], type[BaseModel]] = {
    (): Manifest,
    ("campaign",): CampaignSettings,
    ("api",): ApiSettings,
    ("recipients",): RecipientsSettings,
    ("message",): MessageSettings,
    ("message", "tracking"): TrackingSettings,
    ("message", "attachments"): AttachmentSettings,
    ("unsubscribe",): UnsubscribeSettings,
    ("senders",): SenderSettings,
}


def _keys(table: tuple[str, ...]) -> list[str]:
    return [k for k in _TABLES[table].model_fields if table or k != "path"]  # Manifest.path is not a key


def _format_loc(loc: tuple[str | int, ...]) -> str:
    """('senders', 1, 'per_second') -> senders[2].per_second: the 2nd [[senders]] table, counted from 1
    as users count tables (like row numbers); header names are quoted."""
    out = ""
    parents: list[str] = []
    for part in loc:
        if part == "[key]":
            continue
        if isinstance(part, int):
            out += f"[{part + 1}]"
            continue
        if parents[-2:] == ["message", "headers"] or not _BARE_KEY.fullmatch(part):
            part = f'"{part}"'
        out += f".{part}" if out else part
        parents.append(part)
    return out


_TYPE_WORDS = {
    "a valid integer": "an integer",
    "a valid number": "a number",
    "a valid boolean": "true or false",
    "a valid string": "a string",
    "a valid tuple": "an array",
    "a valid path": "a path string",
    " after validation": "",
}


def _toml_type(value: object) -> str:
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", dict: "a table"}
    return names.get(type(value), "an array" if isinstance(value, list) else type(value).__name__)


def _describe_error(error: ErrorDetails) -> str:
    """One pydantic error as `dotted.key: what is wrong`."""
    loc = tuple(error["loc"])
    table = tuple(p for p in loc[:-1] if isinstance(p, str))
    key = loc[-1] if loc else ""
    kind, message = error["type"], error["msg"]
    if kind == "extra_forbidden" and table in _TABLES and isinstance(key, str):
        close = difflib.get_close_matches(key, _keys(table), n=1)
        if close:
            return f"{_format_loc(loc)}: unknown key (did you mean {close[0]!r}?)"
        elsewhere = [".".join(t) for t in _TABLES if key in _keys(t) and t]
        if elsewhere:
            return f"{_format_loc(loc)}: unknown key here (it belongs in [{elsewhere[0]}])"
        return f"{_format_loc(loc)}: unknown key (expected one of: {', '.join(_keys(table))})"
    if kind == "missing":
        full = tuple(p for p in loc if isinstance(p, str))
        if full == ("senders",):
            return "senders: missing; add at least one [[senders]] table with name and grant_id"
        if full in _TABLES:
            return f"{_format_loc(loc)}: required table [{'.'.join(full)}] is missing"
        return f"{_format_loc(loc)}: required key is missing"
    if kind == "too_short" and loc == ("senders",):
        return "senders: add at least one [[senders]] table with name and grant_id"
    if kind == "string_too_short" and error.get("ctx", {}).get("min_length") == 1:
        message = "must not be empty"
    elif kind == "value_error":
        message = message.removeprefix("Value error, ")
    elif kind in {"model_type", "dict_type"}:
        message = "must be a table"
    else:
        message = re.sub(r"^Input should be ", "must be ", message)
        message = re.sub(r"^(String|Tuple) should have", "must have", message)
        for pydantic_word, toml_word in _TYPE_WORDS.items():
            message = message.replace(pydantic_word, toml_word)
    if kind.endswith("_type"):
        message += f" (got {_toml_type(error['input'])})"
    elif kind != "value_error" and type(error["input"]) in {int, float}:
        message += f" (got {error['input']})"
    place = _format_loc(loc)
    return f"{place}: {message}" if place else message


def _describe_validation(exc: ValidationError, name: str) -> str:
    errors = exc.errors()
    # A list whose only item failed is also "too short": that echo is not a problem of its own.
    inner = {e["loc"][:n] for e in errors for n in range(len(e["loc"]))}
    errors = [e for e in errors if not (e["type"] == "too_short" and e["loc"] in inner)]
    # A typo makes a key unknown *and* leaves the real key missing: report the typo first.
    errors.sort(key=lambda e: e["type"] != "extra_forbidden")
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return f"{name}: {_describe_error(errors[0])}{more}"


def parse_manifest(text: str, *, path: Path) -> Manifest:
    """Parse and validate manifest TOML; `path` is where it lives (relative paths start at its folder)."""
    path = Path(os.path.abspath(path))
    try:
        data = tomllib.loads(text.removeprefix("\ufeff"))
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"^(.*) \(at line (\d+), column \d+\)$", str(exc))
        if found is None:
            reason = re.sub(r" \(at end of document\)$", "", str(exc))
            raise ManifestError(f"{path.name}: invalid TOML ({reason})") from exc
        raise ManifestError(f"{path.name}: line {found[2]}: invalid TOML ({found[1]})") from exc
    if "path" in data:
        raise ManifestError(f"{path.name}: path: unknown key (expected one of: {', '.join(_keys(()))})")
    try:
        return Manifest.model_validate({**data, "path": path}, context={"base_dir": path.parent})
    except ValidationError as exc:
        raise ManifestError(_describe_validation(exc, path.name)) from exc


def load_manifest(path: Path) -> Manifest:
    """Read and validate the manifest file at `path`."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise InputFileError(f"{path}: manifest not found; check the path") from exc
    except IsADirectoryError as exc:
        raise InputFileError(f"{path}: is a folder; give the manifest file (e.g. campaign.toml)") from exc
    except OSError as exc:
        raise InputFileError(f"{path}: cannot read the manifest ({exc.strerror or exc})") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ManifestError(f"{path.name}: line {line}: not UTF-8 text; save the file as UTF-8") from exc
    return parse_manifest(text, path=path)


def build_manifest_schema() -> dict[str, object]:
    """The JSON Schema of the manifest's TOML shape, for editors and `campaign schema`."""
    schema: dict[str, object] = {"$schema": "https://json-schema.org/draft/2020-12/schema"}
    schema.update(Manifest.model_json_schema())
    schema["description"] = "A campaign manifest (TOML) for the `campaign` bulk email tool."
    return schema
