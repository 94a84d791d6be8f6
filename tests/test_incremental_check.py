"""Issue 15, incremental re-check: a run whose list changed renders only the rows added or changed
(and never the ones sent already); a changed template or manifest checks every row that may be sent.
Renders are counted through a seam (`Composer.render`), sends at the fake."""

from __future__ import annotations

import json
import re
import sqlite3
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from campaign.recipients import AudienceScan
from campaign.render import Composer

GRANT = "grant-inc"


@pytest.fixture(name="renders")
def _renders(monkeypatch) -> Counter[str]:
    """Every render, by recipient key (the seam: the composer every run renders through)."""
    counted: Counter[str] = Counter()
    original = Composer.render

    def render(self, recipient, sender, *, previous=None):
        counted[recipient.key] += 1
        return original(self, recipient, sender, previous=previous)

    monkeypatch.setattr(Composer, "render", render)
    return counted


def _campaign(folder: Path, people: int, *, attach: str | None = None) -> Path:
    """A text campaign of `people` rows; with `attach`, a [[message.attachments]] path (a template for
    a file of each recipient's own)."""
    folder.mkdir()
    (folder / "note.txt.j2").write_text("Hello {{ name }} from {{ city }}\n", encoding="utf-8")
    _write_rows(folder, [(f"p{n}@example.com", f"P {n}", "Berlin") for n in range(1, people + 1)])
    attachments = "" if attach is None else f'\n[[message.attachments]]\npath = "{attach}"\n'
    manifest = folder / "campaign.toml"
    manifest.write_text(
        '[campaign]\nname = "incremental"\n\n[recipients]\nsource = "r.csv"\nname_column = "name"\n\n'
        f'[message]\nsubject = "Hi {{{{ name }}}}"\ntext = "note.txt.j2"\n{attachments}\n'
        f'[[senders]]\nname = "a"\ngrant_id = "{GRANT}"\nemail = "a@corp.example.com"\nper_second = 100\n',
        encoding="utf-8",
    )
    return manifest


def _write_rows(folder: Path, rows: list[tuple[str, str, str]]) -> None:
    lines = ["email,name,city", *(f'{email},"{name}",{city}' for email, name, city in rows)]
    (folder / "r.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _rows(folder: Path) -> list[tuple[str, str, str]]:
    lines = (folder / "r.csv").read_text(encoding="utf-8").splitlines()[1:]
    return [tuple(part.strip('"') for part in line.split(",")) for line in lines]  # type: ignore[misc]


def _started(api, cli, tmp_path, renders, *, attach: str | None = None, files: dict[str, str] | None = None):
    """Six rows, two of them sent (--limit 2); the render count starts at zero after. `files`: written
    beside the manifest first (attachments)."""
    api.add_grant(GRANT, "a@corp.example.com")
    manifest = _campaign(tmp_path / "c", 6, attach=attach)
    for name, text in (files or {}).items():
        (manifest.parent / name).parent.mkdir(parents=True, exist_ok=True)
        (manifest.parent / name).write_text(text, encoding="utf-8")
    assert cli("run", manifest, "--yes", "--limit", "2").exit_code == 75
    assert len(api.deliveries) == 2
    renders.clear()
    return manifest


def test_an_appended_row_alone_is_rendered_and_everyone_is_sent_once(api, cli, tmp_path, renders):
    manifest = _started(api, cli, tmp_path, renders)
    folder = manifest.parent
    _write_rows(folder, [*_rows(folder), ("p7@example.com", "P 7", "Lisbon")])
    result = cli("resume", manifest, "--yes")
    assert result.exit_code == 0, result.output
    # The check rendered the new row only; the sends render each of the five they send, once.
    sent_now = [d.payload["to"][0]["email"] for d in api.deliveries[2:]]
    assert sorted(sent_now) == [f"p{n}@example.com" for n in range(3, 8)]
    assert renders["p7@example.com"] == 2  # checked (new), then sent
    assert all(renders[email] == 1 for email in sent_now if email != "p7@example.com")  # sent only
    assert renders["p1@example.com"] == renders["p2@example.com"] == 0  # sent before: never again
    emails = [d.payload["to"][0]["email"] for d in api.deliveries]
    assert sorted(emails) == sorted(set(emails))


def test_a_changed_row_is_checked_again_and_refused_when_now_bad(api, cli, tmp_path, renders):
    manifest = _started(api, cli, tmp_path, renders)
    folder = manifest.parent
    rows = _rows(folder)
    rows[3] = ("p4@example.com", "P 4", "Porto")  # changed: checked again
    _write_rows(folder, rows)
    with pytest.MonkeyPatch.context() as patch:
        # Stop right after the check: the plan is all this test looks at.
        patch.setattr("campaign.cli.sending._confirm", lambda *_args, **_kwargs: False)
        assert cli("resume", manifest).exit_code == 0
    assert dict(renders) == {"p4@example.com": 1}
    rows[4] = ("p5@example.com", "P 5\r\nBcc: all@example.com", "Berlin")  # now a header injection
    _write_rows(folder, rows)
    renders.clear()
    refused = cli("resume", manifest, "--yes")
    assert refused.exit_code == 65, refused.output
    assert "row 5" in refused.output
    assert len(api.deliveries) == 2  # nothing sent
    assert set(renders) == {"p4@example.com", "p5@example.com"}  # unchanged since its record: p4 again


def test_a_changed_template_checks_every_row_that_may_be_sent(api, cli, tmp_path, renders):
    manifest = _started(api, cli, tmp_path, renders)
    (manifest.parent / "note.txt.j2").write_text("Hello again {{ name }}\n", encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("campaign.cli.sending._confirm", lambda *_args, **_kwargs: False)
        assert cli("resume", manifest, "--allow-changed-content").exit_code == 0
    assert sorted(renders) == [f"p{n}@example.com" for n in range(3, 7)]  # the sent two are never sent


@pytest.mark.parametrize("attach", ["terms.txt", " ./terms.txt "])
def test_with_a_file_every_message_attaches_an_appended_row_alone_is_rendered(
    api, cli, tmp_path, renders, attach
):
    """The rules stamp holds the size and time of the files attached to every message (the file the
    path names once tidied, as the sends read it), so rows unchanged under the same file are not checked
    again; touching the file checks every row that may be sent."""
    manifest = _started(api, cli, tmp_path, renders, attach=attach, files={"terms.txt": "Terms v1\n"})
    folder = manifest.parent
    _write_rows(folder, [*_rows(folder), ("p7@example.com", "P 7", "Lisbon")])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("campaign.cli.sending._confirm", lambda *_args, **_kwargs: False)
        assert cli("resume", manifest).exit_code == 0
        assert dict(renders) == {"p7@example.com": 1}
        renders.clear()
        (folder / "terms.txt").write_text("Terms v2, longer\n", encoding="utf-8")
        assert cli("resume", manifest).exit_code == 0
    assert sorted(renders) == [f"p{n}@example.com" for n in range(3, 8)]
    renders.clear()
    result = cli("resume", manifest, "--yes")
    assert result.exit_code == 0, result.output
    assert [d.payload["attachments"][0]["filename"] for d in api.deliveries] == ["terms.txt"] * 7
    assert renders["p3@example.com"] == 2  # the plan was made with the old file: checked, then sent
    emails = [d.payload["to"][0]["email"] for d in api.deliveries]
    assert sorted(emails) == sorted(set(emails))


def test_a_row_whose_own_file_changed_is_checked_again_and_no_other(api, cli, tmp_path, renders):
    """A per-recipient file (a path template): each row's cells carry its file's size and time. Nothing
    changed: no row is checked again. A changed list renders only the rows changed or whose file
    changed, and a row whose file is gone is refused (exit 65, nothing sent), though its cells are the
    same."""
    files = {f"files/P {n}.txt": f"Invoice {n}\n" for n in range(1, 7)}
    manifest = _started(api, cli, tmp_path, renders, attach="files/{{ name }}.txt", files=files)
    folder = manifest.parent
    unchanged = cli("resume", manifest, "--yes", "--limit", "1")
    assert unchanged.exit_code == 75, unchanged.output
    assert "unchanged since it was checked" in unchanged.output
    assert dict(renders) == {"p3@example.com": 1}  # sent; no row checked again
    renders.clear()
    rows = _rows(folder)
    rows[5] = ("p6@example.com", "P 6", "Lisbon")
    _write_rows(folder, rows)
    assert cli("resume", manifest, "--yes", "--limit", "1").exit_code == 75
    assert dict(renders) == {"p6@example.com": 1, "p4@example.com": 1}  # checked (changed); sent
    renders.clear()
    (folder / "files" / "P 5.txt").write_text("Invoice 5, corrected\n", encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("campaign.cli.sending._confirm", lambda *_args, **_kwargs: False)
        assert cli("resume", manifest).exit_code == 0
    assert dict(renders) == {"p5@example.com": 1}
    (folder / "files" / "P 6.txt").unlink()
    refused = cli("resume", manifest, "--yes")
    assert refused.exit_code == 65, refused.output
    assert "row 6" in refused.output
    assert len(api.deliveries) == 4


def test_preview_renders_no_row_sent_already_and_counts_them(api, cli, tmp_path, renders):
    """The preview streams every row as a run would, and like a run it does not render rows the ledger
    holds as sent: they are counted and listed as already sent."""
    import json

    manifest = _started(api, cli, tmp_path, renders)
    result = cli("preview", manifest, "--json", "--out", tmp_path / "site")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["already_done_by_state"] == {"sent": 2}
    assert report["to_send"] == 4
    assert set(renders) == {f"p{n}@example.com" for n in range(3, 7)}


@pytest.fixture(name="rows_read")
def _rows_read(monkeypatch) -> list[int]:
    """Every list row the scan reads and checks, by row number (the seam: `AudienceScan._check_row`)."""
    read: list[int] = []
    original = AudienceScan._check_row

    def check_row(self, row, values):
        read.append(row)
        return original(self, row, values)

    monkeypatch.setattr(AudienceScan, "_check_row", check_row)
    return read


def _copy_ledger(source: Path, target: Path) -> None:
    with sqlite3.connect(source) as old, sqlite3.connect(target) as new:
        old.backup(new)


def _ledger_rows(path: Path) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as db:
        return db.execute(
            "SELECT key, row, email, sender, state, listed, cells FROM recipients ORDER BY key"
        ).fetchall()


def _append(folder: Path) -> None:
    """Two new people, a duplicate of an earlier row (p3) and a duplicate of an appended one (p8)."""
    new = [("p7@example.com", "P 7", "Lisbon"), ("p8@example.com", "P 8", "Oslo")]
    _write_rows(folder, [*_rows(folder), *new, ("P3@example.com", "P 3 again", "Rome"), new[1]])


def test_rows_only_appended_are_the_only_rows_read_and_the_plan_is_the_full_checks(
    api, cli, tmp_path, renders, rows_read
):
    """The list only grew: its earlier rows are not read again. The plan recorded is the one a check of
    every row records (the same ledger rows; duplicates of earlier rows skipped), and everyone is
    mailed once."""
    manifest = _started(api, cli, tmp_path, renders)
    ledger = manifest.with_name("campaign.ledger.sqlite")
    _append(manifest.parent)
    _copy_ledger(ledger, tmp_path / "before.sqlite")
    rows_read.clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("campaign.cli.sending._confirm", lambda *_args, **_kwargs: True)
        patch.setattr("campaign.run._send_checked", lambda *_args, **_kwargs: None)  # the plan only
        appended = cli("resume", manifest)
        assert sorted(rows_read) == [7, 8, 9, 10], appended.output
        recorded = _ledger_rows(ledger)
        # Again from the same ledger, made to check every row (its record of the list forgotten).
        _copy_ledger(tmp_path / "before.sqlite", ledger)
        with sqlite3.connect(ledger) as db:
            db.execute("DELETE FROM meta WHERE key = 'list_extent'")
        rows_read.clear()
        full = cli("resume", manifest)
        assert sorted(rows_read) == list(range(1, 11)), full.output
    assert "checked the 4 rows added at its end, 6 to send, 2 duplicate" in appended.stdout, appended.output
    assert "checked, 6 to send, 2 duplicate" in full.stdout, full.output
    assert recorded == _ledger_rows(ledger)
    sent = cli("resume", manifest, "--yes")
    assert sent.exit_code == 0, sent.output
    emails = [d.payload["to"][0]["email"] for d in api.deliveries]
    assert sorted(emails) == [f"p{n}@example.com" for n in range(1, 9)]


def test_a_bad_appended_row_is_refused_naming_its_row_and_nothing_is_sent(api, cli, tmp_path, renders):
    manifest = _started(api, cli, tmp_path, renders)
    folder = manifest.parent
    _write_rows(folder, [*_rows(folder), ("p7@example.com", "P 7", "Oslo"), ("not-an-address", "X", "Oslo")])
    refused = cli("resume", manifest, "--yes")
    assert refused.exit_code == 65, refused.output
    assert "r.csv row 8" in refused.output
    assert len(api.deliveries) == 2


def test_after_rows_skipped_as_invalid_only_the_appended_rows_are_read(
    api, cli, tmp_path, renders, rows_read
):
    """Rows skipped as invalid are not read again when rows were only appended (with or without the flag)."""
    api.add_grant(GRANT, "a@corp.example.com")
    manifest = _campaign(tmp_path / "c", 4)
    folder = manifest.parent
    _write_rows(folder, [*_rows(folder), ("bad-address", "B", "Oslo")])
    assert cli("run", manifest, "--yes", "--skip-invalid", "--limit", "1").exit_code == 75
    _write_rows(folder, [*_rows(folder), ("p9@example.com", "P 9", "Oslo")])
    rows_read.clear()
    resumed = cli("resume", manifest, "--yes")
    assert resumed.exit_code == 0, resumed.output
    assert "checked the 1 row added at its end" in resumed.stdout
    assert sorted(rows_read) == [6]
    emails = [d.payload["to"][0]["email"] for d in api.deliveries]
    assert sorted(emails) == [*(f"p{n}@example.com" for n in range(1, 5)), "p9@example.com"]


def _skipped_one(api, cli, tmp_path) -> Path:
    """Four good rows and a bad one (row 5), run with --skip-invalid and stopped after one send."""
    api.add_grant(GRANT, "a@corp.example.com")
    manifest = _campaign(tmp_path / "c", 4)
    folder = manifest.parent
    _write_rows(folder, [*_rows(folder), ("bad-address", "B", "Oslo")])
    assert cli("run", manifest, "--yes", "--skip-invalid", "--limit", "1").exit_code == 75
    return manifest


def _ledger_rows(manifest: Path) -> dict[str, tuple[str, str | None, str | None]]:
    """Key -> state, reason and cells of every row of the campaign's ledger."""
    with sqlite3.connect(manifest.with_name("campaign.ledger.sqlite")) as db:
        rows = db.execute("SELECT key, state, reason, cells FROM recipients").fetchall()
    return {key: (state, reason, cells) for key, state, reason, cells in rows}


def test_rows_skipped_as_invalid_stay_skipped_without_the_flag(api, cli, tmp_path, rows_read):
    """--skip-invalid is recorded row by row, not a setting of the run: a resume without it goes on
    without checking the list again, and the skipped row stays skipped."""
    manifest = _skipped_one(api, cli, tmp_path)
    rows_read.clear()
    resumed = cli("resume", manifest, "--yes")
    assert resumed.exit_code == 0, resumed.output
    assert "unchanged since it was checked" in resumed.output
    assert rows_read == []
    emails = [d.payload["to"][0]["email"] for d in api.deliveries]
    assert sorted(emails) == [f"p{n}@example.com" for n in range(1, 5)]
    state, reason, _cells = _ledger_rows(manifest)["row:5"]
    assert state == "skipped"
    assert (reason or "").startswith("invalid:")


def test_rows_appended_after_a_skip_are_checked_and_sent_without_the_flag(api, cli, tmp_path):
    manifest = _skipped_one(api, cli, tmp_path)
    folder = manifest.parent
    _write_rows(folder, [*_rows(folder), ("p9@example.com", "P 9", "Oslo")])
    resumed = cli("resume", manifest, "--yes")
    assert resumed.exit_code == 0, resumed.output
    emails = [d.payload["to"][0]["email"] for d in api.deliveries]
    assert sorted(emails) == [*(f"p{n}@example.com" for n in range(1, 5)), "p9@example.com"]


def test_a_new_bad_row_still_stops_a_run_without_the_flag(api, cli, tmp_path):
    manifest = _skipped_one(api, cli, tmp_path)
    folder = manifest.parent
    before = _ledger_rows(manifest)
    _write_rows(folder, [*_rows(folder), ("p9@example.com", "P 9", "Oslo"), ("worse", "W", "Oslo")])
    refused = cli("resume", manifest, "--yes")
    assert refused.exit_code == 65, refused.output
    assert "r.csv row 7" in refused.output
    assert "row 5" not in refused.output
    assert len(api.deliveries) == 1
    assert _ledger_rows(manifest) == before


def test_a_skipped_row_changed_since_is_a_problem_again(api, cli, tmp_path):
    """The earlier decision was about the row as it was: edited (still bad), it needs the flag again,
    which records it as it is now."""
    manifest = _skipped_one(api, cli, tmp_path)
    folder = manifest.parent
    rows = _rows(folder)
    rows[4] = ("still-bad", "B", "Oslo")
    _write_rows(folder, rows)
    refused = cli("resume", manifest, "--yes")
    assert refused.exit_code == 65, refused.output
    assert "r.csv row 5" in refused.output
    assert len(api.deliveries) == 1
    assert cli("resume", manifest, "--yes", "--skip-invalid").exit_code == 0
    assert '"still-bad"' in (_ledger_rows(manifest)["row:5"][2] or "")  # recorded as it is now
    _write_rows(folder, [*_rows(folder), ("p9@example.com", "P 9", "Oslo")])
    assert cli("resume", manifest, "--yes").exit_code == 0
    emails = [d.payload["to"][0]["email"] for d in api.deliveries]
    assert sorted(emails) == [*(f"p{n}@example.com" for n in range(1, 5)), "p9@example.com"]


def test_a_skipped_row_that_moved_is_a_problem_again(api, cli, tmp_path):
    """A row with problems is known by its number: a row put in before it makes it another row."""
    manifest = _skipped_one(api, cli, tmp_path)
    folder = manifest.parent
    _write_rows(folder, [("p0@example.com", "P 0", "Oslo"), *_rows(folder)])
    refused = cli("resume", manifest, "--yes")
    assert refused.exit_code == 65, refused.output
    assert "r.csv row 6" in refused.output
    assert len(api.deliveries) == 1


def test_a_preview_shows_a_row_skipped_earlier_as_skipped_not_as_a_problem(api, cli, tmp_path):
    manifest = _skipped_one(api, cli, tmp_path)
    shown = cli("preview", manifest, "--json")
    assert shown.exit_code == 0, shown.output
    found = json.loads(shown.stdout)
    assert found["problems"] == []
    assert found["skipped"] == {"invalid": 1}
    _write_rows(manifest.parent, [*_rows(manifest.parent), ("worse", "W", "Oslo")])
    refused = cli("preview", manifest, "--json")
    assert refused.exit_code == 65
    assert [problem["row"] for problem in json.loads(refused.stdout)["problems"]] == [6]


# Person 0's message does not render (an undefined variable); rep "zz" is no sender (a row with problems).
_PERSON = st.tuples(st.integers(min_value=0, max_value=14), st.sampled_from(["", "a", "b", "zz"]))


def _pinned_campaign(folder: Path, people: list[tuple[int, str]]) -> Path:
    """Two senders, a `rep` column pinning some rows, a suppression list (p3), and rows that fail their
    checks (run with --skip-invalid)."""
    folder.mkdir()
    note = "Hello {{ name }}{% if name.startswith('Person 0 ') %}{{ nowhere }}{% endif %}\n"
    (folder / "note.txt.j2").write_text(note, encoding="utf-8")
    (folder / "suppressed.txt").write_text("p3@example.com\n", encoding="utf-8")
    _write_people(folder, people)
    senders = "".join(
        f'\n[[senders]]\nname = "{name}"\ngrant_id = "grant-{name}"\nemail = "{name}@corp.example.com"\n'
        for name in ("a", "b")
    )
    manifest = folder / "campaign.toml"
    manifest.write_text(
        '[campaign]\nname = "appended"\n\n[recipients]\nsource = "r.csv"\nname_column = "name"\n'
        'sender_column = "rep"\nsuppress = ["suppressed.txt"]\n\n'
        '[message]\nsubject = "Hi {{ name }}"\ntext = "note.txt.j2"\n' + senders,
        encoding="utf-8",
    )
    return manifest


def _write_people(folder: Path, people: list[tuple[int, str]], *, mode: str = "w") -> None:
    lines = [] if mode == "a" else ["email,name,rep"]
    lines += [f"P{n}@example.com,Person {n} ({rep or 'any'}),{rep}" for n, rep in people]
    with (folder / "r.csv").open(mode, encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(before=st.lists(_PERSON, min_size=1, max_size=12), after=st.lists(_PERSON, min_size=1, max_size=8))
def test_a_plan_of_appended_rows_is_the_plan_a_check_of_every_row_makes(
    api, cli, tmp_path_factory, before, after
):
    """Random lists with duplicates (before and among the appended rows, any case), suppressed rows,
    pinned senders and rows skipped as invalid: the ledger after checking only the appended rows is the
    ledger after checking them all, and the run has as many messages to send."""
    folder = tmp_path_factory.mktemp("appended")
    manifest = _pinned_campaign(folder / "c", before)
    ledger = manifest.with_name("campaign.ledger.sqlite")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("campaign.run._send_checked", lambda *_args, **_kwargs: None)  # the plans only
        assert cli("run", manifest, "--yes", "--skip-invalid").exit_code == 0
        _write_people(manifest.parent, after, mode="a")
        _copy_ledger(ledger, folder / "before.sqlite")
        appended = cli("run", manifest, "--yes", "--skip-invalid")
        recorded = _ledger_rows(ledger)
        _copy_ledger(folder / "before.sqlite", ledger)
        with sqlite3.connect(ledger) as db:
            db.execute("DELETE FROM meta WHERE key = 'list_extent'")
        full = cli("run", manifest, "--yes", "--skip-invalid")
    assert f"checked the {len(after)} row" in appended.stdout, appended.output
    assert "r.csv: checked, " in full.stdout, full.output
    # The same messages to send; the skips it counts are the appended rows' (the others' were counted).
    to_send = re.compile(r"(\d+) to send")
    assert to_send.findall(appended.stdout) == to_send.findall(full.stdout)
    assert recorded == _ledger_rows(ledger)


def test_the_reason_of_a_row_skipped_as_invalid_does_not_ask_for_the_flag(api, cli, tmp_path):
    """The reason recorded for a row skipped as invalid says what is wrong and how to have it mailed,
    never "run with --skip-invalid": the flag was given, or (a later run without it) the earlier skip
    stands. A row that still stops a run keeps that advice."""
    manifest = _skipped_one(api, cli, tmp_path)
    expected = (
        "invalid: column \"email\": 'bad-address' is not a valid address (An email address must have an "
        "@-sign); fix the row to have it mailed (the next run checks it again)"
    )
    assert _ledger_rows(manifest)["row:5"][:2] == ("skipped", expected)
    folder = manifest.parent
    _write_rows(folder, [*_rows(folder), ("p9@example.com", "P 9", "Oslo")])
    resumed = cli("resume", manifest, "--yes")  # checks the list again, without the flag
    assert resumed.exit_code == 0, resumed.output
    assert _ledger_rows(manifest)["row:5"][:2] == ("skipped", expected)
    _write_rows(folder, [*_rows(folder), ("worse", "W", "Oslo")])
    refused = cli("resume", manifest, "--yes")
    assert refused.exit_code == 65
    assert "fix or remove the row, or run with --skip-invalid" in refused.output
