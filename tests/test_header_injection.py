"""Header injection through every header input: refused before the API, naming the row and field or key."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
from support import check_plan

from campaign.errors import ManifestError
from campaign.headers import _BAD_VALUE_CHAR, header_value_problem
from campaign.manifest import Manifest
from campaign.manifest._load import parse_manifest

SECRETS = (b"injection-test-secret-0123456789",)
# CR/LF in every arrangement, the Unicode line breaks Python's email package splits on, and other controls.
INJECTIONS = [
    "x\r\nBcc: victim@example.com",
    "x\nBcc: victim@example.com",
    "x\rBcc: victim@example.com",
    "x\u2028Bcc: victim@example.com",
    "x\u2029Bcc: victim@example.com",
    "x\x85Bcc: victim@example.com",
    "x\x0bBcc: victim@example.com",
    "x\x1bBcc",
    "x\x7fy",
    "x\x9b31mRed",  # C1 controls: CSI, which a terminal takes as ESC [
    "x\x80y",
    "x\x9fy",
]
MANIFEST = """
[campaign]
name = "spring"
[recipients]
source = "recipients.csv"
name_column = "name"
[message]
subject = {subject}
html = "body.html.j2"
reply_to = {reply_to}
headers = {{ {header_name} = {header_value} }}
[unsubscribe]
url = {url}
mailto = {mailto}
[[senders]]
name = "maya"
grant_id = "grant-1"
email = "maya@example.com"
from_name = {from_name}
"""
CLEAN = {
    "subject": '"Hello {{ topic }}"',
    "reply_to": '"support@example.com"',
    "header_name": '"X-Ref"',
    "header_value": '"{{ ref }}"',
    "url": '"https://example.com/u/{{ slug }}?t={{ unsubscribe_token }}"',
    "mailto": '"unsubscribe@example.com"',
    "from_name": '"Maya"',
}


def _toml(text: str) -> str:
    """A TOML basic string holding `text` exactly (every control escaped)."""
    return '"' + "".join(c if c.isprintable() and c not in '"\\' else f"\\u{ord(c):04x}" for c in text) + '"'


def _folder(tmp_path: Path, rows: list[dict[str, str]], **manifest: str) -> Manifest:
    with (tmp_path / "recipients.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["email", "name", "topic", "ref", "slug"])
        writer.writeheader()
        writer.writerows(rows)
    (tmp_path / "body.html.j2").write_text('<p>Hi</p><a href="{{ unsubscribe_url }}">Unsubscribe</a>')
    text = MANIFEST.format(**{**CLEAN, **manifest})
    (tmp_path / "campaign.toml").write_text(text, encoding="utf-8")
    return parse_manifest(text, path=tmp_path / "campaign.toml")


def _row(n: int, **cells: str) -> dict[str, str]:
    return {
        "email": f"r{n}@example.com",
        "name": f"R {n}",
        "topic": "news",
        "ref": "a1",
        "slug": "s",
        **cells,
    }


@pytest.mark.parametrize("bad", INJECTIONS, ids=[repr(s) for s in INJECTIONS])
def test_recipient_data_injection_is_a_problem_naming_row_and_field(tmp_path, bad):
    """Each merge field reaching a header (subject, display name, custom header, URL, address) is refused."""
    rows = [
        _row(1),
        _row(2, topic=bad),
        _row(3, name=bad),
        _row(4, ref=bad),
        _row(5, slug=bad),
        _row(6, email=f"r6@example.com{bad}"),
    ]
    preflight = check_plan(_folder(tmp_path, rows), secrets=SECRETS, skip_invalid=False)
    assert [job.recipient.row for job in preflight.jobs] == [1]
    problems = preflight.problems
    assert len(problems) == 5
    expected = [
        ("row 2", "message.subject"),
        ("row 3", "recipient name (column 'name')"),
        ("row 4", "message.headers.X-Ref"),
        ("row 5", "unsubscribe.url"),
        ("row 6", 'column "email"'),
    ]
    for problem, (row, field) in zip(problems, expected, strict=True):
        assert problem.startswith(f"recipients.csv {row}"), problem
        assert field in problem, problem
        assert "\n" not in problem
        assert "\r" not in problem


@pytest.mark.parametrize("bad", INJECTIONS[:7], ids=[repr(s) for s in INJECTIONS[:7]])
@pytest.mark.parametrize(
    ("key", "where"),
    [
        ("subject", "message.subject"),
        ("reply_to", "message.reply_to"),
        ("header_value", 'message.headers."X-Ref"'),
        ("url", "unsubscribe.url"),
        ("mailto", "unsubscribe.mailto"),
        ("from_name", "senders[1].from_name"),
    ],
)
def test_manifest_value_injection_is_a_manifest_error_naming_the_key(tmp_path, bad, key, where):
    """A line break or control in a header value written in the manifest is refused naming the key (78)."""
    value = {"url": f"https://example.com/u{bad}?t={{{{ unsubscribe_token }}}}"}.get(key, bad)
    if key in {"reply_to", "mailto"}:
        value = f"a@example.com{bad}"
    with pytest.raises(ManifestError) as caught:
        _folder(tmp_path, [_row(1)], **{key: _toml(value)})
    assert where in str(caught.value)
    assert caught.value.exit_code == 78


@pytest.mark.parametrize("name", ["X-Ref\r\nBcc", "X Ref", "X-Ref:", "X-Réf", "", "X-Ref\u2028"])
def test_custom_header_names_outside_rfc_5322_are_refused(tmp_path, name):
    """Header names must be printable ASCII without space or colon."""
    with pytest.raises(ManifestError, match=r"message\.headers"):
        _folder(tmp_path, [_row(1)], header_name=_toml(name))


def test_injection_stops_the_cli_run_before_anything_is_sent(api, cli, tmp_path):
    """Through the CLI: exit 65 naming the row and field, and the API never sees a request."""
    _folder(tmp_path, [_row(1), _row(2, ref="a\r\nBcc: victim@example.com")])
    api.add_grant("grant-1", "maya@example.com")
    result = cli("run", tmp_path / "campaign.toml", "--yes")
    assert result.exit_code == 65
    assert "row 2" in result.stderr
    assert "message.headers.X-Ref" in result.stderr
    assert api.deliveries == []
    assert api.requests == []


@pytest.mark.parametrize("control", ["\x80", "\x9b", "\x9f"])
def test_a_c1_control_in_a_display_name_stops_the_cli_run_naming_the_row(api, cli, tmp_path, control):
    """U+0080-U+009F are controls like C0's: exit 65 naming the row and column, nothing sent."""
    _folder(tmp_path, [_row(1), _row(2, name=f"Ann {control}31mLee")])
    api.add_grant("grant-1", "maya@example.com")
    result = cli("run", tmp_path / "campaign.toml", "--yes")
    assert result.exit_code == 65, result.output
    assert result.stderr.strip().splitlines() == [
        f"error: recipients.csv row 2: the recipient name (column 'name') contains control character "
        f"U+{ord(control):04X}; header values must be a single line; nothing was sent (or pass "
        "--skip-invalid to skip bad rows)"
    ]
    assert api.deliveries == []
    assert api.requests == []


def test_every_character_the_header_check_refuses_is_one_python_calls_unprintable():
    """The quick pass (a printable value has no bad character) changes no verdict: checked for every code
    point, alone and between letters; a tab stays allowed, though not printable."""
    for point in range(sys.maxunicode + 1):
        char = chr(point)
        bad = _BAD_VALUE_CHAR.search(char) is not None
        assert not (bad and char.isprintable()), hex(point)
        assert (header_value_problem(f"a{char}b") is None) is not bad, hex(point)
    assert header_value_problem("a\tb") is None
