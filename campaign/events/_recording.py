"""Keeping a verified notification: raw, once per envelope id, with the bounces it reports."""

from __future__ import annotations

from campaign.clock import Clock
from campaign.events._notifications import (
    Notification,
    decode_notification,
    parse_bounces,
    parse_notification,
)
from campaign.unsubscribe import SuppressionStore

__all__ = ["record_notification"]


def record_notification(store: SuppressionStore, body: bytes, *, clock: Clock) -> Notification | None:
    """Record the notification in `body` (already verified); None when it was recorded before.

    DataError when the body is not a notification in UTF-8 JSON. A bounce suppresses its addresses in
    the same transaction, as the store's rules say. The text kept is the very text parsed: the store's
    readers parse it again and must find what was found here.
    """
    text = decode_notification(body)
    notification = parse_notification(text)
    bounces = parse_bounces(notification, received_at=clock.now())
    new = store.record_event(
        notification.id, notification.type, grant_id=notification.grant_id, body=text, bounces=bounces
    )
    return notification if new else None
