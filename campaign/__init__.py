"""campaign: personalised bulk email through people's own mailboxes via the Nylas v3 Send API."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("campaign")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
