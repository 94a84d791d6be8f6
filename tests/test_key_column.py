"""recipients.key_column through the CLI: the key is who a row is, and an address is still mailed once
whatever keys it comes under, in one list or across runs of a list exported again (its keys shifted).
A row skipped as a duplicate is mailed once it no longer is one (never to an address mailed already),
and a suppression file exported from a store suppresses the keys of its entries that hold no address.

Against the fake Nylas on loopback, counting the deliveries it received; the skipped rows carry their
reasons in the preview, the ledger (`report`) and `status`.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import API_KEY, serve_fake
from postgres import fresh_database

from campaign.testing import FakeNylas
from campaign.testing.records import Fault

MANIFEST = """\
[campaign]
name = "keyed"

[api]
key_env = "NYLAS_API_KEY"

[recipients]
source = "list.csv"
email_column = "email"
key_column = "id"

[message]
subject = "Hi {{ recipient.key }}"
text = "note.txt.j2"

[[senders]]
name = "s1"
grant_id = "grant-keyed"
email = "maya@example.com"
per_second = 1000
burst = 1000
per_day = 100000
concurrency = 4
"""
SAME_ADDRESS = "duplicate of row {} (same address, other key)"


def _campaign(
    api: FakeNylas, folder: Path, rows: str, *, ledger: str = "", suppress: str = "", keyed: bool = True
) -> Path:
    """A campaign keyed by its list's `id` column (`keyed`; else by address), the list holding `rows`
    (`id,email` lines); `suppress`: a suppression file's name for `recipients.suppress`."""
    folder.mkdir()
    (folder / "note.txt.j2").write_text("Hello {{ recipient.email }}\n")
    (folder / "list.csv").write_text("id,email\n" + rows)
    manifest = folder / "campaign.toml"
    text = MANIFEST if keyed else MANIFEST.replace('key_column = "id"\n', "")
    if suppress:
        listed = f'email_column = "email"\nsuppress = ["{suppress}"]\n'
        text = text.replace('email_column = "email"\n', listed)
    manifest.write_text(text + (f'\n[ledger]\nurl = "{ledger}"\n' if ledger else ""))
    api.add_grant("grant-keyed", "maya@example.com")
    return manifest


def _mailed(api: FakeNylas) -> Counter[str]:
    """Deliveries per address, as the fake API received them."""
    return Counter(delivery.payload["to"][0]["email"].lower() for delivery in api.deliveries)


def _ledger_rows(cli, manifest: Path) -> dict[str, tuple[str, str]]:
    """Key -> (state, reason) of every row the ledger holds, read through `campaign report`."""
    out = manifest.with_name("report.csv")
    written = cli("report", manifest, "--out", out)
    assert written.exit_code == 0, written.output
    with out.open(newline="") as file:
        return {row["key"]: (row["state"], row["reason"]) for row in csv.DictReader(file)}


def _preview(cli, manifest: Path) -> tuple[dict, str]:
    """`preview --json`'s report and the site's index page."""
    site = manifest.with_name("site")
    result = cli("preview", manifest, "--json", "--out", site)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), (site / "index.html").read_text()


def test_two_keys_at_one_address_in_one_list_mail_it_once(api, cli, tmp_path):
    """Ids 1 and 2 at ann@ and ANN@: row 2 is a duplicate of row 1 (a skip, not a bad row: the run needs
    no --skip-invalid), shown by the preview, recorded with its reason; Ann gets one message."""
    rows = "1,ann@example.com\n2,ANN@example.com\n3,bob@example.com\n"
    manifest = _campaign(api, tmp_path / "c", rows)
    report, index = _preview(cli, manifest)
    assert (report["to_send"], report["skipped"], report["problem_rows"]) == (2, {"duplicate": 1}, 0)
    assert SAME_ADDRESS.format(1) in index
    result = cli("run", manifest, "--yes")
    assert result.exit_code == 0, result.output
    assert "2 to send, 1 duplicate" in result.stdout
    assert _mailed(api) == {"ann@example.com": 1, "bob@example.com": 1}
    assert _ledger_rows(cli, manifest)["2"] == ("skipped", f"duplicate: {SAME_ADDRESS.format(1)}")
    status = json.loads(cli("status", manifest, "--json").stdout)
    assert (status["done"], status["skipped"]) == (True, {"duplicate": 1})
    assert cli("run", manifest, "--yes").exit_code == 0
    assert len(api.deliveries) == 2


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_list_exported_again_with_shifted_keys_mails_nobody_twice(api, cli, tmp_path, backend):
    """Ann was key 1 and Bob key 2; the list comes back as 1 new@, 2 ann@, 3 bob@. Bob is not mailed
    again under key 3: it is skipped as `duplicate: already mailed as key "2"`, in the preview, the
    ledger and status; keys 1 and 2 were sent (the key is the identity: neither goes out again)."""
    if backend == "postgres":
        with fresh_database() as url:
            _shifted_keys(api, cli, _campaign(api, tmp_path / "c", "", ledger=url))
    else:
        _shifted_keys(api, cli, _campaign(api, tmp_path / "c", ""))


def _shifted_keys(api: FakeNylas, cli, manifest: Path) -> None:
    listed = manifest.with_name("list.csv")
    listed.write_text("id,email\n1,ann@example.com\n2,bob@example.com\n")
    first = cli("run", manifest, "--yes")
    assert first.exit_code == 0, first.output
    listed.write_text("id,email\n1,new@example.com\n2,ann@example.com\n3,bob@example.com\n")
    report, index = _preview(cli, manifest)
    assert (report["to_send"], report["already_done"], report["skipped"]) == (0, 2, {"duplicate": 1})
    assert "already mailed as key &quot;2&quot;" in index
    again = cli("resume", manifest, "--yes")
    assert again.exit_code == 0, again.output
    assert "0 to send, 1 duplicate" in again.stdout
    assert _mailed(api) == {"ann@example.com": 1, "bob@example.com": 1}
    assert _ledger_rows(cli, manifest)["3"] == ("skipped", 'duplicate: already mailed as key "2"')
    status = json.loads(cli("status", manifest, "--json").stdout)
    assert (status["done"], status["skipped"], status["states"]["sent"]) == (True, {"duplicate": 1}, 2)


def test_a_key_not_sent_yet_whose_address_went_out_under_another_key_is_skipped(api, cli, tmp_path):
    """Only key 1 (Ann) was sent when the list came back as 1 new@, 2 ann@, 3 bob@: key 2, still to send,
    is now Ann's and is skipped as already mailed as key 1; Bob, never mailed, goes out under key 3."""
    manifest = _campaign(api, tmp_path / "c", "1,ann@example.com\n2,bob@example.com\n")
    assert cli("run", manifest, "--yes", "--limit", "1").exit_code == 75
    assert _mailed(api) == {"ann@example.com": 1}
    listed = "1,new@example.com\n2,ann@example.com\n3,bob@example.com\n"
    manifest.with_name("list.csv").write_text("id,email\n" + listed)
    report, index = _preview(cli, manifest)
    assert (report["to_send"], report["skipped"]) == (1, {"duplicate": 1})
    assert "already mailed as key &quot;1&quot;" in index
    again = cli("resume", manifest, "--yes")
    assert again.exit_code == 0, again.output
    assert _mailed(api) == {"ann@example.com": 1, "bob@example.com": 1}
    rows = _ledger_rows(cli, manifest)
    assert rows["2"] == ("skipped", 'duplicate: already mailed as key "1"')
    assert rows["3"][0] == "sent"


def test_rows_appended_at_an_address_of_an_earlier_row_are_its_duplicates(api, cli, tmp_path):
    """Rows added at the end of the list (only they are checked) under new keys, at Bob's address (his
    row not sent yet) and Ann's (sent): each is the duplicate of the earlier row, as a full check says."""
    manifest = _campaign(api, tmp_path / "c", "1,ann@example.com\n2,bob@example.com\n")
    assert cli("run", manifest, "--yes", "--limit", "1").exit_code == 75
    with manifest.with_name("list.csv").open("a") as file:
        file.write("3,BOB@example.com\n4,ann@example.com\n")
    again = cli("resume", manifest, "--yes")
    assert again.exit_code == 0, again.output
    assert "checked the 2 rows added at its end, 1 to send, 2 duplicate" in again.stdout
    assert _mailed(api) == {"ann@example.com": 1, "bob@example.com": 1}
    rows = _ledger_rows(cli, manifest)
    assert rows["3"] == ("skipped", f"duplicate: {SAME_ADDRESS.format(2)}")
    assert rows["4"] == ("skipped", f"duplicate: {SAME_ADDRESS.format(1)}")


def test_a_key_mailed_at_another_address_is_not_mailed_again_and_the_run_says_so(api, cli, tmp_path):
    """Key 1 went to ann@old; the list now says ann@new (a new address, or keys given out afresh): the key
    is one recipient, so nothing is sent, and the preview (a warning, and the row's listing) and the run
    (a note before it asks) say which address the key was mailed at. A key at its own address: no word."""
    manifest = _campaign(api, tmp_path / "c", "1,ann@old.example\n2,bob@example.com\n")
    assert cli("run", manifest, "--yes").exit_code == 0
    manifest.with_name("list.csv").write_text("id,email\n1,ann@new.example\n2,BOB@example.com\n")
    report, index = _preview(cli, manifest)
    (warning,) = [text for text in report["warnings"] if "already mailed at another address" in text]
    assert warning.startswith(
        "1 row has a key already mailed at another address, not mailed again at the list's (first: row 1, "
        'key "1", mailed at ann@old.example, the list now says ann@new.example)'
    )
    assert "mailed at ann@old.example, not at this address" in index
    assert "mailed at bob@example.com" not in index
    again = cli("resume", manifest, "--yes")
    assert again.exit_code == 0, again.output
    assert "note: 1 row has a key already mailed at another address" in again.stdout
    assert _mailed(api) == {"ann@old.example": 1, "bob@example.com": 1}


def _on_backend(backend: str, check: Callable[[str], None]) -> None:
    """Run `check` with the URL of a fresh PostgreSQL ledger, or "" (the SQLite file beside the manifest)."""
    if backend == "postgres":
        with fresh_database() as url:
            check(url)
    else:
        check("")


# --- a row skipped as a duplicate comes back when it no longer is one -------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_duplicate_whose_address_is_fixed_is_mailed_once(api, cli, tmp_path, backend):
    """Row 2 had Ann's address by mistake (a duplicate); fixed to cat@, it is mailed: the preview counts it
    to send, the run says it is pending again, Cat gets one message, and nobody a second. A resume after
    that finds nothing changed (the list is not read again) and sends nothing."""

    def check(ledger: str) -> None:
        rows = "1,ann@example.com\n2,ANN@example.com\n3,bob@example.com\n"
        manifest = _campaign(api, tmp_path / "c", rows, ledger=ledger)
        assert cli("run", manifest, "--yes").exit_code == 0
        assert _ledger_rows(cli, manifest)["2"] == ("skipped", f"duplicate: {SAME_ADDRESS.format(1)}")
        manifest.with_name("list.csv").write_text(
            "id,email\n1,ann@example.com\n2,cat@example.com\n3,bob@example.com\n"
        )
        report, _ = _preview(cli, manifest)
        assert (report["to_send"], report["already_done"], report["skipped"]) == (1, 2, {})
        again = cli("resume", manifest, "--yes")
        assert again.exit_code == 0, again.output
        assert "list.csv: checked, 1 to send" in again.stdout
        assert "1 row skipped earlier as a duplicate no longer is one and is pending again" in again.stdout
        assert _mailed(api) == {"ann@example.com": 1, "bob@example.com": 1, "cat@example.com": 1}
        assert _ledger_rows(cli, manifest)["2"] == ("sent", "")
        unchanged = cli("resume", manifest, "--yes")
        assert unchanged.exit_code == 0, unchanged.output
        assert "unchanged since it was checked" in unchanged.stdout
        assert len(api.deliveries) == 3

    _on_backend(backend, check)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_duplicate_whose_earlier_row_was_removed_before_it_was_sent_is_mailed(api, cli, tmp_path, backend):
    """Keys 2 and 3 are both Ann (3 skipped as 2's duplicate); only Bob was sent when key 2's row was taken
    out of the list: key 3 is now Ann's one row, and she gets one message (key 2, no longer listed, none)."""

    def check(ledger: str) -> None:
        rows = "1,bob@example.com\n2,ann@example.com\n3,ann@example.com\n"
        manifest = _campaign(api, tmp_path / "c", rows, ledger=ledger)
        assert cli("run", manifest, "--yes", "--limit", "1").exit_code == 75
        assert _mailed(api) == {"bob@example.com": 1}
        manifest.with_name("list.csv").write_text("id,email\n1,bob@example.com\n3,ann@example.com\n")
        again = cli("resume", manifest, "--yes")
        assert again.exit_code == 0, again.output
        assert _mailed(api) == {"bob@example.com": 1, "ann@example.com": 1}
        rows_now = _ledger_rows(cli, manifest)
        assert rows_now["3"] == ("sent", "")
        assert rows_now["2"][0] == "pending"  # not listed: never sent

    _on_backend(backend, check)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_duplicate_of_an_address_mailed_already_stays_a_duplicate(api, cli, tmp_path, backend):
    """Key 2 repeated Ann's address (key 1, sent). Key 1's row removed, key 2 is the list's only Ann, but
    her address went out under key 1: key 2 stays skipped, and she is not mailed again."""

    def check(ledger: str) -> None:
        manifest = _campaign(api, tmp_path / "c", "1,ann@example.com\n2,ann@example.com\n", ledger=ledger)
        assert cli("run", manifest, "--yes").exit_code == 0
        manifest.with_name("list.csv").write_text("id,email\n2,ann@example.com\n")
        report, index = _preview(cli, manifest)
        assert (report["to_send"], report["skipped"]) == (0, {"duplicate": 1})
        assert "already mailed as key &quot;1&quot;" in index
        again = cli("resume", manifest, "--yes")
        assert again.exit_code == 0, again.output
        assert "0 to send, 1 duplicate" in again.stdout
        assert _mailed(api) == {"ann@example.com": 1}
        assert _ledger_rows(cli, manifest)["2"][0] == "skipped"

    _on_backend(backend, check)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_duplicate_that_stays_skipped_says_why_as_the_list_is_now(api, cli, tmp_path, backend):
    """Key 3 repeats Ann's address (key 1, row 2) and key 4 Bob's (key 2, row 1). Bob was sent when his
    row left the list and two rows came in on top: key 3 is now the duplicate of row 3 (row 2 is Cat), and
    key 4, the only Bob listed, is skipped because his address went out as key 2. The ledger (report),
    the preview and status say so, never the rows the list no longer has them as; nobody is mailed twice."""

    def check(ledger: str) -> None:
        rows = "2,bob@example.com\n1,ann@example.com\n3,ANN@example.com\n4,BOB@example.com\n"
        manifest = _campaign(api, tmp_path / "c", rows, ledger=ledger)
        assert cli("run", manifest, "--yes", "--limit", "1").exit_code == 75
        assert _mailed(api) == {"bob@example.com": 1}
        before = _ledger_rows(cli, manifest)
        assert before["3"] == ("skipped", f"duplicate: {SAME_ADDRESS.format(2)}")
        assert before["4"] == ("skipped", f"duplicate: {SAME_ADDRESS.format(1)}")
        listed = ["0,zed@example.com", "5,cat@example.com", "1,ann@example.com", "3,ANN@example.com"]
        manifest.with_name("list.csv").write_text("\n".join(["id,email", *listed, "4,BOB@example.com\n"]))
        _, index = _preview(cli, manifest)
        assert "already mailed as key &quot;2&quot;" in index
        again = cli("resume", manifest, "--yes")
        assert again.exit_code == 0, again.output
        mailed = {"bob@example.com": 1, "ann@example.com": 1, "zed@example.com": 1, "cat@example.com": 1}
        assert _mailed(api) == mailed
        after = _ledger_rows(cli, manifest)
        assert after["3"] == ("skipped", f"duplicate: {SAME_ADDRESS.format(3)}")
        assert after["4"] == ("skipped", 'duplicate: already mailed as key "2"')
        status = json.loads(cli("status", manifest, "--json").stdout)
        assert (status["done"], status["skipped"]) == (True, {"duplicate": 2})

    _on_backend(backend, check)


def test_a_duplicate_met_again_with_the_cells_it_once_had_is_checked_under_todays_templates(
    api, cli, tmp_path
):
    """Key 2 (Bob, not sent) became a duplicate of Ann while the template changed to one Bob's row cannot
    render; back at Bob's address, its cells are the ones it was checked with before the change: it is
    checked again (never taken as checked), so the resume stops naming row 2, and nothing goes to Bob."""
    rows = "1,ann@example.com\n2,bob@example.com\n3,cat@example.com\n"
    manifest = _campaign(api, tmp_path / "c", rows)
    assert cli("run", manifest, "--yes", "--limit", "1").exit_code == 75
    listed = manifest.with_name("list.csv")
    listed.write_text("id,email\n1,ann@example.com\n2,ann@example.com\n3,cat@example.com\n")
    manifest.with_name("note.txt.j2").write_text(
        "Hello {{ recipient.email }}{% if recipient.email.startswith('bob') %}{{ nowhere }}{% endif %}\n"
    )
    assert cli("resume", manifest, "--yes", "--allow-changed-content").exit_code == 0
    assert _ledger_rows(cli, manifest)["2"] == ("skipped", f"duplicate: {SAME_ADDRESS.format(1)}")
    listed.write_text("id,email\n1,ann@example.com\n2,bob@example.com\n3,cat@example.com\n")
    refused = cli("resume", manifest, "--yes")
    assert refused.exit_code == 65, refused.output
    assert "list.csv row 2" in refused.output
    assert "nowhere" in refused.output
    assert _mailed(api) == {"ann@example.com": 1, "cat@example.com": 1}
    assert _ledger_rows(cli, manifest)["2"] == ("skipped", f"duplicate: {SAME_ADDRESS.format(1)}")


# --- a list exported again with new keys for people already mailed ------------------------------------


@pytest.fixture(name="api_on_clock")
def _api_on_clock(_loopback, cli_clock, monkeypatch):
    """The fake Nylas on the CLI's clock: follow-ups fall due, and replies are looked up, in one time."""
    yield from serve_fake(_loopback, FakeNylas(api_key=API_KEY, clock=cli_clock), monkeypatch)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_people_given_new_keys_after_step_1_still_get_their_follow_up_once(
    api_on_clock, cli, cli_clock, tmp_path, backend
):
    """Ann (key 1) and Bob (key 2) got step 1; the CRM's export renumbers them 11 and 12. They are still in
    the list: each new key is skipped as already mailed, and the follow-up goes out once each, in the
    thread of step 1. Status counts no row as gone from the list and no sequence as stopped."""

    def check(ledger: str) -> None:
        api = api_on_clock
        manifest = _campaign(api, tmp_path / "c", "1,ann@example.com\n2,bob@example.com\n", ledger=ledger)
        manifest.with_name("nudge.txt.j2").write_text("Nudge {{ recipient.email }}\n")
        followup = '[[followups]]\nname = "nudge"\nafter = "1d"\ntext = "nudge.txt.j2"\n\n[[senders]]'
        manifest.write_text(manifest.read_text().replace("[[senders]]", followup))
        assert cli("run", manifest, "--yes").exit_code == 75  # the nudge is due tomorrow
        manifest.with_name("list.csv").write_text("id,email\n11,ann@example.com\n12,bob@example.com\n")
        cli_clock.advance(86_400 + 60)
        again = cli("resume", manifest, "--yes")
        assert again.exit_code == 0, again.output
        steps = Counter(
            (d.payload["to"][0]["email"], d.payload["metadata"].get("step", "message"))
            for d in api.deliveries
        )
        assert steps == {
            ("ann@example.com", "message"): 1,
            ("bob@example.com", "message"): 1,
            ("ann@example.com", "nudge"): 1,
            ("bob@example.com", "nudge"): 1,
        }
        first = {
            d.payload["to"][0]["email"]: d.id for d in api.deliveries if "step" not in d.payload["metadata"]
        }
        answered = {
            d.payload["to"][0]["email"]: d.payload.get("reply_to_message_id")
            for d in api.deliveries
            if "step" in d.payload["metadata"]
        }
        assert answered == first
        rows = _ledger_rows(cli, manifest)
        assert rows["11"] == ("skipped", 'duplicate: already mailed as key "1"')
        assert rows["12"] == ("skipped", 'duplicate: already mailed as key "2"')
        status = json.loads(cli("status", manifest, "--json").stdout)
        assert (status["done"], status["removed_from_list"]) == (True, 0)
        assert status["steps"]["nudge"]["stopped"] == {}
        assert status["steps"]["nudge"]["sent"] == 2

    _on_backend(backend, check)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_new_key_held_back_by_an_unknown_send_is_mailed_once_it_proves_not_sent(
    api, cli, cli_clock, tmp_path, backend
):
    """Ann's send (key 1) ended unknown, then the list came back renumbered (11, 12): key 11 is skipped as
    already mailed as key 1, so status is not done while that send is unknown and names reconcile. Once
    reconcile finds it never went out, the next resume mails Ann, once; status is then done."""

    def check(ledger: str) -> None:
        manifest = _campaign(api, tmp_path / "c", "1,ann@example.com\n2,bob@example.com\n", ledger=ledger)
        api.script(Fault.UNAVAILABLE, times=1)
        assert cli("run", manifest, "--yes").exit_code == 1
        assert _mailed(api) == {"bob@example.com": 1}
        manifest.with_name("list.csv").write_text("id,email\n11,ann@example.com\n12,bob@example.com\n")
        renumbered = cli("resume", manifest, "--yes")
        assert renumbered.exit_code == 1, renumbered.output
        assert _mailed(api) == {"bob@example.com": 1}
        status = json.loads(cli("status", manifest, "--json").stdout)
        assert (status["done"], status["states"]["unknown"], status["removed_from_list"]) == (False, 1, 0)
        unknown = next(step for step in status["next"] if step["state"] == "unknown")
        assert unknown["examples"] == ["ann@example.com"]
        cli_clock.advance(20 * 60)
        assert cli("reconcile", manifest).exit_code == 0
        again = cli("resume", manifest, "--yes")
        assert again.exit_code == 0, again.output
        assert _mailed(api) == {"ann@example.com": 1, "bob@example.com": 1}
        status = json.loads(cli("status", manifest, "--json").stdout)
        assert (status["done"], status["states"]["sent"], status["skipped"]) == (True, 2, {"duplicate": 2})
        assert cli("resume", manifest, "--yes").exit_code == 0
        assert len(api.deliveries) == 2

    _on_backend(backend, check)


# --- a suppression file's entries that hold a recipient key and no address ---------------------------------


def _export_opt_outs(cli, folder: Path, name: str, *keys: str) -> None:
    """`suppress add --key` each of `keys` to a store, then `suppress export` it to `name` beside it (rows
    with an empty `email` and the key); a store without keys exports a header alone."""
    store = folder / "opt-outs.sqlite"
    if keys:
        assert cli("suppress", "add", *keys, "--key", "--store", store).exit_code == 0
    else:
        assert cli("suppress", "add", "zed@example.org", "--store", store).exit_code == 0
    exported = cli("suppress", "export", folder / name, "--store", store)
    assert exported.exit_code == 0, exported.output


@pytest.mark.parametrize("name", ["opt-outs.csv", "opt-outs.parquet"])
def test_an_exported_entry_holding_only_a_key_suppresses_that_key(api, cli, tmp_path, name):
    """`suppress export` writes key 2's opt-out as a row with an empty email: used as recipients.suppress,
    it skips key 2 (Bob) as `suppressed`, as `suppress import` into a store would; the others are mailed."""
    rows = "1,ann@example.com\n2,bob@example.com\n3,cat@example.com\n"
    manifest = _campaign(api, tmp_path / "c", rows, suppress=name)
    _export_opt_outs(cli, manifest.parent, name, "2")
    report, _ = _preview(cli, manifest)
    assert (report["to_send"], report["skipped"]) == (2, {"suppressed": 1})
    assert not [text for text in report["warnings"] if "recipient_key" in text]
    result = cli("run", manifest, "--yes")
    assert result.exit_code == 0, result.output
    assert "2 to send, 1 suppressed" in result.stdout
    assert _mailed(api) == {"ann@example.com": 1, "cat@example.com": 1}
    assert _ledger_rows(cli, manifest)["2"] == ("skipped", "suppressed: on a suppression list")


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_key_added_to_the_exported_suppression_file_skips_its_row_on_resume(api, cli, tmp_path, backend):
    """The suppression file is part of the rules: exported again with key 3 in it after Ann was sent, the
    resume checks the rows again, skips key 3 (not sent yet) as suppressed and sends Bob alone."""

    def check(ledger: str) -> None:
        rows = "1,ann@example.com\n2,bob@example.com\n3,cat@example.com\n"
        manifest = _campaign(api, tmp_path / "c", rows, ledger=ledger, suppress="opt-outs.csv")
        _export_opt_outs(cli, manifest.parent, "opt-outs.csv")
        assert cli("run", manifest, "--yes", "--limit", "1").exit_code == 75
        _export_opt_outs(cli, manifest.parent, "opt-outs.csv", "3")
        again = cli("resume", manifest, "--yes")
        assert again.exit_code == 0, again.output
        assert "list.csv: checked, 1 to send, 1 suppressed" in again.stdout
        assert _mailed(api) == {"ann@example.com": 1, "bob@example.com": 1}
        assert _ledger_rows(cli, manifest)["3"] == ("skipped", "suppressed: on a suppression list")

    _on_backend(backend, check)


def test_entries_holding_only_a_key_match_no_one_without_a_key_column_and_preview_and_run_say_so(
    api, cli, tmp_path
):
    """A campaign without key_column knows its recipients by address: the export's key-only row (key 2)
    suppresses no one, and the preview (a warning) and the run (a note) say so once, naming the file; its
    address row still suppresses Cat."""
    rows = "1,ann@example.com\n2,bob@example.com\n3,cat@example.com\n"
    manifest = _campaign(api, tmp_path / "c", rows, suppress="opt-outs.csv", keyed=False)
    store = manifest.with_name("opt-outs.sqlite")
    assert cli("suppress", "add", "2", "--key", "--store", store).exit_code == 0
    assert cli("suppress", "add", "cat@example.com", "--store", store).exit_code == 0
    assert cli("suppress", "export", manifest.with_name("opt-outs.csv"), "--store", store).exit_code == 0
    said = (
        "opt-outs.csv: 1 row with a recipient_key and no email matches no one: without "
        "recipients.key_column this campaign knows its recipients by address"
    )
    report, _ = _preview(cli, manifest)
    assert next(text for text in report["warnings"] if "recipient_key" in text).startswith(said)
    assert (report["to_send"], report["skipped"]) == (2, {"suppressed": 1})
    result = cli("run", manifest, "--yes")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("recipient_key") == 1
    assert "note: " + said in " ".join(result.stdout.split())
    assert _mailed(api) == {"ann@example.com": 1, "bob@example.com": 1}
