"""The manifest's tables about the run: [campaign], [api], [recipients], [unsubscribe], [[senders]].

Frozen pydantic models of those tables, and the validated field types every table uses
(an address, a header value, a path resolved against the manifest's folder, or in its place the
URL of an unsubscribe store in PostgreSQL).
`campaign.manifest._load` joins them with the [message] table (`campaign.manifest._message`)
and turns validation errors into one line. These models check shapes and values only:
they never open the files they name and never read the environment. An error repeats a value
through `quoted`, which hides one that looks like a secret (the secret values to look for are
handed in as validation context).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, urlsplit

from email_validator import EmailNotValidError, validate_email
from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from campaign.headers import header_value_problem
from campaign.manifest._presets import PROVIDER_PRESETS
from campaign.redaction import looks_like_secret, quote_value
from campaign.sendtime import SendWindow, load_zone, parse_deliver_at, parse_window

__all__ = [
    "DEFAULT_PER_SECOND",
    "FROZEN",
    "HEADERLESS_PROVIDERS",
    "STORE_SUFFIXES",
    "TOKEN_IN_URL_RULE",
    "ApiSettings",
    "CampaignSettings",
    "EmailAddress",
    "HeaderValue",
    "LedgerSettings",
    "ManifestPath",
    "PathOrStoreUrl",
    "RecipientsSettings",
    "SenderSettings",
    "TimeOfDay",
    "UnsubscribeSettings",
    "check_env_name",
    "check_ledger_url",
    "check_one_body",
    "check_store_url",
    "is_env_name",
    "is_store_url",
    "known_secrets",
    "normalize_sendable_address",
    "quoted",
]

DEFAULT_PER_SECOND = 2.0
# A suppression source with one of these suffixes is an unsubscribe store (SQLite), not a list file.
STORE_SUFFIXES = (".sqlite", ".sqlite3", ".db")
_NAME_PATTERN = r"^[A-Za-z0-9._-]+$"
# Capitals, digits and '_', as environment variable names are written: a pasted key or secret
# (`nyk_v0_…`, base64, lower-case hex) never looks like one. One in capitals and digits may (upper-case
# hex, a base32 TOTP seed, a random token): it is a name only if it does not also look like a secret
# (`looks_like_secret`), since a name is echoed ("the environment variable … is not set").
_ENV_PATTERN = r"^[A-Z_][A-Z0-9_]{0,63}$"
# A URL parameter whose name holds one of these holds a secret (libpq's sslpassword, oauth_client_secret).
_SECRET_PARAMETER_WORDS = ("password", "secret", "token")
# A value that starts like `postgresql://` is a URL, never a file name (a path holds no "scheme://").
_URL_START = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# TCP keepalives on every connection to a database such a URL names (the ledger's, the store's): a
# server that vanished (a host down, a network cut) is noticed after 30 s of silence and 3 probes 10 s
# apart, about a minute, not the two hours of the kernel's defaults during which a call waits. Keepalives
# are not sent while a write waits for its acknowledgement (a query sent into a cut network): there, the
# kernel retransmits for about 15 minutes, unless TCP_USER_TIMEOUT (libpq's tcp_user_timeout, in ms)
# ends it after the same minute.
_KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 60_000,
}
# Bounds that keep every duration and budget finite: one send a day at the slowest, 1,000/s at the
# fastest (Nylas allows far less), so no plan or wait overflows and none is effectively forever.
_MIN_PER_SECOND = 1 / 86_400
_MAX_PER_SECOND = 1_000.0
_MAX_COUNT = 10_000_000
# listmonk pauses a campaign after `max_send_errors`, YAMM on a bounce spike (peers.md §5, point 4): the
# addresses were checked before the first send, so refusals in a row are the mailbox or the message.
DEFAULT_STOP_AFTER_REJECTIONS = 20
# Every table: an unknown key is an error (a typo must not be ignored), and values never change.
FROZEN = ConfigDict(extra="forbid", frozen=True)


def known_secrets(info: ValidationInfo | None) -> tuple[str, ...]:
    """The secret values the manifest's loader handed in (validation context `secrets`), to look for."""
    context = None if info is None else info.context
    return tuple(context.get("secrets", ())) if isinstance(context, dict) else ()


def quoted(value: object, info: ValidationInfo | None) -> str:
    """`value` as an error message repeats it: its repr, or words saying it looks like a secret."""
    return quote_value(value, known_secrets(info))


def _check_name(value: str, info: ValidationInfo) -> str:
    if not re.fullmatch(_NAME_PATTERN, value):
        raise ValueError(f"{quoted(value, info)} may only use letters, digits, '.', '_' and '-'")
    return value


def is_env_name(value: str) -> bool:
    """Whether `value` is written as an environment variable's name (capitals, digits and '_'), and not
    as a secret is (a long random-looking run of capitals and digits)."""
    return re.fullmatch(_ENV_PATTERN, value) is not None and not looks_like_secret(value)


def check_env_name(value: str) -> str:
    """`value` if it looks like an environment variable name; ValueError (not repeating it) if not."""
    # Never echo the value: a user may have pasted the secret itself here.
    if not is_env_name(value):
        raise ValueError(
            "the value does not look like an environment variable name (capitals, digits and '_', "
            "e.g. MY_VAR); put the NAME of the variable here, never the secret itself"
        )
    return value


def normalize_sendable_address(value: str) -> str:
    """`value` as the Nylas API takes a participant: email_validator's normalised local part, '@', and
    the domain in ASCII (IDNA; plain ASCII addresses come out exactly as `normalized` gives them).

    Nylas refuses any address holding a non-ASCII character (402): an internationalised domain is sent
    in its `xn--` form, and a non-ASCII local part, which cannot be sent at all, is a ValueError. Raises
    email_validator's EmailNotValidError for what is not an address.
    """
    found = validate_email(value.strip(), check_deliverability=False)
    if not found.local_part.isascii():
        raise ValueError(
            f"the part before @ holds non-ASCII characters ({found.local_part}), which the Nylas API refuses"
        )
    return f"{found.local_part}@{found.ascii_domain}"


def _check_address(value: str, info: ValidationInfo) -> str:
    try:
        return normalize_sendable_address(value)
    except (EmailNotValidError, ValueError) as exc:
        raise ValueError(f"{quoted(value, info)} is not a valid address ({str(exc).rstrip('.')})") from exc


def _check_header_value(value: str) -> str:
    problem = header_value_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def _resolve(value: Path, info: ValidationInfo) -> Path:
    """Make a manifest path absolute against the manifest's folder (given as validation context)."""
    base = info.context.get("base_dir") if isinstance(info.context, dict) else None
    value = value.expanduser()
    return value if base is None else Path(os.path.normpath(Path(base) / value))


_Name = Annotated[str, AfterValidator(_check_name)]
_EnvName = Annotated[str, AfterValidator(check_env_name)]
# Field types the tables share (campaign.manifest._message uses them too).
EmailAddress = Annotated[str, AfterValidator(_check_address)]
HeaderValue = Annotated[str, AfterValidator(_check_header_value)]
ManifestPath = Annotated[Path, AfterValidator(_resolve)]


def _path_or_store_url(value: object, info: ValidationInfo) -> Path | str:
    """A `postgresql://` URL as given (checked: no password), else a manifest path (resolved)."""
    if isinstance(value, str) and is_store_url(value):
        return check_store_url(value, known=known_secrets(info))
    if isinstance(value, str | Path):
        return _resolve(Path(value), info)
    raise PydanticCustomError("path_or_url_type", "must be a path string or a postgresql:// URL")


# A file (resolved like ManifestPath) or a PostgreSQL database holding an unsubscribe store (a str).
PathOrStoreUrl = Annotated[Path | str, PlainValidator(_path_or_store_url, json_schema_input_type=str)]


def _check_time_of_day(value: str) -> str:
    parse_deliver_at(value)
    return value


# A local time of day, "09:30" (`deliver_at`).
TimeOfDay = Annotated[str, AfterValidator(_check_time_of_day)]


def check_one_body(html: Path | None, text: Path | None, markdown: Path | None) -> None:
    """ValueError unless a message has a body template, and not both HTML and Markdown."""
    if html is None and text is None and markdown is None:
        raise ValueError("give `html`, `markdown` or `text` (a template file)")
    if html is not None and markdown is not None:
        raise ValueError("give `html` or `markdown`, not both (a Markdown body becomes the HTML)")


class CampaignSettings(BaseModel):
    """[campaign]: what identifies this campaign."""

    model_config = FROZEN
    name: _Name = Field(
        min_length=1,
        max_length=64,
        description="Identifies the campaign in the ledger, unsubscribe tokens and message metadata; "
        "1–64 letters, digits, '.', '_' or '-'. Changing it starts a new campaign.",
        json_schema_extra={"pattern": _NAME_PATTERN},
    )
    holidays: tuple[date, ...] = Field(
        default=(),
        description='Days follow-ups never count as business days nor send on, e.g. ["2026-12-25"].',
    )


class ApiSettings(BaseModel):
    """[api]: how to reach the Nylas API. The key itself is never in the file."""

    model_config = FROZEN
    uri: str | None = Field(
        default=None,
        description="Nylas API base URL, e.g. https://api.eu.nylas.com; else env NYLAS_API_URI; "
        "else the US region.",
    )
    key_env: _EnvName = Field(
        default="NYLAS_API_KEY", description="NAME of the environment variable holding the API key."
    )
    timeout_s: float = Field(
        default=90,
        ge=1,
        le=600,
        strict=True,
        allow_inf_nan=False,
        description="Seconds to wait for one API request (1–600).",
    )

    @field_validator("uri")
    @classmethod
    def _check_uri(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and not re.fullmatch(r"https?://\S+", value):
            raise ValueError(
                f"{quoted(value, info)} must be an https:// URL such as https://api.us.nylas.com"
            )
        return None if value is None else value.rstrip("/")


def check_ledger_url(value: str, *, known: Iterable[str] = ()) -> str:
    """A PostgreSQL ledger's URL as given, or ValueError saying what is wrong (never echoing a password).

    The password may not be in it, nor any other secret (a parameter named like a password, secret or
    token; a value that looks like a secret, or is one of the `known` secret values): a manifest is
    shared and committed, a command line is seen by every user of the machine (`ps`), and the URL is
    how messages name the ledger. The password comes from PGPASSWORD or the variable `password_env`
    names.
    """
    return _check_postgres_url(
        value,
        wrong_scheme="must be a PostgreSQL URL such as postgresql://campaign@db.example.com/campaigns",
        password_advice="export it as PGPASSWORD, or name a variable holding it in [ledger] password_env",
        known=known,
    )


def _check_ledger_url(value: str, info: ValidationInfo) -> str:
    return check_ledger_url(value, known=known_secrets(info))


def check_store_url(value: str, *, known: Iterable[str] = ()) -> str:
    """An unsubscribe store's PostgreSQL URL as given, or ValueError saying what is wrong (never echoing
    it: it may hold a password). As a ledger's (`check_ledger_url`), it holds no password nor other
    secret. The password comes from PGPASSWORD (or ~/.pgpass), read by libpq."""
    return _check_postgres_url(
        value,
        wrong_scheme="is a URL but not a PostgreSQL one: give a file's path, or a PostgreSQL URL such as "
        "postgresql://campaign@db.example.com/campaigns",
        password_advice="export it as PGPASSWORD",
        known=known,
    )


def postgres_keepalives(given: Mapping[str, object]) -> dict[str, int]:
    """The libpq keepalive and TCP user timeout parameters campaign connects with (`_KEEPALIVES`), but for
    those the URL's own parameters (`given`, as `conninfo_to_dict` reads them) set."""
    return {name: value for name, value in _KEEPALIVES.items() if name not in given}


def is_store_url(value: str) -> bool:
    """Whether a store (or suppression source) is written as a URL (`scheme://…`) rather than a path."""
    return _URL_START.match(value) is not None


def _check_postgres_url(
    value: str, *, wrong_scheme: str, password_advice: str, known: Iterable[str] = ()
) -> str:
    """`value` if it is a PostgreSQL URL without a password or other secret; ValueError (`wrong_scheme`
    for another scheme, `password_advice` saying where a password goes) never repeating the value."""
    parts = urlsplit(value)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError(wrong_scheme)
    try:
        password = parts.password
        parts.port  # noqa: B018 - parsed for its error: a port that is not a number
    except ValueError:
        raise ValueError(
            "is not a valid URL (a port must be a number); e.g. postgresql://campaign@db.example.com:5432/"
            "campaigns"
        ) from None
    names = [name.strip().lower() for name, _ in parse_qsl(parts.query)]
    if password is not None or "password" in names:
        raise ValueError(
            f"holds a password, which must not be written down here; remove it and {password_advice}"
        )
    secret = next((name for name in names if any(word in name for word in _SECRET_PARAMETER_WORDS)), None)
    if secret is not None:
        # Named only when it reads as a parameter's name (sslpassword), never as a value pasted there.
        named = f"its parameter {secret}" if re.fullmatch(r"[a-z_]{1,40}", secret) else "a parameter"
        raise ValueError(
            f"holds a secret ({named}), which must not be written down here; remove it and keep it in "
            "a PostgreSQL service file (service=NAME in the URL)"
        )
    if looks_like_secret(value, known):
        raise ValueError(
            "holds a value that looks like a secret (an API key, a token), which must not be written "
            "down here; remove it"
        )
    if any(not char.isprintable() or char.isspace() for char in value):
        raise ValueError("holds a space or a control character; write the URL alone")
    return value


class LedgerSettings(BaseModel):
    """[ledger]: where the campaign's progress is kept. Default: a SQLite file beside the manifest."""

    model_config = FROZEN
    url: Annotated[str, AfterValidator(_check_ledger_url)] | None = Field(
        default=None,
        description="A PostgreSQL database to keep the ledger in, shared by several machines running the "
        "campaign, e.g. postgresql://campaign@db.example.com/campaigns (no password here: see "
        "password_env). One database holds many campaigns.",
    )
    password_env: _EnvName | None = Field(
        default=None,
        description="NAME of the environment variable holding the database password; else PostgreSQL's "
        "own PGPASSWORD (or ~/.pgpass) is used.",
    )
    lease_s: float = Field(
        default=30,
        ge=2,
        le=600,
        strict=True,
        allow_inf_nan=False,
        description="Seconds a worker's lease on a grant lasts without renewal (2–600; renewed every tenth "
        "of it). A dead worker's grants go to another worker this long after its last renewal.",
    )


class RecipientsSettings(BaseModel):
    """[recipients]: the list to mail and the lists never to mail."""

    model_config = FROZEN
    source: ManifestPath = Field(
        description="The recipient list, .csv or .parquet, relative to the manifest."
    )
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
    timezone_column: str | None = Field(
        default=None,
        min_length=1,
        description="Optional column holding each recipient's IANA time zone (e.g. Europe/Berlin), for "
        "`deliver_at`; an empty cell means the sender's zone.",
    )
    delimiter: str = Field(
        default=",",
        description='CSV field separator, one character, e.g. ";" or "\\t".',
        json_schema_extra={"minLength": 1, "maxLength": 1},
    )
    suppress: tuple[PathOrStoreUrl, ...] = Field(
        default=(),
        description="Files of addresses never to mail (.csv/.parquet with an `email` column, "
        "or text with one address per line), or unsubscribe stores (.sqlite, or a PostgreSQL URL such "
        "as postgresql://campaign@db.example.com/campaigns, without its password: export PGPASSWORD).",
    )

    @field_validator("suppress", mode="before")
    @classmethod
    def _one_as_list(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("delimiter")
    @classmethod
    def _check_delimiter(cls, value: str, info: ValidationInfo) -> str:
        if len(value) != 1:
            raise ValueError(f'{quoted(value, info)} must be one character, e.g. ";" or "\\t"')
        if value in {'"', "\n", "\r"}:
            raise ValueError(f'{value!r} cannot separate fields; use e.g. ",", ";" or "\\t"')
        return value


# `{{ unsubscribe_token }}` in unsubscribe.url as it is, with or without whitespace control: the endpoint
# verifies the token exactly as signed, so a filter that changes it (upper, truncate, a slice) makes
# links that unsubscribe no one. `urlencode` is let through: a token is URL-safe, and it leaves it so.
_TOKEN_IN_URL = re.compile(r"\{\{-?\s*unsubscribe_token\s*(?:\|\s*urlencode\s*)*-?\}\}")
# What every refusal of a URL that does not carry the token says to do (the composer says it too).
TOKEN_IN_URL_RULE = (
    "must contain {{ unsubscribe_token }} as it is, unfiltered and outside any {% if %} or loop, "
    "e.g. 'https://example.com/u?t={{ unsubscribe_token }}' "
    "(the endpoint verifies the token exactly as signed, and refuses every click whose URL lacks it)"
)


class UnsubscribeSettings(BaseModel):
    """[unsubscribe]: one-click unsubscribe (RFC 8058) links and headers."""

    model_config = FROZEN
    url: HeaderValue = Field(
        description="One-click unsubscribe URL, a Jinja template that must start with https:// and "
        "hold the token, e.g. 'https://example.com/u?t={{ unsubscribe_token }}'."
    )
    mailto: EmailAddress | None = Field(
        default=None,
        description="Optional unsubscribe mailbox, e.g. unsubscribe@example.com (Outlook.com only acts "
        "on mailto).",
    )
    secret_env: _EnvName = Field(
        default="CAMPAIGN_UNSUBSCRIBE_SECRET",
        description="NAME of the environment variable holding the token secret(s).",
    )
    store: PathOrStoreUrl | None = Field(
        default=None,
        description="The unsubscribe store (.sqlite) the endpoint writes, e.g. 'unsubscribes.sqlite', or "
        "a PostgreSQL database shared by several machines, e.g. 'postgresql://campaign@db.example.com/"
        "campaigns' (no password here: export PGPASSWORD); everyone in it is skipped (reason "
        "`unsubscribed`), also while the campaign runs.",
    )
    require_body_link: bool = Field(
        default=True,
        strict=True,
        description="Refuse to send from Microsoft/iCloud senders (which drop List-Unsubscribe headers) "
        "a body without a link to unsubscribe_url.",
    )

    @field_validator("store")
    @classmethod
    def _check_store(cls, value: Path | str | None) -> Path | str | None:
        if isinstance(value, Path) and value.suffix.lower() not in STORE_SUFFIXES:
            raise ValueError(
                "must name an SQLite file ending in .sqlite, e.g. 'unsubscribes.sqlite', or a PostgreSQL "
                "database, e.g. 'postgresql://campaign@db.example.com/campaigns'"
            )
        return value

    @field_validator("url")
    @classmethod
    def _check_https(cls, value: str) -> str:
        if not value.startswith("https://"):
            raise ValueError(
                "must be an https:// URL (mail providers require https for one-click unsubscribe)"
            )
        if _TOKEN_IN_URL.search(value) is None:
            raise ValueError(TOKEN_IN_URL_RULE)
        return value

    @field_validator("mailto", mode="before")
    @classmethod
    def _drop_scheme(cls, value: object) -> object:
        if isinstance(value, str) and value[:7].lower() == "mailto:":
            return value[7:]
        return value


# Nylas: "Microsoft Graph and iCloud do not support List-Unsubscribe / List-Unsubscribe-Post custom
# headers": campaign does not send them for these senders; the body link is their unsubscribe.
HEADERLESS_PROVIDERS = frozenset({"microsoft", "icloud"})
# Nylas sends through these by IMAP/SMTP: a reply names the message it answers by its RFC Message-ID
# header, not Nylas's id (nylas-api.md §1.2 `reply_to_message_id`).
IMAP_PROVIDERS = frozenset({"yahoo", "icloud", "imap"})


class SenderSettings(BaseModel):
    """[[senders]]: one sending mailbox (a Nylas grant) and its limits."""

    model_config = FROZEN
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
    email: EmailAddress | None = Field(
        default=None,
        validation_alias=AliasChoices("email", "from"),
        description="The mailbox address (shown in output; used as From); `from` is accepted too.",
    )
    from_name: HeaderValue | None = Field(default=None, description="Display name for the From header.")
    provider: Literal["gmail", "google-workspace", "microsoft", "yahoo", "icloud", "imap"] | None = Field(
        default=None, description="Mailbox provider, for sensible default limits."
    )
    per_second: float | None = Field(
        default=None,
        gt=0,
        strict=True,
        allow_inf_nan=False,
        description=f"Sustained sends per second (default {DEFAULT_PER_SECOND:g} when per_minute is unset); "
        "at least one a day, at most 1000.",
    )
    per_minute: float | None = Field(
        default=None,
        gt=0,
        strict=True,
        allow_inf_nan=False,
        description="Sustained sends per minute (instead of per_second); at least one a day, at most 60000.",
    )
    burst: int = Field(
        default=1, ge=1, le=10_000, strict=True, description="Sends allowed back to back above the rate."
    )
    per_day: int | None = Field(
        default=None,
        ge=1,
        le=_MAX_COUNT,
        strict=True,
        description="Recipients this mailbox may mail in any rolling 24 h.",
    )
    per_day_messages: int | None = Field(
        default=None,
        ge=1,
        le=_MAX_COUNT,
        strict=True,
        description="Messages this mailbox may send in any rolling 24 h.",
    )
    concurrency: int = Field(default=2, ge=1, le=64, strict=True, description="Sends in flight at once.")
    stop_after_rejections: int = Field(
        default=DEFAULT_STOP_AFTER_REJECTIONS,
        ge=0,
        le=_MAX_COUNT,
        strict=True,
        description="Stop this sender for the run once the API has refused this many of its messages in a "
        "row (a 4xx such as 402 'message rejected') with none sent between: a refused mailbox or a broken "
        "message, not a bad address; its other rows stay pending. 0: never stop.",
    )
    window: str | None = Field(
        default=None,
        description="When this sender may send, in its `timezone`: e.g. 'Mon-Fri 09:00-17:30'; "
        "default: any time.",
    )
    timezone: str = Field(
        default="UTC",
        description="IANA time zone of the window, business days and deliver_at, e.g. Europe/Berlin.",
    )

    @field_validator("timezone")
    @classmethod
    def _check_zone(cls, value: str) -> str:
        load_zone(value)
        return value

    @field_validator("window")
    @classmethod
    def _check_window(cls, value: str | None) -> str | None:
        if value is not None:
            parse_window(value, load_zone("UTC"))
        return value

    @property
    def send_window(self) -> SendWindow | None:
        """The window as a value in the sender's zone (None: any time)."""
        return None if self.window is None else parse_window(self.window, load_zone(self.timezone))

    @field_validator("per_second", "per_minute")
    @classmethod
    def _check_pace(cls, value: float | None, info: ValidationInfo) -> float | None:
        unit = 1 if info.field_name == "per_second" else 60
        if value is not None and not _MIN_PER_SECOND * unit <= value <= _MAX_PER_SECOND * unit:
            raise ValueError(
                f"must be between {_MIN_PER_SECOND * unit:.3g} (one send a day) and "
                f"{_MAX_PER_SECOND * unit:g} (got {value:g})"
            )
        return value

    @property
    def mailbox(self) -> str:
        """What Nylas scopes this sender's idempotency keys to: its grant, or `domain:<domain>`."""
        return self.grant_id if self.grant_id else f"domain:{self.domain}"

    @property
    def mailbox_address(self) -> str | None:
        """The address this sender's grant sends as, as addresses are compared (normalised, lower-cased,
        as `recipients.comparable_address` gives it): a mailbox reconnected under a new grant id is the
        same mailbox, with the same daily limit. None: a domain sender (its limits are the domain's), or
        a grant sender without `email`."""
        if self.grant_id is None or self.email is None:
            return None
        return self.email.lower()

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
