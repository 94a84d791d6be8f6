"""Attachments: which file each message carries, whether it may be sent, and reading it once.

`build_attachment_file` checks a rendered path and names the file (pure). An
`AttachmentLoader` finds, sizes and reads files inside the campaign's attachments
folder, refusing anything that leaves it (`..`, an absolute path, a symlink out); a
file shared by every message is read and base64-encoded once per run. Preflight calls
`check_message_attachments` for every row (find and size each file, check the encoded
request against Nylas's limits); dispatch calls `load_message_attachments` right
before a send; the `check_*_inline_images` functions are preview warnings. Nothing
here renders templates or sends.
"""

from __future__ import annotations

import base64
import mimetypes
import os
import re
import stat
import unicodedata
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from campaign.errors import DataError, InputFileError, ManifestError, UnsendableError
from campaign.manifest import AttachmentSettings
from campaign.models import Attachment, AttachmentFile, Message
from campaign.nylas import JSON_LIMIT_BYTES, MULTIPART_LIMIT_BYTES, measure_send_request
from campaign.render._markup import find_cid_references

__all__ = [
    "AttachmentLoader",
    "build_attachment_file",
    "check_message_attachments",
    "check_missing_inline_images",
    "check_shared_path",
    "check_unused_inline_images",
    "describe_shared_files",
    "find_inline_problems",
    "guess_content_type",
    "load_message_attachments",
]

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Unicode categories a file name must not hold: controls, invisible format characters, line and
# paragraph separators (spaces, Zs, are fine).
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})
_DRIVE = re.compile(r"[A-Za-z]:")
_MAX_FILENAME = 255
# A file whose base64 alone passes the JSON limit always goes multipart: no point encoding it.
_MAX_JSON_RAW = JSON_LIMIT_BYTES // 4 * 3
# Only the standard table, not the machine's mime.types: the same file gets the same type everywhere.
_MIME = mimetypes.MimeTypes()
_COMPRESSED = {"gzip": "application/gzip", "bzip2": "application/x-bzip2", "xz": "application/x-xz"}
_OCTET_STREAM = "application/octet-stream"


def guess_content_type(*names: str) -> str:
    """The MIME type of the first of `names` whose extension is known; application/octet-stream if none."""
    for name in names:
        content_type, encoding = _MIME.guess_type(name, strict=False)
        if encoding is not None:
            return _COMPRESSED.get(encoding, _OCTET_STREAM)
        if content_type is not None:
            return content_type
    return _OCTET_STREAM


def build_attachment_file(
    *,
    key: str,
    path: str,
    filename: str | None,
    content_type: str | None,
    content_id: str | None,
    shared: bool,
    row: int,
) -> AttachmentFile:
    """Check a rendered attachment `path` (relative, no `..`) and `filename`; DataError naming the row."""
    problem = _path_problem(path)
    if problem is not None:
        raise DataError(f"{key}.path {problem}", row=row, field=f"{key}.path")
    clean = _normalise_path(path)
    name = clean.rsplit("/", 1)[-1] if filename is None else filename.strip()
    if (problem := _filename_problem(name)) is not None:
        raise DataError(f"{key}.filename {problem}", row=row, field=f"{key}.filename")
    return AttachmentFile(
        path=clean,
        filename=name,
        # The file's own path first: the name shown may come from the list, and list data must not
        # decide how a file is sent (a PDF shown as `x.html` is still a PDF). The manifest's type wins.
        content_type=content_type or guess_content_type(clean, name),
        content_id=content_id,
        key=key,
        shared=shared,
    )


def describe_shared_files(attachments: Sequence[AttachmentSettings], root: Path) -> list[str]:
    """Each file every message attaches (a literal path in `attachments`, under `root`) as
    `AttachmentLoader.describe` gives it, or its path alone when it cannot be read (the check says why):
    what tells a later run whether those files changed. Reads the files' metadata."""
    found = []
    for attachment in attachments:
        if attachment.per_recipient:
            continue
        path = _normalise_path(attachment.path)
        try:
            info = (root / path).stat()
        except OSError:
            found.append(path)
            continue
        found.append(_described(path, info))
    return found


def _described(path: str, info: os.stat_result) -> str:
    return f"{path}\t{info.st_size}\t{info.st_mtime_ns}"


def check_shared_path(key: str, path: str) -> None:
    """ManifestError if a literal (shared) attachment path could never be sent."""
    problem = _path_problem(path)
    if problem is not None:
        raise ManifestError(f"{key}.path {problem}")


def _path_problem(path: str) -> str | None:
    """Why a rendered attachment path cannot be used, or None."""
    path = path.strip()
    if not path:
        return "renders empty; give every row a file (check the columns the path uses)"
    if _CONTROL.search(path):
        return f"{path!r} contains a control character or line break"
    if "\\" in path:
        return f"{path!r} contains '\\'; separate folders with '/'"
    if path.startswith("/") or _DRIVE.match(path):
        return f"{path!r} is an absolute path; give it relative to the attachments folder"
    if ".." in PurePosixPath(path).parts:
        return f"{path!r} uses '..'; attachments must stay inside the attachments folder"
    return None


def _normalise_path(path: str) -> str:
    """A checked relative path without empty or '.' parts: ' ./invoices//a.pdf ' -> 'invoices/a.pdf'."""
    return "/".join(part for part in path.strip().split("/") if part not in ("", "."))


def _filename_problem(name: str) -> str | None:
    if not name:
        return "renders empty; give every attachment a name"
    if _CONTROL.search(name):
        return f"{name!r} contains a control character or line break"
    # A C1 control, a line separator, or an invisible format character such as U+202E, which shows
    # "invoice<U+202E>fdp.exe" as "invoiceexe.pdf": a name must read as what it is.
    hidden = [] if name.isprintable() else [c for c in name if unicodedata.category(c) in _HIDDEN_CATEGORIES]
    if hidden:
        return f"{name!r} contains U+{ord(hidden[0]):04X}, which does not show as itself; give a plain name"
    if name.strip(". ") == "":
        return f"{name!r} is not a file name; give a name such as invoice.pdf"
    if "/" in name or "\\" in name:
        return f"{name!r} contains a '/' or '\\'; give a plain file name"
    if '"' in name:  # a multipart send would show it as %22
        return f"{name!r} contains a double quote; give a name without one"
    if len(name) > _MAX_FILENAME:
        return f"is {len(name)} characters; keep file names under {_MAX_FILENAME}"
    return None


class AttachmentLoader:
    """Finds, sizes and reads attachment files inside one folder; shared files are read once per run."""

    def __init__(self, root: Path, *, label: str = "message.attachments_dir") -> None:
        try:
            self._root = root.resolve(strict=True)
        except (OSError, RuntimeError) as exc:
            raise InputFileError(f"{label}: the folder {root} does not exist; check the path") from exc
        if not self._root.is_dir():
            raise InputFileError(f"{label}: {root} is not a folder; give the folder the files are in")
        self._sizes: dict[Path, int] = {}  # shared files, by resolved path
        self._contents: dict[Path, tuple[bytes, bytes | None]] = {}  # shared files: bytes and base64

    @property
    def root(self) -> Path:
        """The folder every attachment must be inside (symlinks resolved)."""
        return self._root

    def find(self, file: AttachmentFile, *, row: int) -> int:
        """The size in bytes of `file`, after checking it is a readable regular file inside the folder."""
        resolved = self._resolve(file, row)
        if file.shared and resolved in self._sizes:
            return self._sizes[resolved]
        try:
            info = resolved.stat()
        except OSError as exc:
            raise self._error(file, row, f"cannot be read ({exc.strerror or exc})") from exc
        if not stat.S_ISREG(info.st_mode):
            raise self._error(file, row, "is not a file")
        if not os.access(resolved, os.R_OK):
            raise self._error(file, row, "cannot be read (permission denied)")
        if file.shared:
            if info.st_size > MULTIPART_LIMIT_BYTES:
                raise ManifestError(
                    f"{file.key}: {file.path} is {info.st_size / 1_000_000:.1f} MB; Nylas sends at most "
                    f"{MULTIPART_LIMIT_BYTES // 1_000_000} MB per message: send a link instead"
                )
            self._sizes[resolved] = info.st_size
        return info.st_size

    def describe(self, files: Sequence[AttachmentFile], *, row: int) -> str:
        """Each of `files` as its path, size and modification time (ns), one line each: what tells a later
        run whether a row's own files changed since its check. DataError if one cannot be found."""
        lines = []
        for file in files:
            resolved = self._resolve(file, row)
            try:
                info = resolved.stat()
            except OSError as exc:
                raise self._error(file, row, f"cannot be read ({exc.strerror or exc})") from exc
            lines.append(_described(file.path, info))
        return "\n".join(lines)

    def load(self, file: AttachmentFile, *, row: int) -> Attachment:
        """Read `file` (a shared one only the first time) as an Attachment; DataError if it is no longer a
        readable file within Nylas's limit (replaced, grown or gone since the check)."""
        resolved = self._resolve(file, row)
        cached = self._contents.get(resolved) if file.shared else None
        if cached is None:
            # What the check found may have changed: a pipe would block the run for good, a huge file
            # fill memory. (The message's total is measured again when it is encoded.)
            size = self.find(file, row=row)
            if size > MULTIPART_LIMIT_BYTES:
                limit = MULTIPART_LIMIT_BYTES // 1_000_000
                raise self._error(file, row, f"is {size / 1_000_000:.1f} MB, over Nylas's {limit} MB")
            try:
                content = resolved.read_bytes()
            except OSError as exc:
                raise self._error(file, row, f"cannot be read ({exc.strerror or exc})") from exc
            encoded = base64.b64encode(content) if file.shared and len(content) <= _MAX_JSON_RAW else None
            cached = (content, encoded)
            if file.shared:
                self._contents[resolved] = cached
        content, encoded = cached
        return Attachment(file.filename, file.content_type, content, file.content_id, encoded)

    def _resolve(self, file: AttachmentFile, row: int) -> Path:
        candidate = self._root / file.path
        try:
            resolved = candidate.resolve(strict=True)
        except FileNotFoundError as exc:
            raise self._error(file, row, f"does not exist in {self._root}; check the path") from exc
        except (OSError, RuntimeError) as exc:  # a symlink loop, a file where a folder should be
            raise self._error(file, row, f"cannot be opened ({exc})") from exc
        if not resolved.is_relative_to(self._root):
            problem = (
                f"leads (by a symlink) to {resolved}, outside {self._root}; attachments must stay inside"
            )
            if file.shared:  # the manifest names a file outside the folder
                raise ManifestError(f"{file.key}: {file.path} {problem}")
            raise self._error(file, row, problem)
        return resolved

    def _error(self, file: AttachmentFile, row: int, problem: str) -> DataError | InputFileError:
        # A shared file's problem is the whole campaign's, not one row's: it stops preflight at once.
        if file.shared:
            return InputFileError(f"{file.key}: {file.path} {problem}")
        return DataError(f"{file.key} {file.path} {problem}", row=row, field=file.key)


# JSON writes a character in at most 6 bytes (\u001f); a message whose texts, at that, and the rest of
# its request stay under Nylas's limit cannot pass it, and is not measured (every row is checked).
_WORST_BYTES_PER_CHAR = 6
_REQUEST_ROOM = 64 * 1024


def _surely_fits(message: Message) -> bool:
    if message.attachments:
        return False
    chars = len(message.subject) + len(message.html or "") + len(message.text or "")
    chars += sum(len(name) + len(value) for name, value in message.headers)
    chars += sum(len(name) + len(value) for name, value in message.metadata)
    return chars * _WORST_BYTES_PER_CHAR + _REQUEST_ROOM <= MULTIPART_LIMIT_BYTES


def check_message_attachments(message: Message, loader: AttachmentLoader | None) -> None:
    """Find and size every file of `message` and check the request fits Nylas's 25 MB limit: a message
    without files too (a huge list cell), measured only when its text could come near it.

    DataError naming the row (InputFileError or ManifestError for a file every message shares).
    """
    if not message.attachment_files:
        if _surely_fits(message):
            return
        size = measure_send_request(message)
        if not size.fits:
            raise DataError(
                f"the message comes to {size.multipart_bytes / 1_000_000:.1f} MB; Nylas sends at most "
                f"{MULTIPART_LIMIT_BYTES // 1_000_000} MB per message: check the list's cells for a "
                "huge value",
                row=message.row,
            )
        return
    if loader is None:
        raise ValueError("a message with attachment files needs an AttachmentLoader")
    sizes = [loader.find(file, row=message.row) for file in message.attachment_files]
    size = measure_send_request(message, file_sizes=sizes)
    if not size.fits:
        total = size.multipart_bytes / 1_000_000
        largest_size, largest = max(zip(sizes, (file.path for file in message.attachment_files), strict=True))
        raise DataError(
            f"the message and its attachments come to {total:.1f} MB (the largest, "
            f"{largest}, is {largest_size / 1_000_000:.1f} MB); Nylas sends at most "
            f"{MULTIPART_LIMIT_BYTES // 1_000_000} MB per message: send smaller files or a link",
            row=message.row,
            field="message.attachments",
        )


def load_message_attachments(message: Message, loader: AttachmentLoader | None) -> Message:
    """`message` with its attachment files read into `attachments` (shared ones from the run's cache)."""
    if not message.attachment_files:
        return message
    if loader is None:
        raise ValueError("a message with attachment files needs an AttachmentLoader")
    try:
        loaded = tuple(loader.load(file, row=message.row) for file in message.attachment_files)
    except UnsendableError:
        raise
    except DataError as exc:  # a row's own file, changed since its check (a shared one is InputFileError)
        raise UnsendableError(exc.detail, row=exc.row, field=exc.field) from exc
    return message._replace(attachments=message.attachments + loaded, attachment_files=())


def find_inline_problems(message: Message) -> tuple[list[str], list[tuple[str, str]]]:
    """The `cid:` ids the HTML shows that no attachment has, and the inline files (content id, file
    name) the HTML never shows."""
    inline: dict[str, str] = {}
    items: list[AttachmentFile | Attachment] = [*message.attachment_files, *message.attachments]
    for item in items:
        if item.content_id is not None:
            inline.setdefault(item.content_id, item.filename)
    referenced = find_cid_references(message.html or "")
    missing = [cid for cid in referenced if cid not in inline]
    unused = [(cid, filename) for cid, filename in inline.items() if cid not in referenced]
    return missing, unused


def check_missing_inline_images(message: Message) -> tuple[str, str] | None:
    """Preview warning: the HTML shows `cid:x` but no attachment has content_id x (the image is missing)."""
    if not find_cid_references(message.html or ""):
        return None  # most messages: nothing to compare with the attachments
    missing, _ = find_inline_problems(message)
    if not missing:
        return None
    label = "the HTML shows cid: images that no attachment provides (add them with a content_id)"
    return label, "missing " + ", ".join(f"cid:{cid}" for cid in missing)


def check_unused_inline_images(message: Message) -> tuple[str, str] | None:
    """Preview warning: an inline attachment the HTML never shows (it may appear nowhere)."""
    if not message.attachment_files and not message.attachments:
        return None  # most messages: nothing to look for
    inline = [item.content_id for item in message.attachment_files] + [
        a.content_id for a in message.attachments
    ]
    if not any(inline):
        return None  # no inline attachment: none unused (the HTML is not read)
    _, unused = find_inline_problems(message)
    if not unused:
        return None
    label = 'inline attachments the HTML never shows (add <img src="cid:…"> or make them plain attachments)'
    return label, ", ".join(f"{filename} (cid:{cid})" for cid, filename in unused)
