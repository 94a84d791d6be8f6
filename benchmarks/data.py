"""The benchmarks' inputs, generated: recipient lists, manifests, templates and a pre-filled ledger.

Every case writes what it needs into its own folder with these functions, so a run
needs nothing but this repository. The newsletter template uses six columns of the
list (first_name, city, company, plan, renewal_date, code) on top of the built-in
`newsletter.html.j2`; the mailmerge comparison uses the list and template of
`shared/reference/peers.md` §4 (email, name, number). The 1,000,000-row ledger is
written straight into SQLite with the real schema (`campaign.ledger._schema`), because
sending 900,000 messages to build it would take longer than the benchmark.
"""

from __future__ import annotations

import csv
import hashlib
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

__all__ = [
    "API_KEY",
    "CITIES",
    "build_resume_ledger",
    "grant_id",
    "write_mailmerge_campaign",
    "write_newsletter_campaign",
]

API_KEY = "sandbox-key"  # what `campaign sandbox` and benchmarks/server.py accept
CITIES = ("Lisbon", "Leeds", "Taipei", "Cork", "Oslo", "Berlin", "Quito", "Accra")
PLANS = ("Starter", "Team", "Business", "Enterprise")

NEWSLETTER_TEMPLATE = """\
{% extends "newsletter.html.j2" %}
{% block headline %}Your {{ plan }} plan at {{ company }}{% endblock %}
{% block intro %}Here is what changed for {{ company }} this spring,
and what is coming to {{ city }}.{% endblock %}
{% block stories %}
            <h2 style="margin:24px 0 8px 0; font-size:18px;">Your plan</h2>
            <p style="margin:0 0 16px 0;">Your {{ plan }} plan renews on {{ renewal_date }}.
            Nothing to do.</p>
            <p style="margin:0 0 16px 0;">Invite a colleague with code <strong>{{ code }}</strong>:
            you both get a month free.</p>
{% endblock %}
{% block cta_url %}https://example.com/account?ref={{ code }}{% endblock %}
"""

NEWSLETTER_MANIFEST = """\
[campaign]
name = "bench-newsletter"

[recipients]
source = "recipients.csv"
name_column = "name"

[message]
subject = "{{ first_name }}, your {{ plan }} plan this spring"
html = "bench.html.j2"
headers = { "X-Campaign" = "bench" }

[unsubscribe]
url = "https://example.com/unsubscribe?t={{ unsubscribe_token }}"
mailto = "unsubscribe@example.com"
secret_env = "BENCH_UNSUBSCRIBE_SECRET"
"""

SENDER = """
[[senders]]
name = "s{number:02d}"
grant_id = "{grant}"
email = "s{number:02d}@example.com"
from_name = "Sender {number}"
per_second = {per_second:g}
burst = {burst}
concurrency = {concurrency}
"""

MAILMERGE_TEMPLATE = """\
TO: {{email}}
SUBJECT: Hello {{name}}
FROM: Bench Sender <bench@example.com>

Hi {{name}},

Your number is {{number}}.
"""
# The same message for campaign: the subject and the text body, rendered by Jinja from the same columns.
MAILMERGE_TEXT_BODY = "Hi {{name}},\n\nYour number is {{number}}.\n"
MAILMERGE_MANIFEST = """\
[campaign]
name = "bench-mailmerge"

[recipients]
source = "db.csv"

[message]
subject = "Hello {{ name }}"
text = "body.txt.j2"
"""


def grant_id(number: int) -> str:
    """The grant id of sender number `number` (the bench server registers the same ones)."""
    return f"grant-{number:02d}"


def write_newsletter_campaign(
    folder: Path,
    rows: int,
    *,
    senders: int = 1,
    per_second: float = 200.0,
    burst: int = 1,
    concurrency: int = 8,
    invalid_every: int | None = None,
) -> Path:
    """Write an N-row CSV, the 6-variable newsletter template and a manifest with `senders` senders
    (every `invalid_every`-th row with an address that is not one)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_newsletter_list(folder / "recipients.csv", rows, invalid_every=invalid_every)
    (folder / "bench.html.j2").write_text(NEWSLETTER_TEMPLATE, encoding="utf-8")
    text = NEWSLETTER_MANIFEST + "".join(
        SENDER.format(
            number=n, grant=grant_id(n), per_second=per_second, burst=burst, concurrency=concurrency
        )
        for n in range(1, senders + 1)
    )
    manifest = folder / "campaign.toml"
    manifest.write_text(text, encoding="utf-8")
    return manifest


def write_newsletter_list(path: Path, rows: int, *, first: int = 1, invalid_every: int | None = None) -> None:
    """An N-row list: email, name and the six template columns, every value different per row. With
    `first` above 1, rows `first`.. are appended to the list there (no header). With `invalid_every`,
    every such row has an address that is not one (`is_invalid`)."""
    start = datetime(2026, 6, 1, tzinfo=UTC).date()
    with path.open("w" if first == 1 else "a", encoding="utf-8", newline="") as handle:
        if first == 1:
            handle.write("email,name,first_name,city,company,plan,renewal_date,code\n")
        lines = []
        for n in range(first, first + rows):
            city = CITIES[n % len(CITIES)]
            renewal = start + timedelta(days=n % 365)
            email = f"bad-address-{n}" if is_invalid(n, invalid_every) else f"user{n:07d}@example.com"
            lines.append(
                f"{email},User {n},U{n},{city},Company {n % 997},"
                f"{PLANS[n % len(PLANS)]},{renewal.isoformat()},C{n:07X}\n"
            )
            if len(lines) == 10_000:
                handle.writelines(lines)
                lines.clear()
        handle.writelines(lines)


def write_mailmerge_campaign(folder: Path, rows: int, *, senders: int = 10) -> Path:
    """peers.md §4's list (email,name,number) and template, for mailmerge and for campaign side by side.

    campaign's manifest sends the same subject and text from `senders` senders at Nylas's 200/s each.
    """
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "db.csv").open("w", encoding="utf-8", newline="") as handle:
        handle.write("email,name,number\n")
        handle.writelines(f"user{n:05d}@example.com,User {n},{n}\n" for n in range(1, rows + 1))
    (folder / "template.txt").write_text(MAILMERGE_TEMPLATE, encoding="utf-8")
    (folder / "body.txt.j2").write_text(MAILMERGE_TEXT_BODY, encoding="utf-8")
    text = MAILMERGE_MANIFEST + "".join(
        SENDER.format(number=n, grant=grant_id(n), per_second=200, burst=1, concurrency=8)
        for n in range(1, senders + 1)
    )
    manifest = folder / "campaign.toml"
    manifest.write_text(text, encoding="utf-8")
    return manifest


def is_invalid(row: int, every: int | None) -> bool:
    """Whether list row `row` is one of the bad ones when every `every`-th row is."""
    return every is not None and row % every == 0


def build_resume_ledger(
    manifest_path: Path, ledger_path: Path, *, rows: int, sent: int, invalid_every: int | None = None
) -> None:
    """A ledger for the newsletter campaign: `rows` rows, the first `sent` sent hours ago, the rest pending.

    The schema, meta rows (campaign name, content fingerprint, plan stamp) and migrations come
    from campaign's own code; the rows are inserted in one transaction, shaped as `record_plan`,
    `claim` and `record_outcome` leave them (sender round-robin over the manifest's senders).
    The plan stamp (and the list's record) is the one the first `campaign run` of this list would have
    recorded.
    """
    from campaign.clock import SystemClock
    from campaign.ledger import open_ledger
    from campaign.manifest import load_manifest
    from campaign.pipeline import (
        load_content_fingerprint,
        load_list_extent,
        load_plan_stamp,
        load_rules_stamp,
    )
    from campaign.recipients import encode_cells

    manifest = load_manifest(manifest_path)
    campaign = manifest.campaign.name
    ledger = open_ledger(ledger_path, clock=SystemClock(), campaign=campaign)
    content = load_content_fingerprint(manifest)
    ledger.record_content_fingerprint(content)
    stamp = load_plan_stamp(manifest, content=content)
    rules = load_rules_stamp(manifest, content=content)
    source = manifest.recipients.source
    extent = load_list_extent(source, size=source.stat().st_size, rows=rows)
    ledger.record_plan([], [], stamp=stamp, rules=rules, extent=extent.encode())
    ledger.close()
    # Each row's cells as a run records them, so that a changed list re-checks only what changed.
    with manifest.recipients.source.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        cells = [encode_cells(dict(zip(header, line, strict=True))) for line in reader]
    names = [sender.name for sender in manifest.senders]
    db = sqlite3.connect(ledger_path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=OFF")  # a scratch file: rebuilt if the machine dies
        db.execute("BEGIN")
        _insert_rows(db, campaign, names, cells, rows=rows, sent=sent, invalid_every=invalid_every)
        db.execute("COMMIT")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()


def _insert_rows(
    db: sqlite3.Connection,
    campaign: str,
    names: Sequence[str],
    cells: Sequence[str],
    *,
    rows: int,
    sent: int,
    invalid_every: int | None = None,
) -> None:
    now = datetime.now(UTC)
    started = now - timedelta(hours=2)
    step = timedelta(hours=1) / max(1, sent)  # the sent rows went out over an hour, two hours ago
    columns = (
        "key, row, email, sender, state, attempts, attempt_no, idempotency_key, claimed_at, message_id, "
        "request_id, created_at, updated_at, sent_at, key_issued_at, key_uses, first_claimed_at, subject, "
        "cells, reason"
    )
    insert = f"INSERT INTO recipients ({columns}) VALUES ({', '.join('?' * 20)})"
    log = "INSERT INTO send_log (sender, sent_at, recipients) VALUES (?, ?, 1)"
    created = started.isoformat(timespec="milliseconds")
    batch: list[tuple[object, ...]] = []
    logs: list[tuple[object, ...]] = []
    for n in range(1, rows + 1):
        email = f"user{n:07d}@example.com"
        sender = names[(n - 1) % len(names)]
        values: tuple[object, ...]
        if is_invalid(n, invalid_every):  # as a run with --skip-invalid records it (`Skip.cells`)
            values = (
                f"row:{n}", n, "", None, "skipped", 0, 0, None, None,
                None, None, created, created, None, None, 0, None, None, cells[n - 1],
                'invalid: column "email": not an address',
            )  # fmt: skip
        elif n <= sent:
            at = started + step * n
            stamp = at.isoformat(timespec="milliseconds")
            digest = hashlib.sha256(f"{campaign}\0{email}".encode()).hexdigest()[:32]
            values = (
                email, n, email, sender, "sent", 1, 0, f"{campaign}-{digest}-0", stamp,
                f"msg-{n:08d}", f"req-{n:08d}", created, stamp, stamp, stamp, 0, stamp, "Spring",
                cells[n - 1], None,
            )  # fmt: skip
            logs.append((sender, at.timestamp()))
        else:
            values = (
                email, n, email, sender, "pending", 0, 0, None, None,
                None, None, created, created, None, None, 0, None, None, cells[n - 1], None,
            )  # fmt: skip
        batch.append(values)
        if len(batch) == 50_000:
            db.executemany(insert, batch)
            db.executemany(log, logs)
            batch.clear()
            logs.clear()
    db.executemany(insert, batch)
    db.executemany(log, logs)
