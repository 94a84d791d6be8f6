"""Replies the webhooks reported: `thread.replied` notifications that `campaign serve` keeps in a store.

A message sent with reply tracking carries the label `<campaign>:<recipient key>:<step>`, and the
notification carries the label back (not the metadata): so a kept notification names the recipient
who answered. `ReplyNotices` re-reads the stores (only what was added) when asked, and says whether
a recipient of this campaign answered, before any lookup costs an API request. It is asked from worker
threads (a store may be slow to answer), one at a time.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

from campaign.clock import Clock
from campaign.unsubscribe import StoreFollower, SuppressionStore, ThreadReply

__all__ = ["ReplyNotices"]


class ReplyNotices:
    """The `thread.replied` notifications of one campaign in its stores."""

    def __init__(self, paths: Sequence[Path | str], *, campaign: str, clock: Clock) -> None:
        self._stores = StoreFollower(paths, clock=clock)
        self._prefix = f"{campaign}:"
        self._by_recipient: dict[str, ThreadReply] = {}
        self._by_message: dict[str, ThreadReply] = {}
        self._reading = threading.Lock()  # each re-read goes on from where the one before it stopped

    def reply_to(self, recipient_key: str, message_ids: Sequence[str]) -> ThreadReply | None:
        """The first reply reported from `recipient_key` (by the label) or to one of `message_ids`."""
        with self._reading:
            return self._reply_to(recipient_key, message_ids)

    def _reply_to(self, recipient_key: str, message_ids: Sequence[str]) -> ThreadReply | None:
        for reply in self._stores.read_new(SuppressionStore.replies_since):
            self._by_message.setdefault(reply.root_message_id, reply)
            if reply.label.startswith(self._prefix):
                # campaign:key:step; a key may hold ':' itself, a step name never does.
                key = reply.label[len(self._prefix) :].rsplit(":", 1)[0]
                self._by_recipient.setdefault(key, reply)
        found = self._by_recipient.get(recipient_key)
        if found is not None:
            return found
        return next((self._by_message[m] for m in message_ids if m in self._by_message), None)

    def close(self) -> None:
        """Close the stores opened for reading."""
        self._stores.close()
