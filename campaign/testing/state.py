"""The in-memory state behind the fake Nylas API, and the test-facing controls on it.

`FakeState` holds grants, scripted faults, rate windows, quotas, idempotency caches,
stored messages and the delivery / request logs. Every method takes the lock and
never awaits, so handlers running in uvicorn's thread and a test in the main thread
can share it. It builds answers but knows nothing of HTTP requests (see fake_nylas.py).
"""

from __future__ import annotations

import copy
import email.policy
import hashlib
import json
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.parser import BytesParser
from email.utils import getaddresses
from pathlib import Path
from typing import Any

import httpx

from campaign.clock import Clock, SystemClock
from campaign.outputfiles import make_private_dir, write_private_text
from campaign.testing.answers import build_answer
from campaign.testing.bounces import DsnStyle, build_bounce_object, build_dsn
from campaign.testing.envelopes import Answer, ApiProblem
from campaign.testing.limits import IdempotencyCache, KeyState, Quota, QuotaLog, SlidingWindow
from campaign.testing.listing import StoredMessage, select_messages
from campaign.testing.payload import (
    build_message,
    build_message_headers,
    build_reply_headers,
    count_recipients,
    new_opaque_id,
)
from campaign.testing.records import DeliveredAttachment, Delivery, Fault, QuotaStyle, RequestRecord
from campaign.testing.webhooks import (
    DELIVERY_TIMEOUT_S,
    PendingNotification,
    Webhook,
    WebhookStatus,
    post_notification,
)

__all__ = ["NOT_FOUND_MESSAGE", "FakeState", "Grant", "ScriptedFault"]

JSON_SENDS_PER_SECOND = 200
NOT_FOUND_MESSAGE = "requested object not found"  # the OpenAPI example's text for any 404 (§3.3)
MULTIPART_SENDS_PER_SECOND = 10
MESSAGE_READS_PER_SECOND = 200
# Graph's per-app-per-mailbox concurrency (nylas-api.md §3.4, §10; email-standards.md §3.6): 4 requests
# at once. One Nylas send is several Graph calls made one after another, so it holds one of them.
GRAPH_MAILBOX_CONCURRENCY = 4
_UNSAFE_FILENAME = re.compile(r"[^A-Za-z0-9@._+-]")
_OUTBOX_NUMBER = re.compile(r"(\d{4,})-")

# Nylas sends through these by IMAP/SMTP: a message is known to them by its Message-ID header.
_IMAP_PROVIDERS = frozenset({"imap", "yahoo", "icloud"})
# An RFC 5322 msg-id as `reply_to_message_id` may name one: `<left@right>`.
_MESSAGE_ID = re.compile(r"<[^<>@\s]+@[^<>@\s]+>")


@dataclass
class ScriptedFault:
    """A fault waiting for its next `remaining` send requests."""

    fault: Fault
    grant_id: str | None
    remaining: int
    delay_s: float
    retry_after_s: float


@dataclass
class Grant:
    """One connected mailbox and everything the fake counts for it."""

    id: str
    email: str
    provider: str
    folders: tuple[dict[str, Any], ...]
    json_sends: SlidingWindow = field(default_factory=lambda: SlidingWindow(JSON_SENDS_PER_SECOND))
    multipart_sends: SlidingWindow = field(default_factory=lambda: SlidingWindow(MULTIPART_SENDS_PER_SECOND))
    reads: SlidingWindow = field(default_factory=lambda: SlidingWindow(MESSAGE_READS_PER_SECOND))
    quota: Quota | None = None
    quota_log: QuotaLog = field(default_factory=QuotaLog)
    throttled_until: datetime | None = None
    throttle_style: QuotaStyle = "microsoft"
    keys: IdempotencyCache = field(default_factory=IdempotencyCache)
    messages: list[StoredMessage] = field(default_factory=list)
    # Real mailboxes list a sent message (Sent folder, metadata index) seconds to minutes after the
    # send; Microsoft grants' `to` filter sometimes finds nothing (set_listing_quirks).
    listing_lag_s: float = 0.0
    to_filter_broken: bool = False
    schedules: dict[str, tuple[int, bool]] = field(default_factory=dict)  # id -> (send_at, cancelled)
    raw_mime: dict[str, bytes] = field(default_factory=dict)  # message id -> the MIME it arrived as
    # Sends being processed for this grant now, and the most there ever were at once: a client that
    # keeps to a sender's concurrency never has more in flight on its grant, however many processes send.
    in_flight: int = 0
    most_in_flight: int = 0
    reads_refused: int = 0  # reads answered 429 by the read limit
    # Sends a Microsoft mailbox takes at once before Graph answers the next 429 MailboxConcurrency
    # (None: no such limit, as for other providers).
    mailbox_concurrency: int | None = None

    @property
    def inbox_folder_id(self) -> str:
        """The id of the folder with the `\\Inbox` attribute."""
        return next(str(f["id"]) for f in self.folders if "\\Inbox" in f["attributes"])

    @property
    def sent_folder_id(self) -> str:
        """The id of the folder with the \\Sent attribute."""
        return str(self.folders[1]["id"])


def _build_folders(grant_id: str, provider: str) -> tuple[dict[str, Any], ...]:
    # Google folder ids are Gmail label ids; other providers use opaque ids.
    if provider == "google":
        names = (("INBOX", "INBOX", "\\Inbox"), ("SENT", "SENT", "\\Sent"), ("DRAFT", "DRAFT", "\\Drafts"))
    else:
        digest = hashlib.sha256(grant_id.encode()).hexdigest()
        names = (
            (f"inbox-{digest[:12]}", "Inbox", "\\Inbox"),
            (f"sent-{digest[12:24]}", "Sent Items", "\\Sent"),
            (f"drafts-{digest[24:36]}", "Drafts", "\\Drafts"),
        )
    return tuple(
        {
            "id": fid,
            "grant_id": grant_id,
            "name": name,
            "object": "folder",
            "attributes": [attr],
            "system_folder": True,
        }
        for fid, name, attr in names
    )


class FakeState:
    """Grants, faults, limits and logs of a fake Nylas API, safe to use from two threads."""

    def __init__(self, *, api_key: str = "sandbox-key", clock: Clock | None = None) -> None:
        self.api_key = api_key
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.latency_s = 0.0  # added to every send, on the clock
        self.nylas_retry_after = False  # Retry-After on Nylas' own 429 (undocumented; off by default)
        self.quota_retry_after = True  # Retry-After besides Google's "Retry after <ISO>" text
        # The key of a transactional (domain) send answer's message id: "id" (OpenAPI spec, Python SDK),
        # "message_id" or "messageId" (the Node SDK's type).
        self.domain_answer_id = "id"
        # A Sandbox (trial) Nylas application: a send asking for tracking is refused (next-capabilities.md
        # §0.4; the status is not given, 400 is the fake's choice).
        self.trial_app = False
        self.max_json_bytes = 3_000_000
        self.max_multipart_bytes = 25_000_000
        self.idempotency_ttl_s = 3600.0
        # A grant send whose `reply_to_message_id` names no message of the grant is answered 404. Off:
        # it goes out in a thread of its own, as for a mailbox the fake holds only part of (the
        # sandbox's start empty each run, without the messages earlier runs sent).
        self.check_reply_to = True
        # Bounces: a message to an address in `bounce_addresses`, or to one the share picks (by a hash of
        # the address, so the same recipients bounce every time), is delivered, then bounced: a DSN
        # arrives in the sending grant's inbox and a `message.bounce_detected` notification is queued.
        self.bounce_addresses: set[str] = set()
        self.bounce_share = 0.0
        self.dsn_style: DsnStyle = "gmail"
        # Answers (the sandbox's simulated recipients): a share of the messages a grant sends gets a
        # reply in its thread, another share an out-of-office auto-reply, `reply_lag_s` later; picked
        # by a hash of the address and the thread's length, so the same campaign answers alike.
        self._read_failures: dict[str, int] = {}  # grant id -> reads left to fail (`fail_reads`)
        self.reply_share = 0.0
        self.auto_reply_share = 0.0
        self.reply_lag_s = 1.0
        # Webhooks (`add_webhook`): notifications wait here until `deliver_webhooks` sends them.
        self._webhooks: list[Webhook] = []
        self._outbox: list[tuple[str, dict[str, Any]]] = []  # (trigger type, envelope): first tries
        self._retries: list[PendingNotification] = []  # tries after a failed one, each due at its time
        self.duplicate_webhooks = False  # deliver every notification twice, as Nylas may
        self._lock = threading.Lock()
        self._grants: dict[str, Grant] = {}
        self._domain_keys = IdempotencyCache()  # transactional sends' keys: one cache per application
        self._scripts: list[ScriptedFault] = []
        self._deliveries: list[Delivery] = []
        self._requests: list[RequestRecord] = []
        self._in_flight = 0
        self._seq = 0

    # ---- configuration (tests, sandbox) ----

    def add_grant(self, grant_id: str, email: str, *, provider: str = "google") -> None:
        """Connect a mailbox: sends to `grant_id` (or its email) are accepted from now on."""
        with self._lock:
            grant = Grant(grant_id, email, provider, _build_folders(grant_id, provider))
            if provider == "microsoft":
                grant.mailbox_concurrency = GRAPH_MAILBOX_CONCURRENCY
            self._grants[grant_id] = grant

    def remove_grant(self, grant_id: str) -> None:
        """A test control: the grant is deleted (its owner disconnected it): every request naming it is
        answered 404 `not_found_error` from now on, sends and reads alike (§11.1)."""
        with self._lock:
            del self._grants[self._require_grant(grant_id).id]

    def set_listing_quirks(
        self, grant_id: str, *, lag_s: float = 0.0, to_filter_broken: bool = False
    ) -> None:
        """Make `GET /messages` of a grant behave as real providers do.

        `lag_s`: a sent message is listed (by any filter, metadata included) only `lag_s` seconds
        after its send, on the fake's clock: Gmail's and Exchange's Sent folders and Nylas's
        metadata index show a message some time after it went out. `to_filter_broken`: the `to`
        filter finds nothing, as the Nylas OpenAPI spec warns for Microsoft grants (it suggests
        `thread_id` instead). Sources: nylas-api.md §5 and §11.3 (open questions).
        """
        with self._lock:
            grant = self._grants[grant_id]
            grant.listing_lag_s, grant.to_filter_broken = lag_s, to_filter_broken

    def add_domain(self, domain: str) -> None:
        """Verify a domain for transactional sends (POST /v3/domains/{domain}/messages/send).

        It is served as the pseudo-grant `domain:<domain>`: faults, quotas and deliveries name it so.
        Its Idempotency-Keys are the application's, shared by every domain (nylas-api.md §4, §6: a key
        used through one domain collides through another), and no grant path reaches it: a
        transactional send is archived in no mailbox (§5), so it cannot be listed or read back.
        """
        grant_id = f"domain:{domain}"
        self.add_grant(grant_id, f"no-reply@{domain}", provider="nylas")
        with self._lock:
            self._grants[grant_id].keys = self._domain_keys

    def set_quota(
        self,
        grant_id: str,
        *,
        recipients_per_day: int | None = None,
        messages_per_minute: int | None = None,
        style: QuotaStyle = "google",
    ) -> None:
        """Simulate a provider quota on rolling windows (24 h recipients, 1 min messages); None lifts it."""
        for limit in (recipients_per_day, messages_per_minute):
            if limit is not None and limit < 1:
                raise ValueError("quota limits must be at least 1")
        with self._lock:
            grant = self._require_grant(grant_id)
            unset = recipients_per_day is None and messages_per_minute is None
            grant.quota = None if unset else Quota(recipients_per_day, messages_per_minute, style)

    def set_mailbox_concurrency(self, grant_id: str, limit: int | None) -> None:
        """A test control: the grant's sends past `limit` at once are answered Graph's 429 MailboxConcurrency
        (a Microsoft grant starts at Graph's 4; None lifts the limit)."""
        if limit is not None and limit < 1:
            raise ValueError("a mailbox concurrency must be at least 1")
        with self._lock:
            self._require_grant(grant_id).mailbox_concurrency = limit

    def throttle_account(
        self, grant_id: str, *, until: datetime | None, style: QuotaStyle = "microsoft"
    ) -> None:
        """Answer every send to the grant with a provider 429 until `until` (None ends it)."""
        with self._lock:
            grant = self._require_grant(grant_id)
            grant.throttled_until = until
            grant.throttle_style = style

    def script(
        self,
        fault: Fault,
        *,
        grant_id: str | None = None,
        times: int = 1,
        delay_s: float = 0.0,
        retry_after_s: float = 2.0,
    ) -> None:
        """Give the next `times` send requests (to `grant_id`, or any) this fault.

        `delay_s` is the wait of Fault.SLOW; `retry_after_s` is the wait that the
        throttling faults announce. A request takes at most one gateway fault, one
        SLOW and one provider fault, in the order they were scripted.
        """
        if times < 1:
            raise ValueError("times must be at least 1")
        with self._lock:
            if grant_id is not None:
                grant_id = self._require_grant(grant_id).id
            self._scripts.append(ScriptedFault(fault, grant_id, times, delay_s, retry_after_s))

    def receive_message(
        self, grant_id: str, raw: bytes, *, received_at: datetime | None = None, reply_to: str | None = None
    ) -> str:
        """A test control: a message arrives in the grant's inbox (a reply, an auto-reply, a bounce
        report), as the provider would sync it; returns its id. With `reply_to` (a message id) it
        joins that message's thread, as a human reply does. `GET /messages/{id}?fields=raw_mime`
        gives `raw` back, base64url-encoded; `fields=include_headers` lists its headers."""
        grant = self._require_grant(grant_id)
        parsed = BytesParser(policy=email.policy.default).parsebytes(raw)
        message_id = new_opaque_id()
        when = received_at or self.clock.now()
        data = {
            "id": message_id,
            "grant_id": grant.id,
            "object": "message",
            "thread_id": new_opaque_id(),
            "subject": str(parsed.get("Subject", "")),
            "body": "",
            "snippet": "",
            "from": _participants(parsed.get("From")),
            "to": _participants(parsed.get("To")),
            "cc": [],
            "bcc": [],
            "reply_to": [],
            "date": int(when.timestamp()),
            "folders": [grant.inbox_folder_id],
            "attachments": [],
            "starred": False,
            "unread": True,
            "metadata": {},
        }
        headers = tuple({"name": str(name), "value": str(value)} for name, value in parsed.items())
        with self._lock:
            if reply_to is not None and (thread := self._thread_of(grant, reply_to)) is not None:
                data["thread_id"] = thread
            self._seq += 1
            grant.messages.append(StoredMessage(self._seq, data, headers))
            grant.raw_mime[message_id] = raw
        if reply_to is not None:
            self._queue_reply(
                grant, reply_to, message_id, from_self=grant.email.lower() in str(parsed["From"]).lower()
            )
        return message_id

    def _queue_reply(self, grant: Grant, original_id: str, reply_id: str, *, from_self: bool) -> None:
        """`thread.replied` for a reply in the thread of a message sent with `thread_replies` tracking."""
        with self._lock:
            found = next((m.data for m in grant.messages if m.data["id"] == original_id), None)
        tracking = (found or {}).get("tracking_options") or {}
        if found is None or not tracking.get("thread_replies"):
            return
        obj = {
            "object": "thread",
            "grant_id": grant.id,
            "message_id": reply_id,
            "root_message_id": original_id,
            "label": tracking.get("label", ""),
            "reply_data": {"count": 1},
            "thread_id": found["thread_id"],
            "timestamp": int(self.clock.now().timestamp()),
            "from_self": from_self,
        }
        self.queue_notification("thread.replied", grant.id, obj)

    def move_message(self, grant_id: str, message_id: str, *, folder: str = "Archive") -> str:
        """A test control: the mailbox's owner files message `message_id` into `folder`; returns its id now.

        On a Microsoft grant the message gets a new id, as a Graph id changes when a message moves
        between folders unless immutable ids are asked for (reference/next-capabilities.md §1.2); it
        keeps its thread and its Message-ID header. Other providers keep the id (a Gmail label)."""
        grant = self._require_grant(grant_id)
        with self._lock:
            index = next((i for i, m in enumerate(grant.messages) if m.data["id"] == message_id), None)
            if index is None:
                raise KeyError(f"grant {grant_id} has no message {message_id}")
            stored = grant.messages[index]
            data = {**stored.data, "folders": [folder]}
            if grant.provider == "microsoft":
                data["id"] = new_opaque_id()
                if message_id in grant.raw_mime:
                    grant.raw_mime[data["id"]] = grant.raw_mime.pop(message_id)
            grant.messages[index] = StoredMessage(stored.seq, data, stored.headers)
            return str(data["id"])

    def delete_message(self, grant_id: str, message_id: str) -> None:
        """A test control: the mailbox's owner deletes message `message_id` for good (emptied trash)."""
        grant = self._require_grant(grant_id)
        with self._lock:
            kept = [m for m in grant.messages if m.data["id"] != message_id]
            if len(kept) == len(grant.messages):
                raise KeyError(f"grant {grant_id} has no message {message_id}")
            grant.messages = kept
            grant.raw_mime.pop(message_id, None)

    def _sent_message(self, grant_id: str, message_id: str) -> dict[str, Any]:
        grant = self._require_grant(grant_id)
        with self._lock:
            found = next((m.data for m in grant.messages if m.data["id"] == message_id), None)
        if found is None:
            raise KeyError(f"grant {grant_id} sent no message {message_id}")
        return found

    def open_message(self, grant_id: str, message_id: str) -> str:
        """A test control: the recipient opened a sent message; queues `message.opened` (if tracked)."""
        message = self._sent_message(grant_id, message_id)
        now = int(self.clock.now().timestamp())
        obj = {
            "message_id": message_id,
            "label": message["tracking_options"].get("label", ""),
            "message_data": {"count": 1, "timestamp": now},
            "recents": [{"opened_id": 0, "ip": "192.0.2.7", "user_agent": "Mozilla/5.0", "timestamp": now}],
            "timestamp": now,
        }
        return (
            self.queue_notification("message.opened", grant_id, obj)
            if message["tracking_options"]["opens"]
            else ""
        )

    def click_link(self, grant_id: str, message_id: str, url: str) -> str:
        """A test control: the recipient clicked `url`; queues `message.link_clicked` (if tracked)."""
        message = self._sent_message(grant_id, message_id)
        now = int(self.clock.now().timestamp())
        obj = {
            "message_id": message_id,
            "label": message["tracking_options"].get("label", ""),
            "link_data": [{"url": url, "count": 1}],
            "recents": [{"click_id": "0", "ip": "192.0.2.7", "link_index": "0", "timestamp": now}],
            "timestamp": now,
        }
        return (
            self.queue_notification("message.link_clicked", grant_id, obj)
            if message["tracking_options"]["links"]
            else ""
        )

    def thread(self, grant_id: str, thread_id: str) -> dict[str, Any] | None:
        """`GET /threads/{id}` as the Threads API answers it (None: no such thread in the grant)."""
        grant = self._require_grant(grant_id)
        with self._lock:
            # Oldest first by date (then arrival), as a conversation reads: a message synced late still
            # stands where its date puts it, and the latest is the one dated last.
            stored = sorted(
                (m for m in grant.messages if m.data["thread_id"] == thread_id),
                key=lambda m: (m.data["date"], m.seq),
            )
            found = [m.data for m in stored]
        if not found:
            return None
        incoming = [m["date"] for m in found if grant.sent_folder_id not in m["folders"]]
        sent = [m["date"] for m in found if grant.sent_folder_id in m["folders"]]
        people = {p["email"].lower(): p for m in found for f in ("from", "to", "cc") for p in m[f]}
        latest = found[-1]
        return {
            "id": thread_id,
            "grant_id": grant.id,
            "object": "thread",
            "subject": found[0]["subject"],
            "message_ids": [m["id"] for m in found],
            "draft_ids": [],
            "has_drafts": False,
            "has_attachments": any(m["attachments"] for m in found),
            "starred": any(m["starred"] for m in found),
            "unread": any(m["unread"] for m in found),
            "folders": sorted({folder for m in found for folder in m["folders"]}),
            "snippet": latest["snippet"],
            "latest_draft_or_message": copy.deepcopy(latest),
            "participants": list(people.values()),
            "earliest_message_date": min(m["date"] for m in found),
            "latest_message_received_date": max(incoming) if incoming else None,
            "latest_message_sent_date": max(sent) if sent else None,
        }

    def _thread_of(self, grant: Grant, message_id: str) -> str | None:
        """The thread of the grant's message with id `message_id`, whatever the provider (a message that
        arrives answering it joins it; an IMAP grant's too) (call with the lock held)."""
        found = next((m for m in grant.messages if m.data["id"] == message_id), None)
        return None if found is None else str(found.data["thread_id"])

    def _message_named(self, grant: Grant, message_id: str) -> StoredMessage | None:
        """The grant's message a `reply_to_message_id` names: its id (Gmail, Graph) or, on an IMAP grant
        (Yahoo and iCloud are IMAP too), its Message-ID header, the only name IMAP knows it by
        (nylas-api.md §1.2) (call with the lock held)."""
        if not message_id:
            return None
        by_id = grant.provider not in _IMAP_PROVIDERS
        found = next((m for m in grant.messages if by_id and m.data["id"] == message_id), None)
        if found is not None or not message_id.startswith("<"):
            return found
        return next(
            (
                m
                for m in grant.messages
                if any(h["name"].lower() == "message-id" and h["value"] == message_id for h in m.headers)
            ),
            None,
        )

    def _check_reply_target(self, grant: Grant, payload: Mapping[str, Any]) -> None:
        """404 for a send whose `reply_to_message_id` names no message of the grant (a filed Microsoft
        message's old id): Nylas reads the original to set In-Reply-To and References (§1.3). The
        envelope is the one an unknown grant gets (nylas-api.md §3.1, §11.1): a client tells the two
        apart only by looking. A transactional (domain) send names no grant's message: not checked."""
        named = str(payload.get("reply_to_message_id") or "")
        if not named or not self.check_reply_to or grant.id.startswith("domain:"):
            return
        with self._lock:
            if self._message_named(grant, named) is None:
                raise ApiProblem(404, "not_found_error", NOT_FOUND_MESSAGE)

    def add_webhook(self, url: str, secret: bytes, trigger_types: Iterable[str]) -> None:
        """Register a webhook as `POST /v3/webhooks` does: the URL must echo a challenge first."""
        challenge = new_opaque_id()
        answer = httpx.get(url, params={"challenge": challenge}, timeout=DELIVERY_TIMEOUT_S)
        if answer.status_code != 200 or answer.text != challenge:
            raise ValueError(f"{url} did not echo the challenge (HTTP {answer.status_code})")
        with self._lock:
            self._webhooks.append(Webhook(url, secret, frozenset(trigger_types)))

    def webhook_status(self, url: str) -> WebhookStatus:
        """The status of the webhook at `url`: "active", "failing" (its deliveries fail, and go on) or
        "failed" (delivery stopped for good); see campaign/testing/webhooks.py."""
        with self._lock:
            found = next((hook for hook in self._webhooks if hook.url == url), None)
        if found is None:
            raise KeyError(f"no webhook at {url}; add it with add_webhook")
        return found.status

    def queue_notification(self, kind: str, grant_id: str, obj: dict[str, Any]) -> str:
        """Queue a notification (any trigger type) for the webhooks; returns its envelope id."""
        event_id = new_opaque_id()
        envelope = {
            "specversion": "1.0",
            "type": kind,
            "source": "/nylas/send" if kind.startswith("message.bounce") else "/com/nylas/tracking",
            "id": event_id,
            "time": int(self.clock.now().timestamp()),
            "webhook_delivery_attempt": 1,
            "data": {"application_id": "sandbox-app", "grant_id": grant_id, "object": obj},
        }
        with self._lock:
            self._outbox.append((kind, envelope))
        return event_id

    def deliver_webhooks(self) -> int:
        """POST the notifications due now on the fake's clock, signed, to the webhooks subscribed to their
        types (twice each with `duplicate_webhooks`); returns how many POSTs it made.

        A try that a webhook answers 408, 429, 502, 503, 504 or 507, or not within 10 s (or not at all),
        is made again later, to every webhook of the type, at most 3 tries in all; each says its number
        in `webhook_delivery_attempt`. Advance the clock and call again to make the retries due
        (`pending_webhooks`). A webhook whose deliveries keep failing becomes failing, then failed, and
        gets nothing more (campaign/testing/webhooks.py has the rules and their sources)."""
        now = self.clock.now()
        with self._lock:
            due = [note for note in self._retries if note.due <= now]
            self._retries = [note for note in self._retries if note.due > now]
            due += [PendingNotification(kind, envelope, due=now) for kind, envelope in self._outbox]
            self._outbox = []
        posted = 0
        for note in due:
            with self._lock:
                hooks = [h for h in self._webhooks if note.kind in h.trigger_types and h.accepts(now)]
            body = json.dumps({**note.envelope, "webhook_delivery_attempt": note.attempt}).encode()
            retried = False
            for hook in hooks:
                for _ in range(2 if self.duplicate_webhooks else 1):
                    delivered, retry = post_notification(hook, body)
                    posted += 1
                    retried |= retry
                    with self._lock:
                        hook.count(delivered=delivered)
            if retried and (later := note.next_try(now)) is not None:
                with self._lock:
                    self._retries.append(later)
        return posted

    @property
    def pending_webhooks(self) -> int:
        """Notifications waiting for a try (a first one, or a retry not yet due)."""
        with self._lock:
            return len(self._outbox) + len(self._retries)

    def clear_faults(self) -> None:
        """Drop every scripted fault not yet used."""
        with self._lock:
            self._scripts.clear()
            self._read_failures.clear()

    def fail_reads(self, grant_id: str, *, times: int = 1) -> None:
        """A test control: the grant's next `times` reads (listings, single messages) answer 503, as
        Nylas does when the provider is unavailable."""
        grant = self._require_grant(grant_id)
        with self._lock:
            self._read_failures[grant.id] = self._read_failures.get(grant.id, 0) + times

    def _take_read_failure(self, grant: Grant) -> bool:
        with self._lock:
            left = self._read_failures.get(grant.id, 0)
            if left:
                self._read_failures[grant.id] = left - 1
            return left > 0

    # ---- inspection ----

    @property
    def deliveries(self) -> list[Delivery]:
        """Messages delivered so far, in delivery order (a copy)."""
        with self._lock:
            return list(self._deliveries)

    @property
    def requests(self) -> list[RequestRecord]:
        """Every send request answered so far, in order of answer (a copy)."""
        with self._lock:
            return list(self._requests)

    @property
    def in_flight(self) -> int:
        """Send requests being processed right now (past parsing, before their answer)."""
        with self._lock:
            return self._in_flight

    def most_in_flight(self, grant_id: str) -> int:
        """The most sends of `grant_id` that were ever processed at once."""
        with self._lock:
            return self._require_grant(grant_id).most_in_flight

    def limit_reads(self, grant_id: str, limit: int, *, span_s: float = 1.0) -> None:
        """A test control: the grant answers at most `limit` reads (listings, single messages) in any
        `span_s` seconds, and 429 to the rest (Nylas's 200 a second otherwise)."""
        with self._lock:
            self._require_grant(grant_id).reads = SlidingWindow(limit, span_s)

    def refused_reads(self, grant_id: str) -> int:
        """How many reads of `grant_id` the read limit answered with 429."""
        with self._lock:
            return self._require_grant(grant_id).reads_refused

    def sent_folder_id(self, grant_id: str) -> str:
        """The Sent folder id of a grant, as `GET /folders` reports it."""
        with self._lock:
            return self._require_grant(grant_id).sent_folder_id

    def write_outbox(self, directory: Path) -> list[Path]:
        """Write each delivery as `NNNN-<to>.json` (and `.html` for an HTML body); return the paths.

        Numbers go on from `next_outbox_number(directory)`: a later run's follow-up to the same address
        gets its own files instead of replacing the first message's.
        """
        start = next_outbox_number(directory)
        make_private_dir(directory)  # payloads hold addresses and working unsubscribe links
        written: list[Path] = []
        for number, delivery in enumerate(self.deliveries, start=start):
            first_to = str(delivery.payload["to"][0]["email"])
            stem = f"{number:04d}-{_UNSAFE_FILENAME.sub('_', first_to)}"
            document = {"id": delivery.id, "grant_id": delivery.grant_id, **delivery.payload}
            json_path = directory / f"{stem}.json"
            write_private_text(json_path, json.dumps(document, indent=2, ensure_ascii=False) + "\n")
            written.append(json_path)
            body = delivery.payload.get("body")
            if isinstance(body, str) and body and delivery.payload.get("is_plaintext") is not True:
                html_path = directory / f"{stem}.html"
                write_private_text(html_path, body)
                written.append(html_path)
        return written

    # ---- used by the handlers (all non-awaiting, under the lock) ----

    def _require_grant(self, grant_id: str) -> Grant:
        grant = self._find_grant(grant_id)
        if grant is None:
            raise KeyError(f"no grant {grant_id!r}; add it with add_grant")
        return grant

    def _find_grant(self, identifier: str) -> Grant | None:
        if identifier.startswith("grant:"):
            return self._grants.get(identifier.removeprefix("grant:"))
        if identifier.startswith("email:"):
            address = identifier.removeprefix("email:").lower()
        elif identifier in self._grants:
            return self._grants[identifier]
        else:
            address = identifier.lower()
        return next((g for g in self._grants.values() if g.email.lower() == address), None)

    def _lookup_grant(self, identifier: str) -> Grant | None:
        with self._lock:
            return self._find_grant(identifier)

    def _take_fault(self, grant_id: str, *, stage: str) -> ScriptedFault | None:
        """Use up the first fault scripted for this grant and stage ("gateway", "delay", "provider")."""
        with self._lock:
            for scripted in self._scripts:
                if scripted.grant_id not in (None, grant_id) or _stage_of(scripted.fault) != stage:
                    continue
                scripted.remaining -= 1
                if scripted.remaining == 0:
                    self._scripts.remove(scripted)
                return scripted
        return None

    def _admit_send(self, grant: Grant, *, multipart: bool) -> float | None:
        """Count a send in the grant's 1 s window; None if admitted, else the seconds until room."""
        window = grant.multipart_sends if multipart else grant.json_sends
        now = self.clock.monotonic()
        with self._lock:
            return None if window.admit(now) else window.wait_s(now)

    def _admit_read(self, grant: Grant) -> float | None:
        now = self.clock.monotonic()
        with self._lock:
            if grant.reads.admit(now):
                return None
            grant.reads_refused += 1
            return grant.reads.wait_s(now)

    def _claim_key(self, grant: Grant, key: str, fingerprint: str) -> tuple[KeyState, Answer | None]:
        now = self.clock.monotonic()
        with self._lock:
            state, answer = grant.keys.claim(key, fingerprint, now=now, ttl_s=self.idempotency_ttl_s)
            if state is KeyState.FRESH:
                self._in_flight += 1
                self._begin(grant)
            return state, answer

    def _begin_unkeyed(self, grant: Grant) -> None:
        with self._lock:
            self._in_flight += 1
            self._begin(grant)

    def _begin(self, grant: Grant) -> None:
        grant.in_flight += 1
        grant.most_in_flight = max(grant.most_in_flight, grant.in_flight)

    def _finish(self, grant: Grant, key: str | None, answer: Answer | None) -> None:
        """End processing: cache the answer under the key (or forget the key if there is none)."""
        with self._lock:
            self._in_flight -= 1
            grant.in_flight -= 1
            if key is not None:
                if answer is None:
                    grant.keys.release(key)
                else:
                    grant.keys.store(key, answer)

    def _over_mailbox_concurrency(self, grant: Grant) -> bool:
        """Whether this send (already counted in flight) is one more than the mailbox takes at once."""
        with self._lock:
            limit = grant.mailbox_concurrency
            return limit is not None and grant.in_flight > limit

    def _throttle_wait(self, grant: Grant, recipients: int) -> tuple[QuotaStyle, float] | None:
        """The provider refusal this send meets (account throttled or quota), as (style, seconds to wait)."""
        now = self.clock.now()
        with self._lock:
            if grant.throttled_until is not None and now < grant.throttled_until:
                return grant.throttle_style, (grant.throttled_until - now).total_seconds()
            if grant.quota is None:
                return None
            mono = self.clock.monotonic()
            release = grant.quota_log.find_release(grant.quota, mono, recipients)
            return None if release is None else (grant.quota.style, release - mono)

    def _deliver(
        self,
        grant: Grant,
        payload: dict[str, Any],
        attachments: tuple[DeliveredAttachment, ...],
        *,
        key: str | None,
        multipart: bool,
    ) -> tuple[dict[str, Any], list[dict[str, str]]]:
        """Record a sent message (delivery log, Sent folder, quota); return its message object and headers."""
        now = self.clock.now()
        message_id = new_opaque_id()
        # The payload was parsed for this request alone and is only read from here on, so the stored
        # message may take its lists and objects; the delivery log gets its own copy of them.
        kept = _copy_json(payload)
        data = build_message(
            payload,
            message_id=message_id,
            grant_id=grant.id,
            grant_email=grant.email,
            folder_id=grant.sent_folder_id,
            date=now,
            attachments=attachments,
        )
        replying: tuple[str, str] | None = None
        if named := str(payload.get("reply_to_message_id") or ""):
            with self._lock:
                # A reply joins the thread of the message it answers, and the provider writes its
                # In-Reply-To and References from that message's headers (next-capabilities.md §1.2-1.3).
                original = self._message_named(grant, named)
                if original is not None:
                    data["thread_id"] = original.data["thread_id"]
                    replying = build_reply_headers(original.headers)
            if original is None and _MESSAGE_ID.fullmatch(named):
                # A Message-ID the fake does not hold (a transactional reply, a mailbox the fake
                # holds only part of): the reply names it alone, having no chain to follow.
                replying = named, named
        headers = tuple(build_message_headers(data, payload, replying=replying))
        with self._lock:
            self._seq += 1
            grant.messages.append(StoredMessage(self._seq, data, headers))
            grant.quota_log.record(self.clock.monotonic(), count_recipients(payload))
            self._deliveries.append(
                Delivery(message_id, grant.id, kept, attachments, key, now, multipart, headers)
            )
        self._bounce_if_chosen(grant, data)
        self._answer_if_chosen(grant, data, headers)
        # The caller only sets top-level keys (`headers`) on the answer's data before encoding it.
        return dict(data), list(headers)

    def _bounce_if_chosen(self, grant: Grant, message: dict[str, Any]) -> None:
        for recipient in message["to"]:
            address = str(recipient["email"]).lower()
            share = int(hashlib.sha256(address.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
            if address not in self.bounce_addresses and share >= self.bounce_share:
                continue
            now = self.clock.now()
            subject = str(message["subject"])
            dsn = build_dsn(address, mailbox=grant.email, subject=subject, at=now, style=self.dsn_style)
            self.receive_message(grant.id, dsn, received_at=now)
            obj = build_bounce_object(address, message_id=str(message["id"]), subject=subject, at=now)
            self.queue_notification("message.bounce_detected", grant.id, obj)

    def _answer_if_chosen(
        self, grant: Grant, message: dict[str, Any], headers: Sequence[dict[str, str]]
    ) -> None:
        if not message["to"] or not (self.reply_share or self.auto_reply_share):
            return
        address = str(message["to"][0]["email"])
        with self._lock:
            length = sum(1 for m in grant.messages if m.data["thread_id"] == message["thread_id"])
        digest = hashlib.sha256(f"answer\0{address.lower()}\0{length}".encode()).hexdigest()
        share = int(digest[:8], 16) / 0xFFFFFFFF
        if share >= self.reply_share + self.auto_reply_share:
            return
        auto = share >= self.reply_share
        at = self.clock.now() + timedelta(seconds=self.reply_lag_s)
        subject = str(message["subject"])
        replying = build_reply_headers(headers)
        raw = build_answer(address, mailbox=grant.email, subject=subject, at=at, auto=auto, replying=replying)
        self.receive_message(grant.id, raw, received_at=at, reply_to=str(message["id"]))

    def _add_schedule(self, grant: Grant, schedule_id: str, send_at: int) -> None:
        with self._lock:
            grant.schedules[schedule_id] = (send_at, False)

    def _schedule_status(self, grant: Grant, schedule_id: str, *, cancel: bool = False) -> dict[str, Any]:
        """A schedule's status object (cancelling it first when `cancel`); 404 ApiProblem if unknown."""
        now = int(self.clock.now().timestamp())
        with self._lock:
            if schedule_id not in grant.schedules:
                raise ApiProblem(404, "not_found_error", "requested object not found")
            send_at, cancelled = grant.schedules[schedule_id]
            if cancel:
                if cancelled or send_at <= now:
                    raise ApiProblem(400, "invalid_request_error", "the scheduled message was already sent")
                grant.schedules[schedule_id] = (send_at, True)
                cancelled = True
        if cancelled:
            return {"code": "cancelled", "description": "schedule send cancelled"}
        if send_at <= now:
            return {"code": "success", "description": "schedule send succeeded"}
        return {"code": "pending", "description": "schedule send awaiting send at time"}

    def _schedule_ids(self, grant: Grant) -> list[str]:
        with self._lock:
            return list(grant.schedules)

    def _list_messages(
        self, grant: Grant, query: Mapping[str, list[str]]
    ) -> tuple[list[dict[str, Any]], str | None]:
        listed_before = self.clock.now().timestamp() - grant.listing_lag_s
        with self._lock:
            snapshot: Sequence[StoredMessage] = [m for m in grant.messages if m.data["date"] <= listed_before]
        if grant.to_filter_broken and query.get("to"):
            snapshot = []
        folder_ids = frozenset(str(f["id"]) for f in grant.folders)
        return select_messages(
            snapshot, query, folder_ids=folder_ids, microsoft=grant.provider == "microsoft"
        )

    def _record_request(self, record: RequestRecord) -> None:
        with self._lock:
            self._requests.append(record)


def _copy_json(value: Any) -> Any:
    """A copy of parsed JSON: copy.deepcopy's result for a tree of dicts and lists, for less work."""
    if isinstance(value, dict):
        return {key: _copy_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy_json(item) for item in value]
    return value  # str, int, float, bool, None: immutable


def _stage_of(fault: Fault) -> str:
    if fault.at_gateway:
        return "gateway"
    return "delay" if fault is Fault.SLOW else "provider"


def _participants(header: object) -> list[dict[str, str]]:
    found = getaddresses([str(header)]) if header is not None else []
    return [
        {"email": address, "name": name} if name else {"email": address} for name, address in found if address
    ]


def next_outbox_number(directory: Path) -> int:
    """The number `write_outbox` gives its first file in `directory`: one past the highest there."""
    if not directory.is_dir():
        return 1
    found = (_OUTBOX_NUMBER.match(path.name) for path in directory.iterdir())
    return 1 + max((int(match.group(1)) for match in found if match), default=0)
