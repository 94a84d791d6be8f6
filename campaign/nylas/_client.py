"""The wire to the Nylas v3 API: the send call and its outcome, and listing for reconcile.

Sends the payload built by `campaign.nylas._payload` over an injected `httpx.AsyncClient` (straight
through its transport when that is our `ApiTransport`: the same exchange without httpx's models),
through a sender's grant or its verified domain (`send_as`), and turns every response or httpx
failure into a `SendOutcome` (`campaign.nylas._answers` reads the answers), so a
per-message result never raises. It must not decide what happens next (retry, park,
record: that is dispatch's job), must not read time except through the `Clock`, and no
text it produces may hold the API key.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Protocol
from urllib.parse import quote

import httpx

from campaign import __version__
from campaign.clock import Clock
from campaign.errors import ApiAuthError, ApiError, ApiNotFoundError, ApiUnavailableError, ManifestError
from campaign.manifest import SenderSettings
from campaign.models import OutcomeKind, SendOutcome
from campaign.nylas._answers import (
    Answer,
    answer_text,
    build_send_outcome,
    describe_exception,
    find_request_id,
    json_text,
    never_left,
    parse_error_body,
    parse_json_object,
    retry_time,
)
from campaign.nylas._http import ApiHttpClient, env_proxy_applies
from campaign.nylas._payload import SendRequest, encode_send_request

__all__ = [
    "DEFAULT_API_URI",
    "DEFAULT_CONNECTIONS",
    "MAX_IDEMPOTENCY_KEY_LENGTH",
    "Folder",
    "ListedMessage",
    "MessagePage",
    "NylasClient",
    "SendClient",
    "build_http_client",
    "send_as",
]

DEFAULT_API_URI = "https://api.us.nylas.com"
DEFAULT_CONNECTIONS = 100  # aiohttp's own default pool size
MAX_IDEMPOTENCY_KEY_LENGTH = 256  # §4: a longer key gets 400 api.invalid_idempotency_key
_USER_AGENT = f"campaign/{__version__}"
_VISIBLE_ASCII = re.compile(r"[\x21-\x7E]+")  # safe in an HTTP header value as is
_METADATA_KEYS = frozenset({"key1", "key2", "key3", "key4", "key5"})  # the only filterable keys (§5)


@dataclass(frozen=True, slots=True)
class ListedMessage:
    """A message as `GET /messages` lists it: what reconcile compares (recipient emails, metadata)."""

    id: str
    subject: str
    to: tuple[str, ...]
    date: datetime | None
    metadata: Mapping[str, str] = field(hash=False)
    senders: tuple[str, ...] = ()  # the `from` addresses
    thread_id: str | None = None


@dataclass(frozen=True, slots=True)
class MessagePage:
    """One page of a message listing; `next_cursor` is None on the last page."""

    messages: tuple[ListedMessage, ...]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class Folder:
    """A mailbox folder; the Sent folder has `\\Sent` among its `attributes`."""

    id: str
    name: str
    attributes: tuple[str, ...]


class SendClient(Protocol):
    """What dispatch needs from the API: one idempotent send, translated."""

    async def send_message(
        self, grant_id: str, payload: Mapping[str, Any] | SendRequest, *, idempotency_key: str
    ) -> SendOutcome: ...

    async def send_domain_message(
        self, domain: str, payload: Mapping[str, Any] | SendRequest, *, idempotency_key: str
    ) -> SendOutcome: ...


async def send_as(
    client: SendClient,
    sender: SenderSettings,
    payload: Mapping[str, Any] | SendRequest,
    *,
    idempotency_key: str,
) -> SendOutcome:
    """Send `payload` the way `sender` sends: through its grant, or through its verified domain."""
    if sender.domain is not None:
        return await client.send_domain_message(sender.domain, payload, idempotency_key=idempotency_key)
    assert sender.grant_id is not None  # the manifest requires one of the two
    return await client.send_message(sender.grant_id, payload, idempotency_key=idempotency_key)


def build_http_client(
    *,
    base_url: str,
    timeout_s: float,
    transport: httpx.AsyncBaseTransport | None = None,
    connections: int = DEFAULT_CONNECTIONS,
) -> httpx.AsyncClient:
    """An `httpx.AsyncClient` for the API at `base_url` with one timeout for every phase of a request.

    Without `transport` it sends through `campaign.nylas._transport.ApiTransport` (aiohttp), keeping up
    to `connections` connections alive (give at least the number of requests ever in flight);
    when the environment names a proxy for `base_url`, httpx's own transport, which uses it.
    """
    try:
        url = httpx.URL(base_url)
    except httpx.InvalidURL as exc:
        raise ManifestError(f"api.uri {base_url!r} is not a URL; use e.g. {DEFAULT_API_URI}") from exc
    if url.scheme not in ("http", "https") or not url.host:
        raise ManifestError(f"api.uri {base_url!r} must be an http(s) URL such as {DEFAULT_API_URI}")
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise ManifestError(f"api.timeout_s must be a positive number of seconds, not {timeout_s!r}")
    if connections < 1:
        raise ValueError(f"connections must be at least 1, not {connections}")
    headers = {"User-Agent": _USER_AGENT}
    timeout = httpx.Timeout(timeout_s)
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    if transport is None and not env_proxy_applies(url):
        # Imported here: aiohttp takes a tenth of a second to load, and commands that never
        # send (status, preview) import this module too.
        from campaign.nylas._transport import ApiTransport

        transport = direct = ApiTransport(limits=limits)
    else:
        direct = None
    return ApiHttpClient(
        base_url=url, timeout=timeout, transport=transport, headers=headers, limits=limits, direct=direct
    )


class NylasClient:
    """Nylas v3 over an injected `httpx.AsyncClient`; each send attempt becomes a `SendOutcome`."""

    def __init__(self, http: httpx.AsyncClient, *, api_key: str, clock: Clock) -> None:
        key = api_key.strip()
        if not _VISIBLE_ASCII.fullmatch(key):
            raise ManifestError(
                "the Nylas API key is empty or contains spaces or control characters; "
                "set the variable named by api.key_env to the key from the Nylas dashboard"
            )
        self._http = http
        self._clock = clock
        # The key as a server might echo it back: raw, JSON-escaped, URL-quoted; longest first.
        forms = {key, json.dumps(key)[1:-1], quote(key, safe="")}
        self._secrets = tuple(sorted(forms, key=len, reverse=True))
        self._base_headers = {
            "Authorization": f"Bearer {key}",
            "Accept": "application/json",
            "User-Agent": _USER_AGENT,
        }
        # Absolute send URLs by (grants|domains, id): httpx would parse and merge a path per request.
        self._send_urls: dict[tuple[str, str], httpx.URL] = {}
        # Sends skip httpx's client and models when its transport is ours (a fifth of a send's CPU).
        self._direct = http.direct if isinstance(http, ApiHttpClient) else None
        self._timeouts = http.timeout.as_dict()

    async def send_message(
        self, grant_id: str, payload: Mapping[str, Any] | SendRequest, *, idempotency_key: str
    ) -> SendOutcome:
        """POST one message with `Idempotency-Key` and translate the answer; never raises for an outcome.

        `payload` is a JSON object, or a `SendRequest` (JSON or multipart, from campaign.nylas._payload).
        """
        return await self._post_send(self._send_url("grants", grant_id), payload, idempotency_key)

    async def send_domain_message(
        self, domain: str, payload: Mapping[str, Any] | SendRequest, *, idempotency_key: str
    ) -> SendOutcome:
        """POST one message through a verified domain (§6), where `from` is one object, not a list."""
        body = dict(payload.payload if isinstance(payload, SendRequest) else payload)
        if isinstance(body.get("from"), list) and body["from"]:
            body["from"] = body["from"][0]
        files = payload.attachments if isinstance(payload, SendRequest) else ()
        return await self._post_send(
            self._send_url("domains", domain), encode_send_request(body, files), idempotency_key
        )

    def _send_url(self, kind: str, target: str) -> httpx.URL:
        """The absolute URL of `POST /v3/{kind}/{target}/messages/send`, merged with the base URL once."""
        url = self._send_urls.get((kind, target))
        if url is None:
            path = httpx.URL(f"/v3/{kind}/{_quote_grant(target)}/messages/send")
            base = self._http.base_url  # always ends in "/": httpx merges a path the same way
            # A grant's answer then carries the message's Message-ID header, which an IMAP grant's
            # follow-up must name to answer it (nylas-api.md §1.1, §1.2).
            query = b"?fields=include_basic_headers" if kind == "grants" else b""
            url = base.copy_with(raw_path=base.raw_path + path.raw_path.lstrip(b"/") + query)
            self._send_urls[(kind, target)] = url
        return url

    async def _post_send(
        self, url: httpx.URL, payload: Mapping[str, Any] | SendRequest, idempotency_key: str
    ) -> SendOutcome:
        if len(idempotency_key) > MAX_IDEMPOTENCY_KEY_LENGTH or not _VISIBLE_ASCII.fullmatch(idempotency_key):
            limit, got = MAX_IDEMPOTENCY_KEY_LENGTH, len(idempotency_key)
            raise ValueError(f"Idempotency-Key must be 1–{limit} visible ASCII characters (got {got})")
        request = payload if isinstance(payload, SendRequest) else encode_send_request(payload)
        headers = {
            **self._base_headers,
            "Content-Type": request.content_type,
            "Content-Length": str(request.size),
            "Idempotency-Key": idempotency_key,
        }
        body = _request_body(request)
        try:
            response: Answer
            if self._direct is not None:
                response = await self._direct.post(str(url), headers, body, timeout=self._timeouts)
            else:
                response = await self._http.post(url, content=body, headers=headers)
        except httpx.RequestError as exc:
            # No connection (refused, timed out, no such name, a bad certificate): the request never left,
            # so its key is unused. Anything later may have reached Nylas: same key again (§4).
            kind = OutcomeKind.UNREACHABLE if never_left(exc) else OutcomeKind.AMBIGUOUS
            error_type = "timeout" if isinstance(exc, httpx.TimeoutException) else "network"
            message = self._scrub(describe_exception(exc))
            return SendOutcome(kind, error_type=error_type, error_message=message)
        return build_send_outcome(response, clock=self._clock, scrub=self._scrub)

    async def list_messages(
        self,
        grant_id: str,
        *,
        metadata_pair: tuple[str, str] | None = None,
        in_folder: str | None = None,
        to: str | None = None,
        from_: str | None = None,
        subject: str | None = None,
        thread_id: str | None = None,
        received_after: datetime | int | None = None,
        received_before: datetime | int | None = None,
        limit: int | None = None,
        page_token: str | None = None,
    ) -> MessagePage:
        """One page of `GET /v3/grants/{id}/messages` with the §5 filters (`in_folder` is `in`).

        Microsoft grants cannot combine `thread_id` with the address or subject filters (§5): it is
        refused here for every grant, so that no lookup works on one provider and fails on another.
        """
        received_after = _unix_seconds(received_after, "received_after")
        received_before = _unix_seconds(received_before, "received_before")
        if limit is not None and not 1 <= limit <= 200:
            raise ValueError(f"limit must be 1..200, not {limit}")
        if thread_id is not None and (to or from_ or subject):
            raise ValueError("thread_id cannot be combined with to, from or subject (Microsoft refuses it)")
        filters = {
            "in": in_folder,
            "to": to,
            "from": from_,
            "subject": subject,
            "thread_id": thread_id,
            "received_after": received_after,
            "received_before": received_before,
        }
        params = {name: str(value) for name, value in filters.items() if value is not None}
        if metadata_pair is not None:
            if metadata_pair[0] not in _METADATA_KEYS:
                raise ValueError(f"metadata_pair key must be one of key1..key5, not {metadata_pair[0]!r}")
            if params:
                raise ValueError(f"metadata_pair cannot be combined with {', '.join(params)} (§5)")
            params["metadata_pair"] = ":".join(metadata_pair)
        params |= {
            name: str(v) for name, v in (("limit", limit), ("page_token", page_token)) if v is not None
        }
        body = await self._get_json(f"/v3/grants/{_quote_grant(grant_id)}/messages", params)
        messages = tuple(_listed_message(item) for item in _data_list(body, "messages"))
        return MessagePage(messages, json_text(body, "next_cursor") or None)

    async def list_folders(self, grant_id: str) -> list[Folder]:
        """Every folder of the grant (`GET /v3/grants/{id}/folders`, following `next_cursor`)."""
        path = f"/v3/grants/{_quote_grant(grant_id)}/folders"
        folders: list[Folder] = []
        seen: set[str] = set()
        token: str | None = None
        while True:
            body = await self._get_json(path, {} if token is None else {"page_token": token})
            folders.extend(_folder(item) for item in _data_list(body, "folders"))
            token = json_text(body, "next_cursor") or None
            if token is None or token in seen:  # a repeated cursor would loop forever
                return folders
            seen.add(token)

    async def fetch_raw_mime(self, grant_id: str, message_id: str) -> bytes:
        """A message as it arrived (`GET /messages/{id}?fields=raw_mime`, base64url-decoded)."""
        path = f"/v3/grants/{_quote_grant(grant_id)}/messages/{quote(message_id, safe='')}"
        body = await self._get_json(path, {"fields": "raw_mime"})
        data = body.get("data")
        raw = data.get("raw_mime") if isinstance(data, dict) else None
        if not isinstance(raw, str):
            raise ApiError(f"Nylas API GET {path}: the answer has no raw_mime")
        try:
            return base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
        except ValueError as exc:
            raise ApiError(f"Nylas API GET {path}: raw_mime is not base64url") from exc

    async def fetch_headers(self, grant_id: str, message_id: str) -> tuple[tuple[str, str], ...]:
        """A message's headers, (name, value) in order (`GET /messages/{id}?fields=include_headers`)."""
        path = f"/v3/grants/{_quote_grant(grant_id)}/messages/{quote(message_id, safe='')}"
        body = await self._get_json(path, {"fields": "include_headers"})
        data = body.get("data")
        raw = data.get("headers") if isinstance(data, dict) else None
        return tuple(
            (str(item["name"]), str(item.get("value") or ""))
            for item in (raw if isinstance(raw, list) else [])
            if isinstance(item, dict) and isinstance(item.get("name"), str)
        )

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    async def _get_json(self, path: str, params: Mapping[str, str]) -> dict[str, Any]:
        where = f"Nylas API GET {path}"
        try:
            response = await self._http.get(path, params=params, headers=self._base_headers)
        except httpx.RequestError as exc:
            detail = self._scrub(describe_exception(exc))
            hint = "check the network and api.uri, then try again"
            raise ApiUnavailableError(f"{where}: {detail}; {hint}") from exc
        status = response.status_code
        text = self._scrub(answer_text(response))
        body = parse_json_object(text)
        if not 200 <= status < 300:
            error = parse_error_body(status, text, body)
            request_id = find_request_id(body, response) or "none"
            what = self._scrub(
                f"HTTP {status} {error.type or 'unknown'} (request {request_id}): {error.message}"
            )
            if status in (401, 403):
                hint = "check the key in the variable named by api.key_env, or re-authenticate the grant"
                raise ApiAuthError(f"{where} failed: {what}; {hint}")
            if status == 429 or status >= 500:
                retry_at = retry_time(response, error, self._clock)
                raise ApiUnavailableError(f"{where} failed: {what}; try again later", retry_at=retry_at)
            if status == 404:
                raise ApiNotFoundError(f"{where} failed: {what}; check the grant id, or try again later")
            raise ApiError(f"{where} failed: {what}; check the grant id, or try again later")
        if body is None:
            raise ApiError(f"{where}: HTTP {status} but the body is not a JSON object; is api.uri right?")
        return body


def _request_body(request: SendRequest) -> bytes | AsyncIterator[bytes]:
    """The body as is when it is one piece; else streamed, so shared attachment bytes are never joined."""
    if len(request.chunks) == 1:
        return request.chunks[0]

    async def stream() -> AsyncIterator[bytes]:
        for chunk in request.chunks:
            yield chunk

    return stream()


def _quote_grant(grant_id: str) -> str:
    if not grant_id:
        raise ValueError("grant_id must not be empty")
    return quote(grant_id, safe=":@")  # ':' and '@' are legal in a path segment (grant:<id>, email:<addr>)


def _data_list(body: dict[str, Any], what: str) -> list[Any]:
    data = body.get("data")
    if not isinstance(data, list):
        raise ApiError(f"Nylas API listed {what} without a 'data' array; is api.uri the Nylas v3 API?")
    return data


def _listed_message(item: object) -> ListedMessage:
    if not isinstance(item, dict) or not isinstance(item.get("id"), str):
        raise ApiError("Nylas API listed a message without an id; is api.uri the Nylas v3 API?")
    emails, senders = _emails(item.get("to")), _emails(item.get("from"))
    metadata = item.get("metadata")
    pairs = {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}
    date, when = item.get("date"), None
    if isinstance(date, int | float) and not isinstance(date, bool):
        with contextlib.suppress(OverflowError, OSError, ValueError):
            when = datetime.fromtimestamp(date, UTC)
    thread = item.get("thread_id")
    return ListedMessage(
        item["id"],
        json_text(item, "subject"),
        emails,
        when,
        MappingProxyType(pairs),
        senders,
        thread if isinstance(thread, str) and thread else None,
    )


def _emails(participants: object) -> tuple[str, ...]:
    return tuple(
        p["email"]
        for p in (participants if isinstance(participants, list) else [])
        if isinstance(p, dict) and isinstance(p.get("email"), str)
    )


def _folder(item: object) -> Folder:
    if not isinstance(item, dict) or not isinstance(item.get("id"), str):
        raise ApiError("Nylas API listed a folder without an id; is api.uri the Nylas v3 API?")
    # §11.3: the Python SDK types `attributes` as a string, the docs as an array; take both.
    raw = item.get("attributes")
    attributes = tuple(a for a in (raw if isinstance(raw, list) else [raw]) if isinstance(a, str))
    return Folder(item["id"], json_text(item, "name"), attributes)


def _unix_seconds(at: datetime | int | None, name: str) -> int | None:
    """A listing's time bound as Unix seconds (a datetime must be aware)."""
    if not isinstance(at, datetime):
        return at
    if at.tzinfo is None:
        raise ValueError(f"{name} must be timezone-aware")
    return int(at.timestamp())
