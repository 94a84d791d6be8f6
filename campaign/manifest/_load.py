"""The campaign manifest: one TOML file naming the list, the templates, the senders and their limits.

`parse_manifest` turns TOML text into a frozen `Manifest` made of the table models in
`campaign.manifest._settings` and `campaign.manifest._message`, resolving every path against the
manifest's folder; every mistake becomes one `ManifestError` line naming the file and the
dotted key. This module checks shapes and values only: it never opens the files the
manifest names (the loaders do). It reads the environment for one thing: the values of the secret
variables the manifest names (`campaign.redaction.secret_values`), so that an error never repeats
one pasted into another key.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import ErrorDetails

from campaign.errors import InputFileError, ManifestError
from campaign.manifest._followups import FIRST_STEP, FollowupSettings
from campaign.manifest._message import AttachmentSettings, MessageSettings, TrackingSettings
from campaign.manifest._settings import (
    STORE_SUFFIXES,
    ApiSettings,
    CampaignSettings,
    LedgerSettings,
    RecipientsSettings,
    SenderSettings,
    UnsubscribeSettings,
    is_env_name,
    quoted,
)
from campaign.redaction import HIDDEN, holds_secret, looks_like_secret, quote_value, secret_values

# The table models live in _settings and _message; they stay importable from here.
__all__ = [
    "STORE_SUFFIXES",
    "ApiSettings",
    "AttachmentSettings",
    "CampaignSettings",
    "LedgerSettings",
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

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


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
    ledger: LedgerSettings = Field(
        default=LedgerSettings(),
        description="Where the campaign's progress is kept (default: a SQLite file beside the manifest).",
    )
    followups: tuple[FollowupSettings, ...] = Field(
        default=(),
        description="Steps after [message], in order, each a reply in the same thread; one [[followups]] "
        "table each.",
    )

    @model_validator(mode="after")
    def _unique_steps(self, info: ValidationInfo) -> Manifest:
        seen: dict[str, int] = {}
        for index, step in enumerate(self.followups, start=1):
            if step.name in seen:
                raise ValueError(
                    f"followups[{index}].name: {quoted(step.name, info)} is already the name of "
                    f"followups[{seen[step.name]}]; step names must be unique"
                )
            seen[step.name] = index
        for index, sender in enumerate(self.senders, start=1):
            if self.followups and sender.domain is not None:
                raise ValueError(
                    f"senders[{index}].domain: {quoted(sender.name, info)} sends through a domain, which has "
                    "no mailbox "
                    "to hold a thread or see replies; [[followups]] need mailbox senders (grant_id)"
                )
        return self

    @property
    def secret_envs(self) -> tuple[str, ...]:
        """The names of the environment variables that hold this campaign's secrets: the API key's, the
        unsubscribe secret's (with [unsubscribe]) and the database password's (with password_env)."""
        names = [self.api.key_env]
        if self.unsubscribe is not None:
            names.append(self.unsubscribe.secret_env)
        if self.ledger.password_env is not None:
            names.append(self.ledger.password_env)
        return tuple(names)

    @property
    def steps(self) -> tuple[str, ...]:
        """The names of the steps in order: "message" ([message]), then each follow-up's."""
        return (FIRST_STEP, *(step.name for step in self.followups))

    def step_message(self, step: str) -> MessageSettings:
        """The [message] settings as step `step` sends them: a follow-up's own subject and body, the rest
        as in [message] (attachments are step 1's only)."""
        if step == FIRST_STEP:
            return self.message
        followup = next(item for item in self.followups if item.name == step)
        subject = followup.subject if followup.subject is not None else f"Re: {self.message.subject}"
        return self.message.model_copy(
            update={
                "subject": subject,
                "html": followup.html,
                "text": followup.text,
                "markdown": followup.markdown,
                "attachments": (),
                "deliver_at": followup.deliver_at,
            }
        )

    def followup(self, step: str) -> FollowupSettings | None:
        """The [[followups]] table of `step` (None for "message", or a step no longer in the manifest)."""
        return next((item for item in self.followups if item.name == step), None)

    @model_validator(mode="after")
    def _unique_senders(self, info: ValidationInfo) -> Manifest:
        first: dict[str, int] = {}
        mailboxes: dict[tuple[str, str], int] = {}
        for index, sender in enumerate(self.senders, start=1):  # counted as users count tables
            if sender.name in first:
                raise ValueError(
                    f"senders[{index}].name: {quoted(sender.name, info)} is already the name of "
                    f"senders[{first[sender.name]}]; sender names must be unique"
                )
            first[sender.name] = index
            # Two senders on one mailbox would each take its whole pace and daily budget: twice its limits.
            key, value = ("grant_id", sender.grant_id) if sender.grant_id else ("domain", sender.domain or "")
            # Compared as Nylas and DNS compare them: a grant id (a UUID) and a domain ignore case.
            mailbox = (key, value.lower().rstrip("."))
            if mailbox in mailboxes:
                earlier = mailboxes[mailbox]
                other = self.senders[earlier - 1].name
                raise ValueError(
                    f"senders[{index}].{key}: {quoted(sender.name, info)} and {quoted(other, info)} "
                    f"(senders[{earlier}]) "
                    f"both send through {key} {quoted(value, info)}, which would double its pace and daily "
                    "budget; keep one sender per mailbox"
                )
            mailboxes[mailbox] = index
            if sender.provider == "microsoft":
                self._check_graph_headers(index, sender.name, info)
        return self

    def _check_graph_headers(self, index: int, sender: str, info: ValidationInfo) -> None:
        # Microsoft Graph refuses a custom header whose name does not start with X-
        # (InvalidInternetMessageHeader): every send of this sender would fail, so say it now.
        for name in self.message.headers:
            if not name.lower().startswith("x-"):
                shown = quoted(name, info)
                rename = "rename it X-…" if shown == HIDDEN else f"rename it X-{name}"
                raise ValueError(
                    f"message.headers: {shown} cannot be sent by senders[{index}] "
                    f"{quoted(sender, info)} (provider microsoft): Microsoft Graph only accepts custom "
                    f"headers whose names start with X-; {rename}"
                )

    @property
    def base_dir(self) -> Path:
        """The folder holding the manifest; relative paths start here."""
        return self.path.parent

    @property
    def attachments_root(self) -> Path:
        """The folder attachment paths start from: message.attachments_dir, else the manifest's folder."""
        return self.message.attachments_dir or self.base_dir

    @property
    def ledger_path(self) -> Path:
        """Where this campaign's ledger lives: beside the manifest."""
        return self.base_dir / f"{self.path.stem}.ledger.sqlite"

    @functools.cached_property
    def _senders_by_name(self) -> tuple[tuple[SenderSettings, ...], dict[str, SenderSettings]]:
        return self.senders, {sender.name: sender for sender in self.senders}

    def sender(self, name: str) -> SenderSettings:
        """The sender called `name`; ManifestError if the manifest has none by that name."""
        # Looked up for every row checked and message sent: a dict, not a walk through thousands of senders
        # (and not a pydantic private attribute: reading one costs microseconds, a million times over).
        senders, by_name = self._senders_by_name
        if senders is not self.senders:  # a copy with other senders (model_copy keeps cached values)
            by_name = {sender.name: sender for sender in self.senders}
        found = by_name.get(name)
        if found is not None:
            return found
        known = ", ".join(s.name for s in self.senders)
        raise ManifestError(f"{self.path.name}: no sender named {quote_value(name)} (senders: {known})")


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
    ("followups",): FollowupSettings,
    ("ledger",): LedgerSettings,
}


def _other_name(table: tuple[str, ...], key: str) -> str | None:
    """The key `key` is another name of in `table` (a sender's `from` is its `email`), or None."""
    for name, field in _TABLES[table].model_fields.items():
        names = field.validation_alias.choices if isinstance(field.validation_alias, AliasChoices) else ()
        if key != name and key in names:
            return name
    return None


def _keys(table: tuple[str, ...]) -> list[str]:
    return [k for k in _TABLES[table].model_fields if table or k != "path"]  # Manifest.path is not a key


def _format_loc(loc: tuple[str | int, ...], known: tuple[str, ...] = ()) -> str:
    """('senders', 1, 'per_second') -> senders[2].per_second: the 2nd [[senders]] table, counted from 1
    as users count tables (like row numbers); header names are quoted, and a key that looks like a
    secret (one pasted as a key, or as a header's name) is not shown."""
    out = ""
    parents: list[str] = []
    for part in loc:
        if part == "[key]":
            continue
        if isinstance(part, int):
            out += f"[{part + 1}]"
            continue
        if looks_like_secret(part, known):
            part = HIDDEN
        elif parents[-2:] == ["message", "headers"] or not _BARE_KEY.fullmatch(part):
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


def _describe_error(error: ErrorDetails, known: tuple[str, ...] = ()) -> str:  # noqa: C901 - one branch per pydantic error type, each its own message
    """One pydantic error as `dotted.key: what is wrong` (`known`: the secret values no key may show)."""
    loc = tuple(error["loc"])
    table = tuple(p for p in loc[:-1] if isinstance(p, str))
    key = loc[-1] if loc else ""
    kind, message = error["type"], error["msg"]
    if kind == "extra_forbidden" and table in _TABLES and isinstance(key, str):
        twin = _other_name(table, key)
        if twin is not None:  # both names of one key given: the first found counts, the other is "extra"
            where = _format_loc(loc, known)
            return f"{where}: another name for {twin!r}, which is given too; keep one of the two"
        close = difflib.get_close_matches(key, _keys(table), n=1)
        if close:
            return f"{_format_loc(loc, known)}: unknown key (did you mean {close[0]!r}?)"
        elsewhere = [".".join(t) for t in _TABLES if key in _keys(t) and t]
        if elsewhere:
            return f"{_format_loc(loc, known)}: unknown key here (it belongs in [{elsewhere[0]}])"
        return f"{_format_loc(loc, known)}: unknown key (expected one of: {', '.join(_keys(table))})"
    if kind == "missing":
        full = tuple(p for p in loc if isinstance(p, str))
        if full == ("senders",):
            return "senders: missing; add at least one [[senders]] table with name and grant_id"
        if full in _TABLES:
            return f"{_format_loc(loc, known)}: required table [{'.'.join(full)}] is missing"
        return f"{_format_loc(loc, known)}: required key is missing"
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
    place = _format_loc(loc, known)
    return f"{place}: {message}" if place else message


def _describe_validation(exc: ValidationError, name: str, known: tuple[str, ...] = ()) -> str:
    errors = exc.errors()
    # A list whose only item failed is also "too short": that echo is not a problem of its own.
    inner = {e["loc"][:n] for e in errors for n in range(len(e["loc"]))}
    errors = [e for e in errors if not (e["type"] == "too_short" and e["loc"] in inner)]
    # A typo makes a key unknown *and* leaves the real key missing: report the typo first.
    errors.sort(key=lambda e: e["type"] != "extra_forbidden")
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return f"{name}: {_describe_error(errors[0], known)}{more}"


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
    # The secrets a value in a wrong key may be: what the variables this manifest names hold (read
    # from its tables as written: they may not validate), to look for and never to show.
    known = secret_values(_secret_envs_named(data))
    context = {"base_dir": path.parent, "secrets": known}
    try:
        manifest = Manifest.model_validate({**data, "path": path}, context=context)
    except ValidationError as exc:
        raise ManifestError(_describe_validation(exc, path.name, known)) from exc
    pasted = _find_pasted_secret(manifest, (), known)
    if pasted is not None:
        raise ManifestError(
            f"{path.name}: {_format_loc(pasted, known)}: holds a secret (an API key, or the value of a "
            "secret variable such as NYLAS_API_KEY), which would be shown and sent; remove it: secrets "
            "live only in environment variables"
        )
    return manifest


def _find_pasted_secret(
    value: object, loc: tuple[str | int, ...], known: tuple[str, ...]
) -> tuple[str | int, ...] | None:
    """Where in the manifest a secret was pasted into a text that campaign shows or sends (a name, a
    header, a subject, a URL), if anywhere: a value, or a header's name, that holds a known secret or a
    Nylas API key (`holds_secret`). Paths are left out (an error shows a path only through
    `quote_value`), and so are the `*_env` keys (their own check refuses a value that is not a name)."""
    if isinstance(value, str):
        return loc if holds_secret(value, known) else None
    children: list[tuple[str | int, object]] = []
    if isinstance(value, BaseModel):
        fields = type(value).model_fields
        children.extend((name, getattr(value, name)) for name in fields if not name.endswith("_env"))
    elif isinstance(value, Mapping):
        for key, child in value.items():
            if holds_secret(str(key), known):
                return (*loc, str(key))
            children.append((str(key), child))
    elif isinstance(value, tuple | list):
        children.extend(enumerate(value))
    for part, child in children:
        found = _find_pasted_secret(child, (*loc, part), known)
        if found is not None:
            return found
    return None


def _secret_envs_named(data: dict[str, object]) -> list[str]:
    """The names of the secret variables the manifest's tables name (api.key_env, unsubscribe.secret_env,
    ledger.password_env), those written as variable names."""
    names = []
    for table, key in (("api", "key_env"), ("unsubscribe", "secret_env"), ("ledger", "password_env")):
        settings = data.get(table)
        name = settings.get(key) if isinstance(settings, dict) else None
        if isinstance(name, str) and is_env_name(name):
            names.append(name)
    return names


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
    # pydantic lists a field under its first alias only: a sender's address may also be written `from`
    # (a domain sender's, as the README writes it), which the loader takes.
    definitions = schema["$defs"]
    assert isinstance(definitions, dict)
    sender = definitions["SenderSettings"]["properties"]
    sender["from"] = {**sender["email"], "description": "The sender's address (the same as email)."}
    return schema
