"""A fake Nylas v3 API: `FakeNylas` is the in-memory state plus `.app`, a starlette app over it.

It answers the send, list-messages, folders and scheduled-send endpoints the way
`nylas-api.md` §11 describes, including idempotency, rate limits, provider quotas
and scripted faults, so the client can be tested without a network. It is written
from that document only: it must not import the client (campaign.nylas._client) or the
models it sends (campaign.models).

Providers, per grant (`add_grant(..., provider=)`; `campaign sandbox` takes each sender's
`provider` from the manifest, Gmail kinds as "google"):

- "microsoft" refuses a send whose `custom_headers` has a name not starting with `X-`
  (List-Unsubscribe included): 400, Nylas's envelope with type `provider_error` and, under
  `provider_error.error`, Graph's code `InvalidInternetMessageHeader` and its message. Source:
  Microsoft Graph's internetMessageHeaders ("only ... headers that begin with X-") and Nylas's
  notes on custom_headers and List-Unsubscribe (nylas-api.md §1.2, email-standards.md).
- "microsoft" takes 4 sends of a grant at once (Graph's MailboxConcurrency, nylas-api.md §3.4 and
  §10, email-standards.md §3.6); one more is answered 429 `rate_limit_error` with Graph's
  `ApplicationThrottled` "Application is over its MailboxConcurrency limit." and Retry-After, and
  is not sent (`set_mailbox_concurrency` changes the number, None lifts it).
- "microsoft" refuses a listing that combines `thread_id`, `unread` or `starred` with `subject`,
  `to`, `cc`, `bcc` or `any_email`: 400 `invalid_request_error` (nylas-api.md §5; the status is
  the fake's choice).
- Transactional (domain) sends answer with the message id under `data.id` (OpenAPI spec, Python
  SDK), or, per `domain_answer_id`, `message_id` or the Node SDK's `messageId`; any other
  name leaves the answer without an id our reader knows.

With `trial_app` the application is a Sandbox (trial) one, which may not track: a send that turns on
`tracking_options` (opens, links, thread_replies) is answered 400 `invalid_request_error` "Tracking
options are not allowed for trial accounts" and not sent (next-capabilities.md §0.4, from Nylas's
message-tracking page; the status is not documented, 400 is the fake's choice).

Mail that arrives: `receive_message(grant, raw_mime)` puts a message (a reply, a bounce report)
in the grant's inbox as the provider would sync it; it is listed with `in=<inbox id>` and
`GET /messages/{id}?fields=raw_mime` gives its MIME back base64url-encoded (nylas-api.md §5's
`fields`; Nylas's Python SDK's `Fields` literal). With `reply_to=<message id>` it joins that
message's thread, as a human reply or an auto-reply does; a send with `reply_to_message_id` joins
it too (reference/next-capabilities.md §1.3), and its In-Reply-To and References are written from the
message it answers, as Nylas does (§1.2-1.3): In-Reply-To its Message-ID, References its References
then its Message-ID (never the provider id the request named); the recipients' simulated answers
(`reply_share`) name the message they answer the same way. `GET /threads/{id}` gives the thread, its
messages oldest first by date, with its `latest_message_received_date` (incoming) and
`latest_message_sent_date` (§1.4 C). Listings are newest first by each message's `date` (Nylas's
"reverse chronological order"), not by when the fake stored it. A grant send whose
`reply_to_message_id` names no message of the grant (by id, or by Message-ID as IMAP takes it) is
answered 404 `not_found_error` "requested object not found", the envelope an unknown grant gets, and
cached under its Idempotency-Key like any answer. `move_message` files a message: on a Microsoft grant
its id changes (Graph ids do, §1.2) while its thread and Message-ID stay; `delete_message` removes one.

Bounces and webhooks: a message to an address in `bounce_addresses`, or to a share of them
(`bounce_share`, the same ones each time), bounces: a Gmail- or Exchange-style DSN arrives in the
sending grant's inbox and a `message.bounce_detected` notification is queued. `add_webhook`
checks the URL with a challenge, as `POST /v3/webhooks` does; `deliver_webhooks` posts what is
due, signed (hex HMAC-SHA256 of the body), twice each with `duplicate_webhooks`, and retries as Nylas
does (reference/next-capabilities.md §2.4): a try answered 408, 429 or 502-507, or not within 10 s,
is made again 5 and then 10 minutes later on the fake's clock (3 tries in all, each numbered in
`webhook_delivery_attempt`), to every webhook of the trigger type; a webhook whose deliveries keep
failing becomes `failing`, then `failed`, and gets nothing more (`webhook_status`; the rules are in
campaign/testing/webhooks.py).

Checked by a client nobody here wrote: tests/test_sdk_contract.py runs Nylas's Python SDK
(nylas 6.18) against this fake over loopback. What that settled of nylas-api.md's open points,
as far as a client can settle them (a client shows what it sends and what it can parse, never
what the real server answers):

- Multipart layout (§2, §11.2): the SDK's `message` part is a file part with `filename=""` and
  `Content-Type: application/json`; file parts are named by `content_id`, else `file<index>`,
  with the attachment's filename and content type. The fake reads that and the plain-field form.
- Answers (§1.3, §3.5): the SDK needs `request_id` beside `data` in every answer, and an error's
  `error.type` and `error.message` (else it reports type "unknown"); `provider_error` passes
  through as a dict, and the caller gets the headers (`Retry-After`) as they came. Every
  envelope here parses.
- JSON or multipart (§2): 6.18 still picks multipart by the files' raw size (>= 3 MiB), so
  2.25-3 MiB of files go as a JSON body over the 3 MB limit (the fake refuses it with 413, the
  fake's choice); our client picks by the encoded size and sends those as multipart.
- Listing (§5, §11.3): list filters repeat their key (`to=a&to=b`); `metadata_pair` arrives
  percent-encoded (`key1%3Avalue`); `next_cursor` goes back as `page_token`.
- Folders (§11.3): the SDK types `attributes` as a string but documents `["\\Sent"]`; the fake
  keeps the array (the SDK turns it into the list's text, so `"\\Sent" in attributes` still works).
- Transactional answer (§12 question 7): only half. The Python SDK reads the id from `data.id`
  and needs `data.grant_id` (a KeyError without it), so a Node-style `{messageId}` answer would
  break it; the server's real shape stays unknown, hence `domain_answer_id`.
- Idempotency "same payload" (§12 question 8): not settled, but sharpened. The SDK's body differs
  from ours in bytes (separators, escaping) and, in JSON, by `attachments[].size`; the fake
  compares parsed JSON (and multipart parts), under which the SDK's retry of our multipart or
  attachment-free send is a replay, and of our JSON send with attachments a 409.
- Not settled, as no client can: over-size statuses, Retry-After on Nylas's own 429, the exact
  error types, 200 vs 202 for scheduled sends, daily-limit answers, metadata on real grants.
"""

from __future__ import annotations

import base64
import re
import secrets
from dataclasses import dataclass
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from campaign.clock import Clock
from campaign.testing.envelopes import (
    BAD_GATEWAY_HTML,
    Answer,
    ApiProblem,
    DroppedConnection,
    answer_error,
    answer_html,
    answer_json,
    answer_problem,
    answer_throttled,
    new_request_id,
)
from campaign.testing.limits import KeyState
from campaign.testing.payload import (
    BASIC_HEADER_NAMES,
    REJECTED_MESSAGE,
    build_message,
    count_recipients,
    decode_json_attachments,
    fingerprint_payload,
    parse_json_object,
    validate_send_payload,
)
from campaign.testing.records import (
    DeliveredAttachment,
    Fault,
    QuotaStyle,
    RequestRecord,
)
from campaign.testing.state import NOT_FOUND_MESSAGE, FakeState, Grant, ScriptedFault

__all__ = ["FakeNylas"]

IDEMPOTENCY_KEY_MAX = 256
_FILE_PART = re.compile(r"file\d+")
# Gmail's daily quota in the older words Nylas relays it with (nylas-api.md §3.4): a 429 naming no time.
DAILY_LIMIT_MESSAGE = "Error encountered while sending using Gmail API due to Rate Limit Exceeded"
# Nylas's words refusing tracking to a Sandbox (trial) application (next-capabilities.md §0.4).
TRIAL_TRACKING_MESSAGE = "Tracking options are not allowed for trial accounts"
# Graph's Retry-After for a mailbox over its concurrency: a request ends within seconds (the value is ours).
MAILBOX_RETRY_AFTER_S = 1.0
FilePart = tuple[str, DeliveredAttachment]


@dataclass
class _Trace:
    """What the request log needs to know about a send once it is answered (status 0: dropped)."""

    grant_id: str
    status: int = 0
    replayed: bool = False


class FakeNylas(FakeState):
    """The fake API: configure it (add_grant, set_quota, script, …), serve `.app`, inspect `deliveries`."""

    def __init__(self, *, api_key: str = "sandbox-key", clock: Clock | None = None) -> None:
        super().__init__(api_key=api_key, clock=clock)
        grant = "/v3/grants/{grant_id}"
        # Nylas's API (behind its gateway) compresses answers for clients that accept gzip; with
        # `gzip_answers` the fake does too, and `gzip_answered` counts the answers it compressed.
        self.gzip_answers = False
        self.gzip_answered = 0
        self._plain = Starlette(
            routes=[
                Route(f"{grant}/messages/send", self._handle_send, methods=["POST"]),
                # Transactional send through a verified domain (§6): `from` is one object, not a list.
                Route("/v3/domains/{domain}/messages/send", self._handle_send, methods=["POST"]),
                Route(f"{grant}/messages", self._handle_list, methods=["GET"]),
                Route(f"{grant}/folders", self._handle_folders, methods=["GET"]),
                Route(f"{grant}/messages/schedules", self._handle_schedules, methods=["GET"]),
                Route(
                    f"{grant}/messages/schedules/{{schedule_id}}",
                    self._handle_schedule,
                    methods=["GET", "DELETE"],
                ),
                Route(f"{grant}/messages/{{message_id}}", self._handle_message, methods=["GET"]),
                Route(f"{grant}/threads/{{thread_id}}", self._handle_thread, methods=["GET"]),
            ],
            exception_handlers={HTTPException: _answer_http_error},
        )
        self._gzipped = GZipMiddleware(self._plain, minimum_size=0)
        self.app: ASGIApp = self._serve

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.gzip_answers:
            await self._plain(scope, receive, send)
            return

        async def counting(message: Message) -> None:
            if (
                message["type"] == "http.response.start"
                and (b"content-encoding", b"gzip") in message["headers"]
            ):
                self.gzip_answered += 1
            await send(message)

        await self._gzipped(scope, receive, counting)

    # ---- POST /v3/grants/{grant_id}/messages/send ----

    async def _handle_send(self, request: Request) -> Response:
        arrived = self.clock.monotonic()
        key = request.headers.get("idempotency-key")
        trace = _Trace(grant_id=_route_id(request))
        try:
            response = await self._serve_send(request, key, trace)
            if not isinstance(response, DroppedConnection):
                trace.status = response.status_code
            return response
        finally:
            self._record_request(RequestRecord(arrived, trace.grant_id, trace.status, key, trace.replayed))

    async def _serve_send(self, request: Request, key: str | None, trace: _Trace) -> Response:  # noqa: C901 - the send endpoint's gates in the order Nylas applies them
        request_id = new_request_id()
        try:
            grant = self._gate(request)
        except ApiProblem as problem:
            return answer_problem(problem, request_id=request_id).build_response()
        trace.grant_id = grant.id
        multipart = request.headers.get("content-type", "").lower().startswith("multipart/form-data")
        gateway = self._take_fault(grant.id, stage="gateway")
        if gateway is not None and gateway.fault is Fault.RESET:
            await request.body()
            return DroppedConnection()
        if gateway is not None:
            return self._answer_gateway_fault(gateway, request_id).build_response()
        wait = self._admit_send(grant, multipart=multipart)
        if wait is not None:
            return self._answer_rate_limited(request_id, wait).build_response()
        if key is not None and len(key) > IDEMPOTENCY_KEY_MAX:
            message = f"Idempotency-Key must be {IDEMPOTENCY_KEY_MAX} characters or fewer."
            return answer_error(
                400, "api.invalid_idempotency_key", message, request_id=request_id
            ).build_response()
        try:
            payload, files, fingerprint = await self._read_send_body(request, multipart=multipart)
        except ApiProblem as problem:
            return answer_problem(problem, request_id=request_id).build_response()
        if key is None:
            self._begin_unkeyed(grant)
        else:
            state, stored = self._claim_key(grant, key, fingerprint)
            if stored is not None:
                trace.replayed = True
                return stored.build_response(replayed=True)
            if state is not KeyState.FRESH:
                return _answer_key_conflict(state, request_id).build_response()
        fields = request.query_params.get("fields", "")
        try:
            # The server finishes what it started even if the caller gives up (client timeout).
            with anyio.CancelScope(shield=True):
                answer, dropped = await self._process_send(
                    grant, payload, files, key=key, multipart=multipart, fields=fields, request_id=request_id
                )
        except BaseException:
            self._finish(grant, key, None)
            raise
        self._finish(grant, key, answer)
        return DroppedConnection() if dropped else answer.build_response()

    def _gate(self, request: Request) -> Grant:
        """The grant named in the path, after checking the API key (401, then 404)."""
        given = request.headers.get("authorization", "").encode()
        if not secrets.compare_digest(given, f"Bearer {self.api_key}".encode()):
            raise ApiProblem(401, "unauthorized", "Unauthorized")
        grant = self._lookup_grant(_route_id(request))
        # A verified domain is no grant: `/v3/grants/domain:<name>/…` finds nothing (§5, §6).
        if grant is None or (grant.id.startswith("domain:") and "domain" not in request.path_params):
            raise ApiProblem(404, "not_found_error", NOT_FOUND_MESSAGE)
        return grant

    async def _read_send_body(
        self, request: Request, *, multipart: bool
    ) -> tuple[dict[str, Any], list[FilePart], str]:
        body = await request.body()
        limit = self.max_multipart_bytes if multipart else self.max_json_bytes
        # The limits count the whole HTTP request, not its body alone (nylas-api.md §2).
        size = _head_size(request) + len(body)
        if size > limit:
            kind = "multipart" if multipart else "JSON"
            message = f"request is {size} bytes; {kind} sends accept at most {limit}"
            raise ApiProblem(413, "invalid_request_error", message)
        if not multipart:
            payload = parse_json_object(body)
            return _grant_shaped(request, payload), [], fingerprint_payload(payload)
        message_part, files = await _read_form(request, limit=limit)
        payload = parse_json_object(message_part)
        return _grant_shaped(request, payload), files, fingerprint_payload(payload, files)

    async def _process_send(  # noqa: C901 - each fault and answer Nylas documents for a send
        self,
        grant: Grant,
        payload: dict[str, Any],
        files: list[FilePart],
        *,
        key: str | None,
        multipart: bool,
        fields: str,
        request_id: str,
    ) -> tuple[Answer, bool]:
        """Validate, apply quotas and provider faults, deliver; return the answer and whether to drop."""
        slow = self._take_fault(grant.id, stage="delay")
        if self.latency_s > 0:
            await self.clock.sleep(self.latency_s)
        if slow is not None:
            await self.clock.sleep(slow.delay_s)
        try:
            validate_send_payload(payload, now=self.clock.now())
            attachments = decode_json_attachments(payload) + tuple(part for _, part in files)
        except ApiProblem as problem:
            return answer_problem(problem, request_id=request_id), False
        if self.trial_app and _asks_tracking(payload):
            message = TRIAL_TRACKING_MESSAGE
            return answer_error(400, "invalid_request_error", message, request_id=request_id), False
        refused_header = _graph_refused_header(grant, payload)
        if refused_header is not None:
            return _answer_graph_header_refusal(refused_header, request_id), False
        try:
            self._check_reply_target(grant, payload)
        except ApiProblem as problem:
            return answer_problem(problem, request_id=request_id), False
        if payload.get("send_at") is not None:
            return self._accept_scheduled(grant, payload, attachments, request_id), False
        if self._over_mailbox_concurrency(grant):
            # Graph refuses a mailbox's 5th request at once (nylas-api.md §3.4, SUP-MSFT): 429
            # ApplicationThrottled "over its MailboxConcurrency limit", with Retry-After; nothing sent.
            throttled = answer_throttled(
                "microsoft", request_id=request_id, now=self.clock.now(), wait_s=MAILBOX_RETRY_AFTER_S
            )
            return throttled, False
        refusal = self._throttle_wait(grant, count_recipients(payload))
        if refusal is not None:
            style, wait = refusal
            now = self.clock.now()
            throttled = answer_throttled(
                style, request_id=request_id, now=now, wait_s=wait, retry_after_header=self.quota_retry_after
            )
            return throttled, False
        fault = self._take_fault(grant.id, stage="provider")
        if fault is not None and fault.fault not in (Fault.TIMEOUT_AFTER_SEND, Fault.RESET_AFTER_SEND):
            return self._answer_provider_fault(fault, request_id), False
        data, headers = self._deliver(grant, payload, attachments, key=key, multipart=multipart)
        if fault is not None and fault.fault is Fault.TIMEOUT_AFTER_SEND:
            return answer_error(
                504, "provider_error", "Provider request timed out.", request_id=request_id
            ), False
        if fields == "include_headers":
            data["headers"] = headers
        elif fields == "include_basic_headers":
            data["headers"] = [h for h in headers if h["name"].lower() in BASIC_HEADER_NAMES]
        if grant.id.startswith("domain:") and self.domain_answer_id != "id":
            # Nylas's Node SDK types a transactional send's answer as {messageId}; the OpenAPI spec
            # and the Python SDK say `id`. Tests switch the shape to hold the client to both.
            data = {self.domain_answer_id: data["id"], **{k: v for k, v in data.items() if k != "id"}}
        answer = answer_json(200, {"grant_id": grant.id, "data": data}, request_id=request_id)
        return answer, fault is not None

    def _accept_scheduled(
        self,
        grant: Grant,
        payload: dict[str, Any],
        attachments: tuple[DeliveredAttachment, ...],
        request_id: str,
    ) -> Answer:
        """202 for a send with `send_at`: remembered as a schedule, not delivered."""
        schedule_id = new_request_id()
        data = build_message(
            payload,
            message_id=schedule_id,
            grant_id=grant.id,
            grant_email=grant.email,
            folder_id=grant.sent_folder_id,
            date=self.clock.now(),
            attachments=attachments,
        )
        data.update(schedule_id=schedule_id, send_at=payload["send_at"], folders=[])
        self._add_schedule(grant, schedule_id, payload["send_at"])
        return answer_json(202, {"grant_id": grant.id, "data": data}, request_id=request_id)

    def _answer_gateway_fault(self, scripted: ScriptedFault, request_id: str) -> Answer:
        if scripted.fault is Fault.UNAUTHORIZED:
            return answer_error(401, "unauthorized", "Unauthorized", request_id=request_id)
        if scripted.fault is Fault.BAD_GATEWAY:
            return answer_html(502, BAD_GATEWAY_HTML)
        return self._answer_rate_limited(request_id, scripted.retry_after_s)

    def _answer_rate_limited(self, request_id: str, wait_s: float) -> Answer:
        """Nylas' own 429 (no provider_error); Retry-After only when `nylas_retry_after` is on."""
        return answer_error(
            429,
            "nylas_rate_limit_exceeded",
            "Too many requests, please try again shortly.",
            request_id=request_id,
            retry_after_s=wait_s if self.nylas_retry_after else None,
        )

    def _answer_provider_fault(self, scripted: ScriptedFault, request_id: str) -> Answer:
        fault = scripted.fault
        if fault in (Fault.PROVIDER_THROTTLE, Fault.QUOTA_EXCEEDED):
            style: QuotaStyle = "microsoft" if fault is Fault.PROVIDER_THROTTLE else "google"
            return answer_throttled(
                style,
                request_id=request_id,
                now=self.clock.now(),
                wait_s=scripted.retry_after_s,
                retry_after_header=self.quota_retry_after,
            )
        simple = {
            Fault.DAILY_LIMIT: (429, "rate_limit_error", DAILY_LIMIT_MESSAGE),
            Fault.FORBIDDEN: (403, "insufficient_scopes", "missing provider scopes required to send email"),
            Fault.REJECTED: (402, "message_rejected", REJECTED_MESSAGE),
            Fault.INTERNAL_ERROR: (500, "api.internal_error", "Internal server error."),
            Fault.UNAVAILABLE: (503, "api.service_unavailable", "Error while connected to the provider."),
        }
        status, error_type, message = simple[fault]
        return answer_error(status, error_type, message, request_id=request_id)

    # ---- reading endpoints ----

    async def _handle_list(self, request: Request) -> Response:
        request_id = new_request_id()
        try:
            grant = self._gate(request)
            if self._take_read_failure(grant):
                raise ApiProblem(503, "service_unavailable", "The provider is unavailable; try again later.")
            wait = self._admit_read(grant)
            if wait is not None:
                return self._answer_rate_limited(request_id, wait).build_response()
            query: dict[str, list[str]] = {}
            for name, value in request.query_params.multi_items():
                query.setdefault(name, []).append(value)
            data, cursor = self._list_messages(grant, query)
        except ApiProblem as problem:
            return answer_problem(problem, request_id=request_id).build_response()
        document: dict[str, Any] = {"data": data}
        if cursor is not None:
            document["next_cursor"] = cursor
        return answer_json(200, document, request_id=request_id).build_response()

    async def _handle_message(self, request: Request) -> Response:
        """`GET /messages/{id}`: the message object; with `fields=raw_mime`, its MIME (base64url); with
        `fields=include_headers`, its headers too."""
        request_id = new_request_id()
        try:
            grant = self._gate(request)
            if self._take_read_failure(grant):
                raise ApiProblem(503, "service_unavailable", "The provider is unavailable; try again later.")
            wait = self._admit_read(grant)
            if wait is not None:
                return self._answer_rate_limited(request_id, wait).build_response()
            message_id = request.path_params["message_id"]
            found = next((m for m in grant.messages if m.data["id"] == message_id), None)
            if found is None:
                raise ApiProblem(404, "not_found_error", f"message {message_id} not found")
        except ApiProblem as problem:
            return answer_problem(problem, request_id=request_id).build_response()
        data = dict(found.data)
        fields = request.query_params.get("fields")
        if fields == "raw_mime":
            raw = grant.raw_mime.get(message_id, b"")
            data = {"id": message_id, "grant_id": grant.id, "object": "message"}
            data["raw_mime"] = base64.urlsafe_b64encode(raw).decode().rstrip("=")
        elif fields == "include_headers":
            data["headers"] = [dict(header) for header in found.headers]
        return answer_json(200, {"data": data}, request_id=request_id).build_response()

    async def _handle_thread(self, request: Request) -> Response:
        """`GET /threads/{id}`: the thread's messages, participants and latest incoming/sent dates."""
        request_id = new_request_id()
        try:
            grant = self._gate(request)
            found = self.thread(grant.id, request.path_params["thread_id"])
            if found is None:
                raise ApiProblem(404, "not_found_error", "thread not found")
        except ApiProblem as problem:
            return answer_problem(problem, request_id=request_id).build_response()
        return answer_json(200, {"data": found}, request_id=request_id).build_response()

    async def _handle_folders(self, request: Request) -> Response:
        request_id = new_request_id()
        try:
            grant = self._gate(request)
        except ApiProblem as problem:
            return answer_problem(problem, request_id=request_id).build_response()
        return answer_json(200, {"data": list(grant.folders)}, request_id=request_id).build_response()

    async def _handle_schedules(self, request: Request) -> Response:
        request_id = new_request_id()
        try:
            grant = self._gate(request)
            data = [
                {"schedule_id": sid, "status": self._schedule_status(grant, sid)}
                for sid in self._schedule_ids(grant)
            ]
        except ApiProblem as problem:
            return answer_problem(problem, request_id=request_id).build_response()
        return answer_json(200, {"data": data}, request_id=request_id).build_response()

    async def _handle_schedule(self, request: Request) -> Response:
        request_id = new_request_id()
        schedule_id = request.path_params["schedule_id"]
        cancel = request.method == "DELETE"
        try:
            grant = self._gate(request)
            status = self._schedule_status(grant, schedule_id, cancel=cancel)
        except ApiProblem as problem:
            return answer_problem(problem, request_id=request_id).build_response()
        if cancel:
            data = {"message": "requested cancelation for workflow"}
            return answer_json(202, {"data": data}, request_id=request_id).build_response()
        return answer_json(
            200, {"data": {"schedule_id": schedule_id, "status": status}}, request_id=request_id
        ).build_response()


def _route_id(request: Request) -> str:
    """The grant the request is for; a domain send is served by the pseudo-grant `domain:<name>`."""
    params = request.path_params
    return f"domain:{params['domain']}" if "domain" in params else str(params["grant_id"])


def _head_size(request: Request) -> int:
    """Bytes of the request line and headers as HTTP/1.1 writes them (`Name: value` CRLF, a blank line)."""
    target = request.scope.get("raw_path", b"") or request.url.path.encode()
    query = request.scope.get("query_string", b"")
    line = len(request.method) + 1 + len(target) + (len(query) + 1 if query else 0) + len(" HTTP/1.1\r\n")
    fields: list[tuple[bytes, bytes]] = request.scope.get("headers", [])
    return line + sum(len(name) + len(value) + 4 for name, value in fields) + 2


def _grant_shaped(request: Request, payload: dict[str, Any]) -> dict[str, Any]:
    """A domain send's body in the grant form: its required single `from` object becomes a list (§6)."""
    if "domain" not in request.path_params:
        return payload
    sender = payload.get("from")
    if not isinstance(sender, dict) or not isinstance(sender.get("email"), str):
        raise ApiProblem(400, "invalid_request_error", "`from` must be an object with an `email`")
    return {**payload, "from": [sender]}


async def _read_form(request: Request, *, limit: int) -> tuple[str | bytes, list[FilePart]]:
    """The `message` part (plain field, or file part with an empty filename) and the attachment parts."""
    message: str | bytes | None = None
    files: list[FilePart] = []
    unparseable = ApiProblem(400, "invalid_request_error", "error parsing request body")
    try:
        async with request.form(max_part_size=limit) as form:
            for name, value in form.multi_items():
                if isinstance(value, str):
                    if name != "message" or message is not None:
                        raise unparseable
                    message = value
                    continue
                content = await value.read()
                if name == "message" and not value.filename and message is None:
                    message = content
                    continue
                content_type = value.content_type or "application/octet-stream"
                content_id = None if _FILE_PART.fullmatch(name) else name
                files.append(
                    (name, DeliveredAttachment(value.filename or name, content_type, content, content_id))
                )
    except (HTTPException, MultiPartException) as exc:
        raise unparseable from exc
    if message is None:
        raise ApiProblem(400, "invalid_request_error", "multipart body has no 'message' part")
    return message, files


def _answer_key_conflict(state: KeyState, request_id: str) -> Answer:
    if state is KeyState.IN_PROGRESS:
        message = "A request with the same Idempotency-Key is currently in progress. Retry in a few seconds."
        return answer_error(409, "api.concurrent_idempotent_request", message, request_id=request_id)
    message = (
        "The Idempotency-Key was reused with a different request payload. Use a new key for a new request."
    )
    return answer_error(409, "api.invalid_idempotent_request", message, request_id=request_id)


async def _answer_http_error(request: Request, exc: Exception) -> Response:
    """Unknown paths and methods answer with the API's JSON envelope, not starlette's text."""
    del request
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    if status == 404:
        return answer_error(
            404, "not_found_error", NOT_FOUND_MESSAGE, request_id=new_request_id()
        ).build_response()
    detail = exc.detail if isinstance(exc, HTTPException) else "Internal server error."
    return answer_error(status, "invalid_request_error", detail, request_id=new_request_id()).build_response()


def _asks_tracking(payload: dict[str, Any]) -> bool:
    """Whether a send turns any tracking on (opens, links or thread replies)."""
    options = payload.get("tracking_options") or {}
    return any(options.get(flag) is True for flag in ("opens", "links", "thread_replies"))


def _graph_refused_header(grant: Grant, payload: dict[str, Any]) -> str | None:
    """The first custom header a Microsoft grant refuses: Graph takes only names that start with X-.

    Source: Microsoft Graph's internetMessageHeaders ("only ... headers that begin with X-"), and
    Nylas's custom_headers notes (nylas-api.md §1.2).
    """
    if grant.provider != "microsoft":
        return None
    for header in payload.get("custom_headers") or ():
        name = str(header.get("name", "")) if isinstance(header, dict) else ""
        if not name.lower().startswith("x-"):
            return name
    return None


def _answer_graph_header_refusal(name: str, request_id: str) -> Answer:
    """400 as Nylas relays Graph's InvalidInternetMessageHeader: a provider_error under the envelope."""
    return answer_error(
        400,
        "provider_error",
        "The provider rejected the request.",
        request_id=request_id,
        provider_error={
            "error": {
                "code": "InvalidInternetMessageHeader",
                "message": f"The internet message header name '{name}' should start with 'x-' or 'X-'.",
            }
        },
    )
