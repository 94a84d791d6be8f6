"""Issue 16 end to end: follow-ups in the same thread that stop on a reply, against the fake Nylas served
on loopback, on the CLI's virtual clock. Every count is taken where it happens: at the fake."""

from __future__ import annotations

import csv
import json
import sqlite3
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from conftest import API_KEY, SECRET, copy_sample, serve_fake
from postgres import fresh_database
from support import serve_events, short_store_waits, store_held

import campaign.dispatch._loop as loop_module
import campaign.followups._sequence as sequence_module
from campaign.cli.base import options
from campaign.clock import SystemClock
from campaign.ledger import open_ledger
from campaign.ledger._read import content_key
from campaign.manifest import load_manifest
from campaign.pipeline import load_content_fingerprint
from campaign.testing import FakeClock, FakeNylas
from campaign.testing.answers import build_answer

SENDERS = {"ana": ("grant-ana", "ana@corp.example.com"), "ben": ("grant-ben", "ben@corp.example.com")}
PEOPLE = [f"person{n}@example.net" for n in range(1, 7)]


def serve_senders(loopback, clock: FakeClock, monkeypatch) -> Iterator[FakeNylas]:
    """A fake with both senders' grants on `clock` (the CLI's: replies and due times are measured in the
    same time), served on conftest's loopback server, the CLI pointed at it."""
    fake = FakeNylas(api_key=API_KEY, clock=clock)
    for grant, email in SENDERS.values():
        fake.add_grant(grant, email)
    yield from serve_fake(loopback, fake, monkeypatch)


@pytest.fixture(name="fake")
def _fake(_loopback, cli_clock, monkeypatch):
    yield from serve_senders(_loopback, cli_clock, monkeypatch)


def write_campaign(
    folder: Path,
    *,
    nudge: str = 'after = "2d"',
    last: str = 'after = "3d"',
    sender: str = "",
    campaign: str = "",
    message: str = "",
    columns: str = "",
    people: list[str] | None = None,
) -> Path:
    """Three steps (message, nudge, last-call) from two senders; extra keys per table as TOML lines."""
    folder.mkdir(exist_ok=True)
    rows = people or PEOPLE
    header = "email,name,rep" + (f",{columns.split('=')[0]}" if columns else "")
    extra = f",{columns.split('=')[1]}" if columns else ""
    lines = [f"{email},P{n},{'ana' if n % 2 else 'ben'}{extra}" for n, email in enumerate(rows, start=1)]
    (folder / "recipients.csv").write_text("\n".join([header, *lines]) + "\n", encoding="utf-8")
    (folder / "step1.txt.j2").write_text("Hello {{ name }}\n", encoding="utf-8")
    (folder / "nudge.txt.j2").write_text(
        "About {{ previous.subject }} ({{ previous.step }})\n", encoding="utf-8"
    )
    (folder / "last.txt.j2").write_text("Last note, {{ name }}\n", encoding="utf-8")
    senders = "".join(
        f'\n[[senders]]\nname = "{name}"\ngrant_id = "{grant}"\nemail = "{email}"\n'
        f"per_second = 50\n{sender}\n"
        for name, (grant, email) in SENDERS.items()
    )
    manifest = folder / "campaign.toml"
    manifest.write_text(
        f'[campaign]\nname = "follow"\n{campaign}\n\n'
        '[recipients]\nsource = "recipients.csv"\nname_column = "name"\nsender_column = "rep"\n'
        + (f'timezone_column = "{columns.split("=")[0]}"\n' if columns else "")
        + f'\n[message]\nsubject = "Renewal for {{{{ name }}}}"\ntext = "step1.txt.j2"\n{message}\n\n'
        f'[[followups]]\nname = "nudge"\ntext = "nudge.txt.j2"\n{nudge}\n\n'
        f'[[followups]]\nname = "last-call"\ntext = "last.txt.j2"\n{last}\n' + senders,
        encoding="utf-8",
    )
    return manifest


def by_step(fake: FakeNylas) -> dict[str, dict[str, list]]:
    """Deliveries per recipient, per step (from the metadata the message carried)."""
    found: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for delivery in fake.deliveries:
        step = delivery.payload.get("metadata", {}).get("step", "message")
        found[delivery.payload["to"][0]["email"]][step].append(delivery)
    return found


def steps_json(cli, manifest: Path) -> dict:
    return json.loads(cli("status", manifest, "--json").stdout)["steps"]


def reply(fake: FakeNylas, email: str, *, step: str = "message", auto: bool = False, in_thread: bool = True):
    """`email` answers the message of `step` it was sent (in its thread, or as a new message)."""
    (sent,) = by_step(fake)[email][step]
    grant = next(g for g, mailbox in SENDERS.values() if g == sent.grant_id)
    mailbox = next(m for g, m in SENDERS.values() if g == grant)
    raw = build_answer(
        email, mailbox=mailbox, subject=sent.payload["subject"], at=fake.clock.now(), auto=auto
    )
    return fake.receive_message(grant, raw, reply_to=sent.id if in_thread else None)


def test_a_reply_in_the_thread_or_outside_it_stops_the_next_steps(fake, cli, cli_clock, tmp_path):
    """Step 1 to everyone; two reply in the thread and one writes a new message between the runs: those
    three get no follow-up; everyone else gets the nudge once its time came, and exit 75 says when."""
    manifest = write_campaign(tmp_path / "c")
    first = cli("run", manifest, "--yes")
    assert first.exit_code == 75, first.output
    assert "next follow-up is due" in first.output
    assert len(fake.deliveries) == len(PEOPLE)
    reply(fake, PEOPLE[0])
    reply(fake, PEOPLE[1])
    reply(fake, PEOPLE[2], in_thread=False)
    cli_clock.advance(2 * 86_400 + 1)
    second = cli("resume", manifest, "--yes")
    assert second.exit_code == 75, second.output
    sent = by_step(fake)
    assert [email for email in PEOPLE if sent[email]["nudge"]] == PEOPLE[3:]
    assert all(len(sent[email]["nudge"]) == 1 for email in PEOPLE[3:])
    nudge = steps_json(cli, manifest)["nudge"]
    assert nudge["stopped"] == {"replied": 3}
    assert nudge["sent"] == 3
    assert steps_json(cli, manifest)["last-call"]["scheduled"] == 3


@pytest.mark.parametrize("in_thread", [True, False])
def test_a_reply_dated_by_a_provider_clock_behind_ours_still_stops_the_follow_up(
    fake, cli, cli_clock, tmp_path, in_thread
):
    """The provider dates a reply by its own clock, here two minutes behind ours: the reply reads as
    older than step 1's send. It is still the recipient's answer, and the nudge is not sent."""
    manifest = write_campaign(tmp_path / "c")
    assert cli("run", manifest, "--yes").exit_code == 75
    email = PEOPLE[0]
    (sent,) = by_step(fake)[email]["message"]
    mailbox = next(m for g, m in SENDERS.values() if g == sent.grant_id)
    behind = cli_clock.now() - timedelta(minutes=2)
    raw = build_answer(email, mailbox=mailbox, subject=sent.payload["subject"], at=behind)
    fake.receive_message(sent.grant_id, raw, received_at=behind, reply_to=sent.id if in_thread else None)
    cli_clock.advance(2 * 86_400 + 1)
    assert cli("resume", manifest, "--yes").exit_code == 75
    sent_now = by_step(fake)
    assert not sent_now[email]["nudge"]
    assert all(len(sent_now[other]["nudge"]) == 1 for other in PEOPLE[1:])
    assert steps_json(cli, manifest)["nudge"]["stopped"] == {"replied": 1}


def test_every_follow_up_answers_the_step_before_through_the_same_grant(fake, cli, cli_clock, tmp_path):
    """Each follow-up carries the previous step's message id, "Re: " and step 1's subject, step 1's grant,
    and joins its thread at the fake; status and report count per step what the fake received."""
    manifest = write_campaign(tmp_path / "c")
    assert cli("run", manifest, "--yes").exit_code == 75
    cli_clock.advance(2 * 86_400)
    assert cli("resume", manifest, "--yes").exit_code == 75
    cli_clock.advance(3 * 86_400)
    done = cli("resume", manifest, "--yes")
    assert done.exit_code == 0, done.output
    for email, steps in by_step(fake).items():
        (first,), (nudge,), (last,) = steps["message"], steps["nudge"], steps["last-call"]
        assert "reply_to_message_id" not in first.payload
        assert nudge.payload["reply_to_message_id"] == first.id
        assert last.payload["reply_to_message_id"] == nudge.id
        assert nudge.payload["subject"] == last.payload["subject"] == f"Re: {first.payload['subject']}"
        assert first.grant_id == nudge.grant_id == last.grant_id
        thread = fake.thread(first.grant_id, fake._sent_message(first.grant_id, first.id)["thread_id"])
        assert thread is not None
        assert set(thread["message_ids"]) >= {first.id, nudge.id, last.id}
        assert (nudge.payload["metadata"]["key3"], nudge.payload["metadata"]["key2"]) == ("nudge", email)
        assert f"About Renewal for P{PEOPLE.index(email) + 1} (message)" in nudge.payload["body"]
    steps = steps_json(cli, manifest)
    assert [steps[name]["sent"] for name in ("message", "nudge", "last-call")] == [len(PEOPLE)] * 3
    report = tmp_path / "report.csv"
    assert cli("report", manifest, "--out", report).exit_code == 0
    lines = report.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1 + 3 * len(PEOPLE) == 1 + len(fake.deliveries)
    header = lines[0].split(",")
    first_row = dict(zip(header, lines[1].split(","), strict=True))
    assert (first_row["key"], first_row["step"]) == (PEOPLE[0], "message")
    assert [dict(zip(header, line.split(","), strict=True))["step"] for line in lines[1:4]] == [
        "message",
        "nudge",
        "last-call",
    ]


@pytest.mark.parametrize(("rule", "nudged"), [("ignore", True), ("stop", False)])
def test_an_auto_reply_follows_the_steps_rule(fake, cli, cli_clock, tmp_path, rule, nudged):
    """An out-of-office in the thread: "ignore" sends the nudge and counts the auto-reply; "stop" stops."""
    manifest = write_campaign(tmp_path / "c", nudge=f'after = "1d"\nauto_replies = "{rule}"')
    assert cli("run", manifest, "--yes").exit_code == 75
    reply(fake, PEOPLE[0], auto=True)
    cli_clock.advance(86_400)
    assert cli("resume", manifest, "--yes").exit_code == 75
    assert bool(by_step(fake)[PEOPLE[0]]["nudge"]) is nudged
    nudge = steps_json(cli, manifest)["nudge"]
    if nudged:
        assert (nudge["auto_replied_continuing"], nudge["stopped"]) == (1, {})
    else:
        assert (nudge["auto_replied_continuing"], nudge["stopped"]) == (0, {"auto-replied": 1})


def test_a_reply_only_stops_when_the_step_says_so(fake, cli, cli_clock, tmp_path):
    """stop_on without "reply": the nudge goes to someone who answered (e.g. a step meant for all)."""
    manifest = write_campaign(tmp_path / "c", nudge='after = "1d"\nstop_on = ["bounce", "unsubscribe"]')
    assert cli("run", manifest, "--yes").exit_code == 75
    reply(fake, PEOPLE[0])
    cli_clock.advance(86_400)
    assert cli("resume", manifest, "--yes").exit_code == 75
    assert len(by_step(fake)[PEOPLE[0]]["nudge"]) == 1


def test_nothing_is_sent_before_its_time(fake, cli, cli_clock, tmp_path):
    """A minute before the nudge is due, a resume sends nothing (exit 75); a minute after, it sends."""
    manifest = write_campaign(tmp_path / "c")
    assert cli("run", manifest, "--yes").exit_code == 75
    cli_clock.advance(2 * 86_400 - 60)
    early = cli("resume", manifest, "--yes")
    assert early.exit_code == 75, early.output
    assert len(fake.deliveries) == len(PEOPLE)
    cli_clock.advance(120)
    assert cli("resume", manifest, "--yes").exit_code == 75
    assert len(fake.deliveries) == 2 * len(PEOPLE)


def test_wait_sends_the_whole_sequence_in_one_run(fake, cli, tmp_path):
    """`run --wait` sleeps (on the clock) until each step is due and goes on: every step, exit 0."""
    manifest = write_campaign(tmp_path / "c")
    result = cli("run", manifest, "--yes", "--wait")
    assert result.exit_code == 0, result.output
    assert "follow-ups scheduled; waiting for the next one" in result.output
    sent = by_step(fake)
    assert all(len(sent[email][step]) == 1 for email in PEOPLE for step in ("message", "nudge", "last-call"))
    times = sorted(d.delivered_at for d in fake.deliveries)
    assert times[-1] - times[0] >= timedelta(days=5)


def test_a_failed_reply_lookup_never_sends_and_is_tried_again(fake, cli, cli_clock, tmp_path):
    """The mailbox's reads fail (503): the nudges stay due and unsent; once reads work, they go."""
    manifest = write_campaign(tmp_path / "c", people=PEOPLE[:2])
    assert cli("run", manifest, "--yes").exit_code == 75
    cli_clock.advance(2 * 86_400)
    for grant, _ in SENDERS.values():
        fake.fail_reads(grant, times=1000)
    held = cli("resume", manifest, "--yes")
    assert held.exit_code == 75, held.output
    assert (
        "2 follow-ups held back: their reply lookup failed (they are never sent blind); they are looked up "
        "again on the next run"
    ) in " ".join(held.output.split())
    assert len(fake.deliveries) == 2
    assert steps_json(cli, manifest)["nudge"]["due_now"] == 2
    fake.clear_faults()
    assert cli("resume", manifest, "--yes").exit_code == 75
    assert len(fake.deliveries) == 4


def test_a_reply_that_arrives_while_waiting_stops_the_step(fake, cli, cli_clock, tmp_path):
    """The lookups happen right before the claim: a reply placed after scheduling still stops it."""
    manifest = write_campaign(tmp_path / "c", people=PEOPLE[:2])
    assert cli("run", manifest, "--yes").exit_code == 75
    assert steps_json(cli, manifest)["nudge"]["scheduled"] == 2
    cli_clock.advance(86_400)
    reply(fake, PEOPLE[1])
    cli_clock.advance(86_400)
    assert cli("resume", manifest, "--yes").exit_code == 75
    assert [email for email in PEOPLE[:2] if by_step(fake)[email]["nudge"]] == [PEOPLE[0]]


def test_an_unsubscribe_stops_the_sequence(fake, cli, cli_clock, tmp_path):
    """Someone added to a suppression store after step 1 gets no follow-up (reason unsubscribed)."""
    from campaign.unsubscribe import open_store

    manifest = write_campaign(tmp_path / "c", people=PEOPLE[:2])
    text = manifest.read_text().replace(
        'sender_column = "rep"\n', 'sender_column = "rep"\nsuppress = ["optouts.sqlite"]\n'
    )
    manifest.write_text(text)
    store = open_store(tmp_path / "c" / "optouts.sqlite", clock=cli_clock)
    store.close()
    assert cli("run", manifest, "--yes").exit_code == 75
    store = open_store(tmp_path / "c" / "optouts.sqlite", clock=cli_clock)
    store.record("follow", PEOPLE[0], email=PEOPLE[0], source="test")
    store.close()
    cli_clock.advance(2 * 86_400)
    assert cli("resume", manifest, "--yes").exit_code == 75
    assert [email for email in PEOPLE[:2] if by_step(fake)[email]["nudge"]] == [PEOPLE[1]]
    assert steps_json(cli, manifest)["nudge"]["stopped"] == {"unsubscribed": 1}


def test_someone_added_to_a_suppression_file_after_step_1_gets_no_follow_up(fake, cli, cli_clock, tmp_path):
    """A suppression file means never mailed again, whatever the list says: the plan checked step 1
    before the address was added, so the check before each follow-up's claim reads the file too."""
    manifest = write_campaign(tmp_path / "c", people=PEOPLE[:2])
    optouts = tmp_path / "c" / "optouts.txt"
    optouts.write_text("# never mail again\n", encoding="utf-8")
    text = manifest.read_text().replace(
        'sender_column = "rep"\n', 'sender_column = "rep"\nsuppress = ["optouts.txt"]\n'
    )
    manifest.write_text(text)
    assert cli("run", manifest, "--yes").exit_code == 75
    optouts.write_text(f"# never mail again\nP1 <{PEOPLE[0].upper()}>\n", encoding="utf-8")
    cli_clock.advance(2 * 86_400)
    assert cli("resume", manifest, "--yes").exit_code == 75
    cli_clock.advance(3 * 86_400)
    assert cli("resume", manifest, "--yes").exit_code == 0
    assert {step: len(sent) for step, sent in by_step(fake)[PEOPLE[0]].items()} == {"message": 1}
    assert {step: len(sent) for step, sent in by_step(fake)[PEOPLE[1]].items()} == {
        "message": 1, "nudge": 1, "last-call": 1
    }  # fmt: skip
    assert steps_json(cli, manifest)["nudge"]["stopped"] == {"suppressed": 1}


def test_an_opt_out_since_step_1_in_a_ledger_from_before_cells_were_kept(fake, cli, cli_clock, tmp_path):
    """A ledger begun before the ledger kept each row's cells (schema 7; migration 8 cleared the digests
    it held), with step 1 sent and the nudges scheduled; then one recipient unsubscribed. The check after
    the upgrade skips that row, and its step 1 row got no cells: every resume stopped (exit 74, 'no
    readable cells'), nobody else's follow-up sent. Now the skip brings the cells: the nudge is skipped
    as unsubscribed, everyone else gets each step once."""
    from campaign.unsubscribe import open_store

    manifest = write_campaign(tmp_path / "c", people=PEOPLE[:2])
    text = manifest.read_text().replace(
        'sender_column = "rep"\n', 'sender_column = "rep"\nsuppress = ["optouts.sqlite"]\n'
    )
    manifest.write_text(text)
    open_store(tmp_path / "c" / "optouts.sqlite", clock=cli_clock).close()
    assert cli("run", manifest, "--yes").exit_code == 75
    with sqlite3.connect(manifest.with_name("campaign.ledger.sqlite")) as db:  # as migration 8 leaves it
        db.execute("UPDATE recipients SET cells = NULL")
        db.execute("DELETE FROM meta WHERE key IN ('plan_stamp', 'rules_stamp')")
    db.close()
    store = open_store(tmp_path / "c" / "optouts.sqlite", clock=cli_clock)
    store.record("follow", PEOPLE[0], email=PEOPLE[0], source="test")
    store.close()
    cli_clock.advance(2 * 86_400)
    nudged = cli("resume", manifest, "--yes")
    assert nudged.exit_code == 75, nudged.output
    cli_clock.advance(3 * 86_400)
    done = cli("resume", manifest, "--yes")
    assert done.exit_code == 0, done.output
    assert {step: len(sent) for step, sent in by_step(fake)[PEOPLE[0]].items()} == {"message": 1}
    assert {step: len(sent) for step, sent in by_step(fake)[PEOPLE[1]].items()} == {
        "message": 1, "nudge": 1, "last-call": 1
    }  # fmt: skip
    assert steps_json(cli, manifest)["nudge"]["stopped"] == {"unsubscribed": 1}


def test_a_changed_follow_up_is_refused_once_it_began_and_a_new_one_is_allowed(
    fake, cli, cli_clock, tmp_path
):
    """Per step: editing the nudge after it went out needs --allow-changed-content; adding a third
    follow-up to a running campaign schedules it for everyone who got the step before."""
    manifest = write_campaign(tmp_path / "c", people=PEOPLE[:2])
    assert cli("run", manifest, "--yes").exit_code == 75
    (tmp_path / "c" / "nudge.txt.j2").write_text("Changed before it was sent\n", encoding="utf-8")
    assert cli("resume", manifest, "--yes").exit_code == 75  # not sent yet: a change is free
    cli_clock.advance(2 * 86_400)
    assert cli("resume", manifest, "--yes").exit_code == 75
    (tmp_path / "c" / "nudge.txt.j2").write_text("Changed after it was sent\n", encoding="utf-8")
    refused = cli("resume", manifest, "--yes")
    assert refused.exit_code == 2
    assert "follow-up 'nudge' changed since sending began" in refused.output
    (tmp_path / "c" / "nudge.txt.j2").write_text("Changed before it was sent\n", encoding="utf-8")
    (tmp_path / "c" / "extra.txt.j2").write_text("One more\n", encoding="utf-8")
    manifest.write_text(
        manifest.read_text() + '\n[[followups]]\nname = "extra"\nafter = "1d"\ntext = "extra.txt.j2"\n'
    )
    cli_clock.advance(3 * 86_400)
    assert cli("resume", manifest, "--yes").exit_code == 75
    cli_clock.advance(86_400)
    assert cli("resume", manifest, "--yes").exit_code == 0
    assert all(len(by_step(fake)[email]["extra"]) == 1 for email in PEOPLE[:2])


def _nudged(cli, cli_clock, tmp_path) -> Path:
    """Two recipients sent step 1, then the nudge: every step but the last has begun sending."""
    manifest = write_campaign(tmp_path / "c", people=PEOPLE[:2])
    assert cli("run", manifest, "--yes").exit_code == 75
    cli_clock.advance(2 * 86_400)
    assert cli("resume", manifest, "--yes").exit_code == 75
    return manifest


def _each_step_once(fake: FakeNylas) -> None:
    for email in PEOPLE[:2]:
        assert {step: len(sent) for step, sent in by_step(fake)[email].items()} == {
            "message": 1, "nudge": 1, "last-call": 1
        }  # fmt: skip


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_follow_up_renamed_after_it_went_out_is_refused_and_nobody_gets_it_twice(
    fake, cli, cli_clock, tmp_path, backend
):
    """The nudge went to both recipients; the manifest then calls it "reminder", same templates. A row's
    key holds its step's name: the run is refused (exit 2, naming both) with nothing sent, even with
    --allow-changed-content; named "nudge" again, the sequence goes on and each step goes once."""

    def check(url: str) -> None:
        manifest = write_campaign(tmp_path / "c", people=PEOPLE[:2])
        if url:
            manifest.write_text(manifest.read_text() + f'\n[ledger]\nurl = "{url}"\n')
        assert cli("run", manifest, "--yes").exit_code == 75
        cli_clock.advance(2 * 86_400)
        assert cli("resume", manifest, "--yes").exit_code == 75
        named = manifest.read_text()
        manifest.write_text(named.replace('name = "nudge"', 'name = "reminder"'))
        cli_clock.advance(3 * 86_400)
        for flags in ((), ("--allow-changed-content",)):
            refused = cli("resume", manifest, "--yes", *flags)
            assert refused.exit_code == 2, refused.output
            assert "follow-up 'reminder' is follow-up 'nudge' renamed" in refused.output
        assert len(fake.deliveries) == 4
        manifest.write_text(named)
        done = cli("resume", manifest, "--yes")
        assert done.exit_code == 0, done.output
        _each_step_once(fake)

    if backend == "postgres":
        with fresh_database() as url:
            check(url)
    else:
        check("")


_NUDGE_TABLE = '[[followups]]\nname = "nudge"\ntext = "nudge.txt.j2"\nafter = "1d"\n\n'


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_step_inserted_before_a_scheduled_one_goes_first_and_the_later_one_waits_its_delay(
    fake, cli, cli_clock, tmp_path, backend
):
    """Steps [message, last-call (3d)]; two recipients got both, two more got step 1 three days later,
    their last-call scheduled for day 6. A `nudge` (1d) is then inserted between the steps. On day 6 the
    two newer recipients get the nudge alone (not the last-call too, minutes later), and the last-call
    goes 3 days after each one's nudge, answering it; the two who got the last-call never get the
    earlier nudge; a reply to the nudge stops the last-call."""

    def check(url: str) -> None:
        folder = tmp_path / "c"
        runs: list[set[tuple[str, str]]] = []

        def resume(expected: int) -> None:
            seen = len(fake.deliveries)
            result = cli("resume" if runs else "run", manifest, "--yes")
            assert result.exit_code == expected, result.output
            runs.append({
                (d.payload["to"][0]["email"], d.payload.get("metadata", {}).get("step", "message"))
                for d in fake.deliveries[seen:]
            })  # fmt: skip

        write_campaign(folder, people=PEOPLE[:2], nudge='after = "1d"')
        manifest = folder / "campaign.toml"
        inserted = manifest.read_text() + (f'\n[ledger]\nurl = "{url}"\n' if url else "")
        assert _NUDGE_TABLE in inserted
        manifest.write_text(inserted.replace(_NUDGE_TABLE, ""))
        resume(75)
        cli_clock.advance(3 * 86_400)
        listed = manifest.read_text()
        write_campaign(folder, people=PEOPLE[:4])  # the list grew by two
        manifest.write_text(listed)
        resume(75)
        manifest.write_text(inserted)
        cli_clock.advance(3 * 86_400)  # day 6: the newer two's last-call is due by its first schedule
        resume(75)
        reply(fake, PEOPLE[3], step="nudge")
        report = tmp_path / "report.csv"
        assert cli("report", manifest, "--out", report).exit_code == 0
        with report.open(encoding="utf-8", newline="") as lines:
            rows = {(row["email"], row["step"]): row for row in csv.DictReader(lines)}
        assert (PEOPLE[0], "nudge") not in rows
        due = datetime.fromisoformat(rows[(PEOPLE[2], "last-call")]["due_at"])
        assert due == datetime.fromisoformat(rows[(PEOPLE[2], "nudge")]["sent_at"]) + timedelta(days=3)
        # A run on a database moves the fake clock on by itself (its lease heartbeats wait on it), so it
        # starts an hour early there; a file's run a second early.
        early = 3600 if url else 1
        cli_clock.advance((due - cli_clock.now()).total_seconds() - early)
        resume(75)
        cli_clock.advance(early)
        resume(0)
        assert runs == [
            {(PEOPLE[0], "message"), (PEOPLE[1], "message")},
            {
                (PEOPLE[0], "last-call"),
                (PEOPLE[1], "last-call"),
                (PEOPLE[2], "message"),
                (PEOPLE[3], "message"),
            },
            {(PEOPLE[2], "nudge"), (PEOPLE[3], "nudge")},
            set(),
            {(PEOPLE[2], "last-call")},
        ]
        (nudge,) = by_step(fake)[PEOPLE[2]]["nudge"]
        (last,) = by_step(fake)[PEOPLE[2]]["last-call"]
        assert last.payload["reply_to_message_id"] == nudge.id
        steps = steps_json(cli, manifest)
        assert (steps["nudge"]["sent"], steps["last-call"]["sent"]) == (2, 3)
        assert steps["last-call"]["stopped"] == {"replied": 1}

    if backend == "postgres":
        with fresh_database() as url:
            check(url)
    else:
        check("")


def test_a_moved_campaign_goes_on_with_its_follow_ups(fake, cli, cli_clock, tmp_path):
    """Each step's fingerprint counts paths from the campaign's folder: moved once the nudge went out,
    the campaign goes on, each step sent once."""
    manifest = _nudged(cli, cli_clock, tmp_path)
    moved = tmp_path / "elsewhere" / "renamed"
    moved.parent.mkdir()
    manifest.parent.rename(moved)
    cli_clock.advance(3 * 86_400)
    done = cli("resume", moved / manifest.name, "--yes")
    assert done.exit_code == 0, done.output
    _each_step_once(fake)


def test_legacy_fingerprints_of_every_step_are_unchanged_and_replaced(fake, cli, cli_clock, tmp_path):
    """A ledger that kept each step's fingerprint in the legacy form (templates named by their absolute
    path): an edit to the nudge is still refused, and the unchanged content goes on, the ledger then
    holding today's fingerprint of every step, no change journaled."""
    from campaign.pipeline._content import load_legacy_content_fingerprint

    manifest = _nudged(cli, cli_clock, tmp_path)
    loaded = load_manifest(manifest)
    ledger = open_ledger(manifest.with_name("campaign.ledger.sqlite"), clock=SystemClock(), campaign="follow")
    try:
        for step in loaded.steps:
            ledger._set_meta(content_key(step), load_legacy_content_fingerprint(loaded, step))
    finally:
        ledger.close()
    nudge = manifest.parent / "nudge.txt.j2"
    kept = nudge.read_text(encoding="utf-8")
    nudge.write_text("Changed after it was sent\n", encoding="utf-8")
    refused = cli("resume", manifest, "--yes")
    assert refused.exit_code == 2
    assert "follow-up 'nudge' changed since sending began" in refused.output
    nudge.write_text(kept, encoding="utf-8")
    cli_clock.advance(3 * 86_400)
    done = cli("resume", manifest, "--yes")
    assert done.exit_code == 0, done.output
    _each_step_once(fake)
    ledger = open_ledger(manifest.with_name("campaign.ledger.sqlite"), clock=SystemClock(), campaign="follow")
    try:
        assert {step: ledger.content_fingerprint(step) for step in loaded.steps} == {
            step: load_content_fingerprint(loaded, step) for step in loaded.steps
        }
        assert ledger.journal() == []
    finally:
        ledger.close()


@pytest.fixture(name="saturday")
def _saturday(cli_clock, monkeypatch) -> FakeClock:
    """The CLI's clock on Saturday 2026-12-05, 12:00 UTC (in place of `cli_clock`'s)."""
    clock = FakeClock(start=datetime(2026, 12, 5, 12, 0, tzinfo=UTC))
    monkeypatch.setattr(options, "clock", clock)
    return clock


@pytest.fixture(name="weekend_fake")
def _weekend_fake(_loopback, saturday, monkeypatch):
    yield from serve_senders(_loopback, saturday, monkeypatch)


def test_no_step_leaves_outside_its_senders_window(weekend_fake, cli, saturday, tmp_path):
    """Saturday, window Mon-Fri 09:00-17:30 Berlin: the run sends nothing and exits 75 naming when it
    opens; with --wait it sends at Monday 09:00 Berlin, and the nudge "1 business days" later skips
    the holiday (Tuesday) to Wednesday, inside the window."""
    manifest = write_campaign(
        tmp_path / "c",
        nudge='after = "1 business days"',
        last='after = "1d"',
        sender='window = "Mon-Fri 09:00-17:30"\ntimezone = "Europe/Berlin"',
        campaign='holidays = ["2026-12-08"]',
    )
    shut = cli("run", manifest, "--yes")
    assert shut.exit_code == 75, shut.output
    assert "send window is shut" in shut.output
    assert weekend_fake.deliveries == []
    waited = cli("run", manifest, "--yes", "--wait")
    assert waited.exit_code == 0, waited.output
    monday_9_berlin = datetime(2026, 12, 7, 8, 0, tzinfo=UTC)
    sent = by_step(weekend_fake)
    for email in PEOPLE:
        (first,) = sent[email]["message"]
        (nudge,) = sent[email]["nudge"]
        (last,) = sent[email]["last-call"]
        assert monday_9_berlin <= first.delivered_at < monday_9_berlin + timedelta(minutes=1)
        # Wednesday, at the time of day step 1 went (Tuesday is a holiday).
        assert nudge.delivered_at.date() == datetime(2026, 12, 9).date()
        assert nudge.delivered_at - first.delivered_at < timedelta(days=2, minutes=1)
        assert last.delivered_at - nudge.delivered_at >= timedelta(days=1)
    for delivery in weekend_fake.deliveries:
        local = delivery.delivered_at.astimezone(ZoneInfo("Europe/Berlin"))
        assert local.weekday() < 5
        assert (9, 0) <= (local.hour, local.minute) < (17, 30)


def test_one_senders_shut_window_does_not_hold_anothers_follow_ups(weekend_fake, cli, saturday, tmp_path):
    """--wait on Saturday noon: ana sends Mon-Fri 09:00-17:30 Berlin, ben any time, each step an hour
    after the one before. Ben's whole sequence goes out on Saturday, an hour a step (a round waiting for
    ana's window held it until Monday); ana's goes from Monday 09:00, inside her window."""
    manifest = write_campaign(tmp_path / "c", nudge='after = "1h"', last='after = "1h"')
    window = 'window = "Mon-Fri 09:00-17:30"\ntimezone = "Europe/Berlin"\n'
    text = manifest.read_text()
    manifest.write_text(text.replace('grant_id = "grant-ana"\n', 'grant_id = "grant-ana"\n' + window))
    result = cli("run", manifest, "--yes", "--wait")
    assert result.exit_code == 0, result.output
    assert "or for ana to send again" in result.output
    assert "window shut, 1 day 19 h" in result.output  # not "parked"
    noon, monday_9_berlin = datetime(2026, 12, 5, 12, 0, tzinfo=UTC), datetime(2026, 12, 7, 8, 0, tzinfo=UTC)
    sent = by_step(weekend_fake)
    for email in PEOPLE:
        steps = [sent[email][step] for step in ("message", "nudge", "last-call")]
        assert [len(deliveries) for deliveries in steps] == [1, 1, 1]
        times = [deliveries[0].delivered_at for deliveries in steps]
        if steps[0][0].grant_id == "grant-ben":
            assert times[0] < noon + timedelta(minutes=1)
            assert all(
                timedelta(hours=1) <= b - a < timedelta(hours=1, minutes=1) for a, b in pairwise(times)
            )
        else:
            assert all(monday_9_berlin <= at < monday_9_berlin + timedelta(hours=3) for at in times)


def test_one_senders_quota_pause_does_not_hold_anothers_follow_ups(fake, cli, cli_clock, tmp_path):
    """--wait: ben's mailbox answers its first send with a daily limit naming no time (a pause of an hour);
    ana's nudges, ten minutes after her first messages, go out then, not after ben's hour."""
    from campaign.testing import Fault

    manifest = write_campaign(tmp_path / "c", nudge='after = "10m"', last='after = "10m"')
    fake.script(Fault.DAILY_LIMIT, grant_id="grant-ben", times=1)
    start = cli_clock.now()
    result = cli("run", manifest, "--yes", "--wait")
    assert result.exit_code == 0, result.output
    sent = by_step(fake)
    bens = []
    for email in PEOPLE:
        times = [sent[email][step][0].delivered_at for step in ("message", "nudge", "last-call")]
        if sent[email]["message"][0].grant_id == "grant-ana":
            assert times[0] < start + timedelta(minutes=1)
            assert all(b - a < timedelta(minutes=11) for a, b in pairwise(times))
        else:
            bens.append(times[0])
    # The pause held ben's rest an hour (a send already in flight when it came may have gone at once).
    assert max(bens) >= start + timedelta(minutes=59)


def test_deliver_at_uses_the_recipients_time_zone(weekend_fake, cli, saturday, tmp_path):
    """deliver_at = "09:30" with a time-zone column: each nudge leaves at 09:30 in its recipient's zone."""
    zones = {PEOPLE[0]: "Asia/Tokyo", PEOPLE[1]: "America/New_York"}
    manifest = write_campaign(
        tmp_path / "c",
        nudge='after = "1d"\ndeliver_at = "09:30"',
        people=PEOPLE[:2],
        columns="tz=Asia/Tokyo",
    )
    csv = (
        (tmp_path / "c" / "recipients.csv")
        .read_text()
        .replace(f"{PEOPLE[1]},P2,ben,Asia/Tokyo", f"{PEOPLE[1]},P2,ben,America/New_York")
    )
    (tmp_path / "c" / "recipients.csv").write_text(csv)
    assert cli("run", manifest, "--yes", "--wait", "--limit", "1000").exit_code in (0, 75)
    for email, zone in zones.items():
        (nudge,) = by_step(weekend_fake)[email]["nudge"]
        local = nudge.delivered_at.astimezone(ZoneInfo(zone))
        assert (local.hour, local.minute) == (9, 30)
        assert nudge.delivered_at >= datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def test_a_bad_time_zone_cell_stops_the_run_naming_row_and_column(fake, cli, tmp_path):
    manifest = write_campaign(tmp_path / "c", people=PEOPLE[:1], columns="tz=Mars/Olympus")
    result = cli("run", manifest, "--yes")
    assert result.exit_code == 65
    assert 'row 1, column "tz"' in result.output
    assert "Mars/Olympus" in result.output
    assert fake.deliveries == []
    assert not (tmp_path / "c" / "campaign.ledger.sqlite").exists()


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (("nudge", 'after = "three days"'), "followups[1].after"),
        (("sender", 'window = "Weekdays 9-5"'), "senders[1].window"),
        (("sender", 'timezone = "Europe/Atlantis"'), "senders[1].timezone"),
        (("nudge", 'after = "1d"\ndeliver_at = "25:00"'), "followups[1].deliver_at"),
        (("nudge", 'after = "1d"\nauto_replies = "sometimes"'), "followups[1].auto_replies"),
        (("campaign", 'holidays = ["next friday"]'), "campaign.holidays[1]"),
    ],
)
def test_bad_times_are_manifest_errors_naming_the_key(fake, cli, tmp_path, change, key):
    table, line = change
    manifest = write_campaign(tmp_path / "c", **{"nudge" if table == "nudge" else table: line})
    result = cli("run", manifest, "--yes")
    assert result.exit_code == 78, result.output
    assert key in result.output
    assert fake.deliveries == []


def test_a_domain_sender_cannot_send_follow_ups(fake, cli, tmp_path):
    manifest = write_campaign(tmp_path / "c")
    manifest.write_text(manifest.read_text().replace('grant_id = "grant-ben"', 'domain = "mail.example.com"'))
    result = cli("run", manifest, "--yes")
    assert result.exit_code == 78
    assert "senders[2].domain" in result.output
    assert "need mailbox senders" in result.output


def test_the_followups_sample_runs_its_whole_sequence_in_the_sandbox(cli, tmp_path):
    """The sample's documented command: three steps, the sandbox's simulated answers stop some, and
    status agrees with the outbox the sandbox wrote."""
    manifest = copy_sample("followups", tmp_path)
    result = cli("run", manifest, "--sandbox", "--yes", "--wait")
    assert result.exit_code == 0, result.output
    steps = json.loads(cli("status", manifest, "--sandbox", "--json").stdout)["steps"]
    assert list(steps) == ["message", "nudge", "last-call"]
    people = sum(steps["message"]["states"].values())
    assert steps["message"]["sent"] == people
    assert steps["nudge"]["stopped"].get("replied", 0) > 0
    assert steps["nudge"]["sent"] + sum(steps["nudge"]["stopped"].values()) == people
    assert steps["nudge"]["auto_replied_continuing"] + steps["last-call"]["auto_replied_continuing"] > 0
    outbox = list((manifest.parent / "campaign.sandbox" / "outbox").glob("*.json"))
    assert len(outbox) == sum(step["sent"] for step in steps.values())


def test_a_later_runs_follow_ups_get_their_own_outbox_files(cli, cli_clock, tmp_path):
    """The sample run step by step (a run per step, as without --wait): each run's outbox files are
    numbered on from the last run's, so a nudge to an address keeps the first message's file beside it."""
    manifest = copy_sample("followups", tmp_path)
    outbox = manifest.parent / "campaign.sandbox" / "outbox"
    first = cli("run", manifest, "--sandbox", "--yes")
    assert first.exit_code == 75, first.output
    before = {path.name: path.read_bytes() for path in outbox.iterdir()}
    cli_clock.advance(25)  # the nudge is due 20 s after the first message
    second = cli("resume", manifest, "--sandbox", "--yes")
    assert second.exit_code == 75, second.output
    after = {path.name: path.read_bytes() for path in outbox.iterdir()}
    assert {name: after.get(name) for name in before} == before  # nothing of the first run replaced
    steps = json.loads(cli("status", manifest, "--sandbox", "--json").stdout)["steps"]
    assert steps["nudge"]["sent"] > 0
    payloads = sorted(name for name in after if name.endswith(".json"))
    assert len(payloads) == steps["message"]["sent"] + steps["nudge"]["sent"]
    numbers = [int(name.split("-", 1)[0]) for name in payloads]
    assert numbers == list(range(1, len(payloads) + 1))
    nudged = [json.loads(after[name]) for name in payloads[steps["message"]["sent"] :]]
    assert all(payload["subject"].startswith("Re: ") for payload in nudged)
    assert f"{steps['message']['sent'] + 1:04d}" in second.output  # the table's numbers are the files'


def _with_store(manifest: Path, *, tracking: bool = False) -> Path:
    """The campaign with an unsubscribe store that `campaign serve` would record into."""
    store = manifest.parent / "events.sqlite"
    text = manifest.read_text(encoding="utf-8").replace(
        'sender_column = "rep"\n', 'sender_column = "rep"\nsuppress = ["events.sqlite"]\n'
    )
    if tracking:
        text = text.replace(
            'text = "step1.txt.j2"\n', 'text = "step1.txt.j2"\ntracking = { thread_replies = true }\n'
        )
    manifest.write_text(text, encoding="utf-8")
    return store


def test_a_thread_replied_notification_stops_the_follow_up_without_a_lookup(fake, cli, cli_clock, tmp_path):
    """Reply tracking labels each message campaign:key:step; the notification `campaign serve` keeps
    names the recipient, so the nudge stops even while the mailbox cannot be read (others are held)."""
    from campaign.events import record_notification
    from campaign.unsubscribe import open_store

    manifest = write_campaign(tmp_path / "c", people=PEOPLE[:2])
    store_path = _with_store(manifest, tracking=True)
    open_store(store_path, clock=cli_clock).close()
    assert cli("run", manifest, "--yes").exit_code == 75
    (first,) = by_step(fake)[PEOPLE[0]]["message"]
    assert first.payload["tracking_options"]["label"] == f"follow:{PEOPLE[0]}:message"
    reply(fake, PEOPLE[0])
    ((kind, envelope),) = fake._outbox
    assert kind == "thread.replied"
    store = open_store(store_path, clock=cli_clock)
    assert record_notification(store, json.dumps(envelope).encode(), clock=cli_clock) is not None
    store.close()
    _resume_two_days_on_with_mailboxes_unreadable(fake, cli, cli_clock, manifest)
    assert by_step(fake)[PEOPLE[0]]["nudge"] == []
    assert by_step(fake)[PEOPLE[1]]["nudge"] == []  # held: its lookup failed
    nudge = steps_json(cli, manifest)["nudge"]
    assert nudge["stopped"] == {"replied": 1}
    assert nudge["due_now"] == 1


def _resume_two_days_on_with_mailboxes_unreadable(fake, cli, cli_clock, manifest) -> None:
    """Resume when the nudge is due, with no mailbox readable: only a notification can stop it."""
    for grant, _ in SENDERS.values():
        fake.fail_reads(grant, times=1000)
    cli_clock.advance(2 * 86_400)
    result = cli("resume", manifest, "--yes")
    assert result.exit_code == 75, result.output


def test_a_thread_replied_notification_retried_and_duplicated_stops_the_follow_up_once(
    fake, cli, cli_clock, tmp_path, monkeypatch
):
    """The reply's notification reaches `campaign serve` over loopback as Nylas delivers it: its first try
    answered 503 (another writer holds the store), then the retry, twice (at least once). It is kept once,
    and the nudge stops for that recipient alone (the mailboxes cannot be read: only the notification
    can stop it), sent to nobody twice; the other recipient's nudge is held, as its lookup failed."""
    short_store_waits(monkeypatch)
    manifest = write_campaign(tmp_path / "c", people=PEOPLE[:2])
    store_path = _with_store(manifest, tracking=True)
    secret = b"nylas-webhook-secret-for-follow-ups"
    with serve_events(store_path, cli_clock, webhook_secret=secret, unsubscribe_secret=SECRET) as (
        store,
        url,
    ):
        fake.add_webhook(url, secret, ["thread.replied"])
        assert cli("run", manifest, "--yes").exit_code == 75
        reply(fake, PEOPLE[0])
        with store_held(store_path):
            assert fake.deliver_webhooks() == 1
        assert (fake.pending_webhooks, store.event_count()) == (1, 0)
        cli_clock.advance(300)
        fake.duplicate_webhooks = True
        assert fake.deliver_webhooks() == 2
        assert (fake.pending_webhooks, store.event_count()) == (0, 1)
        _resume_two_days_on_with_mailboxes_unreadable(fake, cli, cli_clock, manifest)
    assert by_step(fake)[PEOPLE[0]]["nudge"] == []
    assert by_step(fake)[PEOPLE[1]]["nudge"] == []
    assert [len(by_step(fake)[person]["message"]) for person in PEOPLE[:2]] == [1, 1]
    nudge = steps_json(cli, manifest)["nudge"]
    assert nudge["stopped"] == {"replied": 1}
    assert nudge["due_now"] == 1


@pytest.mark.parametrize(("auto", "nudged"), [(True, True), (False, False)])
def test_a_thread_replied_notification_of_an_out_of_office_follows_ignore(
    fake, cli, cli_clock, tmp_path, auto, nudged
):
    """Nylas notifies `thread.replied` for an autoresponder too: with `auto_replies = "ignore"` the
    notified message is read and classified, so an out-of-office does not stop the sequence (as the
    lookups alone would decide) while a person's reply still does."""
    from campaign.events import record_notification
    from campaign.unsubscribe import open_store

    nudge = 'after = "1d"\nauto_replies = "ignore"'
    manifest = write_campaign(tmp_path / "c", people=PEOPLE[:1], nudge=nudge)
    store_path = _with_store(manifest, tracking=True)
    open_store(store_path, clock=cli_clock).close()
    assert cli("run", manifest, "--yes").exit_code == 75
    reply(fake, PEOPLE[0], auto=auto)
    ((kind, envelope),) = fake._outbox
    assert kind == "thread.replied"
    store = open_store(store_path, clock=cli_clock)
    assert record_notification(store, json.dumps(envelope).encode(), clock=cli_clock) is not None
    store.close()
    cli_clock.advance(2 * 86_400)
    assert cli("resume", manifest, "--yes").exit_code in (0, 75)
    assert len(by_step(fake)[PEOPLE[0]]["nudge"]) == (1 if nudged else 0)
    nudge = steps_json(cli, manifest)["nudge"]
    assert nudge["stopped"] == ({} if nudged else {"replied": 1})
    assert nudge["auto_replied_continuing"] == (1 if nudged else 0)


def test_a_bounce_report_pulled_before_the_round_stops_the_follow_up(fake, cli, cli_clock, tmp_path):
    """A hard bounce lands in the sender's inbox as a DSN after step 1; before the nudges go out the run
    pulls it into the store (as `campaign events pull`), and that recipient gets no nudge."""
    from campaign.unsubscribe import open_store

    manifest = write_campaign(tmp_path / "c", people=PEOPLE[:3])
    store_path = _with_store(manifest)
    open_store(store_path, clock=cli_clock).close()
    fake.bounce_addresses = {PEOPLE[1]}
    assert cli("run", manifest, "--yes").exit_code == 75
    cli_clock.advance(2 * 86_400)
    assert cli("resume", manifest, "--yes").exit_code == 75
    assert [email for email in PEOPLE[:3] if by_step(fake)[email]["nudge"]] == [PEOPLE[0], PEOPLE[2]]
    assert steps_json(cli, manifest)["nudge"]["stopped"] == {"bounced": 1}


def test_an_unsubscribe_mailed_to_the_senders_inbox_stops_the_follow_up(fake, cli, cli_clock, tmp_path):
    """unsubscribe.mailto is ana's own mailbox: person1 unsubscribes by mail after step 1 (as Outlook.com
    does, through List-Unsubscribe's mailto); before the nudges go out the run reads it into the store,
    and person1 gets no nudge."""
    import re

    from campaign.unsubscribe import open_store

    manifest = write_campaign(tmp_path / "c", people=PEOPLE[:3])
    store_path = _with_store(manifest)
    open_store(store_path, clock=cli_clock).close()
    url = "https://example.com/u/{{ unsubscribe_token }}"
    manifest.write_text(
        manifest.read_text() + f'\n[unsubscribe]\nurl = "{url}"\nmailto = "ana@corp.example.com"\n'
    )
    assert cli("run", manifest, "--yes").exit_code == 75
    (first,) = by_step(fake)[PEOPLE[0]]["message"]
    assert first.grant_id == "grant-ana"
    header = next(h["value"] for h in first.payload["custom_headers"] if h["name"] == "List-Unsubscribe")
    subject = re.search(r"subject=(unsubscribe-[A-Za-z0-9_-]+)", header).group(1)
    mailed = f"From: <{PEOPLE[0]}>\r\nTo: <ana@corp.example.com>\r\nSubject: {subject}\r\n\r\nUnsubscribe\r\n"
    fake.receive_message("grant-ana", mailed.encode())
    cli_clock.advance(2 * 86_400)
    assert cli("resume", manifest, "--yes").exit_code == 75
    assert [email for email in PEOPLE[:3] if by_step(fake)[email]["nudge"]] == [PEOPLE[1], PEOPLE[2]]
    assert steps_json(cli, manifest)["nudge"]["stopped"] == {"unsubscribed": 1}


def test_editing_a_steps_timing_before_it_went_out_takes_effect(fake, cli, cli_clock, tmp_path):
    """The nudges are scheduled 2 days after step 1; the manifest then says 5 days, before any went out:
    they come due by the new timing (they went at day 2, by the old one, and at once after a longer
    edit), and each goes once."""
    manifest = write_campaign(tmp_path / "c", people=PEOPLE[:2], last='after = "30d"')
    assert cli("run", manifest, "--yes").exit_code == 75
    text = manifest.read_text()
    manifest.write_text(text.replace('after = "2d"', 'after = "5d"'))
    cli_clock.advance(3 * 86_400)
    early = cli("resume", manifest, "--yes")
    assert early.exit_code == 75, early.output
    assert [email for email in PEOPLE[:2] if by_step(fake)[email]["nudge"]] == []
    cli_clock.advance(3 * 86_400)
    assert cli("resume", manifest, "--yes").exit_code == 75
    assert [len(by_step(fake)[email]["nudge"]) for email in PEOPLE[:2]] == [1, 1]


def test_reconcile_finds_a_follow_up_by_its_step_not_step_ones_message(fake, cli, cli_clock, tmp_path):
    """The nudge went out but its answer was lost (504 after the send, replayed): the row is unknown;
    reconcile finds it by metadata key2 and key3 and records the nudge's own message id."""
    from campaign.testing import Fault

    manifest = write_campaign(tmp_path / "c", people=PEOPLE[:1])
    assert cli("run", manifest, "--yes").exit_code == 75
    cli_clock.advance(2 * 86_400)
    fake.script(Fault.TIMEOUT_AFTER_SEND, times=10)
    lost = cli("resume", manifest, "--yes")
    assert lost.exit_code == 1, lost.output
    assert steps_json(cli, manifest)["nudge"]["states"]["unknown"] == 1
    fake.clear_faults()
    settled = cli("reconcile", manifest)
    assert settled.exit_code == 0, settled.output
    (nudge,) = by_step(fake)[PEOPLE[0]]["nudge"]
    report = tmp_path / "r.csv"
    assert cli("report", manifest, "--out", report).exit_code == 0
    rows = [line.split(",") for line in report.read_text(encoding="utf-8").splitlines()]
    header = rows[0]
    found = {row[header.index("step")]: row[header.index("message_id")] for row in rows[1:]}
    assert found["nudge"] == nudge.id
    assert found["message"] != nudge.id
    assert steps_json(cli, manifest)["nudge"]["sent"] == 1


def test_a_follow_up_that_cannot_render_stops_the_run_before_anything_is_sent(fake, cli, tmp_path):
    manifest = write_campaign(tmp_path / "c")
    (tmp_path / "c" / "nudge.txt.j2").write_text("Hi {{ nickname }}\n", encoding="utf-8")
    result = cli("run", manifest, "--yes")
    assert result.exit_code == 65, result.output
    assert "nudge.txt.j2" in result.output
    assert "nickname" in result.output
    assert fake.deliveries == []


def test_a_follow_up_template_edited_between_runs_is_checked_again(fake, cli, cli_clock, tmp_path):
    """The plan stamp covers the follow-ups' templates: an unchanged resume skips the row check, but a
    nudge edited to use an unknown variable is caught before anything is sent, naming the template."""
    manifest = write_campaign(tmp_path / "c", people=PEOPLE[:2])
    assert cli("run", manifest, "--yes").exit_code == 75
    unchanged = cli("resume", manifest, "--yes")
    assert "unchanged since it was checked" in unchanged.output
    (tmp_path / "c" / "nudge.txt.j2").write_text("Hi {{ nickname }}\n", encoding="utf-8")
    cli_clock.advance(2 * 86_400)
    result = cli("resume", manifest, "--yes")
    assert result.exit_code == 65, result.output
    assert "nudge.txt.j2" in result.output
    assert "unchanged since it was checked" not in result.output  # checked again, not found mid-send
    assert len(fake.deliveries) == 2


def test_limit_counts_every_round_of_the_run(fake, cli, tmp_path):
    """--limit 3 with two recipients and a nudge due at once: step 1 to both, then one nudge; the run
    stops at the limit (exit 75) instead of sending the limit again in its follow-up round."""
    manifest = write_campaign(tmp_path / "c", people=PEOPLE[:2], nudge='after = "0s"')
    result = cli("run", manifest, "--yes", "--limit", "3")
    assert result.exit_code == 75, result.output
    assert "stopped at --limit" in result.output
    assert len(fake.deliveries) == 3


def test_due_follow_ups_are_read_a_page_at_a_time_and_each_goes_once(
    fake, cli, cli_clock, tmp_path, monkeypatch
):
    """Forty recipients, the lanes reading a job or so ahead and the due rows looked over two at a time:
    everyone still listed gets the nudge once, the one who left the list gets none (skipped)."""
    monkeypatch.setattr(loop_module, "_LOOK_AHEAD", 1)
    monkeypatch.setattr(sequence_module, "_BATCH", 2)
    people = [f"p{n}@example.net" for n in range(40)]
    manifest = write_campaign(tmp_path / "c", people=people)
    assert cli("run", manifest, "--yes").exit_code == 75
    listed = manifest.parent / "recipients.csv"
    lines = listed.read_text(encoding="utf-8").splitlines()
    listed.write_text(
        "\n".join(line for line in lines if not line.startswith("p7@")) + "\n", encoding="utf-8"
    )
    cli_clock.advance(2 * 86_400)
    assert cli("resume", manifest, "--yes").exit_code == 75
    sent = by_step(fake)
    assert {email: len(sent[email]["nudge"]) for email in people} == {
        email: int(email != "p7@example.net") for email in people
    }
    nudge = steps_json(cli, manifest)["nudge"]
    assert (nudge["sent"], nudge["due_now"], nudge["stopped"]) == (39, 0, {"not listed": 1})


@pytest.fixture(name="ms_fake")
def _ms_fake(_loopback, cli_clock, monkeypatch):
    """Both senders' grants on Microsoft, where a message filed by its owner gets a new id."""
    fake = FakeNylas(api_key=API_KEY, clock=cli_clock)
    for grant, email in SENDERS.values():
        fake.add_grant(grant, email, provider="microsoft")
    yield from serve_fake(_loopback, fake, monkeypatch)


def _microsoft_campaign(folder: Path, *, people: list[str] | None = None) -> Path:
    return write_campaign(folder, sender='provider = "microsoft"\nstop_after_rejections = 2', people=people)


def _refused_sends(fake: FakeNylas) -> list:
    return [record for record in fake.requests if record.status == 404]


@pytest.fixture(name="imap_fake")
def _imap_fake(_loopback, cli_clock, monkeypatch):
    """Both senders' grants on Yahoo: Nylas sends through IMAP/SMTP there, and a reply names the message
    it answers by its Message-ID header, not Nylas's id (nylas-api.md §1.2)."""
    fake = FakeNylas(api_key=API_KEY, clock=cli_clock)
    for grant, email in SENDERS.values():
        fake.add_grant(grant, email, provider="yahoo")
    yield from serve_fake(_loopback, fake, monkeypatch)


def test_a_follow_up_on_an_imap_grant_answers_the_message_id_header_the_send_gave(
    imap_fake, cli, cli_clock, tmp_path
):
    """On Yahoo, each follow-up's reply_to_message_id is the Message-ID header of the step it answers,
    read from that send's answer (sends ask for it: fields=include_basic_headers), so it joins that
    thread. Named by Nylas's id, the fake (as Nylas) finds no such message: 404, and no nudge went out."""
    fake = imap_fake
    manifest = write_campaign(tmp_path / "c", sender='provider = "yahoo"')
    assert cli("run", manifest, "--yes").exit_code == 75
    cli_clock.advance(2 * 86_400)
    assert cli("resume", manifest, "--yes").exit_code == 75
    cli_clock.advance(3 * 86_400)
    assert cli("resume", manifest, "--yes").exit_code == 0
    assert not [record for record in fake.requests if record.status == 404]
    for email, steps in by_step(fake).items():
        chain = [*steps["message"], *steps["nudge"], *steps["last-call"]]
        assert len(chain) == 3, email
        for before, after in pairwise(chain):
            (stored,) = [
                m for m in fake._require_grant(before.grant_id).messages if m.data["id"] == before.id
            ]
            header = next(h["value"] for h in stored.headers if h["name"].lower() == "message-id")
            assert header.startswith("<")
            assert after.payload["reply_to_message_id"] == header
            thread = fake._sent_message(after.grant_id, after.id)["thread_id"]
            assert thread == fake._sent_message(before.grant_id, before.id)["thread_id"]


@pytest.mark.parametrize("case", ["provider unset", "header not kept"])
def test_a_follow_up_named_by_id_on_an_imap_grant_is_sent_again_answering_its_message_id_header(
    imap_fake, cli, cli_clock, tmp_path, case
):
    """A follow-up on a Yahoo grant named the message it answers by Nylas's id: the manifest did not say
    the provider, or the row was sent before the Message-ID header was kept. Nylas answers 404; the thread
    lookup finds the message under that very id, so the follow-up is sent once more answering its
    header: the one the send's answer gave, or else the message's own (read from the API). One 404 a
    recipient at the fake, every nudge threaded, none failed, none lost."""
    fake = imap_fake
    manifest = write_campaign(tmp_path / "c", sender="" if case == "provider unset" else 'provider = "yahoo"')
    assert cli("run", manifest, "--yes").exit_code == 75
    if case == "header not kept":
        with sqlite3.connect(manifest.with_name("campaign.ledger.sqlite")) as db:
            db.execute("UPDATE recipients SET internet_message_id = NULL")
    cli_clock.advance(2 * 86_400)
    assert cli("resume", manifest, "--yes").exit_code == 75
    refused = [record for record in fake.requests if record.status == 404]
    assert len(refused) == len(PEOPLE)
    for email, steps in by_step(fake).items():
        (first,) = steps["message"]
        (nudge,) = steps["nudge"]
        (stored,) = [m for m in fake._require_grant(first.grant_id).messages if m.data["id"] == first.id]
        header = next(h["value"] for h in stored.headers if h["name"].lower() == "message-id")
        assert nudge.payload["reply_to_message_id"] == header, email
        thread = fake._sent_message(nudge.grant_id, nudge.id)["thread_id"]
        assert thread == fake._sent_message(first.grant_id, first.id)["thread_id"]
    nudge_steps = steps_json(cli, manifest)["nudge"]
    assert (nudge_steps["sent"], nudge_steps["states"]["failed"], nudge_steps["stopped"]) == (
        len(PEOPLE),
        0,
        {},
    )


def test_a_follow_up_to_a_message_filed_on_microsoft_finds_it_by_its_thread_and_goes_out_once(
    ms_fake, cli, cli_clock, tmp_path
):
    """The recipient's step 1 was filed (a new Graph id): the nudge's send is answered 404, the thread
    lookup finds the message under its new id, and the nudge goes out once, answering that id, in the
    thread; nothing failed, and the last call answers the nudge as usual."""
    fake = ms_fake
    manifest = _microsoft_campaign(tmp_path / "c")
    assert cli("run", manifest, "--yes").exit_code == 75
    (first,) = by_step(fake)[PEOPLE[0]]["message"]
    thread = fake._sent_message(first.grant_id, first.id)["thread_id"]
    moved = fake.move_message(first.grant_id, first.id)
    cli_clock.advance(2 * 86_400)
    nudged = cli("resume", manifest, "--yes")
    assert nudged.exit_code == 75, nudged.output
    sent = by_step(fake)
    assert all(len(sent[email]["nudge"]) == 1 for email in PEOPLE)
    (nudge,) = sent[PEOPLE[0]]["nudge"]
    assert nudge.payload["reply_to_message_id"] == moved
    assert fake._sent_message(nudge.grant_id, nudge.id)["thread_id"] == thread
    assert [record.grant_id for record in _refused_sends(fake)] == [first.grant_id]
    steps = steps_json(cli, manifest)["nudge"]
    assert (steps["sent"], steps["states"]["failed"], steps["stopped"]) == (len(PEOPLE), 0, {})
    cli_clock.advance(3 * 86_400)
    assert cli("resume", manifest, "--yes").exit_code == 0
    (last,) = by_step(fake)[PEOPLE[0]]["last-call"]
    assert last.payload["reply_to_message_id"] == nudge.id
    assert len(_refused_sends(fake)) == 1


def test_a_follow_up_whose_message_was_deleted_stops_as_thread_lost_and_is_no_rejection(
    ms_fake, cli, cli_clock, tmp_path
):
    """All three of ana's step-1 messages were deleted: each nudge's send is answered 404 and the thread
    lookup finds nothing, so each row is stopped (`thread_lost`): none is sent unthreaded, no later step
    goes to them, and three 404s in a row do not stop ana under `stop_after_rejections = 2`. Status and
    the report say why; the run ends as one with stopped rows does."""
    fake = ms_fake
    manifest = _microsoft_campaign(tmp_path / "c")
    assert cli("run", manifest, "--yes").exit_code == 75
    anas = [email for email in PEOPLE if by_step(fake)[email]["message"][0].grant_id == "grant-ana"]
    assert len(anas) == 3
    for email in anas:
        (first,) = by_step(fake)[email]["message"]
        fake.delete_message(first.grant_id, first.id)
    cli_clock.advance(2 * 86_400)
    nudged = cli("resume", manifest, "--yes")
    assert nudged.exit_code == 75, nudged.output
    assert len(_refused_sends(fake)) == 3
    cli_clock.advance(3 * 86_400)
    done = cli("resume", manifest, "--yes")
    assert done.exit_code == 0, done.output
    sent = by_step(fake)
    assert all(not sent[email]["nudge"] and not sent[email]["last-call"] for email in anas)
    assert all(len(sent[email]["last-call"]) == 1 for email in PEOPLE if email not in anas)
    assert len(_refused_sends(fake)) == 3  # tried once each, never again
    steps = steps_json(cli, manifest)
    assert steps["nudge"]["stopped"] == {"thread_lost": 3}
    assert steps["nudge"]["states"]["failed"] == 0
    assert steps["last-call"]["sent"] == 3
    report = tmp_path / "report.csv"
    assert cli("report", manifest, "--out", report).exit_code == 0
    text = report.read_text(encoding="utf-8")
    assert text.count("thread_lost: message ") == 3


def test_a_follow_up_whose_grant_is_gone_at_its_send_stops_its_sender_as_any_404(
    ms_fake, cli, cli_clock, tmp_path, monkeypatch
):
    """The grant is deleted between the reply check and the send: the send's 404 and the thread lookup's
    404 alike say nothing of the message, so the sender stops as for any send answered 404 (exit 77),
    the row pending for when the mailbox is connected again, never failed and never `thread_lost`."""
    fake = ms_fake
    manifest = _microsoft_campaign(tmp_path / "c", people=PEOPLE[:2])
    assert cli("run", manifest, "--yes").exit_code == 75
    looked = sequence_module.find_answer

    async def then_gone(*args, **kwargs):
        answer = await looked(*args, **kwargs)
        if kwargs["grant_id"] == "grant-ana":
            fake.remove_grant("grant-ana")
        return answer

    monkeypatch.setattr(sequence_module, "find_answer", then_gone)
    cli_clock.advance(2 * 86_400)
    assert cli("resume", manifest, "--yes").exit_code == 77
    sent = by_step(fake)
    assert not sent[PEOPLE[0]]["nudge"]
    assert len(sent[PEOPLE[1]]["nudge"]) == 1
    assert [record.grant_id for record in _refused_sends(fake)] == ["grant-ana"]
    nudge = steps_json(cli, manifest)["nudge"]
    assert (nudge["states"]["failed"], nudge["states"]["pending"], nudge["stopped"]) == (0, 1, {})


def test_a_failed_lookup_after_the_404_holds_the_follow_up_back_until_it_can_look(
    ms_fake, cli, cli_clock, tmp_path, monkeypatch
):
    """The mailbox's read fails right after the nudge's 404: nothing is sent (never unthreaded, never
    failed), the nudge is held back and stays due; the next run's send names the old id again under a new
    key, the lookup works, and the nudge goes out once, answering the message's new id."""
    fake = ms_fake
    manifest = _microsoft_campaign(tmp_path / "c", people=PEOPLE[:2])
    assert cli("run", manifest, "--yes").exit_code == 75
    (first,) = by_step(fake)[PEOPLE[0]]["message"]
    moved = fake.move_message(first.grant_id, first.id)
    looked = sequence_module.find_answer

    async def then_failing(*args, **kwargs):
        answer = await looked(*args, **kwargs)
        if kwargs["grant_id"] == first.grant_id:
            fake.fail_reads(first.grant_id, times=1)
        return answer

    monkeypatch.setattr(sequence_module, "find_answer", then_failing)
    cli_clock.advance(2 * 86_400)
    held = cli("resume", manifest, "--yes")
    assert held.exit_code == 75, held.output
    assert (
        "1 follow-up held back: its reply lookup failed (it is never sent blind); it is looked up again on "
        "the next run"
    ) in " ".join(held.output.split())
    assert not by_step(fake)[PEOPLE[0]]["nudge"]
    nudge = steps_json(cli, manifest)["nudge"]
    assert (nudge["due_now"], nudge["states"]["failed"], nudge["stopped"]) == (1, 0, {})
    monkeypatch.setattr(sequence_module, "find_answer", looked)
    assert cli("resume", manifest, "--yes").exit_code == 75
    (sent,) = by_step(fake)[PEOPLE[0]]["nudge"]
    assert sent.payload["reply_to_message_id"] == moved
    refused = _refused_sends(fake)
    assert len(refused) == 2
    assert len({record.idempotency_key for record in refused}) == 2
    assert not any(record.replayed for record in refused)
