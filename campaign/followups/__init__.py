"""Follow-ups: the steps after [message], each a reply in the same thread, that stop when the
recipient answers.

`schedule_followups` records each recipient's next step when the previous one was sent, due by
the step's delay, the sender's window and business days (`due_time`). `DueJobs` reads back
the steps due now as jobs. `build_screen` is the check the send loop awaits right before each
follow-up's claim: the reply lookups of `find_answer` (a reply in the thread, or from the
recipient's address since step 1), and `classify_answer`'s verdict on what came back (a
person, an auto-reply, a bounce report). `build_relink` is the lookup the loop awaits when a
follow-up's send is answered 404: the message it answers found again in its thread (a filed Microsoft
message has a new id), or the sequence stops as `thread_lost`. Reads the API; writes only through the
ledger.
"""

from __future__ import annotations

from campaign.followups._notices import ReplyNotices
from campaign.followups._relink import build_relink, pick_previous_message
from campaign.followups._replies import Answer, AnswerKind, ReplyClient, classify_answer, find_answer
from campaign.followups._sequence import (
    DueJobs,
    build_screen,
    due_time,
    first_due_time,
    recipient_zone,
    schedule_followups,
)

__all__ = [
    "Answer",
    "AnswerKind",
    "DueJobs",
    "ReplyClient",
    "ReplyNotices",
    "build_relink",
    "build_screen",
    "classify_answer",
    "due_time",
    "find_answer",
    "first_due_time",
    "pick_previous_message",
    "recipient_zone",
    "schedule_followups",
]
