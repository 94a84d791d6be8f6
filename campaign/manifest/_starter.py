"""The starter campaign that `campaign init DIR` writes: a manifest, a list and a template.

Never overwrites: if any of the files exists, nothing is written.
"""

from __future__ import annotations

from pathlib import Path

from campaign.errors import CampaignError, InputFileError

__all__ = ["write_starter"]

_MANIFEST = """\
# A campaign: who gets what, from which mailbox, at what pace.
# Check it with `campaign preview campaign.toml`, try it with `campaign run campaign.toml --sandbox`.

[campaign]
name = "my-first-campaign"          # identifies the campaign in the ledger and in unsubscribe links

[api]
key_env = "NYLAS_API_KEY"           # the NAME of the environment variable that holds your Nylas API key

[recipients]
source = "recipients.csv"           # .csv or .parquet, relative to this file
email_column = "email"
name_column = "name"

[message]
subject = "Hello {{ first_name }}"
html = "message.html.j2"

[unsubscribe]
url = "https://example.com/unsubscribe?t={{ unsubscribe_token }}"
mailto = "unsubscribe@example.com"
secret_env = "CAMPAIGN_UNSUBSCRIBE_SECRET"

[[senders]]
name = "me"
grant_id = "replace-with-your-grant-id"
email = "me@example.com"
per_second = 1                      # sustained pace
per_day = 400                       # recipients in any rolling 24 h
concurrency = 1
"""

_RECIPIENTS = """\
email,name,first_name
ann@example.com,Ann Lee,Ann
bob@example.com,Bob Stone,Bob
"""

_TEMPLATE = """\
{% extends "base.html.j2" %}
{% block content %}
<p>Hi {{ first_name }},</p>
<p>Write your message here.</p>
<p>{{ sender.from_name or sender.name }}</p>
{% endblock %}
"""

_FILES = {"campaign.toml": _MANIFEST, "recipients.csv": _RECIPIENTS, "message.html.j2": _TEMPLATE}


def write_starter(directory: Path) -> list[Path]:
    """Write the starter files into `directory` (created if needed); return their paths."""
    targets = [directory / name for name in _FILES]
    existing = [path for path in targets if path.is_symlink() or path.exists()]  # a dangling link too
    if existing:
        message = f"{existing[0]} already exists; `campaign init` never overwrites: choose an empty folder"
        raise CampaignError(message)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for path in targets:
            # Created, never opened through a link or over a file that appeared since the check.
            with path.open("x", encoding="utf-8") as file:
                file.write(_FILES[path.name])
    except FileExistsError as exc:
        message = f"{exc.filename} already exists; `campaign init` never overwrites: choose an empty folder"
        raise CampaignError(message) from exc
    except OSError as exc:
        where = exc.filename or directory
        reason = exc.strerror or type(exc).__name__
        # An output that cannot be written, as for preview --out and report --out (exit 66).
        raise InputFileError(
            f"cannot write the starter campaign at {where}: {reason}; choose a folder you can write"
        ) from exc
    return targets
