"""The recipient list: reading CSV/Parquet lists, address checks, duplicates, suppression."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import pytest
from support import check_plan

from campaign.errors import InputFileError, RecipientDataError
from campaign.manifest import RecipientsSettings, load_manifest
from campaign.models import SkipReason
from campaign.recipients import Audience, _audience, load_audience, scan_audience
from campaign.recipients._audience import load_suppression

SENDERS = ("alice", "bob")


def write(tmp_path: Path, content: str | bytes, name: str = "recipients.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def load(path: Path, **settings: Any) -> Audience:
    return load_audience(RecipientsSettings(source=path, **settings), sender_names=SENDERS)


def load_text(tmp_path: Path, content: str | bytes, **settings: Any) -> Audience:
    return load(write(tmp_path, content), **settings)


def data_error(tmp_path: Path, content: str | bytes, **settings: Any) -> str:
    with pytest.raises(RecipientDataError) as info:
        load_text(tmp_path, content, **settings)
    assert info.value.exit_code == 65
    return str(info.value)


def test_basic_csv_becomes_recipients(tmp_path: Path) -> None:
    """Rows become recipients with normalised address, lower-cased key, name and every field."""
    audience = load_text(
        tmp_path, "email,name,zip\nAnn@Example.COM,Ann,01234\nbob@example.com,,99\n", name_column="name"
    )
    assert audience.columns == ("email", "name", "zip")
    first, second = audience.recipients
    assert first.address.email == "Ann@example.com"
    assert first.key == "ann@example.com"
    assert first.address.name == "Ann"
    assert first.row == 1
    assert first.fields == {"email": "Ann@Example.COM", "name": "Ann", "zip": "01234"}
    assert second.address.name is None
    assert second.row == 2
    assert (audience.skipped, audience.problems) == ((), ())


def test_utf8_bom_is_ignored(tmp_path: Path) -> None:
    """A BOM from Excel does not become part of the first column's name."""
    audience = load_text(tmp_path, b"\xef\xbb\xbfemail,name\r\nann@example.com,Ann\r\n")
    assert audience.columns == ("email", "name")
    assert audience.recipients[0].address.email == "ann@example.com"


def test_crlf_line_ends_leave_no_carriage_returns(tmp_path: Path) -> None:
    """Windows line ends do not leak a CR into the last column."""
    audience = load_text(tmp_path, "email,name\r\na@example.com,Ann\r\nb@example.com,Bob\r\n")
    assert [r.fields["name"] for r in audience.recipients] == ["Ann", "Bob"]


def test_quoted_fields_keep_commas_quotes_and_newlines(tmp_path: Path) -> None:
    """RFC 4180 quoting: separators, doubled quotes and line breaks inside quotes are data."""
    content = 'email,note\na@example.com,"Smith, ""Jr"" \nsecond line"\nb@example.com,plain\n'
    audience = load_text(tmp_path, content)
    assert audience.recipients[0].fields["note"] == 'Smith, "Jr" \nsecond line'
    assert audience.recipients[1].row == 2


def test_semicolon_delimiter(tmp_path: Path) -> None:
    """recipients.delimiter = ";" reads European-style CSV."""
    audience = load_text(tmp_path, "email;name\na@example.com;Ann, B.\n", delimiter=";", name_column="name")
    assert audience.recipients[0].address.name == "Ann, B."


@pytest.mark.parametrize(("separator", "shown"), [(";", '";"'), ("\t", '"\\t"'), ("|", '"|"')])
def test_wrong_delimiter_hints_at_the_setting(tmp_path: Path, separator: str, shown: str) -> None:
    """A header that is one column full of another separator suggests recipients.delimiter."""
    message = data_error(tmp_path, f"email{separator}name\na@example.com{separator}Ann\n")
    assert message.startswith('recipients.csv: no column "email" (recipients.email_column)')
    assert f"set recipients.delimiter = {shown} in the manifest" in message


def test_header_with_spaces_names_the_column(tmp_path: Path) -> None:
    """A header name with stray spaces is refused, naming it."""
    message = data_error(tmp_path, "email, first_name\na@example.com,Ann\n")
    assert message.startswith('recipients.csv: column " first_name" has spaces around its name')


def test_duplicate_header_is_refused(tmp_path: Path) -> None:
    """Two columns with the same name cannot both be used by templates."""
    assert 'column "email" appears twice' in data_error(
        tmp_path, "email,email\na@example.com,b@example.com\n"
    )


def test_missing_email_column_lists_columns_and_case_hint(tmp_path: Path) -> None:
    """A missing column lists the header and points at a case-only difference."""
    message = data_error(tmp_path, "Email,Name\na@example.com,Ann\n")
    assert message == (
        'recipients.csv: no column "email" (recipients.email_column); the header has: "Email", "Name"; '
        'did you mean "Email"? (names are case-sensitive)'
    )


def test_an_invisible_character_in_a_header_name_is_shown_escaped(tmp_path: Path) -> None:
    """A zero-width space before `email` (pasted from a web page) is shown as \\u200b, not printed raw
    (it read: no column "email" … the header has: "email"), and named as what to remove."""
    message = data_error(tmp_path, "\u200bemail,na\u00adme\nann@example.com,Ann\n")
    assert message == (
        'recipients.csv: no column "email" (recipients.email_column); the header has: "\\u200bemail", '
        '"na\\xadme"; "\\u200bemail" holds characters that do not show (escaped here): remove them'
    )


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (
            "email,na\x07me\nann@example.com,Ann\n",
            'recipients.csv: line 1 (the header): column "na\\x07me" holds a control character (\\x07); '
            "remove it and save the file again",
        ),
        (
            'email,"na\nme"\nann@example.com,Ann\n',
            'recipients.csv: line 1 (the header): column "na\\nme" holds a control character (\\n); '
            "remove it and save the file again",
        ),
        (
            "\nemail,name\nann@example.com,Ann\n",
            "recipients.csv: line 1 is blank, but it must name the columns (e.g. email,name); remove the "
            "blank lines above the header",
        ),
        (
            ",,\nann@example.com,Ann,\n",
            "recipients.csv: line 1 (the header) names no column; the first line must name them "
            "(e.g. email,name)",
        ),
        (
            "email,name\rann@example.com,Ann\rbob@example.com,Bob\r",
            'recipients.csv: uses CR-only line endings (classic Mac); save it as "CSV UTF-8" (Excel: Save '
            "As > CSV UTF-8)",
        ),
    ],
)
def test_a_header_that_cannot_name_the_columns_is_refused(tmp_path: Path, content: str, said: str) -> None:
    """A control character in a name, a blank first line, a header of unnamed columns, CR-only line ends
    (the whole file one header line: a list of no one, which used to be "every recipient settled")."""
    assert data_error(tmp_path, content) == said


@pytest.mark.parametrize("key", ["name_column", "sender_column", "key_column"])
def test_other_named_columns_must_exist(tmp_path: Path, key: str) -> None:
    """name/sender/key columns named by the manifest must be in the header."""
    message = data_error(tmp_path, "email\na@example.com\n", **{key: "missing"})
    assert f'no column "missing" (recipients.{key})' in message


def test_invalid_address_is_a_problem_with_row_and_column(tmp_path: Path) -> None:
    """A bad address becomes a Problem naming the row, column, value and the fix."""
    audience = load_text(tmp_path, "email\na@example.com\nb@example.com\nc@example.com\nbob@\n")
    (problem,) = audience.problems
    assert (problem.row, problem.where) == (4, 'column "email"')
    assert problem.describe("recipients.csv") == (
        "recipients.csv row 4, column \"email\": 'bob@' is not a valid address "
        "(There must be something after the @-sign); fix or remove the row, or run with --skip-invalid"
    )
    assert len(audience.recipients) == 3


def test_empty_address_is_a_problem(tmp_path: Path) -> None:
    """A row with data but no address is reported, not silently dropped."""
    (problem,) = load_text(tmp_path, "email,name\n,Ann\n").problems
    assert problem.row == 1
    assert problem.message.startswith("the address is empty")


@pytest.mark.parametrize("cell", ['"a@example.com, b@example.com"', "a@example.com;b@example.com"])
def test_several_addresses_in_one_cell(tmp_path: Path, cell: str) -> None:
    """A cell holding two addresses asks for one address per row."""
    (problem,) = load_text(tmp_path, f"email,name\n{cell},Ann\n").problems
    assert "holds 2 addresses; put one address per row" in problem.message


def test_surrounding_whitespace_is_stripped_but_inner_whitespace_is_invalid(tmp_path: Path) -> None:
    """Spreadsheet padding (even a no-break space) is harmless; a space inside the address is not."""
    audience = load_text(tmp_path, "email\n  ann@example.com\u00a0\nbo b@example.com\n")
    assert audience.recipients[0].address.email == "ann@example.com"
    (problem,) = audience.problems
    assert problem.row == 2
    assert "'bo b@example.com' is not a valid address" in problem.message


def test_duplicates_in_another_case_are_skipped_with_both_rows(tmp_path: Path) -> None:
    """The first occurrence is mailed; a later one in another case is skipped naming the first row."""
    audience = load_text(tmp_path, "email\nann@example.com\nbob@example.com\nANN@Example.com\n")
    assert [r.row for r in audience.recipients] == [1, 2]
    (skip,) = audience.skipped
    assert (skip.row, skip.reason, skip.detail) == (3, SkipReason.DUPLICATE, "duplicate of row 1")
    assert skip.key == "ann@example.com"


def test_an_internationalised_domain_is_sent_in_its_ascii_form_and_is_one_person(tmp_path: Path) -> None:
    """`ann@xn--bcher-kva.example` and `ann@bücher.example` are one recipient, keyed and addressed in the
    ASCII form the API accepts; a suppression entry in either spelling suppresses the other."""
    unsub = write(tmp_path, "bob@xn--bcher-kva.example\ncarl@BÜCHER.example\n", "unsub.txt")
    path = write(
        tmp_path,
        "email\nann@xn--bcher-kva.example\nAnn@Bücher.example\nbob@bücher.example\n"
        "carl@xn--bcher-kva.example\nann@example.com\n",
    )
    audience = load(path, suppress=(unsub,))
    assert [(r.row, r.key, r.address.email) for r in audience.recipients] == [
        (1, "ann@xn--bcher-kva.example", "ann@xn--bcher-kva.example"),
        (5, "ann@example.com", "ann@example.com"),
    ]
    assert [(s.row, s.email, s.reason, s.detail) for s in audience.skipped] == [
        (2, "Ann@xn--bcher-kva.example", SkipReason.DUPLICATE, "duplicate of row 1"),
        (3, "bob@xn--bcher-kva.example", SkipReason.SUPPRESSED, "on a suppression list"),
        (4, "carl@xn--bcher-kva.example", SkipReason.SUPPRESSED, "on a suppression list"),
    ]
    assert audience.problems == ()


def test_a_non_ascii_local_part_is_a_problem_naming_row_and_column(tmp_path: Path) -> None:
    """Nylas cannot send to `jörg@…` (402): the row is refused before anything is sent, not at send time."""
    audience = load_text(tmp_path, "email\nann@example.com\njörg@bücher.example\n")
    assert [r.row for r in audience.recipients] == [1]
    (problem,) = audience.problems
    assert problem.describe("recipients.csv") == (
        "recipients.csv row 2, column \"email\": 'jörg@bücher.example' has non-ASCII characters before "
        "the @, and the Nylas API cannot send to such an address; fix or remove the row, or run with "
        "--skip-invalid"
    )


def test_blank_lines_are_ignored_but_counted(tmp_path: Path) -> None:
    """Blank lines (and trailing ones) are not recipients; row numbers still match the file."""
    audience = load_text(tmp_path, "email,name\na@example.com,A\n\n,\nb@example.com,B\n\n")
    assert [r.row for r in audience.recipients] == [1, 4]
    assert audience.problems == ()


def test_leading_zeros_are_preserved(tmp_path: Path) -> None:
    """Every CSV column is read as text, so zip codes keep their zeros."""
    audience = load_text(tmp_path, "email,zip,amount\na@example.com,00501,1.50\n")
    assert audience.recipients[0].fields == {"email": "a@example.com", "zip": "00501", "amount": "1.50"}


def test_unnamed_trailing_columns_are_dropped(tmp_path: Path) -> None:
    """Empty header cells (spreadsheet residue) do not become fields."""
    audience = load_text(tmp_path, "email,name,,\na@example.com,A,,\n")
    assert audience.columns == ("email", "name")
    assert audience.recipients[0].fields == {"email": "a@example.com", "name": "A"}


def test_short_rows_fill_missing_cells_with_empty_strings(tmp_path: Path) -> None:
    """A row with fewer cells than the header gets "" for the missing ones."""
    audience = load_text(tmp_path, "email,name,city\na@example.com,Ann\n")
    assert audience.recipients[0].fields == {"email": "a@example.com", "name": "Ann", "city": ""}


def test_sender_column_checks_names(tmp_path: Path) -> None:
    """Known senders are kept, empty means any sender, unknown ones are problems with a suggestion."""
    content = "email,via\na@example.com,alice\nb@example.com,\nc@example.com,alcie\n"
    audience = load_text(tmp_path, content, sender_column="via")
    assert [r.sender for r in audience.recipients] == ["alice", None]
    (problem,) = audience.problems
    assert (problem.row, problem.where) == (3, 'column "via"')
    assert "names sender 'alcie', which the manifest does not define (senders: alice, bob)" in problem.message
    assert "did you mean 'alice'?" in problem.message


def test_key_column_identifies_recipients(tmp_path: Path) -> None:
    """With key_column the key comes from it, duplicates are by key, and an empty key is a problem."""
    content = "id,email\nC-1,a@example.com\nC-2,d@example.com\nC-1,b@example.com\n,c@example.com\n"
    audience = load_text(tmp_path, content, key_column="id")
    assert [(r.key, r.row) for r in audience.recipients] == [("C-1", 1), ("C-2", 2)]
    (skip,) = audience.skipped
    assert (skip.row, skip.key, skip.detail) == (3, "C-1", "duplicate of row 1")
    (problem,) = audience.problems
    assert (problem.row, problem.where) == (4, 'column "id"')
    assert "the key is empty" in problem.message


def test_with_key_column_an_address_is_still_mailed_once(tmp_path: Path) -> None:
    """Two keys at one address (compared as addresses are: case and the domain's IDNA form aside): the
    later row is a duplicate naming the first, across batches too; a row skipped for its key claims no
    address, and without a key column nothing changes."""
    content = (
        "id,email\n"
        "1,ann@example.com\n"  # 1
        "1,bob@example.com\n"  # 2: its key is row 1's: skipped, and bob is not taken
        "2,ANN@Example.COM\n"  # 3: ann again, under another key
        "3,bob@example.com\n"  # 4: bob's first row that is mailed
        "4,eve@xn--bcher-kva.example\n"  # 5
        "5,eve@bücher.example\n"  # 6: the same address as row 5
    )
    path = write(tmp_path, content)
    scan = scan_audience(RecipientsSettings(source=path, key_column="id"), sender_names=SENDERS)
    checked = [row for batch in scan.batches(2) for row in batch]
    assert [(row.row, row.recipient.key) for row in checked if row.recipient] == [
        (1, "1"),
        (4, "3"),
        (5, "4"),
    ]
    skips = [(row.row, row.skip.key, row.skip.reason, row.skip.detail) for row in checked if row.skip]
    assert skips == [
        (2, "1", SkipReason.DUPLICATE, "duplicate of row 1"),
        (3, "2", SkipReason.DUPLICATE, "duplicate of row 1 (same address, other key)"),
        (6, "5", SkipReason.DUPLICATE, "duplicate of row 5 (same address, other key)"),
    ]
    by_address = load(path)  # keyed by address: the same rows, duplicates by address as ever
    assert [r.row for r in by_address.recipients] == [1, 2, 5]
    assert [(skip.row, skip.detail) for skip in by_address.skipped] == [
        (3, "duplicate of row 1"),
        (4, "duplicate of row 2"),
        (6, "duplicate of row 5"),
    ]


def test_parquet_nulls_become_empty_strings_and_types_are_kept(tmp_path: Path) -> None:
    """Parquet lists keep strings with leading zeros and numbers; nulls become ""."""
    frame = pl.DataFrame(
        {
            "email": ["a@example.com", "b@example.com", None],
            "name": ["Ann", None, "Nobody"],
            "zip": ["00501", "02134", None],
            "visits": [3, None, 1],
        }
    )
    path = tmp_path / "list.parquet"
    frame.write_parquet(path)
    audience = load(path, name_column="name")
    first, second = audience.recipients
    assert first.fields == {"email": "a@example.com", "name": "Ann", "zip": "00501", "visits": 3}
    assert second.fields["visits"] == ""
    assert second.address.name is None
    (problem,) = audience.problems
    assert problem.row == 3
    assert problem.message.startswith("the address is empty")


def test_parquet_header_rules_apply(tmp_path: Path) -> None:
    """A Parquet column name with stray spaces is refused like a CSV header."""
    path = tmp_path / "list.parquet"
    pl.DataFrame({"email ": ["a@example.com"]}).write_parquet(path)
    with pytest.raises(RecipientDataError, match=r'list\.parquet: column "email " has spaces'):
        load(path)


def test_unreadable_parquet_is_a_data_error(tmp_path: Path) -> None:
    """A .parquet file that is not Parquet names the file."""
    with pytest.raises(RecipientDataError, match=r"^list.parquet: not a readable Parquet file"):
        load(write(tmp_path, "email\na@example.com\n", "list.parquet"))


def test_missing_list_is_an_input_file_error(tmp_path: Path) -> None:
    """A missing recipient list exits 66 and names the path."""
    with pytest.raises(InputFileError, match="recipient list not found") as info:
        load(tmp_path / "gone.csv")
    assert info.value.exit_code == 66


def test_unknown_extension_suggests_csv_or_parquet(tmp_path: Path) -> None:
    """An .xlsx list is refused with the formats that work."""
    with pytest.raises(
        RecipientDataError, match=r"unknown file type '\.xlsx'; use a \.csv or \.parquet file"
    ):
        load(write(tmp_path, "x", "list.xlsx"))


def test_upper_case_extension_is_accepted(tmp_path: Path) -> None:
    """LIST.CSV is a CSV file."""
    assert len(load(write(tmp_path, "email\na@example.com\n", "LIST.CSV")).recipients) == 1


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            'email,name\na@example.com,A\nb@example.com,"Bob\nc@example.com,C\n',
            "line 3: malformed CSV: a quote opened",
        ),
        (
            'email,name\na@example.com,A\nb@example.com,Bo"b\n',
            "line 3: malformed CSV: a quote inside an unquoted",
        ),
        ('email,name\na@example.com,"A"x\n', "line 2: malformed CSV: text after a closing quote"),
        (
            "email,name\na@example.com,A\nb@example.com,Smith, Bob\n",
            "line 3: malformed CSV: 3 fields, but the header",
        ),
    ],
)
def test_malformed_csv_names_the_line(tmp_path: Path, content: str, expected: str) -> None:
    """Broken quoting or extra fields raise at once, naming the file and the line."""
    assert data_error(tmp_path, content).startswith(f"recipients.csv: {expected}")


def test_non_utf8_file_names_the_line(tmp_path: Path) -> None:
    """A Latin-1 export is refused with the line and how to re-save it."""
    message = data_error(tmp_path, "email,name\na@example.com,Ann\nb@example.com,Jos\xe9\n".encode("latin-1"))
    assert message.startswith("recipients.csv: line 3: not UTF-8 text (byte 0xe9)")
    assert "CSV UTF-8" in message


def test_utf16_file_is_refused_clearly(tmp_path: Path) -> None:
    """Excel's "Unicode text" (UTF-16) is named as such."""
    assert "is UTF-16 text" in data_error(tmp_path, "email\na@example.com\n".encode("utf-16"))


def test_empty_file_asks_for_a_header(tmp_path: Path) -> None:
    """An empty list is refused, saying the first line must name the columns."""
    assert data_error(tmp_path, "").startswith(
        "recipients.csv: is empty; its first line must name the columns"
    )


def test_header_only_gives_an_empty_audience(tmp_path: Path) -> None:
    """A header with no rows is a valid, empty list."""
    audience = load_text(tmp_path, "email,name\n")
    assert (audience.columns, audience.recipients, audience.problems) == (("email", "name"), (), ())


def test_suppression_from_text_csv_and_parquet(tmp_path: Path) -> None:
    """Suppression lists in all three formats are normalised and lower-cased."""
    text = write(
        tmp_path, "# unsubscribed by hand\n\n  Ann@Example.com \nmailto:x@example.com\n", "unsub.txt"
    )
    csv = write(tmp_path, "id;Email\n1;BOB@example.com\n", "bounced.csv")
    parquet = tmp_path / "complaints.parquet"
    pl.DataFrame({"who": ["carl@EXAMPLE.com"]}).write_parquet(parquet)
    assert load_suppression([text, csv, parquet]) == frozenset(
        {"ann@example.com", "x@example.com", "bob@example.com", "carl@example.com"}
    )


def test_a_mailto_suppression_entry_is_percent_decoded(tmp_path: Path) -> None:
    """RFC 6068 percent-encodes a mailto: address: `ann%2Bnews@…` is ann+news (it was kept as
    `ann%2bnews@…` and matched no one), `bob%40example.com` is bob (it was refused). A plain entry is
    not decoded: '%' is a legal character in a local part."""
    path = write(
        tmp_path,
        "mailto:ann%2Bnews@example.com\nMAILTO:bob%40example.com?subject=stop\ncy%2Bx@example.com\n",
        "unsub.txt",
    )
    assert load_suppression([path]) == frozenset(
        {"ann+news@example.com", "bob@example.com", "cy%2bx@example.com"}
    )


def test_a_suppression_csv_read_as_no_rows_but_holding_lines_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The net under the header checks: a CSV that yields no row while it holds lines after its first
    (however it came to be misread) is an error, never an empty opt-out list; a header alone is empty."""
    path = write(tmp_path, "email\nbob@example.com\n", "unsub.csv")
    empty = pl.DataFrame(schema={"column_0": pl.String})
    monkeypatch.setattr(_audience, "read_table", lambda *_: (["email"], empty))
    with pytest.raises(RecipientDataError) as caught:
        load_suppression([path])
    assert str(caught.value) == (
        "unsub.csv: holds 2 lines, but no entry could be read after its header; save it as CSV UTF-8 "
        "with the header on line 1 (e.g. email) and one entry a line"
    )
    assert load_suppression([write(tmp_path, "email\n\n", "only.csv")]) == frozenset()


def test_headerless_suppression_csv_keeps_its_first_address(tmp_path: Path) -> None:
    """A one-column CSV without a header does not lose its first address to the header."""
    path = write(tmp_path, "a@example.com\nb@example.com\n", "unsub.csv")
    assert load_suppression([path]) == frozenset({"a@example.com", "b@example.com"})


def test_missing_suppression_file_is_an_input_file_error(tmp_path: Path) -> None:
    """A suppression list that is not there is reported, never ignored."""
    with pytest.raises(InputFileError, match="suppression list not found"):
        load_suppression([tmp_path / "unsub.txt"])


def test_suppressed_rows_are_skipped(tmp_path: Path) -> None:
    """Rows on a suppression list, in any case, are skipped as SUPPRESSED with their row numbers."""
    unsub = write(tmp_path, "BOB@example.com\n", "unsub.txt")
    path = write(tmp_path, "email\nann@example.com\nbob@Example.com\nbob@example.com\n")
    audience = load(path, suppress=(unsub,))
    assert [r.key for r in audience.recipients] == ["ann@example.com"]
    assert [(s.row, s.reason) for s in audience.skipped] == [
        (2, SkipReason.SUPPRESSED),
        (3, SkipReason.SUPPRESSED),
    ]


def test_skip_invalid_gives_one_skip_per_problem_row(tmp_path: Path) -> None:
    """With --skip-invalid, problem rows become INVALID skips keyed row:N, with all of a row's problems."""
    (tmp_path / "recipients.csv").write_text("email,via\nbad,carol\nok@example.com,alice\nalso-bad,\n")
    (tmp_path / "body.txt").write_text("Hello")
    (tmp_path / "campaign.toml").write_text(
        '[campaign]\nname = "c"\n[recipients]\nsource = "recipients.csv"\nsender_column = "via"\n'
        '[message]\nsubject = "s"\ntext = "body.txt"\n'
        '[[senders]]\nname = "alice"\ngrant_id = "g-a"\nemail = "alice@example.com"\nprovider = "gmail"\n'
    )
    preflight = check_plan(load_manifest(tmp_path / "campaign.toml"), secrets=None, skip_invalid=True)
    skips = preflight.skips
    assert [(s.row, s.key, s.reason) for s in skips] == [
        (1, "row:1", SkipReason.INVALID),
        (3, "row:3", SkipReason.INVALID),
    ]
    assert 'column "email"' in skips[0].detail
    assert 'column "via"' in skips[0].detail
    assert [job.recipient.row for job in preflight.jobs] == [2]
