"""Paths as the stamps and the content fingerprint count them: relative to the campaign's folder.

A campaign's files need not stay where it began: its folder is moved or renamed, or copied to each
machine that joins a campaign shared in PostgreSQL. The ledger compares what it recorded with what
a run finds, so nothing it compares may depend on where the folder is: a path counts as its way
from the manifest's folder (POSIX, `..` for a file beside the folder), as the manifest would write
it. The manifest resolves its paths against its folder when it is read (`manifest.ManifestPath`);
this undoes that for counting, and nothing else. Pure.

The manifest does not keep how a path was written, so a path outside the folder counts relative
too: a tree moved whole (a campaign and the `../shared` templates it names) counts the same; a
campaign folder moved away from a file it names by an absolute path (a store in /var/lib, say)
counts that path anew.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePath

__all__ = ["portable_path", "portable_settings"]


def portable_path(path: PurePath, base_dir: Path) -> str:
    """`path` relative to the campaign's folder `base_dir`, with '/' between its parts ("." for the
    folder itself); absolute only where no relative way exists (another drive, on Windows)."""
    try:
        relative = os.path.relpath(path, base_dir)
    except ValueError:
        return path.as_posix()
    return PurePath(relative).as_posix()


def portable_settings(settings: object, base_dir: Path) -> object:
    """A manifest table as `model_dump()` gives it (python mode, so that a path is a `Path`, not a string
    that only looks like one), with every path made `portable_path`; for `json.dumps(..., default=str)`."""
    if isinstance(settings, PurePath):
        return portable_path(settings, base_dir)
    if isinstance(settings, dict):
        return {key: portable_settings(value, base_dir) for key, value in settings.items()}
    if isinstance(settings, list | tuple):
        return [portable_settings(value, base_dir) for value in settings]
    return settings
