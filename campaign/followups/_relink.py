"""The message a follow-up answers, found again after its send was answered 404.

A follow-up is sent with `reply_to_message_id` = the previous step's Nylas message id. On a Microsoft
grant that id changes when the mailbox's owner files the message (a Graph id is not immutable), and
Nylas answers the send 404 `not_found_error`, the very answer an unknown grant gets
(reference/next-capabilities.md §1.2, §1.3). So the grant's mailbox is asked:
`GET /messages?thread_id=<the previous step's thread>&received_after=<its send, less 5 minutes>` (the
thread keeps its id), and our previous message is the one from the sender's mailbox to the recipient
dated closest to its send, within 5 minutes either way. Found under a new id: the follow-up answers
that one. Not there (deleted): the sequence stops (`thread_lost`), never sent unthreaded. The listing
answered 404 too: the grant itself is gone, and the send's 404 stands. Found under the very id the
follow-up named: an IMAP grant (Yahoo, iCloud) names a message by its Message-ID header only, so the
follow-up answers that header. Any other failure holds the follow-up back (`Relink.hold`). Reads the
API; writes nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta

from campaign.errors import ApiNotFoundError, CampaignError
from campaign.followups._replies import SKEW, ReplyClient, list_pages
from campaign.manifest import IMAP_PROVIDERS, Manifest, SenderSettings
from campaign.models import PreviousStep, Relink
from campaign.nylas import ListedMessage
from campaign.plan import Job
from campaign.recipients import matching_form

__all__ = ["build_relink", "pick_previous_message"]


def build_relink(manifest: Manifest, client: ReplyClient) -> Callable[[Job], Awaitable[Relink]]:
    """The lookup the send loop awaits when a follow-up's send was answered 404 (see the module's
    docstring)."""

    async def relink(job: Job) -> Relink:
        previous = job.previous
        if previous is None:  # step 1 answers nothing: its 404 is the grant's
            return Relink()
        sender = manifest.sender(job.sender)
        try:
            listed = await list_pages(
                client, sender.route, thread_id=previous.thread_id, since=previous.sent_at - SKEW
            )
        except ApiNotFoundError:
            return Relink()  # the grant is gone too: as any refused send
        except CampaignError:  # a 429, the provider down: never send blind, look again later
            return Relink(hold=True)
        found = pick_previous_message(listed, previous, job.recipient.address.email, sender.email)
        if found is None:
            where = "its thread" if previous.thread_id is None else f"thread {previous.thread_id}"
            return Relink(lost=f"message {previous.message_id} ({previous.step}) is no longer in {where}")
        if found.id == previous.message_id:  # still under its id: the 404 was about how it was named
            return await _by_header(client, sender, previous)
        return Relink(message_id=found.id)

    return relink


async def _by_header(client: ReplyClient, sender: SenderSettings, previous: PreviousStep) -> Relink:
    """The previous message is still under the id the follow-up named, and the send was answered 404:
    its grant is an IMAP one (Yahoo and iCloud are IMAP too; a manifest need not say which), which knows
    a message by its Message-ID header only (nylas-api.md §1.2). The header the send's answer gave, or
    else the message's own; None of either, or the header named already: the 404 stands."""
    if sender.provider in IMAP_PROVIDERS and previous.internet_message_id is not None:
        return Relink()  # the follow-up named the header (`render`): not the cause
    header = previous.internet_message_id
    if header is None:  # a row sent before the header was kept
        try:
            headers = await client.fetch_headers(sender.route, previous.message_id)
        except ApiNotFoundError:
            return Relink()
        except CampaignError:
            return Relink(hold=True)
        header = next((value.strip() for name, value in headers if name.lower() == "message-id"), None)
    return Relink(message_id=header) if header else Relink()


def pick_previous_message(
    listed: Sequence[ListedMessage], previous: PreviousStep, address: str, own_address: str | None
) -> ListedMessage | None:
    """Of the messages `listed`, the one the previous step sent: to `address`, from the sender's mailbox
    (`own_address`, when known), dated within `SKEW` of its send; the closest. Pure."""
    recipient = matching_form(address)
    own = matching_form(own_address) if own_address else ""

    def off_by(message: ListedMessage) -> timedelta | None:
        if message.date is None or recipient not in {matching_form(to) for to in message.to}:
            return None
        if own and not all(matching_form(sender) == own for sender in message.senders):
            return None
        gap = abs(message.date - previous.sent_at)
        return gap if gap <= SKEW else None

    gaps = [(gap, message) for message in listed if (gap := off_by(message)) is not None]
    return min(gaps, key=lambda pair: pair[0])[1] if gaps else None
