"""A real test send of one row, outside a run: `campaign send-test`.

`find_test_message` renders one row exactly as
the campaign would and re-addresses it to a tester with "[TEST] " before the subject;
`send_test_message` sends it. Nothing here writes the ledger.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace

from email_validator import EmailNotValidError

from campaign.errors import ApiAuthError, ApiError, ApiUnavailableError, DataError, UsageError
from campaign.ledger import Ledger
from campaign.manifest import Manifest, SenderSettings, normalize_sendable_address
from campaign.models import Address, Message, OutcomeKind
from campaign.nylas import (
    SendClient,
    build_send_request,
    send_as,
)
from campaign.pipeline import RowCheck, RowPipeline, check_rows
from campaign.render import load_message_attachments

__all__ = [
    "TEST_SUBJECT_PREFIX",
    "TestMessage",
    "find_test_message",
    "send_test_message",
]

TEST_SUBJECT_PREFIX = "[TEST] "


@dataclass(frozen=True, slots=True)
class TestMessage:
    """Row `row` rendered as the campaign would, re-addressed for a test send from `sender`."""

    message: Message
    sender: SenderSettings
    recipient_email: str


def find_test_message(
    manifest: Manifest,
    *,
    row: int,
    to: str,
    sender_name: str | None,
    secrets: Sequence[bytes] | None,
    ledger: Ledger | None = None,
) -> TestMessage:
    """Render row `row` as the campaign would (its sender, unless `sender_name`), addressed to `to`."""
    address = _parse_address(to)
    override = None if sender_name is None else _find_sender(manifest, sender_name)
    pipeline = check_rows(manifest, secrets=secrets, ledger=ledger)
    source = manifest.recipients.source.name
    found = _find_row(pipeline, row)
    if found is None:
        raise UsageError(
            f"{source} has no recipient on row {row} (rows count from 1 after the header; "
            f"the list has {pipeline.scan.row_count} data rows, blank lines included); "
            "pick another row with --row"
        )
    checked = found.checked
    if checked.problems:
        raise DataError("; ".join(problem.describe(source) for problem in checked.problems))
    if checked.skip is not None:
        raise UsageError(
            f"{source} row {row} ({checked.skip.email}) is not mailed by this campaign "
            f"({checked.skip.reason.value}: {checked.skip.detail}); pick another row with --row"
        )
    rendered = pipeline.render(found, sender=override)
    assert rendered.job is not None  # neither a problem nor a skip: a recipient
    if rendered.error is not None:
        raise DataError(f"{source} {rendered.error}")
    assert rendered.message is not None
    message = load_message_attachments(
        rendered.message, pipeline.composer.attachment_loader
    )  # its real files
    test = _readdress(message, address, campaign=manifest.campaign.name)
    return TestMessage(test, manifest.sender(rendered.job.sender), rendered.job.recipient.address.email)


def _find_row(pipeline: RowPipeline, row: int) -> RowCheck | None:
    """Row `row` of the list with the sender the campaign gives it (every earlier row is assigned first)."""
    for batch in pipeline.assigned():
        for checked in batch:
            if checked.row == row:
                return checked
            if checked.row > row:
                return None
    return None


async def send_test_message(client: SendClient, test: TestMessage) -> str:
    """Send the test message through the API; return the Nylas message id (ApiError if it was refused)."""
    payload = build_send_request(test.message)
    key = f"test-{uuid.uuid4().hex}"  # a test is never retried under the campaign's keys
    outcome = await send_as(client, test.sender, payload, idempotency_key=key)
    if outcome.kind == OutcomeKind.SENT and outcome.message_id:
        return outcome.message_id
    why = outcome.error_message or outcome.error_type or outcome.kind.value
    status = f"HTTP {outcome.status}: " if outcome.status is not None else ""
    sender = f"sender {test.sender.name!r}"
    message = f"{sender}: the test message was not sent ({status}{why})"
    if outcome.kind == OutcomeKind.AUTH_REFUSED:
        raise ApiAuthError(f"{message}; check the API key and that the grant is valid")
    if outcome.kind in (OutcomeKind.THROTTLED, OutcomeKind.UNREACHABLE):
        raise ApiUnavailableError(f"{message}; try again later")
    if outcome.kind in (OutcomeKind.AMBIGUOUS, OutcomeKind.IN_PROGRESS):
        unsure = f"{sender}: the test message may or may not have been sent ({status}{why})"
        raise ApiUnavailableError(f"{unsure}; look in {test.message.to[0].email}'s inbox before trying again")
    raise ApiError(message)


def _readdress(message: Message, to: Address, *, campaign: str) -> Message:
    # Only the envelope changes. The metadata drops key1/key2 so reconcile can never take the
    # test for the real recipient's message, and with reply tracking the label (campaign:recipient:step)
    # goes, so that a reply to the test is never taken for the real recipient's reply (it would stop
    # their follow-ups).
    tracking = message.tracking
    if tracking is not None and tracking.thread_replies and tracking.label is not None:
        tracking = replace(tracking, label=None)
    return message._replace(
        to=(to,),
        subject=f"{TEST_SUBJECT_PREFIX}{message.subject}",
        metadata=(("campaign", campaign), ("test", "true")),
        tracking=tracking,
    )


def _parse_address(value: str) -> Address:
    try:
        return Address(normalize_sendable_address(value))
    except (EmailNotValidError, ValueError) as exc:
        raise UsageError(f"--to {value!r} is not a valid address ({str(exc).rstrip('.')})") from exc


def _find_sender(manifest: Manifest, name: str) -> SenderSettings:
    for sender in manifest.senders:
        if sender.name == name:
            return sender
    known = ", ".join(sender.name for sender in manifest.senders)
    raise UsageError(f"--sender {name!r}: the manifest has no such sender (senders: {known})")
