"""The streaming preview agrees with the run's preflight, row for row, whatever the batch size."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import check_plan

import campaign.recipients._firstrows as firstrows_module
from campaign.ledger import Ledger, PlannedRow, open_ledger
from campaign.manifest import SenderSettings, load_manifest
from campaign.models import Address, OutcomeKind, Recipient, SendOutcome, SkipReason
from campaign.plan import SenderAssigner, assign_senders
from campaign.preview import run_preview, write_site
from campaign.recipients._firstrows import FirstRows
from campaign.testing import FakeClock
from campaign.unsubscribe import parse_secrets

REPO = Path(__file__).resolve().parent.parent
SECRETS = parse_secrets("stream-test-secret-0123456789abcdef")
MANIFEST = """\
[campaign]
name = "stream"

[recipients]
source = "recipients.csv"
name_column = "name"
sender_column = "rep"
suppress = ["suppressed.txt"]

[message]
subject = "Hello {{ first_name }}"
html = "message.html.j2"

[unsubscribe]
url = "https://example.com/u/{{ unsubscribe_token }}"

[[senders]]
name = "alice"
grant_id = "grant-alice"
per_second = 2
per_day = 7

[[senders]]
name = "bob"
grant_id = "grant-bob"
per_minute = 30
"""


def _campaign(folder: Path) -> Path:
    """A list with every kind of row: good, pinned, duplicate (later batch), suppressed, bad, unrenderable."""
    rows = ["email,name,first_name,rep"]
    for number in range(1, 41):
        rows.append(f"user{number}@example.com,User {number},U{number},{'bob' if number % 5 == 0 else ''}")
    rows += [
        "USER3@example.com,Again,Again,",  # duplicate of row 3, in a later batch
        "blocked@example.com,Blocked,B,",  # suppressed
        "not-an-address,Bad,Bad,",  # invalid address
        "carl@example.com,Carl,Carl,zoe",  # unknown sender
        'dana@example.com,Dana,"D\nBcc: x@example.com",',  # header injection in the subject
        "",
        "user7@example.com,Dup,Dup,",  # duplicate of row 7
    ]
    (folder / "recipients.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (folder / "suppressed.txt").write_text("blocked@example.com\n", encoding="utf-8")
    (folder / "message.html.j2").write_text("<p>Hi {{ first_name }}</p>\n", encoding="utf-8")
    (folder / "campaign.toml").write_text(MANIFEST, encoding="utf-8")
    return folder / "campaign.toml"


def _preview(
    manifest_path: Path, *, batch_rows: int, skip_invalid: bool = False, ledger: Ledger | None = None
):
    return run_preview(
        load_manifest(manifest_path),
        secrets=SECRETS,
        skip_invalid=skip_invalid,
        sample=2,
        ledger=ledger,
        api_uri="https://api.us.nylas.com",
        clock=FakeClock(),
        batch_rows=batch_rows,
    )


@pytest.mark.parametrize("batch_rows", [1, 4, 7, 1000])
@pytest.mark.parametrize("skip_invalid", [False, True])
def test_streaming_preview_counts_what_the_run_preflight_finds(tmp_path, batch_rows, skip_invalid):
    """Jobs per sender, skips by reason and problems equal run_preflight's, at any batch size."""
    manifest_path = _campaign(tmp_path)
    manifest = load_manifest(manifest_path)
    preflight = check_plan(manifest, secrets=SECRETS, skip_invalid=skip_invalid)
    report = _preview(manifest_path, batch_rows=batch_rows, skip_invalid=skip_invalid)
    assert report.to_send == len(preflight.jobs) == 40
    assert Counter(
        report.senders[i].name for i in range(2) for _ in range(report.senders[i].messages)
    ) == Counter(job.sender for job in preflight.jobs)
    assert report.skipped == dict(Counter(skip.reason for skip in preflight.skips))
    assert report.problem_texts == preflight.problems
    assert {problem.row for problem in report.problems} == {43, 44, 45}
    assert report.rows == 47
    duplicates = [row for row in report.listed if row.state == SkipReason.DUPLICATE.value]
    assert [(row.row, row.detail) for row in duplicates] == [
        (41, "duplicate of row 3"),
        (47, "duplicate of row 7"),
    ]


def test_problems_name_the_row_the_column_or_field_and_the_fix(tmp_path):
    """Each problem row says where (column or message field) and what to do."""
    report = _preview(_campaign(tmp_path), batch_rows=5)
    where = {problem.row: [issue.where for issue in problem.issues] for problem in report.problems}
    assert where == {43: ['column "email"'], 44: ['column "rep"'], 45: ["message.subject"]}
    bad = {problem.row: problem for problem in report.problems}
    assert "--skip-invalid" in bad[43].issues[0].message
    assert "zoe" in bad[44].issues[0].message
    assert dict(bad[45].fields)["first_name"] == "D\nBcc: x@example.com"


def test_the_index_caps_its_rows_but_lists_every_problem(tmp_path):
    """With a cap of 5 rows, index.html lists 5 rows plus all 3 problem rows and says so."""
    manifest_path = _campaign(tmp_path)
    report = run_preview(
        load_manifest(manifest_path),
        secrets=SECRETS,
        skip_invalid=False,
        sample=0,
        ledger=None,
        api_uri="https://api.us.nylas.com",
        clock=FakeClock(),
        index_rows=5,
        batch_rows=6,
    )
    assert report.listed_all is False
    assert [row.row for row in report.listed] == [1, 2, 3, 4, 5, 43, 44, 45]
    index = write_site(report, tmp_path / "site").read_text(encoding="utf-8")
    assert "the first 5 rows are listed here" in index
    for row in (43, 44, 45):
        assert (tmp_path / "site" / "problems" / f"row-{row}.html").is_file()
        assert f'href="problems/row-{row}.html"' in index
    assert "user6@example.com" not in index


def test_ledger_assignments_and_settled_rows_are_honoured(tmp_path):
    """Rows the ledger settled count as done; rows it assigned keep their sender; its sends today
    count against the sender's budget. The ledger is real and read a batch at a time."""
    manifest_path = _campaign(tmp_path)
    ledger = open_ledger(tmp_path / "ledger.sqlite", clock=FakeClock(), campaign="stream")
    ledger.record_plan(
        [
            PlannedRow("user1@example.com", 1, "user1@example.com", "bob"),
            PlannedRow("user2@example.com", 2, "user2@example.com", "bob"),
        ],
        [],
    )
    ledger.claim("user1@example.com", sender="bob")
    ledger.record_outcome("user1@example.com", SendOutcome(OutcomeKind.SENT, 200, "m-1"), sender="bob")
    try:
        report = _preview(manifest_path, batch_rows=3, ledger=ledger)
    finally:
        ledger.close()
    assert report.already_done == {"sent": 1}
    assert report.to_send == 39
    listed = {row.email: row for row in report.listed}
    assert listed["user1@example.com"].state == "already sent"
    assert listed["user2@example.com"].sender == "bob"
    assert next(plan for plan in report.senders if plan.name == "bob").used_24h == 1


def test_first_rows_finds_duplicates_across_batches_exactly():
    """Keys seen in an earlier batch, or earlier in the same one, point to their first row; case matters."""
    index = FirstRows()
    assert index.resolve(["a", "b", "a"], [1, 2, 3]) == [1, 2, 1]
    assert index.resolve(["c", "b", "A", "c"], [4, 5, 6, 7]) == [4, 2, 6, 4]
    assert index.resolve([], []) == []


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batches=st.lists(
        st.lists(st.sampled_from(["a", "A", "b", "a\x00", "\x00", "é", "a'b", "?", "k" * 300]), max_size=12),
        max_size=6,
    )
)
def test_first_rows_agrees_with_a_dict_of_first_rows(monkeypatch, batches):
    """Whatever the keys (control characters and quotes included) and however they fall into batches and
    lookups of a few keys, each row gets the first row its key had, as a dict of every key would say."""
    monkeypatch.setattr(firstrows_module, "_LOOKUP_KEYS", 2)  # the same for every example
    index, seen, row = FirstRows(), {}, 0
    try:
        for keys in batches:
            rows = list(range(row + 1, row + 1 + len(keys)))
            row += len(keys)
            expected = [seen.setdefault(key, number) for key, number in zip(keys, rows, strict=True)]
            assert index.resolve(keys, rows) == expected
    finally:
        index.close()


_SENDERS = st.lists(
    st.builds(
        lambda rate, per_day: SenderSettings(name="s", grant_id="g", per_second=rate, per_day=per_day),
        st.sampled_from([0.5, 1.0, 2.0, 4.0]),
        st.one_of(st.none(), st.integers(min_value=1, max_value=6)),
    ),
    min_size=1,
    max_size=3,
)


@settings(max_examples=60, deadline=None)
@given(
    senders=_SENDERS,
    pins=st.lists(st.integers(min_value=-2, max_value=2), max_size=40),
    previous=st.dictionaries(st.integers(min_value=0, max_value=39), st.integers(min_value=0, max_value=2)),
)
def test_sender_assigner_agrees_with_assign_senders(senders, pins, previous):
    """Row by row, SenderAssigner gives the sender plan.assign_senders gives for the whole list."""
    named = [
        sender.model_copy(update={"name": f"s{i}", "grant_id": f"g{i}"}) for i, sender in enumerate(senders)
    ]
    names = [sender.name for sender in named]
    recipients = [
        Recipient(
            key=f"r{i}@example.com",
            row=i + 1,
            address=Address(f"r{i}@example.com"),
            fields={},
            sender=names[pin] if 0 <= pin < len(names) else None,
        )
        for i, pin in enumerate(pins)
    ]
    assigned = {f"r{i}@example.com": f"s{which}" for i, which in previous.items()}
    expected = [job.sender for job in assign_senders(recipients, named, assigned=assigned)]
    assigner = SenderAssigner(named, assigned=assigned)
    assert [assigner.assign(recipient) for recipient in recipients] == expected


def test_memory_benchmark_runs_on_a_small_list(tmp_path):
    """benchmarks/preview_memory.py previews a generated list and reports its peak RSS (tiny size here)."""
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "preview_memory.py"),
            "--rows",
            "300",
            "--dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "rows: 300" in result.stdout
    assert "peak RSS:" in result.stdout
    assert (tmp_path / "campaign.preview" / "index.html").is_file()
