"""Response bodies of the fake Nylas API, as `nylas-api.md` §3 and §11 describe them.

An `Answer` is a finished response (status, bytes, headers) that can be cached for
idempotent replay and turned into a starlette `Response`. The builders here are
pure; they hold no state and never decide *when* an error happens.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from campaign.testing.records import FakeConnectionReset, QuotaStyle

__all__ = [
    "BAD_GATEWAY_HTML",
    "Answer",
    "ApiProblem",
    "DroppedConnection",
    "answer_error",
    "answer_html",
    "answer_json",
    "answer_problem",
    "answer_throttled",
    "format_gmail_time",
    "new_request_id",
]

BAD_GATEWAY_HTML = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n</body>\r\n</html>\r\n"
)


@dataclass(frozen=True, slots=True)
class Answer:
    """A complete HTTP answer: what is sent, and what an idempotent replay repeats."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...]

    def build_response(self, *, replayed: bool = False) -> Response:
        """A starlette response for this answer, marked as a replay when `replayed`."""
        headers = dict(self.headers)
        if replayed:
            headers["Idempotent-Response"] = "true"
        media_type = headers.pop("content-type", "application/json")
        return Response(content=self.body, status_code=self.status, headers=headers, media_type=media_type)


class ApiProblem(Exception):
    """A request the fake refuses with a JSON error envelope (raised inside handlers)."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message


def new_request_id() -> str:
    """A fresh request id (UUID4 text)."""
    return str(uuid.uuid4())


def answer_json(status: int, document: dict[str, Any], *, request_id: str, **headers: str) -> Answer:
    """A JSON answer; `request_id` goes first in the body and into `x-request-id`."""
    body = json.dumps({"request_id": request_id, **document}, ensure_ascii=False).encode()
    extra = tuple((name.replace("_", "-"), value) for name, value in headers.items())
    return Answer(status, body, (("content-type", "application/json"), ("x-request-id", request_id), *extra))


def answer_error(
    status: int,
    error_type: str,
    message: str,
    *,
    request_id: str,
    provider_error: dict[str, Any] | None = None,
    retry_after_s: float | None = None,
) -> Answer:
    """The §3.1 error envelope, with `Retry-After` (whole seconds, at least 1) when given."""
    error: dict[str, Any] = {"type": error_type, "message": message}
    if provider_error is not None:
        error["provider_error"] = provider_error
    if retry_after_s is None:
        return answer_json(status, {"error": error}, request_id=request_id)
    seconds = str(max(1, math.ceil(retry_after_s)))
    return answer_json(status, {"error": error}, request_id=request_id, Retry_After=seconds)


def answer_problem(problem: ApiProblem, *, request_id: str) -> Answer:
    """The error envelope for a raised `ApiProblem`."""
    return answer_error(problem.status, problem.error_type, problem.message, request_id=request_id)


def answer_html(status: int, html: str) -> Answer:
    """A non-JSON answer, as a gateway in front of the API would give."""
    return Answer(status, html.encode(), (("content-type", "text/html"),))


def format_gmail_time(moment: datetime) -> str:
    """Gmail's timestamp in "Retry after ..." texts: `2026-01-08T09:26:53.594Z`."""
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def answer_throttled(
    style: QuotaStyle,
    *,
    request_id: str,
    now: datetime,
    wait_s: float,
    retry_after_header: bool = True,
) -> Answer:
    """A provider 429: Google's quota_exceeded_error or Microsoft's rate_limit_error.

    Google names the absolute time the window frees inside `provider_error` (and,
    when `retry_after_header`, also `Retry-After`); Microsoft always sends `Retry-After`.
    """
    wait_s = max(0.0, wait_s)
    if style == "google":
        until = format_gmail_time(now + timedelta(seconds=wait_s))
        provider = {
            "error": {"code": 429, "message": f"User-rate limit exceeded. Retry after {until} (Mail sending)"}
        }
        return answer_error(
            429,
            "quota_exceeded_error",
            "Activity limit reached",
            request_id=request_id,
            provider_error=provider,
            retry_after_s=wait_s if retry_after_header else None,
        )
    provider = {
        "error": {
            "code": "ApplicationThrottled",
            "message": "Application is over its MailboxConcurrency limit.",
        }
    }
    return answer_error(
        429,
        "rate_limit_error",
        "The provider is throttling requests; retry after the Retry-After delay.",
        request_id=request_id,
        provider_error=provider,
        retry_after_s=wait_s,
    )


class DroppedConnection(Response):
    """Starts a response, then raises `FakeConnectionReset` so the client sees a broken connection."""

    def __init__(self) -> None:
        super().__init__(status_code=200, media_type="application/json")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        del scope, receive  # the request is left unanswered on purpose
        headers = [(b"content-type", b"application/json"), (b"content-length", b"4096")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b'{"request_id": "', "more_body": True})
        raise FakeConnectionReset("connection reset by the fake Nylas API (Fault.RESET)")
