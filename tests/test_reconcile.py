"""Reconcile against the fake Nylas: metadata lookup, the Sent-folder fallback, what it decides and why."""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import asdict, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import copy_sample

from campaign import reconcile as reconcile_module
from campaign.errors import ApiAuthError, ApiError, ApiUnavailableError
from campaign.ledger import Ledger, PlannedRow, SqliteSite, open_ledger
from campaign.manifest import SenderSettings, load_manifest
from campaign.models import RowState
from campaign.nylas import NylasClient
from campaign.reconcile import Verdict, reconcile_campaign, reconcile_unknown
from campaign.testing import FakeNylas
from campaign.testing.clock import FakeClock

pytestmark = pytest.mark.anyio
KEY = "nyk_test_reconcile_key"
SENDER = SenderSettings(name="a", grant_id="grant-a", email="a@corp.example.com")

# The in-process fake lists a message as soon as it is sent: no settle time is needed here.
NO_SETTLE_TIME = timedelta(0)


class _Setup:
    def __init__(self, tmp_path: Path, *, provider: str = "google") -> None:
        self.clock = FakeClock()
        self.fake = FakeNylas(api_key=KEY, clock=self.clock)
        self.fake.add_grant("grant-a", "a@corp.example.com", provider=provider)
        self.ledger: Ledger = open_ledger(tmp_path / "l.sqlite", clock=self.clock, campaign="spring")

    def unknown(self, email: str, subject: str = "Hello") -> None:
        """A row whose send ended without a definite answer."""
        self.ledger.record_plan([PlannedRow(email, 1, email, "a")], [])
        self.ledger.claim(email, subject=subject)
        self.ledger.record_unknown(email)

    async def deliver(
        self, email: str, *, subject: str = "Hello", metadata: dict[str, str] | None = None
    ) -> str:
        """Make the fake deliver a message as if our earlier request had gone out."""
        body: dict[str, Any] = {"to": [{"email": email}], "subject": subject, "body": "hi"}
        if metadata is not None:
            body["metadata"] = metadata
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.fake.app), base_url="http://f"
        ) as h:
            response = await h.post(
                "/v3/grants/grant-a/messages/send", json=body, headers={"Authorization": f"Bearer {KEY}"}
            )
        assert response.status_code == 200
        return str(response.json()["data"]["id"])

    async def reconcile(self, *, wrap: Any = None, api_key: str = KEY, senders=(SENDER,)):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.fake.app), base_url="http://f"
        ) as h:
            client = NylasClient(h, api_key=api_key, clock=self.clock)
            return await reconcile_unknown(
                self.ledger,
                campaign="spring",
                senders=senders,
                client=wrap(client) if wrap else client,
                clock=self.clock,
                min_age=NO_SETTLE_TIME,
            )


class _MetadataFails:
    """A provider where the metadata lookup is refused (the fallback must carry the decision)."""

    def __init__(self, client: NylasClient) -> None:
        self._client = client

    async def list_messages(self, grant_id: str, **kwargs: Any):
        if kwargs.get("metadata_pair") is not None:
            raise ApiError("Nylas API GET messages failed: HTTP 400 metadata_pair unsupported")
        return await self._client.list_messages(grant_id, **kwargs)

    async def list_folders(self, grant_id: str):
        return await self._client.list_folders(grant_id)


class _FoldersFail(_MetadataFails):
    async def list_messages(self, grant_id: str, **kwargs: Any):
        return await self._client.list_messages(grant_id, **kwargs)

    async def list_folders(self, grant_id: str):
        raise ApiError("Nylas API GET folders: HTTP 503")


class _UnicodeDomains(_FoldersFail):
    """A provider that lists recipients' internationalised domains in Unicode (campaign sent ASCII)."""

    async def list_messages(self, grant_id: str, **kwargs: Any):
        page = await self._client.list_messages(grant_id, **kwargs)
        shown = [
            replace(m, to=tuple(t.replace("xn--bcher-kva", "bücher") for t in m.to)) for m in page.messages
        ]
        return replace(page, messages=tuple(shown))

    async def list_folders(self, grant_id: str):
        return await self._client.list_folders(grant_id)


async def test_a_message_listed_with_its_domain_in_unicode_is_found_sent(tmp_path):
    """The Sent folder's message to ann@bücher.example is the row keyed ann@xn--bcher-kva.example: sent,
    never sent again."""
    s = _Setup(tmp_path, provider="microsoft")
    s.unknown("ann@xn--bcher-kva.example", subject="Spring news")
    message_id = await s.deliver("ann@xn--bcher-kva.example", subject="Spring news")
    (decision,) = (await s.reconcile(wrap=_UnicodeDomains)).decisions
    assert (decision.verdict, decision.message_id) == (Verdict.SENT, message_id)


async def test_found_by_metadata_is_marked_sent_with_its_message_id(tmp_path):
    """key1=campaign and key2=recipient find the message: sent, with that id and the reason."""
    s = _Setup(tmp_path)
    s.unknown("ann@x.com")
    message_id = await s.deliver("ann@x.com", metadata={"key1": "spring", "key2": "ann@x.com"})
    report = await s.reconcile()
    (decision,) = report.decisions
    assert (decision.verdict, decision.message_id) == (Verdict.SENT, message_id)
    assert "metadata" in decision.reason
    row = s.ledger.row("ann@x.com")
    assert (row.state, row.message_id, row.note) == (RowState.SENT, message_id, decision.reason)


async def test_another_campaigns_message_to_the_same_recipient_does_not_count(tmp_path):
    """key2 matches but key1 names another campaign, and the subject differs: not sent, back to pending."""
    s = _Setup(tmp_path)
    s.unknown("ann@x.com", subject="Spring news")
    await s.deliver("ann@x.com", subject="Autumn news", metadata={"key1": "autumn", "key2": "ann@x.com"})
    (decision,) = (await s.reconcile()).decisions
    assert decision.verdict == Verdict.PENDING
    assert "not found by metadata nor in the Sent folder" in decision.reason


async def test_the_sent_folder_finds_a_message_sent_without_metadata(tmp_path):
    """No metadata on the message: found in the Sent folder by address and subject."""
    s = _Setup(tmp_path, provider="microsoft")  # opaque folder ids, found through /folders
    s.unknown("ann@x.com", subject="Spring news")
    message_id = await s.deliver("ann@x.com", subject="Spring news")
    (decision,) = (await s.reconcile()).decisions
    assert (decision.verdict, decision.message_id) == (Verdict.SENT, message_id)
    assert "Sent folder" in decision.reason


async def test_a_refused_metadata_lookup_falls_back_to_the_sent_folder(tmp_path):
    """The metadata lookup fails (e.g. unsupported): the Sent folder decides, and the reason says both."""
    s = _Setup(tmp_path)
    s.unknown("ann@x.com")
    s.unknown("bob@x.com")
    await s.deliver("ann@x.com", metadata={"key1": "spring", "key2": "ann@x.com"})
    decisions = {d.key: d for d in (await s.reconcile(wrap=_MetadataFails)).decisions}
    assert decisions["ann@x.com"].verdict == Verdict.SENT
    assert decisions["bob@x.com"].verdict == Verdict.PENDING
    assert "metadata lookup failed" in decisions["bob@x.com"].reason


async def test_a_subject_that_differs_is_not_a_match(tmp_path):
    """In the Sent folder, a message to the address with another subject is another message."""
    s = _Setup(tmp_path)
    s.unknown("ann@x.com", subject="Spring news")
    await s.deliver("ann@x.com", subject="Something else")
    (decision,) = (await s.reconcile()).decisions
    assert decision.verdict == Verdict.PENDING


async def test_not_found_goes_back_to_pending_with_a_new_key(tmp_path):
    """Nothing anywhere: pending, the attempt counter moved on, so the next send uses a new key."""
    s = _Setup(tmp_path)
    s.unknown("ann@x.com")
    old = s.ledger.row("ann@x.com")
    await s.reconcile()
    row = s.ledger.row("ann@x.com")
    assert (row.state, row.attempt_no, row.idempotency_key) == (RowState.PENDING, old.attempt_no + 1, None)
    assert (row.note or "").startswith("reconcile: ")
    assert s.ledger.claim("ann@x.com").idempotency_key != old.idempotency_key
    assert s.ledger.journal()[-1].kind == "reconcile"


async def test_a_lookup_that_fails_leaves_the_row_unknown(tmp_path):
    """The Sent folder cannot be searched: no decision is made, the row stays unknown, the reason says why."""
    s = _Setup(tmp_path)
    s.unknown("ann@x.com")
    (decision,) = (await s.reconcile(wrap=_FoldersFail)).decisions
    assert decision.verdict == Verdict.UNKNOWN
    assert "try again later" in decision.reason
    assert s.ledger.row("ann@x.com").state == RowState.UNKNOWN


class _FoldersUnreachable(_FoldersFail):
    async def list_folders(self, grant_id: str):
        raise ApiUnavailableError("Nylas API GET folders: could not connect to the API")


async def test_a_lookup_the_api_could_not_serve_is_counted_for_a_later_try(tmp_path):
    """Only a lookup that failed for want of the API (no connection, 429, 5xx) says "try again later";
    a refusal of the lookup itself does not."""
    s = _Setup(tmp_path)
    s.unknown("ann@x.com")
    assert (await s.reconcile(wrap=_FoldersUnreachable)).unreachable == 1
    assert (await s.reconcile(wrap=_FoldersFail)).unreachable == 0
    assert s.ledger.row("ann@x.com").state == RowState.UNKNOWN


async def test_refused_credentials_stop_reconcile_and_change_nothing(tmp_path):
    """A 401 raises ApiAuthError (exit 77 in the CLI); the row is untouched."""
    s = _Setup(tmp_path)
    s.unknown("ann@x.com")
    with pytest.raises(ApiAuthError):
        await s.reconcile(api_key="wrong-key")
    assert s.ledger.row("ann@x.com").state == RowState.UNKNOWN


async def test_rows_of_a_domain_sender_or_a_removed_sender_stay_unknown_with_the_reason(tmp_path):
    """Transactional sends have no mailbox to search; a sender no longer in the manifest cannot be asked."""
    s = _Setup(tmp_path)
    s.unknown("ann@x.com")
    domain = SenderSettings(name="a", domain="mail.example.com", email="news@mail.example.com")
    (decision,) = (await s.reconcile(senders=(domain,))).decisions
    assert (decision.verdict, "transactional" in decision.reason) == (Verdict.UNKNOWN, True)
    (decision,) = (await s.reconcile(senders=())).decisions
    assert (decision.verdict, "no longer in the manifest" in decision.reason) == (Verdict.UNKNOWN, True)


async def test_a_microsoft_grant_whose_to_filter_finds_nothing_still_finds_the_message(tmp_path):
    """`to` broken (as on some Microsoft grants) and no metadata lookup: the Sent folder, listed by time
    and matched here by recipient and subject, still finds the message; its absence still means pending."""
    s = _Setup(tmp_path, provider="microsoft")
    s.fake.set_listing_quirks("grant-a", to_filter_broken=True)
    s.unknown("ann@x.com")
    s.unknown("bob@x.com")
    message_id = await s.deliver("ann@x.com")
    asked: list[dict[str, Any]] = []

    class Recording(_MetadataFails):
        async def list_messages(self, grant_id: str, **kwargs: Any):
            asked.append(kwargs)
            return await super().list_messages(grant_id, **kwargs)

    decisions = {d.key: d for d in (await s.reconcile(wrap=Recording)).decisions}
    assert (decisions["ann@x.com"].verdict, decisions["ann@x.com"].message_id) == (Verdict.SENT, message_id)
    assert decisions["bob@x.com"].verdict == Verdict.PENDING
    sent_folder_listings = [kwargs for kwargs in asked if kwargs.get("in_folder")]
    assert len(sent_folder_listings) == 1  # listed once for the grant, matched here for both rows
    assert sent_folder_listings[0].get("to") is None


async def test_a_sent_folder_longer_than_reconcile_reads_never_yields_not_sent(tmp_path, monkeypatch):
    """A Sent folder listing cut short by the page bound: a row not in it stays unknown, never pending."""
    monkeypatch.setattr(reconcile_module, "PAGE", 2)
    monkeypatch.setattr(reconcile_module, "MAX_PAGES", 2)
    s = _Setup(tmp_path)
    s.unknown("ann@x.com")
    for n in range(6):
        await s.deliver(f"other{n}@x.com")
    (decision,) = (await s.reconcile(wrap=_MetadataFails)).decisions
    assert decision.verdict == Verdict.UNKNOWN
    assert "more than reconcile reads" in decision.reason
    assert s.ledger.row("ann@x.com").state == RowState.UNKNOWN


def test_the_use_case_settles_the_campaigns_ledger_and_says_what_is_next(tmp_path):
    """reconcile_campaign opens the ledger alone, looks up each unknown row, records what it found,
    and returns the decisions and the next steps that `reconcile --json` prints as they are."""
    manifest = load_manifest(copy_sample("newsletter", tmp_path))
    sender = manifest.senders[0]
    clock = FakeClock()
    fake = FakeNylas(api_key=KEY, clock=clock)
    fake.add_grant(sender.grant_id or "", sender.email or "")
    ledger = open_ledger(manifest.ledger_path, clock=clock, campaign=manifest.campaign.name, create=True)
    ledger.record_plan([PlannedRow(email, n, email, sender.name) for n, email in enumerate("ab", 1)], [])
    for email in "ab":
        ledger.claim(email, subject="Hello")
        ledger.record_unknown(email)
    ledger.close()
    clock.advance(3600)

    @asynccontextmanager
    async def connect():
        transport = httpx.ASGITransport(app=fake.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://f") as http:
            yield NylasClient(http, api_key=KEY, clock=clock)

    done = reconcile_campaign(
        manifest, SqliteSite(manifest.ledger_path), connect=connect, clock=clock, command_path="c.toml"
    )
    assert [(d.key, d.verdict) for d in done.report.decisions] == [("a", "pending"), ("b", "pending")]
    assert done.settled
    assert [(step.state, step.count, step.commands) for step in done.next_steps] == [
        (RowState.PENDING, 2, ("campaign resume c.toml",))
    ]
    printed = done.as_json()
    # The shape `reconcile --json` has always had: each decision's fields in order, the verdict's name.
    assert printed["decisions"] == [{**asdict(d), "verdict": d.verdict.value} for d in done.report.decisions]
    assert (printed["in_flight"], printed["decide_after"]) == (0, None)
    assert printed["next"] == [step.as_json() for step in done.next_steps]
    ledger = open_ledger(manifest.ledger_path, clock=clock, campaign=manifest.campaign.name, read_only=True)
    assert ledger.counts()[RowState.PENDING] == 2
    ledger.close()


@pytest.mark.parametrize("retry_after", [True, False])
async def test_reconcile_waits_as_the_api_asks_and_decides_every_row(tmp_path, retry_after):
    """A grant that answers 3 reads a second, with or without Retry-After on its 429s: reconcile waits
    and asks again, and decides all twelve rows; it does not go on calling the API it was told to stop."""
    s = _Setup(tmp_path)
    s.fake.nylas_retry_after = retry_after
    s.fake.limit_reads("grant-a", 3)
    people = [f"p{n}@x.com" for n in range(12)]
    for email in people:
        s.unknown(email)
    report = await s.reconcile()
    assert [d.verdict for d in report.decisions] == [Verdict.PENDING] * len(people)
    assert all(s.ledger.row(email).state == RowState.PENDING for email in people)
    assert not [d.reason for d in report.decisions if "failed" in d.reason]  # every lookup was answered
    # Each refusal was waited out: one per three reads at most (the first row's two, then one a row).
    assert 0 < s.fake.refused_reads("grant-a") <= len(people) // 3


async def test_a_long_retry_after_leaves_the_grants_rows_unknown_without_asking_again(tmp_path):
    """A grant that answers one read an hour: once the API says to wait an hour, reconcile asks that grant
    nothing more; every row stays unknown, saying until when, to be tried again later."""
    s = _Setup(tmp_path)
    s.fake.nylas_retry_after = True
    s.fake.limit_reads("grant-a", 1, span_s=3600)
    people = [f"p{n}@x.com" for n in range(10)]
    for email in people:
        s.unknown(email)
    report = await s.reconcile()
    assert s.fake.refused_reads("grant-a") == 1
    assert [d.verdict for d in report.decisions] == [Verdict.UNKNOWN] * len(people)
    assert report.unreachable == len(people)
    assert all("run reconcile again after" in d.reason for d in report.decisions[1:])
    assert all(s.ledger.row(email).state == RowState.UNKNOWN for email in people)
