"""The `CampaignError` family: every error a user can cause or meet, with its exit code.

Foreign exceptions (pydantic, polars, jinja2, httpx, sqlite3) are translated into
these once, where they arise; only the `campaign.cli` package turns them into exit codes.

    CampaignError                  1
    ├── UsageError                 2   command-line misuse (e.g. no terminal and no --yes)
    ├── DataError                  65  a recipient row or a template does not render / validate
    │   ├── RecipientDataError
    │   ├── TemplateError
    │   ├── HeaderError                CR/LF or a bad name in a header
    │   └── UnsendableError            a checked row's files changed by send time: that row fails
    ├── InputFileError             66  an input file is missing or unreadable
    │   └── MissingFileError           a list file that does not exist, and where its path was given
    ├── ApiError                   69  the API failed in a way no retry fixes
    │   ├── ApiUnavailableError    75  no connection to the API, or it asked us to wait (429, 5xx)
    │   └── ApiAuthError           77  the API refused the credentials
    ├── LedgerError                74  the ledger cannot be read or written; its state is untouched
    └── ManifestError              78  the manifest (or the environment it names) is invalid
"""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar

__all__ = [
    "ApiAuthError",
    "ApiError",
    "ApiNotFoundError",
    "ApiUnavailableError",
    "CampaignError",
    "DataError",
    "HeaderError",
    "InputFileError",
    "LedgerError",
    "ManifestError",
    "MissingFileError",
    "RecipientDataError",
    "TemplateError",
    "UnsendableError",
    "UsageError",
]


class CampaignError(Exception):
    """Root of every error `campaign` raises on purpose; the message is one line for the user."""

    exit_code: ClassVar[int] = 1


class UsageError(CampaignError):
    """The command was used in a way that cannot work."""

    exit_code: ClassVar[int] = 2


class DataError(CampaignError):
    """Recipient data or a template is wrong; nothing was sent.

    Besides its one line (`row 12: …` when it is about a row) it carries where to look, as
    fields: the list `row`, the list `column`, the template `variable`, or the manifest key or
    template file (`field`, e.g. `message.subject`). `detail` is the line without the row.
    """

    exit_code: ClassVar[int] = 65

    def __init__(
        self,
        detail: str,
        *,
        row: int | None = None,
        column: str | None = None,
        variable: str | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(detail if row is None else f"row {row}: {detail}")
        self.detail = detail
        self.row = row
        self.column = column
        self.variable = variable
        self.field = field

    def __reduce__(self) -> tuple[object, ...]:
        # Rebuilt with its fields when it crosses processes (the parallel check's workers send it back):
        # an exception pickles as its class and args, which would drop the keyword-only fields.
        return (
            _rebuild_data_error,
            (type(self), self.detail, self.row, self.column, self.variable, self.field),
        )

    @property
    def where(self) -> str:
        """What to look at first, as a preview labels it: a variable, a column, a key, or `message`."""
        if self.variable is not None:
            return f'variable "{self.variable}"'
        if self.column is not None:
            return f'column "{self.column}"'
        return self.field or "message"


def _rebuild_data_error(
    kind: type[DataError],
    detail: str,
    row: int | None,
    column: str | None,
    variable: str | None,
    field: str | None,
) -> DataError:
    return kind(detail, row=row, column=column, variable=variable, field=field)


class RecipientDataError(DataError):
    """A recipient row (or the list's header) does not validate."""


class TemplateError(DataError):
    """A template does not compile or does not render for a row."""


class HeaderError(DataError):
    """A header name or value would be unsafe on the wire (CR, LF, controls, bad name)."""


class UnsendableError(DataError):
    """A checked row's message can no longer be built as it was checked: an attachment file of its own was
    replaced, grown or removed since (or the request passes Nylas's limit). Met at send time, it fails
    that row, and the run goes on."""


class InputFileError(CampaignError):
    """An input file is missing or unreadable."""

    exit_code: ClassVar[int] = 66


class MissingFileError(InputFileError):
    """A list file does not exist. It carries the `path` (as an error may show it), `what` the file is
    (`suppression list`) and `given`, where its path was written (`in the manifest`, or `given`: on the
    command line), which the line tells the user to check."""

    def __init__(self, path: str, what: str, *, given: str = "in the manifest") -> None:
        super().__init__(f"{path}: {what} not found; check the path {given}")
        self.path = path
        self.what = what
        self.given = given

    def __reduce__(self) -> tuple[object, ...]:
        # As DataError's: a keyword-only field would be lost when it crosses processes.
        return (_rebuild_missing_file_error, (self.path, self.what, self.given))


def _rebuild_missing_file_error(path: str, what: str, given: str) -> MissingFileError:
    return MissingFileError(path, what, given=given)


class ApiError(CampaignError):
    """The Nylas API failed in a way that stops the run."""

    exit_code: ClassVar[int] = 69


class ApiUnavailableError(ApiError):
    """The API could not be reached, or answered that it cannot serve now (429, 5xx): a later try may
    succeed. The exit code is the "try again later" one, as a run's that stops early."""

    exit_code: ClassVar[int] = 75

    def __init__(self, message: str, *, retry_at: datetime | None = None) -> None:
        super().__init__(message)
        self.retry_at = retry_at  # when the API said a try may succeed (Retry-After), if it said


class ApiNotFoundError(ApiError):
    """A read answered 404 `not_found_error`: the API names no such grant or object (it says which in no
    way a client may rely on)."""


class ApiAuthError(ApiError):
    """The API refused the credentials (401/403), or knows no such grant (404 to a send)."""

    exit_code: ClassVar[int] = 77


class LedgerError(CampaignError):
    """The ledger cannot be opened, migrated or written, or a state change is illegal."""

    exit_code: ClassVar[int] = 74


class ManifestError(CampaignError):
    """The manifest is invalid: a key is missing, mistyped or out of range."""

    exit_code: ClassVar[int] = 78
