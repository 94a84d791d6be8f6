"""Which sent rows a store's bounces belong to (`campaign.events.match_bounces`): by the message a bounce
names, else by its address and time. A store is shared by campaigns, so most bounces are not ours."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from campaign.events import RowBounce, match_bounces
from campaign.ledger import SentMessage
from campaign.unsubscribe import BounceRecord

T0 = datetime(2027, 3, 1, 9, 0, tzinfo=UTC)
STEP_1 = SentMessage("ann@x.com", "Ann@X.com", T0, "m-1")
STEP_2 = SentMessage("ann@x.com\x1fnudge", "Ann@X.com", T0 + timedelta(days=3), "m-2")


def _bounce(at: datetime, *, hard: bool = True, message_id: str | None = None, email: str = "ann@x.com"):
    return BounceRecord(email, hard, at.isoformat(timespec="seconds"), reason="gone", message_id=message_id)


def test_a_bounce_naming_a_sent_message_belongs_to_that_row_whenever_it_came():
    later = T0 + timedelta(days=5)
    found = match_bounces([STEP_1, STEP_2], [_bounce(later, message_id="m-1")])
    assert found == {STEP_1.key: RowBounce(True, later, "gone")}


def test_any_other_bounce_belongs_to_the_latest_send_to_its_address_before_it():
    """Between the steps: step 1's; after step 2: step 2's; the address compared without case."""
    between, after = T0 + timedelta(days=1), T0 + timedelta(days=4)
    found = match_bounces([STEP_2, STEP_1], [_bounce(after, message_id="an-inbox-report"), _bounce(between)])
    assert found == {STEP_1.key: RowBounce(True, between, "gone"), STEP_2.key: RowBounce(True, after, "gone")}


def test_a_bounce_a_little_before_the_send_is_its_own_clock_skew_but_an_older_one_is_not_ours():
    skewed, older = T0 - timedelta(minutes=2), T0 - timedelta(hours=1)
    assert match_bounces([STEP_1], [_bounce(skewed)]) == {STEP_1.key: RowBounce(True, skewed, "gone")}
    assert match_bounces([STEP_1], [_bounce(older)]) == {}
    assert match_bounces([STEP_1], [_bounce(T0, email="bob@x.com")]) == {}


def test_a_row_keeps_its_first_bounce_and_is_hard_if_any_of_its_bounces_was():
    soft_at, hard_at = T0 + timedelta(hours=1), T0 + timedelta(hours=5)
    bounces = [_bounce(hard_at), _bounce(soft_at, hard=False)]
    assert match_bounces([STEP_1], bounces) == {STEP_1.key: RowBounce(True, soft_at, "gone")}
    assert match_bounces([STEP_1], bounces[1:]) == {STEP_1.key: RowBounce(False, soft_at, "gone")}


def test_a_bounce_naming_an_internationalised_domain_in_unicode_matches_its_ascii_send():
    """campaign sends (and keys) an internationalised domain in ASCII; a report may name it in Unicode."""
    sent = SentMessage("ann@xn--bcher-kva.example", "ann@xn--bcher-kva.example", T0, "m-1")
    later = T0 + timedelta(hours=1)
    found = match_bounces([sent], [_bounce(later, email="Ann@Bücher.example")])
    assert found == {sent.key: RowBounce(True, later, "gone")}
