"""JobFeed: the lanes' shared view of the work, read a page at a time (campaign.dispatch._feed)."""

from __future__ import annotations

from support import make_jobs

from campaign.dispatch import source_of
from campaign.dispatch._feed import JobFeed
from campaign.models import FIRST_STEP
from campaign.plan import Job


def _keys(jobs: list[Job]) -> list[str]:
    return [job.key for job in jobs]


def test_a_lane_takes_its_own_jobs_in_order_a_page_at_a_time():
    feed = JobFeed(source_of([*make_jobs(5, "a"), *make_jobs(2, "b", start=6)]), bound=set())
    assert _keys(feed.take("a", 2)) == ["r1@example.com", "r2@example.com"]
    assert _keys(feed.take("a", 10)) == ["r3@example.com", "r4@example.com", "r5@example.com"]
    assert feed.take("a", 10) == []
    assert not feed.holds("a")
    assert feed.holds("b")
    assert feed.left() == 2


def test_a_stopped_senders_movable_jobs_go_to_others_and_the_rest_stay_for_it():
    """Given back and still unread, its movable jobs are taken (as the taker's) after the taker's own;
    pinned rows, follow-ups and rows whose key may have been used stay, in order, for their sender."""
    jobs = make_jobs(6, "a")
    jobs[1] = make_jobs(1, "a", start=2, pinned=True)[0]
    jobs[3] = jobs[3]._replace(step="nudge")
    bound = {"r5@example.com"}
    feed = JobFeed(source_of([*jobs, *make_jobs(1, "b", start=7)]), bound=bound)
    held = feed.take("a", 1)  # r1, in a's lane when it is parked
    feed.release("a", held)
    taken = feed.take("b", 10)
    assert _keys(taken) == ["r7@example.com", "r1@example.com", "r3@example.com", "r6@example.com"]
    assert {job.sender for job in taken} == {"b"}
    assert feed.take("c", 10) == []  # nothing movable is left
    kept = feed.take("a", 10)  # should it send again (--wait): what only it may send
    assert [job.recipient.key for job in kept] == ["r2@example.com", "r4@example.com", "r5@example.com"]
    assert [job.step for job in kept] == [FIRST_STEP, "nudge", FIRST_STEP]


def test_a_row_read_again_while_a_lane_holds_it_is_not_handed_out_twice():
    """A source over the ledger can meet a row again (claimed, then back to pending under another
    sender): until the loop says it is finished with the job, the feed hands it to no one else."""
    pages = [make_jobs(2, "a"), make_jobs(2, "a"), make_jobs(1, "a")]

    class Rereading:
        def __call__(self, sender: str, count: int) -> list[Job]:
            return pages.pop(0) if sender == "a" and pages else []

        def left(self) -> int:
            return 0

    feed = JobFeed(Rereading(), bound=set())
    assert _keys(feed.take("a", 2)) == ["r1@example.com", "r2@example.com"]
    assert feed.take("a", 2) == []  # both still in a lane
    feed.finished("r1@example.com")
    assert _keys(feed.take("a", 2)) == ["r1@example.com"]  # finished with, then pending again: it may go
