"""The recipient list: list files (CSV, Parquet), the audience scan row by row, addresses, suppression files.

`scan_audience` yields each row checked (valid address, not a duplicate, not suppressed: by address,
or by the key of an export's entry that holds no address) or as a skip or a problem naming the file,
row and column; `load_audience` is it over the whole list. `comparable_address` is the one form in
which addresses are compared.
`_store_files` moves unsubscribe-store entries in and out of files; `SuppressionFiles` keeps a running
campaign's suppression files current for the check before each send. Reads files with polars;
never sends, never writes the ledger.
"""

from __future__ import annotations

from campaign.recipients._audience import (
    BATCH_ROWS,
    Audience,
    AudienceScan,
    CheckedRow,
    SuppressionList,
    comparable_address,
    describe_key_only_entries,
    describe_skipped_row,
    load_audience,
    locate_suppression_entry,
    matching_form,
    parse_suppression_entry,
    same_address_detail,
    scan_audience,
)
from campaign.recipients._cells import encode_cells, recipient_from_cells
from campaign.recipients._listfile import ListStart
from campaign.recipients._store_files import load_import_addresses, write_entries
from campaign.recipients._suppression import SuppressionFiles

__all__ = [
    "BATCH_ROWS",
    "Audience",
    "AudienceScan",
    "CheckedRow",
    "ListStart",
    "SuppressionFiles",
    "SuppressionList",
    "comparable_address",
    "describe_key_only_entries",
    "describe_skipped_row",
    "encode_cells",
    "load_audience",
    "load_import_addresses",
    "locate_suppression_entry",
    "matching_form",
    "parse_suppression_entry",
    "recipient_from_cells",
    "same_address_detail",
    "scan_audience",
    "write_entries",
]
