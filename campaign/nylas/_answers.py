"""Reading the Nylas API's answers: a send's response as a `SendOutcome`, an error body as one line.

Pure translation for `campaign.nylas._client`: the status and error type decide the outcome
(429 throttled, with when to retry and whose limit it was; 401/403 refused; 409 in
progress; 5xx, and a 2xx without a message id, ambiguous; other answers rejected), and an
error envelope, a provider's error or a gateway's HTML page becomes one short line. It
never sends, reads time only through the `Clock` it is given, and keeps no text of an
answer that has not passed through the caller's `scrub` (which removes the API key).
"""

from __future__ import annotations

import email.message
import email.utils
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import httpx
import orjson

from campaign.clock import Clock
from campaign.models import OutcomeKind, SendOutcome, ThrottleKind

__all__ = [
    "Answer",
    "ErrorBody",
    "answer_text",
    "build_send_outcome",
    "describe_exception",
    "find_request_id",
    "is_trial_app_refusal",
    "json_text",
    "never_left",
    "parse_error_body",
    "parse_json_object",
    "retry_time",
]

_EXCERPT_CHARS = 300
_ISO = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:?\d{2})?"
_RETRY_AFTER_ISO = re.compile(rf"retry after\s+({_ISO})", re.IGNORECASE)  # Gmail, inside provider_error
_QUOTA_WORDS = ("quota", "daily user sending limit exceeded", "activity limit reached")
# A mailbox's daily sending quota in the words providers use, whatever the status Nylas relays it with:
# Gmail's "550 5.4.5" (as a 402), the Gmail API's dailyLimitExceeded (a 403) and "(Mail sending)" text,
# Exchange's submission quota, iCloud's "exceeded your sending limit" (email-standards.md §3.3-3.8).
# Never "quota" alone: a full *recipient* mailbox is "over quota" (4.2.2), a bounce of that address.
_DAILY_QUOTA = re.compile(
    r"daily (user|smtp relay) (sending )?limit|sending limit exceeded|exceeded your (daily )?sending limit|"
    r"submission ?quota|dailylimitexceeded|\(mail sending\)|gmail api due to rate limit|\b5\.4\.5\b",
    re.IGNORECASE,
)
# The Gmail API's short-term limits, relayed as a 403: a throttle, not refused credentials.
_RATE_LIMITED = re.compile(r"\b(user)?ratelimitexceeded\b", re.IGNORECASE)
# Nylas refusing tracking to a Sandbox (trial) application (next-capabilities.md §0.4); its status is
# not documented.
_TRIAL_APP = re.compile(r"not allowed for trial accounts", re.IGNORECASE)


def is_trial_app_refusal(text: str) -> bool:
    """Whether an error's `text` is Nylas refusing tracking to a Sandbox (trial) application."""
    return _TRIAL_APP.search(text) is not None


_PROVIDER_WORDS = ("mailboxconcurrency", "applicationthrottled", "throttl", "provider")
_TAG = re.compile(r"<[^>]*>")
_SPACES = re.compile(r"\s+")


class Answer(Protocol):
    """An HTTP answer read whole: an `httpx.Response`, or the send path's `_transport.RawAnswer`."""

    @property
    def status_code(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...  # names case-insensitive

    @property
    def content(self) -> bytes: ...  # decoded of any Content-Encoding


@dataclass(frozen=True, slots=True)
class ErrorBody:
    """An error answer: its type, and its message as sent and as one line for the user."""

    type: str | None
    raw_message: str  # error.message as the server sent it
    message: str  # one line for the user: the message plus the provider's own words
    provider_error: object


# The OpenAPI spec and the Python SDK name a sent message's id `id`; for a transactional (domain)
# send the Node SDK types the answer as {messageId}. Any of them, a non-empty string, counts.
_MESSAGE_ID_KEYS = ("id", "message_id", "messageId")


def _internet_message_id(data: object) -> str | None:
    """The Message-ID header among a sent message's `headers` (`[{name, value}]`, with
    fields=include_basic_headers); None when the answer has none (a domain send, an older API)."""
    headers = data.get("headers") if isinstance(data, dict) else None
    for header in headers if isinstance(headers, list) else ():
        if isinstance(header, dict) and str(header.get("name", "")).lower() == "message-id":
            value = header.get("value")
            if isinstance(value, str) and value.strip():
                return value.strip()
    return None


def _message_id(data: object) -> str | None:
    if not isinstance(data, dict):
        return None
    found = (data.get(key) for key in _MESSAGE_ID_KEYS)
    return next((value for value in found if isinstance(value, str) and value), None)


def build_send_outcome(response: Answer, *, clock: Clock, scrub: Callable[[str], str]) -> SendOutcome:
    """What one send's HTTP response means; `scrub` removes secrets from any text the outcome keeps."""
    status = response.status_code
    text = scrub(answer_text(response))  # before any excerpt, so a cut can't leave half a key
    body = parse_json_object(text)
    request_id = find_request_id(body, response)
    request_id = None if request_id is None else scrub(request_id)
    replayed = response.headers.get("Idempotent-Response", "").strip().lower() == "true"
    if 200 <= status < 300:
        data = body.get("data") if body is not None else None
        message_id = _message_id(data)
        if message_id is not None:
            thread_id = data.get("thread_id") if isinstance(data, dict) else None
            return SendOutcome(
                OutcomeKind.SENT,
                status,
                message_id=message_id,
                thread_id=thread_id if isinstance(thread_id, str) and thread_id else None,
                internet_message_id=_internet_message_id(data),
                request_id=request_id,
                replayed=replayed,
            )
        # Not a Nylas answer we understand: a same-key retry (or reconcile) settles it safely.
        return SendOutcome(
            OutcomeKind.AMBIGUOUS,
            status,
            request_id=request_id,
            error_type="bad_response",
            error_message=f"HTTP {status} without a message id: {_excerpt(text)}",
            replayed=replayed,
        )
    error = parse_error_body(status, text, body)
    kind = _kind_for_status(status, error)
    message = f"unexpected redirect (HTTP {status}); check api.uri" if status < 400 else error.message
    return SendOutcome(
        kind,
        status,
        request_id=request_id,
        error_type=error.type,
        error_message=message,
        retry_at=retry_time(response, error, clock),
        throttle=_throttle_kind(status, error) if kind is OutcomeKind.THROTTLED else None,
        replayed=replayed,
    )


def retry_time(response: Answer, error: ErrorBody, clock: Clock) -> datetime | None:
    """The latest time the server asked us to wait for: Retry-After, or "Retry after <ISO>" inside."""
    candidates: list[datetime] = []
    if header := response.headers.get("Retry-After"):
        when = _parse_retry_after(header.strip(), clock.now())
        candidates.extend([] if when is None else [when])
    for match in _RETRY_AFTER_ISO.finditer(f"{json.dumps(error.provider_error)} {error.raw_message}"):
        try:
            candidates.append(_as_utc(datetime.fromisoformat(match.group(1))))
        except ValueError:
            continue
    return max(candidates, default=None)


def _kind_for_status(status: int, error: ErrorBody) -> OutcomeKind:
    error_type = error.type
    if status == 429:
        return OutcomeKind.THROTTLED
    if status >= 400 and _DAILY_QUOTA.search(_error_text(error)):
        # Sent with another status, a quota refusal is still one: the mailbox, not this message, is
        # refused (no row fails, no credentials are blamed) until its day frees.
        return OutcomeKind.THROTTLED
    if status == 403 and _RATE_LIMITED.search(_error_text(error)):
        return OutcomeKind.THROTTLED
    if status in (401, 403):
        return OutcomeKind.AUTH_REFUSED
    if status >= 400 and is_trial_app_refusal(_error_text(error)):
        # The application may not do what every message of the campaign asks (track): refused as for
        # credentials, the sender stops with its rows pending, rather than failing them one by one.
        return OutcomeKind.AUTH_REFUSED
    if status == 404:
        # A send names nothing but its grant (or domain) and, for a follow-up, the message it answers:
        # no such grant is the sender's fault, not the message's, so the sender stops with its rows
        # pending, as for refused credentials (the loop looks a follow-up's message up first).
        return OutcomeKind.AUTH_REFUSED
    if status == 409 and (error_type or "").endswith("concurrent_idempotent_request"):
        return OutcomeKind.IN_PROGRESS
    if status >= 500:
        return OutcomeKind.AMBIGUOUS
    # Other 4xx (incl. 409 invalid_idempotent_request: our bug), and 1xx/3xx: redirects are not
    # followed, so nothing at Nylas handled the request.
    return OutcomeKind.REJECTED


def _throttle_kind(status: int, error: ErrorBody) -> ThrottleKind:
    error_type = (error.type or "").lower()
    if error_type == "nylas_rate_limit_exceeded":
        return ThrottleKind.NYLAS
    text = _error_text(error).lower()
    if _DAILY_QUOTA.search(text) or (status == 429 and any(word in text for word in _QUOTA_WORDS)):
        return ThrottleKind.QUOTA
    if status != 429:  # a 403 rateLimitExceeded: the provider's
        return ThrottleKind.PROVIDER
    if error.provider_error is not None or any(word in text for word in _PROVIDER_WORDS):
        return ThrottleKind.PROVIDER
    # No provider in sight: Nylas's own limit (the OAS example uses rate_limit_error for it).
    return ThrottleKind.NYLAS


def _error_text(error: ErrorBody) -> str:
    """Everything an error answer says, to look for words in: its type, message and provider's error."""
    return f"{error.type or ''} {error.raw_message} {json.dumps(error.provider_error)}"


def never_left(exc: httpx.RequestError) -> bool:
    """Whether a request that got no answer provably never reached the API: no connection was made."""
    return isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)


def describe_exception(exc: httpx.RequestError) -> str:
    """One line for a request that got no answer: whether anything can have been sent."""
    detail = _one_line(str(exc))
    what = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    if never_left(exc):
        return f"could not connect to the API ({what}); nothing was sent"
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer in time ({what}); the message may have been sent"
    return f"the connection failed ({what}); the message may have been sent"


def parse_error_body(status: int, text: str, body: dict[str, Any] | None) -> ErrorBody:
    """The error in an answer: a Nylas error envelope, any JSON, or a page that is not JSON."""
    if body is None:  # e.g. a gateway's HTML 502
        page = _excerpt(_TAG.sub(" ", text))
        return ErrorBody(None, "", f"HTTP {status}, not a JSON answer" + (f": {page}" if page else ""), None)
    error = body.get("error")
    if not isinstance(error, dict):
        return ErrorBody(None, "", f"HTTP {status}: {_excerpt(text)}", None)
    error_type, raw_message = json_text(error, "type"), json_text(error, "message")
    provider = error.get("provider_error")
    message = raw_message or f"HTTP {status}"
    provider_text = _provider_message(provider)
    if provider_text and provider_text not in message:
        message = f"{message} (provider: {provider_text})"
    return ErrorBody(error_type or None, raw_message, _excerpt(message), provider)


def _provider_message(provider: object) -> str:
    if provider is None:
        return ""
    inner = provider.get("error", provider) if isinstance(provider, dict) else provider
    if isinstance(inner, dict) and isinstance(inner.get("message"), str):
        return str(inner["message"])
    return inner if isinstance(inner, str) else json.dumps(provider)


def _parse_retry_after(value: str, now: datetime) -> datetime | None:
    try:
        seconds = float(value)
    except ValueError:
        try:
            return _as_utc(email.utils.parsedate_to_datetime(value))
        except (TypeError, ValueError, IndexError):
            return None
    try:
        return now + timedelta(seconds=max(0.0, seconds)) if math.isfinite(seconds) else None
    except OverflowError:
        return None


def answer_text(response: Answer) -> str:
    """The answer's body as text, decoded as httpx's `response.text` would: in the charset Content-Type
    names (one Python knows), else UTF-8, undecodable bytes replaced."""
    content_type = response.headers.get("content-type", "")
    charset = _charset(content_type) if "charset" in content_type.lower() else None
    try:
        return response.content.decode(charset or "utf-8", errors="replace")
    except LookupError:  # a charset Python does not know
        return response.content.decode("utf-8", errors="replace")


def _charset(content_type: str) -> str | None:
    """The charset parameter of a Content-Type value, parsed as httpx parses it."""
    header = email.message.Message()
    header["content-type"] = content_type
    return header.get_content_charset(failobj=None)


def parse_json_object(text: str) -> dict[str, Any] | None:
    """The answer as a JSON object, or None when it is not one."""
    try:
        body = orjson.loads(text)
    except orjson.JSONDecodeError:  # an HTML page, an empty body
        return None
    return body if isinstance(body, dict) else None


def find_request_id(body: dict[str, Any] | None, response: Answer) -> str | None:
    """The request id Nylas gives in the body, else in the x-request-id header."""
    return (
        (json_text(body, "request_id") if body is not None else "")
        or response.headers.get("x-request-id")
        or None
    )


def json_text(item: dict[str, Any], name: str) -> str:
    """A string member of a JSON object; "" when it is missing or not a string."""
    value = item.get(name)
    return value if isinstance(value, str) else ""


def _as_utc(when: datetime) -> datetime:
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _one_line(text: str) -> str:
    return _SPACES.sub(" ", text).strip()


def _excerpt(text: str) -> str:
    line = _one_line(text)
    return line if len(line) <= _EXCERPT_CHARS else line[: _EXCERPT_CHARS - 1] + "…"
