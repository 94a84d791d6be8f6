"""The list file read a block at a time: the rows the whole file holds, faults named by their line."""

from __future__ import annotations

import csv
import io
import math
import sqlite3

import polars as pl
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from campaign.clock import SystemClock
from campaign.errors import LedgerError, RecipientDataError
from campaign.ledger import open_ledger
from campaign.ledger._schema import MIGRATIONS
from campaign.manifest import RecipientsSettings
from campaign.recipients import _listfile, encode_cells, recipient_from_cells
from campaign.recipients._listfile import ListFile, ListStart

_CELL = st.text(alphabet=st.sampled_from(list('ab ,"\n\r;é€x')), max_size=6)


def _whole(data: bytes) -> list[tuple[object, ...]]:
    """The rows polars reads from the whole file at once (the reference: how lists were read before)."""
    frame = pl.read_csv(io.BytesIO(data.removeprefix(b"\xef\xbb\xbf")), has_header=False, infer_schema=False)
    return [tuple("" if v is None else v for v in row) for row in frame.slice(1).rows()]


@settings(max_examples=150, deadline=None)
@given(
    rows=st.lists(st.lists(_CELL, min_size=3, max_size=3), max_size=25),
    blanks=st.sets(st.integers(min_value=0, max_value=25)),
    block=st.integers(min_value=1, max_value=48),
    size=st.integers(min_value=1, max_value=9),
    terminator=st.sampled_from(["\n", "\r\n"]),
    bom=st.booleans(),
)
# The first block ends between the header's CR and its LF: that CR is no sign of CR-only line ends.
@example(rows=[], blanks=set(), block=19, size=1, terminator="\r\n", bom=True)
def test_blocks_read_the_rows_the_whole_file_holds(
    tmp_path_factory, rows, blanks, block, size, terminator, bom
):
    """Quoted newlines, doubled quotes, CRLF, blank lines and a BOM, cut into blocks as small as one
    byte: the same rows, in the same slices, and the same count."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator=terminator)
    writer.writerow(["email", "name", "city"])
    for number, row in enumerate(rows):
        if number in blanks:
            out.write(terminator)
        writer.writerow(row)
    data = (b"\xef\xbb\xbf" if bom else b"") + out.getvalue().encode("utf-8")
    path = tmp_path_factory.mktemp("blocks") / "list.csv"
    path.write_bytes(data)
    expected = _whole(data)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_listfile, "_BLOCK_BYTES", block)
        table = ListFile(path, ",", "recipient list")
        frames = list(table.frames(size))
        count = table.row_count
    assert table.header == ["email", "name", "city"]
    assert [len(frame) for frame in frames[:-1]] == [size] * (len(frames) - 1)
    assert [row for frame in frames for row in frame.rows()] == expected
    assert count == len(expected)


def _list_with(tmp_path, lines: list[bytes]):
    path = tmp_path / "list.csv"
    path.write_bytes(b"email,name\n" + b"".join(lines))
    return path


def test_bytes_that_are_not_utf8_deep_in_the_file_name_their_line(tmp_path, monkeypatch):
    """A fault in a later block is named by its line in the file, not in the block."""
    monkeypatch.setattr(_listfile, "_BLOCK_BYTES", 64)
    lines = [f'u{n}@example.com,"Name\n{n}"\n'.encode() for n in range(40)]  # two lines a row
    lines[30] = b"u30@example.com,Caf\xe9\n"
    table = ListFile(_list_with(tmp_path, lines), ",", "recipient list")
    with pytest.raises(RecipientDataError, match=r"list\.csv: line 62: not UTF-8 text \(byte 0xe9\)"):
        list(table.frames(5))


def test_a_stray_nul_names_its_row_and_column_not_utf16(tmp_path):
    """One NUL in one cell is a control character to remove, named by row, column and line (it used to be
    taken for UTF-16 and named nothing); UTF-16 without a byte order mark is still named as such."""
    table = ListFile(
        _list_with(tmp_path, [b"ann@example.com,Ann\n", b"bob@example.com,Bo\x00b\n"]), ",", "list"
    )
    with pytest.raises(RecipientDataError) as caught:
        list(table.frames(5))
    assert str(caught.value) == (
        'list.csv: row 2, column "name" (line 3): holds a NUL byte (U+0000), a control character; remove it '
        "and save the file again"
    )
    utf16 = tmp_path / "utf16.csv"
    utf16.write_bytes("email,name\nann@example.com,Ann\n".encode("utf-16-le"))
    with pytest.raises(
        RecipientDataError, match=r"^utf16\.csv: holds NUL bytes, so it is UTF-16 text without a"
    ):
        ListFile(utf16, ",", "list")


def test_a_stray_nul_deep_in_the_file_names_its_row_and_column(tmp_path, monkeypatch):
    """In a later block (past the first 4 KB the UTF-16 test reads), after rows of two lines, in a column
    with no name, and in a plain text list: each named where it is."""
    monkeypatch.setattr(_listfile, "_BLOCK_BYTES", 64)
    lines = [f'u{n}@example.com,"Name\n{n}",\n'.encode() for n in range(40)]  # two lines a row
    lines[30] = b'u30@example.com,"Name\n30",x\x00\n'
    path = tmp_path / "list.csv"
    path.write_bytes(b"email,name,\n" + b"".join(lines))  # a spreadsheet's trailing separator: no name
    table = ListFile(path, ",", "list")
    with pytest.raises(
        RecipientDataError, match=r"^list\.csv: row 31, unnamed column 3 \(line 63\): holds a NUL"
    ):
        list(table.frames(5))
    text = tmp_path / "unsub.txt"
    text.write_bytes(b"ann@example.com\nbob@example.com\x00\n")
    with pytest.raises(RecipientDataError, match=r"^unsub\.txt: line 2: holds a NUL byte \(U\+0000\)"):
        _listfile.read_text(text, "suppression list")


@pytest.mark.parametrize(
    ("at", "line", "said"),
    [
        (b'u25@example.com,Ann "the Lee\n', 27, "a quote inside an unquoted field"),
        (b"u25@example.com,Ann,Lee\n", 27, "3 fields, but the header has 2"),
        (b'u25@example.com,"Ann" Lee\n', 27, "text after a closing quote"),
    ],
)
def test_broken_quoting_in_a_later_block_names_its_line(tmp_path, monkeypatch, at, line, said):
    """Each fault is named by its line in the file, though only the block that holds it is searched."""
    monkeypatch.setattr(_listfile, "_BLOCK_BYTES", 64)
    lines = [f"u{n}@example.com,Name {n}\n".encode() for n in range(40)]
    lines[3] = b'u3@example.com,"Name\n3"\n'  # a line more before the fault than rows
    lines[25] = at
    table = ListFile(_list_with(tmp_path, lines), ",", "recipient list")
    with pytest.raises(RecipientDataError, match=rf"^list\.csv: line {line + 1}: malformed CSV: {said}"):
        list(table.frames(5))


def _big_list(rows: int, odd_row: int, odd: str) -> bytes:
    """A list of `rows` plain rows (about 40 bytes each), row `odd_row`'s product being `odd`."""
    return (
        b"email,name,product\n"
        + "".join(
            f"user{n}@example.com,User {n},{odd if n == odd_row else 'Desk'}\n" for n in range(1, rows + 1)
        ).encode()
    )


@pytest.mark.parametrize(
    ("data", "said"),
    [
        (_big_list(25_000, 5, 'Monitor 27"'), "line 6: malformed CSV: a quote inside an unquoted field"),
        (
            b'"email,name,product\n' + _big_list(25_000, 0, "").partition(b"\n")[2],
            "line 1: malformed CSV: a quote opened on this line is never closed",
        ),
    ],
)
def test_one_stray_quote_in_a_big_list_is_named_without_reading_it_over_and_over(
    tmp_path, monkeypatch, data, said
):
    """A stray quote keeps every later newline inside "quotes": each record end was looked for by
    counting the quotes from the start again at every newline, at each block read: these 1 MB lists in
    16 KB blocks ran for more than 3 minutes before they were stopped (5.8 MB in 4 MB blocks: 887 s).
    Now each byte is counted once (0.1 s)."""
    monkeypatch.setattr(_listfile, "_BLOCK_BYTES", 16 << 10)
    path = tmp_path / "list.csv"
    path.write_bytes(data)
    with pytest.raises(RecipientDataError) as caught:
        list(ListFile(path, ",", "recipient list").frames(5_000))  # the header's fault: at the opening
    assert str(caught.value).startswith(f"list.csv: {said}")


def test_a_quoted_cell_over_many_lines_is_read_whole_in_small_blocks(tmp_path, monkeypatch):
    """A valid list whose one quoted cell spans 40,000 lines (1 MB) reads as three rows, the cell whole
    (it ran for more than 3 minutes before it was stopped; a 10 MB cell in a 20 MB list: 421 s)."""
    monkeypatch.setattr(_listfile, "_BLOCK_BYTES", 16 << 10)
    note = "".join(f"line {n} of the note\n" for n in range(40_000))
    path = tmp_path / "list.csv"
    path.write_bytes(
        f'email,note\nann@example.com,short\nbob@example.com,"{note}"\ncy@example.com,x\n'.encode()
    )
    table = ListFile(path, ",", "recipient list")
    rows = [row for frame in table.frames(5_000) for row in frame.rows()]
    assert rows == [("ann@example.com", "short"), ("bob@example.com", note), ("cy@example.com", "x")]


def test_a_quote_never_closed_stops_the_read_at_the_record_limit(tmp_path, monkeypatch):
    """A record may run to `_MAX_RECORD_BYTES`: a quote opened and never closed is named by its line
    once the record runs past it, with only that much of the file read (it used to hold the rest of the
    file as one record, whatever its size)."""
    monkeypatch.setattr(_listfile, "_BLOCK_BYTES", 16 << 10)
    monkeypatch.setattr(_listfile, "_MAX_RECORD_BYTES", 256 << 10)
    path = tmp_path / "list.csv"
    path.write_bytes(_big_list(25_000, 5, '"Monitor 27'))
    read: list[int] = []
    plain_read = _listfile._read

    def counted(file, size, where, what):
        data = plain_read(file, size, where, what)
        read.append(len(data))
        return data

    monkeypatch.setattr(_listfile, "_read", counted)
    with pytest.raises(RecipientDataError) as caught:
        list(ListFile(path, ",", "recipient list").frames(5_000))
    assert str(caught.value).startswith(
        "list.csv: line 6: malformed CSV: a quote opened on this line is not closed within "
    )
    assert max(read) <= 16 << 10
    assert sum(read) < path.stat().st_size / 2  # the first reading (the header's) stops at the limit too


def test_an_empty_or_blank_file_is_refused(tmp_path):
    for text in (b"", b"\n \n"):
        path = tmp_path / "list.csv"
        path.write_bytes(text)
        with pytest.raises(RecipientDataError, match="is empty"):
            ListFile(path, ",", "recipient list")


@pytest.mark.parametrize(
    "fields",
    [
        {"email": "a@x.org", "name": 'Ann "A" <b>', "note": "line\nbreak\x00\u2028"},
        {"n": 3, "big": 2**70, "f": 0.1, "nan": math.nan, "inf": -math.inf, "ok": True, "none": None},
        {},
    ],
)
@pytest.mark.parametrize("files", [None, "files/Ann.pdf\t1234\t1765000000123456789"])
def test_cells_come_back_as_they_went_in(fields, files):
    """The cells a plan records rebuild the same values, of the same types (Parquet numbers too). A row's
    own files, recorded with them, are not a cell, and the rebuilt cells encode to the very same text:
    an unchanged resume compares a row read back from the ledger with its record."""
    settings = RecipientsSettings(source="list.csv")
    cells = encode_cells(fields, files=files)
    back = recipient_from_cells(settings, row=4, key="k", email="a@x.org", cells=cells).fields
    assert encode_cells(back, files=files) == cells
    assert list(back) == list(fields)
    for name, value in fields.items():
        if isinstance(value, float) and math.isnan(value):
            assert math.isnan(back[name])  # type: ignore[arg-type]
        else:
            assert back[name] == value
            assert type(back[name]) is type(value)


def test_a_row_without_cells_is_a_ledger_error_naming_it():
    settings = RecipientsSettings(source="list.csv")
    with pytest.raises(LedgerError, match=r"row 7 \(ann@x\.org\)"):
        recipient_from_cells(settings, row=7, key="ann@x.org", email="ann@x.org", cells=None)


def test_migration_to_recorded_cells_drops_the_digests_and_the_stamps(tmp_path):
    """A ledger whose rows hold digests (before cells were recorded) forgets them and its plan and rules
    stamps, so that the next run checks the whole list and records every row's cells."""
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT, applied_at TEXT)")
        for version, (name, script) in enumerate(MIGRATIONS[:7], start=1):
            db.executescript(script)
            db.execute("INSERT INTO schema_migrations VALUES (?, ?, 'then')", (version, name))
        db.execute("INSERT INTO meta VALUES ('campaign', 'c'), ('plan_stamp', 'p'), ('rules_stamp', 'r')")
        db.execute(
            "INSERT INTO recipients (key, row, email, sender, state, cells, created_at, updated_at) "
            "VALUES ('a@x', 1, 'a@x', 's', 'pending', '0123456789abcdef0123456789abcdef', 't', 't')"
        )
    ledger = open_ledger(path, clock=SystemClock(), campaign="c")
    try:
        assert (ledger.plan_stamp(), ledger.rules_stamp()) == (None, None)
        assert ledger.key_cells(["a@x"]) == {}
    finally:
        ledger.close()


def test_a_list_read_from_where_it_grew_reads_only_the_rows_after_it(tmp_path, monkeypatch):
    """From a `ListStart` (the bytes and rows of the list as it was), the rows after it, as the whole
    file holds them; a fault there is named by its line in the whole file."""
    monkeypatch.setattr(_listfile, "_BLOCK_BYTES", 64)
    before = b"email,name\n" + b"".join(f'u{n}@example.com,"Name\n{n}"\n'.encode() for n in range(30))
    after = b"".join(f"v{n}@example.com,Late {n}\n".encode() for n in range(12))
    path = tmp_path / "list.csv"
    path.write_bytes(before + after)
    whole = [row for frame in ListFile(path, ",", "recipient list").frames(5) for row in frame.rows()]
    start = ListStart(len(before), 30)
    table = ListFile(path, ",", "recipient list", start)
    assert table.row_count == 12
    assert [row for frame in table.frames(5) for row in frame.rows()] == whole[30:]
    assert table.end == len(before + after)  # where the next reading of the rows appended would start
    path.write_bytes(before + after + b"v99@example.com,Caf\xe9\n")
    with pytest.raises(RecipientDataError, match=r"list\.csv: line 74: not UTF-8 text"):
        list(ListFile(path, ",", "recipient list", start).frames(5))
    path.write_bytes(before + after + b'v99@example.com,Caf"e\n')
    with pytest.raises(RecipientDataError, match=r"list\.csv: line 74: malformed CSV: a quote inside"):
        list(ListFile(path, ",", "recipient list", start).frames(5))
