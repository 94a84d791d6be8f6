"""Attachments in the manifest and in preflight: shared and per-recipient files, containment, sizes."""

from __future__ import annotations

import os
import re
import threading
import tracemalloc
from pathlib import Path

import pytest
from support import check_plan

from campaign.errors import DataError, InputFileError, ManifestError, UnsendableError
from campaign.manifest import Manifest
from campaign.manifest._load import parse_manifest
from campaign.models import Address, AttachmentFile, Message, Recipient, SkipReason
from campaign.nylas import build_send_request
from campaign.render import build_composer, load_message_attachments
from campaign.render._attachments import AttachmentLoader, _filename_problem, guess_content_type

ROWS = {
    "ann@example.com": "A-1",
    "bob@example.com": "B-2",
    "cy@example.com": "C-3",
}


def _campaign(
    folder: Path,
    attachments: str,
    *,
    rows: dict[str, str] | None = None,
    invoices: dict[str, bytes] | None = None,
    message: str = "",
) -> Manifest:
    """A campaign in `folder`: one row per (email, invoice id), an HTML body, the given attachment tables."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["email,invoice_id"] + [f"{email},{invoice}" for email, invoice in (rows or ROWS).items()]
    (folder / "recipients.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "body.html.j2").write_text("<p>Invoice {{ invoice_id }}</p>", encoding="utf-8")
    (folder / "invoices").mkdir(exist_ok=True)
    for invoice, content in (invoices if invoices is not None else _invoices()).items():
        (folder / "invoices" / f"{invoice}.pdf").write_bytes(content)
    toml = f"""
[campaign]
name = "billing"

[recipients]
source = "recipients.csv"

[message]
subject = "Your invoice {{{{ invoice_id }}}}"
html = "body.html.j2"
{message}
{attachments}

[[senders]]
name = "alice"
grant_id = "g1"
"""
    return parse_manifest(toml, path=folder / "campaign.toml")


def _invoices() -> dict[str, bytes]:
    return {invoice: f"%PDF-1.4 invoice {invoice}\n".encode() + os.urandom(64) for invoice in ROWS.values()}


PER_RECIPIENT = """
[[message.attachments]]
path = "invoices/{{ invoice_id }}.pdf"
filename = "Invoice {{ invoice_id }}.pdf"
"""


def _problems(manifest: Manifest) -> tuple[str, ...]:
    return check_plan(manifest, secrets=None, skip_invalid=False).problems


# --- per-recipient files ------------------------------------------------------------------------------


def test_each_recipient_gets_exactly_their_own_file(tmp_path):
    """The path template picks each row's file; the loaded bytes are that file's, named by the filename."""
    invoices = _invoices()
    manifest = _campaign(tmp_path, PER_RECIPIENT, invoices=invoices)
    preflight = check_plan(manifest, secrets=None, skip_invalid=False)
    assert preflight.problems == ()
    for job in preflight.jobs:
        message = preflight.render(job)
        invoice = ROWS[job.recipient.key]
        (attachment,) = message.attachments
        assert attachment.content == invoices[invoice]
        assert (attachment.filename, attachment.content_type) == (f"Invoice {invoice}.pdf", "application/pdf")
        assert message.attachment_files == ()


def test_a_per_recipient_file_is_read_at_send_time(tmp_path):
    """Preflight only finds and sizes the files; the bytes sent are the file as it is when the row is sent."""
    manifest = _campaign(tmp_path, PER_RECIPIENT)
    preflight = check_plan(manifest, secrets=None, skip_invalid=False)
    (tmp_path / "invoices" / "A-1.pdf").write_bytes(b"%PDF corrected")
    ann = next(job for job in preflight.jobs if job.recipient.key == "ann@example.com")
    assert preflight.render(ann).attachments[0].content == b"%PDF corrected"


def test_missing_per_recipient_file_fails_preflight_naming_the_row(tmp_path):
    """A row whose file is not there is a problem naming the list, row, attachment and path."""
    invoices = _invoices()
    del invoices["B-2"]
    problems = _problems(_campaign(tmp_path, PER_RECIPIENT, invoices=invoices))
    assert len(problems) == 1
    assert problems[0].startswith(
        "recipients.csv row 2: message.attachments[1] invoices/B-2.pdf does not exist"
    )
    assert "check the path" in problems[0]


@pytest.mark.parametrize(
    ("invoice_id", "expected"),
    [
        (
            "../../secret",
            r"row 1: message\.attachments\[1\]\.path 'invoices/\.\./\.\./secret\.pdf' uses '\.\.'",
        ),
        ("x/../../B-2", r"row 1: .*uses '\.\.'; attachments must stay inside the attachments folder"),
    ],
)
def test_a_path_climbing_out_with_dotdot_fails_preflight(tmp_path, invoice_id, expected):
    """Any '..' in a rendered path is refused, even one that would land back inside."""
    (tmp_path / "secret.pdf").write_bytes(b"secret")
    rows = {"ann@example.com": invoice_id, "bob@example.com": "B-2"}
    problems = _problems(_campaign(tmp_path / "c", PER_RECIPIENT, rows=rows))
    assert len(problems) == 1
    assert problems[0].startswith("recipients.csv row 1: ")
    assert re.search(expected, problems[0])


def test_an_absolute_path_fails_preflight(tmp_path):
    """A path column holding /etc/passwd is refused before anything is read."""
    attachment = '[[message.attachments]]\npath = "{{ invoice_id }}"'
    problems = _problems(_campaign(tmp_path, attachment, rows={"ann@example.com": "/etc/passwd"}))
    assert problems == (
        "recipients.csv row 1: message.attachments[1].path '/etc/passwd' is an absolute path; "
        "give it relative to the attachments folder",
    )


def test_a_symlink_out_of_the_folder_fails_preflight(tmp_path):
    """A file inside the folder that links to one outside is refused, naming where it leads."""
    outside = tmp_path / "outside.pdf"
    outside.write_bytes(b"not yours")
    manifest = _campaign(tmp_path / "c", PER_RECIPIENT)
    link = tmp_path / "c" / "invoices" / "B-2.pdf"
    link.unlink()
    link.symlink_to(outside)
    problems = _problems(manifest)
    assert len(problems) == 1
    assert problems[0].startswith(
        "recipients.csv row 2: message.attachments[1] invoices/B-2.pdf leads (by a symlink)"
    )
    assert f"to {outside}, outside {tmp_path / 'c'}" in problems[0]


def test_a_symlink_that_stays_inside_is_fine(tmp_path):
    """Links between files of the folder are allowed."""
    manifest = _campaign(tmp_path, PER_RECIPIENT)
    link = tmp_path / "invoices" / "B-2.pdf"
    link.unlink()
    link.symlink_to(tmp_path / "invoices" / "A-1.pdf")
    assert _problems(manifest) == ()


def test_an_empty_path_fails_preflight(tmp_path):
    """A row whose path column is empty renders an empty path: a problem, not a send without the file."""
    attachment = '[[message.attachments]]\npath = "{{ invoice_id }}"'
    rows = {"ann@example.com": "invoices/A-1.pdf", "bob@example.com": ""}
    problems = _problems(_campaign(tmp_path, attachment, rows=rows))
    assert problems == (
        "recipients.csv row 2: message.attachments[1].path renders empty; give every row a file "
        "(check the columns the path uses)",
    )


def test_an_oversize_file_fails_preflight(tmp_path):
    """A row whose file makes the message pass 25 MB is a problem naming the size and the limit."""
    manifest = _campaign(tmp_path, PER_RECIPIENT)
    with (tmp_path / "invoices" / "C-3.pdf").open("r+b") as handle:
        handle.truncate(26_000_000)  # sparse: no 26 MB written
    problems = _problems(manifest)
    assert len(problems) == 1
    assert problems[0].startswith(
        "recipients.csv row 3: the message and its attachments come to 26.0 MB (the largest, "
        "invoices/C-3.pdf, is 26.0 MB); Nylas sends at most 25 MB per message"
    )


def test_a_folder_where_a_file_should_be_fails_preflight(tmp_path):
    """A path naming a folder is not a file."""
    (tmp_path / "invoices" / "D-4.pdf").mkdir(parents=True)
    problems = _problems(_campaign(tmp_path, PER_RECIPIENT, rows={"ann@example.com": "D-4"}))
    assert problems == ("recipients.csv row 1: message.attachments[1] invoices/D-4.pdf is not a file",)


def test_skip_invalid_skips_rows_whose_files_are_missing(tmp_path):
    """--skip-invalid records the row with the missing file as skipped and keeps the others."""
    invoices = _invoices()
    del invoices["A-1"]
    preflight = check_plan(
        _campaign(tmp_path, PER_RECIPIENT, invoices=invoices), secrets=None, skip_invalid=True
    )
    assert preflight.problems == ()
    assert [job.recipient.key for job in preflight.jobs] == ["bob@example.com", "cy@example.com"]
    (skip,) = [skip for skip in preflight.skips if skip.reason == SkipReason.INVALID]
    assert skip.row == 1
    assert "invoices/A-1.pdf does not exist" in skip.detail


# --- shared files -------------------------------------------------------------------------------------


def test_a_missing_shared_file_stops_preflight_once(tmp_path):
    """A file every message carries is the campaign's problem, not each row's: one InputFileError."""
    manifest = _campaign(tmp_path, '[[message.attachments]]\npath = "brochure.pdf"')
    with pytest.raises(InputFileError, match=r"^message\.attachments\[1\]: brochure\.pdf does not exist in "):
        check_plan(manifest, secrets=None, skip_invalid=True)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("../brochure.pdf", r"message\.attachments\[1\]\.path '\.\./brochure\.pdf' uses '\.\.'"),
        ("/etc/hosts", r"message\.attachments\[1\]\.path '/etc/hosts' is an absolute path"),
        ("docs\\\\brochure.pdf", r"contains '\\'; separate folders with '/'"),
    ],
)
def test_a_shared_path_that_leaves_the_folder_is_a_manifest_error(tmp_path, path, expected):
    """A literal path outside the folder is refused when the campaign is loaded, before any row."""
    manifest = _campaign(tmp_path, f'[[message.attachments]]\npath = "{path}"')
    with pytest.raises(ManifestError, match=expected):
        build_composer(manifest, secrets=None)


def test_a_shared_symlink_out_of_the_folder_is_a_manifest_error(tmp_path):
    """A shared file that links outside the folder stops preflight once, naming the key and the target."""
    (tmp_path / "elsewhere.pdf").write_bytes(b"x")
    manifest = _campaign(tmp_path / "c", '[[message.attachments]]\npath = "brochure.pdf"')
    (tmp_path / "c" / "brochure.pdf").symlink_to(tmp_path / "elsewhere.pdf")
    with pytest.raises(
        ManifestError, match=r"^message\.attachments\[1\]: brochure\.pdf leads \(by a symlink\)"
    ):
        check_plan(manifest, secrets=None, skip_invalid=True)


def test_an_oversize_shared_file_is_a_manifest_error(tmp_path):
    """A shared file over 25 MB can never be sent: said once, with a hint."""
    with (tmp_path / "video.mp4").open("wb") as handle:
        handle.truncate(30_000_000)
    manifest = _campaign(tmp_path, '[[message.attachments]]\npath = "video.mp4"')
    with pytest.raises(
        ManifestError, match=r"message\.attachments\[1\]: video\.mp4 is 30\.0 MB; .*send a link"
    ):
        check_plan(manifest, secrets=None, skip_invalid=False)


def test_attachments_dir_is_where_paths_start_and_must_exist(tmp_path):
    """message.attachments_dir moves the root; a missing folder is an InputFileError naming the key."""
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "terms.txt").write_bytes(b"terms")
    manifest = _campaign(
        tmp_path, '[[message.attachments]]\npath = "terms.txt"', message='attachments_dir = "files"'
    )
    preflight = check_plan(manifest, secrets=None, skip_invalid=False)
    assert preflight.render(preflight.jobs[0]).attachments[0].content == b"terms"
    manifest = _campaign(
        tmp_path, '[[message.attachments]]\npath = "terms.txt"', message='attachments_dir = "nope"'
    )
    with pytest.raises(InputFileError, match=r"message\.attachments_dir: the folder .*nope does not exist"):
        build_composer(manifest, secrets=None)


def test_a_shared_file_is_read_and_encoded_once_per_run(tmp_path):
    """Every message shares one bytes object and one base64 copy; per-recipient files are read each time."""
    (tmp_path / "terms.txt").write_bytes(b"the terms")
    attachments = '[[message.attachments]]\npath = "terms.txt"\n' + PER_RECIPIENT
    preflight = check_plan(_campaign(tmp_path, attachments), secrets=None, skip_invalid=False)
    messages = [preflight.render(job) for job in preflight.jobs]
    shared = [message.attachments[0] for message in messages]
    assert all(item.content is shared[0].content for item in shared)
    assert all(item.encoded is shared[0].encoded for item in shared)
    assert shared[0].encoded == b"dGhlIHRlcm1z"
    assert all(message.attachments[1].encoded is None for message in messages)


def test_memory_stays_bounded_with_a_20_mb_shared_attachment(tmp_path):
    """Two hundred multipart requests with a 20 MB shared file hold one copy of it, not two hundred."""
    with (tmp_path / "brochure.pdf").open("wb") as handle:
        handle.truncate(20_000_000)
    manifest = _campaign(tmp_path, '[[message.attachments]]\npath = "brochure.pdf"')
    composer = build_composer(manifest, secrets=None)
    loader = composer.attachment_loader
    sender = manifest.senders[0]
    tracemalloc.start()
    try:
        requests = []
        for number in range(200):
            recipient = Recipient(
                f"r{number}@example.com",
                number + 1,
                Address(f"r{number}@example.com"),
                {
                    "email": f"r{number}@example.com",
                    "invoice_id": str(number),
                },
            )
            request = build_send_request(load_message_attachments(composer.render(recipient, sender), loader))
            assert request.multipart
            requests.append(request)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 24_000_000  # one 20 MB copy plus small change
    assert sum(request.size for request in requests) > 200 * 20_000_000


# --- manifest keys ------------------------------------------------------------------------------------


def test_attachment_keys_parse_with_content_ids_and_types(tmp_path):
    """inline derives the content id from the file name; content_type is kept; filename may be a template."""
    attachments = """
[[message.attachments]]
path = "logo.png"
inline = true

[[message.attachments]]
path = "data/report.bin"
content_type = "application/vnd.ms-excel"
content_id = "report"
"""
    manifest = _campaign(tmp_path, attachments, message='attachments_dir = "."')
    logo, report = manifest.message.attachments
    assert (logo.cid, logo.content_type) == ("logo", None)
    assert (report.cid, report.content_type, report.inline) == ("report", "application/vnd.ms-excel", None)
    assert manifest.message.attachments_dir == tmp_path


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        (
            'path = "a.png"\ninline = false\ncontent_id = "a"',
            r"attachments\[1\]: .*a content_id makes the file inline",
        ),
        (
            'path = "{{ x }}.png"\ninline = true',
            r"give a content_id for an inline file whose path is a template",
        ),
        ('path = "a.png"\ncontent_id = "has space"', r"content_id: 'has space' must be letters, digits"),
        ('path = "a.png"\ncontent_id = "file0"', r"would clash with Nylas's multipart part names"),
        (
            'path = "message.png"\ninline = true',
            r"the file name gives the content id 'message'.*; set content_id",
        ),
        ('path = "a.pdf"\ncontent_type = "pdf"', r"content_type: 'pdf' is not a MIME type"),
        ('path = ""', r"attachments\[1\]\.path: must not be empty"),
        ('pth = "a.pdf"', r"attachments\[1\]\.pth: unknown key \(did you mean 'path'\?\)"),
    ],
)
def test_bad_attachment_tables_are_manifest_errors_naming_the_key(tmp_path, table, expected):
    """Each mistake in a [[message.attachments]] table is one line naming message.attachments[N]."""
    with pytest.raises(ManifestError, match=r"campaign\.toml: message\.") as caught:
        _campaign(tmp_path, f"[[message.attachments]]\n{table}")
    assert re.search(expected, str(caught.value)), str(caught.value)


def test_two_inline_files_cannot_share_a_content_id(tmp_path):
    """Two attachments with the same content id would show the same image twice: refused."""
    tables = '[[message.attachments]]\npath = "a/logo.png"\ninline = true\n'
    tables += '[[message.attachments]]\npath = "b/logo.gif"\ninline = true\n'
    with pytest.raises(
        ManifestError, match=r"attachments\[2\] and attachments\[1\] both have content id 'logo'"
    ):
        _campaign(tmp_path, tables)


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (("brochure.pdf",), "application/pdf"),
        (("photo.JPG",), "image/jpeg"),
        (("logs.tar.gz",), "application/gzip"),
        (("Invoice", "invoices/a.pdf"), "application/pdf"),
        (("mystery.zzz",), "application/octet-stream"),
    ],
)
def test_content_type_is_guessed_from_the_name(names, expected):
    """The standard table decides (not this machine's mime.types), then the path, then octet-stream."""
    assert guess_content_type(*names) == expected


def test_a_filename_that_cannot_be_sent_is_a_row_problem(tmp_path):
    """A rendered file name with a '/' (from a column) or a double quote is refused."""
    attachment = '[[message.attachments]]\npath = "invoices/A-1.pdf"\nfilename = "{{ invoice_id }}.pdf"'
    problems = _problems(_campaign(tmp_path, attachment, rows={"ann@example.com": "x/y"}))
    assert problems == (
        "recipients.csv row 1: message.attachments[1].filename 'x/y.pdf' contains a '/' or '\\'; "
        "give a plain file name",
    )
    attachment = """[[message.attachments]]\npath = "invoices/A-1.pdf"\nfilename = 'The "best".pdf'"""
    problems = _problems(_campaign(tmp_path, attachment, rows={"ann@example.com": "A-1"}))
    assert problems == (
        "recipients.csv row 1: message.attachments[1].filename 'The \"best\".pdf' contains a double quote; "
        "give a name without one",
    )


@pytest.mark.parametrize(
    ("cell", "said"),
    [
        ("a\u202etxt.exe", "'a\\u202etxt.exe.pdf' contains U+202E, which does not show as itself"),
        ("a\u200bb", "'a\\u200bb.pdf' contains U+200B, which does not show as itself"),
    ],
)
def test_a_filename_hiding_characters_is_a_row_problem(tmp_path, cell, said):
    """A name from the list must read as what it is: no C1 control, line separator or invisible format
    character (U+202E turns "a<U+202E>txt.exe.pdf" around on screen)."""
    attachment = '[[message.attachments]]\npath = "invoices/A-1.pdf"\nfilename = "{{ invoice_id }}.pdf"'
    problems = _problems(_campaign(tmp_path, attachment, rows={"ann@example.com": cell}))
    assert len(problems) == 1
    assert problems[0].startswith(f"recipients.csv row 1: message.attachments[1].filename {said}")


@pytest.mark.parametrize("name", ["a\x85b.txt", "a\x9b31m.txt", "a\u2028b.txt"])
def test_a_filename_with_a_c1_control_or_line_separator_is_refused(name):
    """What header values refuse (the subject's check finds them first when it uses the same column)."""
    assert "which does not show as itself" in (_filename_problem(name) or "")


@pytest.mark.parametrize("name", [".", "..", " . "])
def test_a_filename_of_dots_is_a_row_problem(tmp_path, name):
    attachment = '[[message.attachments]]\npath = "invoices/A-1.pdf"\nfilename = "{{ invoice_id }}"'
    problems = _problems(_campaign(tmp_path, attachment, rows={"ann@example.com": name}))
    assert len(problems) == 1
    assert "is not a file name; give a name such as invoice.pdf" in problems[0]


def test_loader_refuses_a_message_file_outside_its_root(tmp_path):
    """The loader itself re-checks containment at send time (a file swapped for a symlink after preflight)."""
    (tmp_path / "root").mkdir()
    (tmp_path / "secret").write_bytes(b"secret")
    (tmp_path / "root" / "a.pdf").symlink_to(tmp_path / "secret")
    loader = AttachmentLoader(tmp_path / "root")
    file = AttachmentFile("a.pdf", "a.pdf", "application/pdf", key="message.attachments[1]")
    with pytest.raises(DataError, match=r"^row 4: message\.attachments\[1\] a\.pdf leads \(by a symlink\)"):
        loader.load(file, row=4)


@pytest.mark.parametrize("becomes", ["a pipe", "a folder", "too big"])
def test_loader_refuses_a_file_that_changed_since_the_check(tmp_path, becomes):
    """At send time the file may no longer be what the check found: a pipe (reading it would block the run
    for good), a folder, a file grown past 25 MB. That row's error, found without reading the file."""
    (tmp_path / "root").mkdir()
    path = tmp_path / "root" / "a.pdf"
    if becomes == "a pipe":
        os.mkfifo(path)
    elif becomes == "a folder":
        path.mkdir()
    else:
        with path.open("wb") as handle:
            handle.truncate(26_000_000)  # sparse: no 26 MB written
    loader = AttachmentLoader(tmp_path / "root")
    file = AttachmentFile("a.pdf", "a.pdf", "application/pdf", key="message.attachments[1]")
    outcome: list[BaseException] = []

    message = Message(
        "a@example.com", 4, "s", (Address("a@example.com"),), "Hi", html="<p>x</p>", attachment_files=(file,)
    )

    def load() -> None:
        try:
            load_message_attachments(message, loader)
        except BaseException as exc:
            outcome.append(exc)

    reader = threading.Thread(target=load, daemon=True)  # a blocked read must fail the test, not hang it
    reader.start()
    reader.join(timeout=10)
    assert not reader.is_alive(), "the loader blocked reading the file"
    (error,) = outcome
    assert isinstance(error, UnsendableError)  # the send loop fails this row and goes on
    assert str(error).startswith("row 4: message.attachments[1] a.pdf ")


def test_a_message_with_unread_files_cannot_be_encoded():
    """Encoding a message whose files were never read is a programming error, not a send without them."""
    message = Message(
        "a@example.com", 1, "s", (Address("a@example.com"),), "Hi", html="<p>x</p>",
        attachment_files=(AttachmentFile("a.pdf", "a.pdf", "application/pdf"),),
    )  # fmt: skip
    with pytest.raises(ValueError, match="read the attachment files first"):
        build_send_request(message)
