"""Provider presets and domain senders in the manifest."""

from __future__ import annotations

from pathlib import Path

import pytest

from campaign.errors import ManifestError
from campaign.manifest._load import parse_manifest

BASE = """
[campaign]
name = "c"
[recipients]
source = "r.csv"
[message]
subject = "s"
text = "t.txt"
"""


def _senders(block: str):
    return parse_manifest(BASE + block, path=Path("/tmp/x/campaign.toml")).senders


@pytest.mark.parametrize(
    ("provider", "rate", "per_day", "concurrency"),
    [
        ("gmail", 1.0, 500, 2),
        ("google-workspace", 2.0, 2000, 2),
        ("microsoft", 0.5, 10_000, 1),
        ("yahoo", 20 / 60, 500, 1),
        ("icloud", 20 / 60, 1000, 1),
        ("imap", 20 / 60, 500, 1),
    ],
)
def test_provider_preset_fills_in_limits(provider, rate, per_day, concurrency):
    """A provider alone gives its pace, daily recipients and concurrency."""
    (sender,) = _senders(f'[[senders]]\nname = "a"\ngrant_id = "g"\nprovider = "{provider}"\n')
    assert sender.rate_per_s == pytest.approx(rate)
    assert sender.per_day == per_day
    assert sender.concurrency == concurrency


def test_explicit_keys_override_the_preset():
    """per_minute given explicitly replaces the preset's pace; other preset keys stay."""
    (sender,) = _senders('[[senders]]\nname = "a"\ngrant_id = "g"\nprovider = "microsoft"\nper_minute = 10\n')
    assert sender.rate_per_s == pytest.approx(10 / 60)
    assert sender.per_day == 10_000
    (other,) = _senders('[[senders]]\nname = "a"\ngrant_id = "g"\nprovider = "gmail"\nper_day = 50\n')
    assert other.per_day == 50
    assert other.rate_per_s == pytest.approx(1.0)


def test_workspace_preset_limits_messages_too():
    """Google Workspace counts messages as well as recipients."""
    (sender,) = _senders('[[senders]]\nname = "a"\ngrant_id = "g"\nprovider = "google-workspace"\n')
    assert sender.per_day_messages == 2000


def test_domain_sender_needs_a_from_address():
    """A domain sender takes `from` (or `email`); without it the manifest is invalid."""
    (sender,) = _senders(
        '[[senders]]\nname = "app"\ndomain = "mail.example.com"\nfrom = "news@mail.example.com"\n'
    )
    assert (sender.domain, sender.email, sender.grant_id) == (
        "mail.example.com",
        "news@mail.example.com",
        None,
    )
    assert sender.route == "domain:mail.example.com"
    with pytest.raises(ManifestError, match="from"):
        _senders('[[senders]]\nname = "app"\ndomain = "mail.example.com"\n')


def test_grant_or_domain_exactly_one():
    """A sender names a grant or a domain, not both and not neither."""
    with pytest.raises(ManifestError, match="exactly one"):
        _senders(
            '[[senders]]\nname = "a"\ngrant_id = "g"\ndomain = "d.example.com"\nemail = "x@d.example.com"\n'
        )
    with pytest.raises(ManifestError, match="exactly one"):
        _senders('[[senders]]\nname = "a"\n')
