"""Provider awareness and bulk-sender checks: the body link for Microsoft/iCloud, and preview's warnings."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import check_plan

from campaign.manifest import Manifest
from campaign.manifest._load import parse_manifest
from campaign.models import Address, Message
from campaign.pipeline import build_unsubscribe_warnings
from campaign.pipeline._compliance import _href_where_printed, has_body_link

SECRETS = (b"compliance-test-secret-0123456789",)
LINKED = '{% extends "base.html.j2" %}{% block content %}<p>Hi</p>{% endblock %}'
UNLINKED = "<p>Hi {{ name }}</p>"


def _manifest(
    folder: Path,
    *,
    body: str = UNLINKED,
    provider: str = "microsoft",
    unsubscribe: str = 'url = "https://example.com/u?t={{ unsubscribe_token }}"\nmailto = "u@example.com"',
    senders: str | None = None,
    text_body: bool = False,
) -> Manifest:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipients.csv").write_text("email,name\nann@example.com,Ann\nbob@example.com,Bob\n")
    (folder / "body.j2").write_text(body)
    section = f"[unsubscribe]\n{unsubscribe}\n" if unsubscribe else ""
    senders = senders or '[[senders]]\nname = "maya"\ngrant_id = "grant-1"\nemail = "maya@example.com"\n'
    if provider:
        senders += f'provider = "{provider}"\n'
    kind = "text" if text_body else "html"
    toml = f"""
[campaign]
name = "spring"
[recipients]
source = "recipients.csv"
name_column = "name"
[message]
subject = "Hi"
{kind} = "body.j2"
{section}
{senders}
"""
    (folder / "campaign.toml").write_text(toml)
    return parse_manifest(toml, path=folder / "campaign.toml")


# --- the body link (item 5) ---------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["microsoft", "icloud"])
def test_headerless_provider_needs_the_body_link(tmp_path, provider):
    """Microsoft/iCloud senders without an unsubscribe_url link in the HTML body: a problem per row."""
    preflight = check_plan(_manifest(tmp_path, provider=provider), secrets=SECRETS, skip_invalid=False)
    assert preflight.jobs == []
    assert len(preflight.problems) == 2
    first = preflight.problems[0]
    assert first.startswith("recipients.csv row 1: sender 'maya'")
    assert f"provider {provider}" in first
    assert "unsubscribe.require_body_link = false" in first


def test_base_template_footer_satisfies_the_check(tmp_path):
    """The built-in base template's footer link counts; the check then passes for every row."""
    preflight = check_plan(_manifest(tmp_path, body=LINKED), secrets=SECRETS, skip_invalid=False)
    assert preflight.problems == ()
    assert len(preflight.jobs) == 2


def test_the_check_can_be_turned_off_and_other_providers_are_not_checked(tmp_path):
    """require_body_link = false, or a Google sender, sends a body without the link."""
    off = 'url = "https://example.com/u?t={{ unsubscribe_token }}"\nrequire_body_link = false'
    assert (
        check_plan(_manifest(tmp_path / "a", unsubscribe=off), secrets=SECRETS, skip_invalid=False).problems
        == ()
    )
    gmail = check_plan(_manifest(tmp_path / "b", provider="gmail"), secrets=SECRETS, skip_invalid=False)
    assert gmail.problems == ()


def test_text_only_body_needs_the_url_itself(tmp_path):
    """A text-only body passes when it contains the unsubscribe URL, not otherwise."""
    plain = _manifest(tmp_path / "a", body="Bye: {{ unsubscribe_url }}\n", text_body=True)
    assert check_plan(plain, secrets=SECRETS, skip_invalid=False).problems == ()
    missing = _manifest(tmp_path / "b", body="Bye\n", text_body=True)
    problems = check_plan(missing, secrets=SECRETS, skip_invalid=False).problems
    assert "text body must link" in problems[0]


def test_has_body_link_reads_escaped_and_unquoted_hrefs():
    """An autoescaped href (&amp;) or an unquoted one still counts; a look-alike does not."""
    url = "https://example.com/u?t=abc&list=7"

    def message(html: str) -> Message:
        return Message("k", 1, "s", (Address("a@example.com"),), "Hi", html=html)

    assert has_body_link(message('<a href="https://example.com/u?t=abc&amp;list=7">x</a>'), url)
    assert has_body_link(message("<A HREF=https://example.com/u?t=abc&amp;list=7>x</A>"), url)
    assert not has_body_link(message('<a href="https://example.com/u?t=abc">x</a>'), url)
    assert not has_body_link(message(f"<p>{url}</p>"), url)


_URL = "https://example.com/u?t=abc&list=7"
_PIECES = st.sampled_from(
    [
        _URL,
        html.escape(_URL),
        _URL.replace("&", "&#38;"),  # a spelling only reading every href finds
        "href=",
        "HREF = ",
        'href="',
        "href='",
        '"',
        "'",
        " ",
        ">",
        "<a ",
        "&amp;",
        "&copy;",
        "x" * 70,
        "https://example.com/u?t=abc",
        "hReF=",
        "\u0130",  # İ: its lower case is two characters
        "a",
    ]
)


def _every_href_links(body: str, url: str) -> bool:
    """The reference: the href pattern tried at every position of the body."""
    pattern = re.compile(r"""\bhref\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'>]+))""", re.IGNORECASE)
    for at in range(len(body)):
        match = pattern.match(body, at)
        if match is not None:
            target = next(group for group in match.groups() if group is not None)
            if html.unescape(target).strip() == url:
                return True
    return False


@settings(max_examples=600, deadline=None)
@given(pieces=st.lists(_PIECES, max_size=12))
def test_has_body_link_agrees_with_trying_every_position(pieces):
    """Looking just before where the URL is printed, then trying the href pattern only where "href" is,
    finds what the pattern tried at every position finds (an href inside another's value, case,
    entities, characters whose lower case is longer); the quick look never finds one that is not there."""
    body = "".join(pieces)
    expected = _every_href_links(body, _URL)
    message = Message("k", 1, "s", (Address("a@example.com"),), "Hi", html=body)
    assert has_body_link(message, _URL) == expected
    assert not _href_where_printed(body, _URL) or expected


def test_an_href_where_the_url_is_printed_is_found_by_looking_just_before_it():
    """The quick look finds the link as templates print it (autoescaped or not, quoted or not, spaced,
    after other hrefs), so most messages are not read href by href."""
    printed = html.escape(_URL, quote=False)
    for body in (
        f'<a href="https://example.com/">x</a> <p style="a:b">y</p> <a href="{printed}">stop</a>',
        f"<a HREF = '{_URL}'>stop</a>",
        f"<a href={printed}>stop</a>",
        f'<a class="footer" href="  {printed} ">stop</a>',
    ):
        assert _href_where_printed(body, _URL), body
    assert not _href_where_printed(f"<p>{_URL}</p>", _URL)
    assert not _href_where_printed(f'<a href="{_URL}x">', _URL)


def test_cli_run_with_a_microsoft_sender_and_no_link_sends_nothing(api, cli, tmp_path):
    """Through the CLI: exit 65, the message names the fix, and nothing reaches the API."""
    _manifest(tmp_path)
    api.add_grant("grant-1", "maya@example.com", provider="microsoft")
    result = cli("run", tmp_path / "campaign.toml", "--yes")
    assert result.exit_code == 65
    assert "require_body_link" in result.stderr
    assert api.deliveries == []


# --- preview warnings (items 5 and 7) -----------------------------------------------------------------------


def _warnings(manifest: Manifest, **per_sender: int) -> tuple[str, ...]:
    return build_unsubscribe_warnings(manifest, per_sender or {"maya": 2})


def test_headerless_sender_warning(tmp_path):
    """A Microsoft sender gets the 'only the body link works' warning; a Gmail sender does not."""
    found = _warnings(_manifest(tmp_path / "a", body=LINKED))
    assert any(
        "sender 'maya' (provider microsoft)" in w and "only the unsubscribe link in the body" in w
        for w in found
    )
    assert not any("provider" in w for w in _warnings(_manifest(tmp_path / "b", provider="gmail")))


def _two_senders(provider_b: str = "google-workspace", per_day: int = 10_000) -> str:
    limits = f"per_second = 10\nper_day = {per_day}\n"
    return (
        f'[[senders]]\nname = "a"\ngrant_id = "g-a"\nemail = "a@corp.example"\n{limits}'
        f'[[senders]]\nname = "b"\ngrant_id = "g-b"\nemail = "b@corp.example"\n{limits}'
        f'provider = "{provider_b}"\n'
    )


def test_bulk_domain_without_one_click_warns(tmp_path):
    """Two senders on one domain sending 6,000 a day: warned without [unsubscribe] or with Microsoft."""
    without = _manifest(tmp_path / "a", unsubscribe="", senders=_two_senders(), provider="")
    found = build_unsubscribe_warnings(without, {"a": 3000, "b": 3000})
    assert any(
        "corp.example would send about 6,000 messages a day" in w and "[unsubscribe]" in w for w in found
    )
    with_one_click = _manifest(tmp_path / "b", senders=_two_senders(), provider="")
    assert not any("a day" in w for w in build_unsubscribe_warnings(with_one_click, {"a": 3000, "b": 3000}))
    below = build_unsubscribe_warnings(without, {"a": 2000, "b": 2000})
    assert not any("a day" in w for w in below)
    microsoft = _manifest(tmp_path / "c", senders=_two_senders("microsoft"), provider="")
    found = build_unsubscribe_warnings(microsoft, {"a": 3000, "b": 3000})
    assert any("senders b (Microsoft/iCloud) cannot carry the one-click header" in w for w in found)


def test_daily_volume_counts_only_what_the_limits_allow(tmp_path):
    """6,000 messages from senders capped at 1,000 a day each do not make a bulk day."""
    senders = _two_senders(per_day=1000)
    manifest = _manifest(tmp_path, unsubscribe="", senders=senders, provider="")
    assert not any("a day" in w for w in build_unsubscribe_warnings(manifest, {"a": 3000, "b": 3000}))


def test_missing_mailto_warns(tmp_path):
    """Without unsubscribe.mailto, preview says Outlook.com acts only on mailto."""
    manifest = _manifest(
        tmp_path, provider="gmail", unsubscribe='url = "https://example.com/u?t={{ unsubscribe_token }}"'
    )
    assert any("unsubscribe.mailto is not set" in w and "Outlook.com" in w for w in _warnings(manifest))


def test_a_mailto_no_command_reads_warns(tmp_path):
    """Requests mailed to unsubscribe.mailto are read only from a grant sender's inbox: any other mailbox
    is pointed out (with what to do); a grant sender's address, in any case, is not."""
    url = 'url = "https://example.com/u?t={{ unsubscribe_token }}"'
    senders = '[[senders]]\nname = "maya"\ngrant_id = "g"\nemail = "maya@example.com"\n'
    elsewhere = _manifest(
        tmp_path / "a", provider="", senders=senders, unsubscribe=url + '\nmailto = "unsubscribe@example.com"'
    )
    found = [w for w in _warnings(elsewhere) if "unsubscribe.mailto unsubscribe@example.com" in w]
    assert len(found) == 1, found
    assert "campaign suppress add" in found[0]
    own = _manifest(
        tmp_path / "b", provider="", senders=senders, unsubscribe=url + '\nmailto = "Maya@Example.com"'
    )
    assert not any("no command reads" in w for w in _warnings(own))


@pytest.mark.parametrize(
    ("url", "sender", "warned"),
    [
        ("https://example.com/u?t={{ unsubscribe_token }}", "maya@example.com", False),
        ("https://unsubscribe.example.com/u/{{ unsubscribe_token }}", "maya@news.example.com", False),
        ("https://links.mailer-service.net/u?t={{ unsubscribe_token }}", "maya@example.com", True),
        ("https://u.example.co.uk/x?t={{ unsubscribe_token }}", "maya@example.co.uk", False),
        ("https://u.other.co.uk/x?t={{ unsubscribe_token }}", "maya@example.co.uk", True),
        ("https://{{ host }}/x?t={{ unsubscribe_token }}", "maya@example.com", False),
    ],
)
def test_unsubscribe_host_off_the_sending_domain_warns(tmp_path, url, sender, warned):
    """The URL's host must be under the sender's organisational domain, or preview warns."""
    senders = f'[[senders]]\nname = "maya"\ngrant_id = "g"\nemail = "{sender}"\n'
    manifest = _manifest(
        tmp_path, provider="", senders=senders, unsubscribe=f'url = "{url}"\nmailto = "u@x.com"'
    )
    found = [w for w in _warnings(manifest) if "is not under the sending domain" in w]
    assert bool(found) is warned, found


def test_store_warnings(tmp_path):
    """No store read back, or a store that does not exist yet, is pointed out; an existing store is not."""
    base = 'url = "https://example.com/u?t={{ unsubscribe_token }}"\nmailto = "u@example.com"'
    none = _warnings(_manifest(tmp_path / "a", provider="gmail", unsubscribe=base))
    assert any("no unsubscribe store is read back" in w for w in none)
    missing = _manifest(tmp_path / "b", provider="gmail", unsubscribe=base + '\nstore = "u.sqlite"')
    assert any("does not exist yet" in w for w in _warnings(missing))
    from campaign.testing import FakeClock
    from campaign.unsubscribe import open_store

    open_store(tmp_path / "b" / "u.sqlite", clock=FakeClock()).close()
    assert not any("store" in w for w in _warnings(missing))


def test_preview_shows_the_warnings(cli, tmp_path, monkeypatch):
    """`campaign preview --json` carries the provider and mailto warnings."""
    monkeypatch.setenv("CAMPAIGN_UNSUBSCRIBE_SECRET", SECRETS[0].decode())
    _manifest(tmp_path, body=LINKED, unsubscribe='url = "https://example.com/u?t={{ unsubscribe_token }}"')
    result = cli("preview", tmp_path / "campaign.toml", "--json")
    assert result.exit_code == 0, result.output
    warnings = json.loads(result.stdout)["warnings"]
    assert any("provider microsoft" in w for w in warnings)
    assert any("unsubscribe.mailto is not set" in w for w in warnings)
