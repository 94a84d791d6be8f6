"""Bad input through the CLI: each case exits with its documented code, prints one line naming the
place, sends nothing and writes no ledger."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

MANIFEST = """\
[campaign]
name = "bad-input"

[recipients]
source = "recipients.csv"
name_column = "name"
sender_column = "sender"

[message]
subject = "Hello {{ first_name }}"
html = "message.html.j2"
headers = { "X-Campaign" = "bad-input {{ first_name }}" }

[unsubscribe]
url = "https://example.com/u/{{ unsubscribe_token }}"

[[senders]]
name = "alice"
grant_id = "grant-alice"
email = "alice@corp.example.com"
per_second = 50
"""
CSV = "email,name,first_name,sender\nann@example.com,Ann Lee,Ann,alice\nbob@example.com,Bob Stone,Bob,\n"
TEMPLATE = "<p>Hi {{ first_name }}</p>\n"


def _write(
    folder: Path, *, manifest: str = MANIFEST, csv: str | bytes = CSV, template: str = TEMPLATE
) -> Path:
    (folder / "campaign.toml").write_text(manifest, encoding="utf-8")
    if isinstance(csv, bytes):
        (folder / "recipients.csv").write_bytes(csv)
    else:
        (folder / "recipients.csv").write_text(csv, encoding="utf-8")
    (folder / "message.html.j2").write_text(template, encoding="utf-8")
    return folder / "campaign.toml"


def _edit(old: str, new: str) -> str:
    assert old in MANIFEST
    return MANIFEST.replace(old, new)


CASES = {
    # name: (write kwargs, or a callable(folder) -> manifest path; exit code; fragments of the error line)
    "manifest missing": (lambda f: f / "nope.toml", 66, ["nope.toml"]),
    "manifest not TOML": ({"manifest": MANIFEST + "\nthis is = = wrong\n"}, 78, ["campaign.toml", "line"]),
    "unknown key (typo)": (
        {"manifest": _edit('subject = "', 'subjct = "')},
        78,
        ["message.subjct", "subject"],
    ),
    "campaign name missing": ({"manifest": _edit('name = "bad-input"', "")}, 78, ["campaign.name"]),
    "negative rate": (
        {"manifest": _edit("per_second = 50", "per_second = -1")},
        78,
        ["senders[1].per_second"],
    ),
    "http unsubscribe url": (
        {"manifest": _edit("https://example.com/u/", "http://example.com/u/")},
        78,
        ["unsubscribe.url", "https"],
    ),
    "duplicate sender names": (
        {"manifest": MANIFEST + '\n[[senders]]\nname = "alice"\ngrant_id = "g2"\n'},
        78,
        ["senders", "alice"],
    ),
    "bad custom header name": (
        {"manifest": _edit('"X-Campaign" =', '"X Campaign" =')},
        78,
        ["message.headers", "X Campaign"],
    ),
    "recipients file missing": (
        {"manifest": _edit('source = "recipients.csv"', 'source = "gone.csv"')},
        66,
        ["gone.csv"],
    ),
    "template file missing": (
        {"manifest": _edit('html = "message.html.j2"', 'html = "gone.html.j2"')},
        66,
        ["gone.html.j2"],
    ),
    "template syntax error": ({"template": "<p>{% if %}</p>"}, 65, ["message.html.j2"]),
    "undefined variable": ({"template": "<p>Hi {{ nickname }}</p>"}, 65, ["nickname", "row 1"]),
    "csv bad quote": (
        {"csv": 'email,name,first_name,sender\n"ann@example.com,Ann,Ann,alice\n'},
        65,
        ["recipients.csv"],
    ),
    "csv CR-only line ends (classic Mac)": (
        {"csv": CSV.replace("\n", "\r")},
        65,
        ["recipients.csv: uses CR-only line endings (classic Mac)", "CSV UTF-8"],
    ),
    "csv rows with CR-only line ends after LF ones (mixed)": (
        {"csv": CSV.replace("\n", "\r").replace("\r", "\n", 2) + "cy@example.com,Cy,Cy,alice\r"},
        65,
        ["recipients.csv: line 3: malformed CSV: lines here end with CR only", "mixed line endings"],
    ),
    "csv blank first line": ({"csv": "\n" + CSV}, 65, ["recipients.csv: line 1 is blank"]),
    "header name with a control character": (
        {"csv": CSV.replace("first_name,", "first_name,no\x1bte,", 1)},
        65,
        ['recipients.csv: line 1 (the header): column "no\\x1bte" holds a control character'],
    ),
    "header name with a zero-width space": (
        {"csv": "\u200b" + CSV},
        65,
        ['no column "email"', '"\\u200bemail", "name"', "do not show"],
    ),
    "header with stray spaces": (
        {"csv": "email, name ,first_name,sender\nann@example.com,Ann,Ann,alice\n"},
        65,
        ["recipients.csv", "name"],
    ),
    "wrong delimiter": (
        {"csv": "email;name;first_name;sender\nann@example.com;Ann;Ann;alice\n"},
        65,
        ["delimiter"],
    ),
    "email column missing": (
        {"csv": "mail,name,first_name,sender\nann@example.com,Ann,Ann,alice\n"},
        65,
        ["email"],
    ),
    "invalid address": (
        {"csv": "email,name,first_name,sender\nann@example.com,Ann,Ann,alice\nbob@,Bob,Bob,\n"},
        65,
        ["row 2", "email"],
    ),
    "two addresses in one cell": (
        {"csv": 'email,name,first_name,sender\n"ann@example.com, bob@example.com",Ann,Ann,alice\n'},
        65,
        ["row 1", "email"],
    ),
    "unknown sender in sender column": (
        {"csv": "email,name,first_name,sender\nann@example.com,Ann,Ann,zoe\n"},
        65,
        ["row 1", "sender", "zoe"],
    ),
    "CR/LF in subject via merge field": (
        {"csv": 'email,name,first_name,sender\nann@example.com,Ann,"Ann\r\nBcc: x@evil.example.com",alice\n'},
        65,
        ["row 1", "subject"],
    ),
    "CR/LF in display name": (
        {"csv": 'email,name,first_name,sender\nann@example.com,"Ann\nBcc: x@evil.example.com",Ann,alice\n'},
        65,
        ["row 1"],
    ),
    "CR/LF in custom header via merge field": (
        {
            "manifest": _edit('subject = "Hello {{ first_name }}"', 'subject = "Hello"'),
            "csv": 'email,name,first_name,sender\nann@example.com,Ann,"Ann\rX-Evil: 1",alice\n',
        },
        65,
        ["row 1", "X-Campaign"],
    ),
    "empty subject": (
        {"manifest": _edit('subject = "Hello {{ first_name }}"', 'subject = "{{ sender.nope }}"')},
        65,
        ["nope"],
    ),
    "api key missing": ("no-key", 78, ["NYLAS_API_KEY"]),
    "unsubscribe secret missing": ("no-secret", 78, ["CAMPAIGN_UNSUBSCRIBE_SECRET"]),
    "unsubscribe secret too short": ("short-secret", 78, ["CAMPAIGN_UNSUBSCRIBE_SECRET"]),
    "parquet file corrupt": ("bad-parquet", 65, ["recipients.parquet"]),
    "unsupported list format": (
        {"manifest": _edit('source = "recipients.csv"', 'source = "recipients.xlsx"')},
        65,
        ["recipients.xlsx"],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_refused_before_anything_is_sent(case, api, cli, tmp_path, monkeypatch):
    """One clear line naming the place, the documented exit code, no request, no ledger."""
    setup, code, fragments = CASES[case]
    if callable(setup):
        manifest = setup(tmp_path)
    elif isinstance(setup, dict):
        if "recipients.xlsx" in setup.get("manifest", ""):
            (tmp_path / "recipients.xlsx").write_bytes(b"PK\x03\x04")
        manifest = _write(tmp_path, **setup)
    else:
        manifest = _write(tmp_path)
        if setup == "no-key":
            monkeypatch.delenv("NYLAS_API_KEY")
        elif setup == "no-secret":
            monkeypatch.delenv("CAMPAIGN_UNSUBSCRIBE_SECRET")
        elif setup == "short-secret":
            monkeypatch.setenv("CAMPAIGN_UNSUBSCRIBE_SECRET", "short")
        elif setup == "bad-parquet":
            (tmp_path / "recipients.parquet").write_bytes(b"PAR1 this is not parquet at all")
            manifest.write_text(_edit('source = "recipients.csv"', 'source = "recipients.parquet"'))
    api.add_grant("grant-alice", "alice@corp.example.com")
    result = cli("run", manifest, "--yes")
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in result.output
    assert api.requests == []
    assert not list(tmp_path.glob("*.sqlite*"))


def test_skip_invalid_sends_the_good_rows_and_records_the_bad(api, cli, tmp_path):
    """With --skip-invalid an invalid row is skipped with its reason and the rest are sent."""
    manifest = _write(
        tmp_path, csv="email,name,first_name,sender\nann@example.com,Ann,Ann,alice\nbob@,Bob,Bob,\n"
    )
    api.add_grant("grant-alice", "alice@corp.example.com")
    result = cli("run", manifest, "--yes", "--skip-invalid")
    assert result.exit_code == 0, result.output
    assert [d.payload["to"][0]["email"] for d in api.deliveries] == ["ann@example.com"]
    status = cli("status", manifest, "--json").stdout
    assert '"invalid": 1' in status


def test_secret_never_appears_in_errors(api, cli, tmp_path, monkeypatch):
    """An unsubscribe secret that is rejected is not echoed back, and nothing is sent."""
    manifest = _write(tmp_path)
    monkeypatch.setenv("CAMPAIGN_UNSUBSCRIBE_SECRET", "tiny-secret-xyz")
    result = cli("run", manifest, "--yes")
    assert result.exit_code == 78
    assert "tiny-secret-xyz" not in result.output
    assert api.requests == []


def test_parquet_list_with_a_bad_address_names_the_row(api, cli, tmp_path):
    """A Parquet list gets the same row-numbered errors as a CSV."""
    manifest = _write(tmp_path)
    pl.DataFrame(
        {
            "email": ["ann@example.com", "not-an-address"],
            "name": ["Ann", "X"],
            "first_name": ["Ann", "X"],
            "sender": ["", ""],
        }
    ).write_parquet(tmp_path / "recipients.parquet")
    manifest.write_text(_edit('source = "recipients.csv"', 'source = "recipients.parquet"'))
    result = cli("run", manifest, "--yes")
    assert result.exit_code == 65
    assert "row 2" in result.stderr
    assert api.requests == []


def test_internationalised_addresses_reach_the_api_in_ascii_and_a_non_ascii_local_part_is_a_bad_row(
    api, cli, tmp_path
):
    """The fake refuses a non-ASCII address with 402, as Nylas does: a punycode or Unicode domain goes out
    in its ASCII form (one recipient, whichever spelling), and `jörg@…` stops the run naming its row and
    column, or with --skip-invalid is skipped with the reason; nothing fails at send time."""
    csv = (
        "email,name,first_name,sender\n"
        "ann@xn--bcher-kva.example,Ann,Ann,\n"
        "bob@Bücher.example,Bob,Bob,\n"
        "ann@bücher.example,Ann again,Ann,\n"
        "jörg@example.com,Jörg,Jörg,\n"
    )
    manifest = _write(tmp_path, csv=csv)
    api.add_grant("grant-alice", "alice@corp.example.com")
    refused = cli("run", manifest, "--yes")
    assert refused.exit_code == 65, refused.output
    [line] = [line for line in refused.stderr.splitlines() if line.strip()]
    assert line.startswith(
        "error: recipients.csv row 4, column \"email\": 'jörg@example.com' has non-ASCII characters before "
        "the @, and the Nylas API cannot send to such an address"
    ), line
    assert api.requests == []
    result = cli("run", manifest, "--yes", "--skip-invalid")
    assert result.exit_code == 0, result.output
    assert sorted(d.payload["to"][0]["email"] for d in api.deliveries) == [
        "ann@xn--bcher-kva.example",
        "bob@xn--bcher-kva.example",
    ]
    status = json.loads(cli("status", manifest, "--json").stdout)
    assert (status["states"]["sent"], status["states"]["failed"]) == (2, 0)
    assert (status["total"], status["skipped"]) == (
        3,
        {"invalid": 1},
    )  # a duplicate shares its first row's key
