"""Tests for campaign.manifest._load: parsing, validation messages, path resolution and the JSON schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from campaign.errors import InputFileError, ManifestError
from campaign.manifest import Manifest, build_manifest_schema, load_manifest
from campaign.manifest._load import parse_manifest

BASE = """\
[campaign]
name = "spring-news"

[recipients]
source = "recipients.csv"

[message]
subject = "Hello {{ first_name }}"
html = "templates/news.html.j2"

[[senders]]
name = "alice"
grant_id = "grant-a"
"""


def parse(text: str, tmp_path: Path) -> Manifest:
    return parse_manifest(text, path=tmp_path / "campaign.toml")


def error_of(text: str, tmp_path: Path) -> str:
    with pytest.raises(ManifestError) as info:
        parse(text, tmp_path)
    return str(info.value)


def with_sender(extra: str) -> str:
    """BASE plus a second sender carrying `extra` lines."""
    return BASE + f'\n[[senders]]\nname = "bob"\ngrant_id = "grant-b"\n{extra}\n'


def test_minimal_manifest_gets_documented_defaults(tmp_path: Path) -> None:
    """A minimal manifest validates and fills in the documented defaults."""
    manifest = parse(BASE, tmp_path)
    assert manifest.campaign.name == "spring-news"
    assert manifest.api.key_env == "NYLAS_API_KEY"
    assert manifest.api.timeout_s == 90
    assert manifest.api.uri is None
    assert manifest.recipients.email_column == "email"
    assert manifest.recipients.delimiter == ","
    assert manifest.recipients.suppress == ()
    assert manifest.unsubscribe is None
    sender = manifest.senders[0]
    assert (sender.per_second, sender.burst, sender.concurrency, sender.per_day) == (2, 1, 2, None)
    assert sender.rate_per_s == 2.0


def test_paths_resolve_against_the_manifest_folder(tmp_path: Path) -> None:
    """source, suppress, html and text become absolute paths relative to the manifest's folder."""
    text = BASE.replace('source = "recipients.csv"', 'source = "../lists/r.csv"\nsuppress = ["unsub.txt"]')
    text = text.replace('html = "templates/news.html.j2"', 'text = "t/note.txt.j2"\nhtml = "t/n.html"')
    folder = tmp_path / "camp"
    manifest = parse_manifest(text, path=folder / "campaign.toml")
    assert manifest.recipients.source == tmp_path / "lists" / "r.csv"
    assert manifest.recipients.suppress == (folder / "unsub.txt",)
    assert manifest.message.html == folder / "t" / "n.html"
    assert manifest.message.text == folder / "t" / "note.txt.j2"
    assert manifest.path == folder / "campaign.toml"


def test_relative_manifest_path_becomes_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A manifest path given relative to the working folder is stored absolute, and so are its paths."""
    monkeypatch.chdir(tmp_path)
    manifest = parse_manifest(BASE, path=Path("campaign.toml"))
    assert manifest.path == tmp_path / "campaign.toml"
    assert manifest.recipients.source == tmp_path / "recipients.csv"


def test_single_suppression_file_may_be_a_string(tmp_path: Path) -> None:
    """suppress = "x.csv" is taken as a one-file list."""
    text = BASE.replace('source = "recipients.csv"', 'source = "r.csv"\nsuppress = "x.csv"')
    assert parse(text, tmp_path).recipients.suppress == (tmp_path / "x.csv",)


def test_base_dir_and_ledger_path_sit_beside_the_manifest(tmp_path: Path) -> None:
    """The ledger is named after the manifest's stem, in the manifest's folder."""
    manifest = parse_manifest(BASE, path=tmp_path / "spring.toml")
    assert manifest.base_dir == tmp_path
    assert manifest.ledger_path == tmp_path / "spring.ledger.sqlite"


def test_per_minute_sets_the_rate(tmp_path: Path) -> None:
    """per_minute = 30 is half a message per second, and per_second stays unset."""
    sender = parse(with_sender("per_minute = 30"), tmp_path).senders[1]
    assert sender.per_second is None
    assert sender.rate_per_s == 0.5


def test_sender_lookup_by_name(tmp_path: Path) -> None:
    """sender() finds a sender by name and names the known senders when it cannot."""
    manifest = parse(with_sender("per_day = 500"), tmp_path)
    assert manifest.sender("bob").per_day == 500
    with pytest.raises(ManifestError, match=r"no sender named 'carol' \(senders: alice, bob\)"):
        manifest.sender("carol")


def test_models_are_frozen(tmp_path: Path) -> None:
    """A parsed manifest cannot be changed in place."""
    manifest = parse(BASE, tmp_path)
    with pytest.raises(ValidationError):
        manifest.campaign.name = "other"


def test_unknown_key_suggests_the_close_one(tmp_path: Path) -> None:
    """A typo is an error naming the key and suggesting the right one."""
    message = error_of(BASE.replace("subject =", "subjct ="), tmp_path)
    assert message.startswith("campaign.toml: message.subjct: unknown key (did you mean 'subject'?)")


def test_unknown_key_without_a_close_match_lists_the_keys(tmp_path: Path) -> None:
    """An unknown key with no close match lists what the table accepts."""
    message = error_of(BASE.replace("[recipients]", "[recipients]\nzzz = 1"), tmp_path)
    assert message == (
        "campaign.toml: recipients.zzz: unknown key (expected one of: source, email_column, name_column, "
        "sender_column, key_column, timezone_column, delimiter, suppress)"
    )


def test_both_names_of_one_key_are_refused_as_such(tmp_path: Path) -> None:
    """A sender's `from` is its `email` by another name (as domain senders write it): both given is
    one key twice, not an unknown key (it said "did you mean 'from_name'?")."""
    twice = BASE.replace('grant_id = "grant-a"', 'grant_id = "grant-a"\nemail = "a@x.com"\nfrom = "b@x.com"')
    message = error_of(twice, tmp_path)
    assert message == (
        "campaign.toml: senders[1].from: another name for 'email', which is given too; keep one of the two"
    )


def test_key_in_the_wrong_table_says_where_it_belongs(tmp_path: Path) -> None:
    """reply_to under [campaign] is pointed to [message]."""
    message = error_of(BASE.replace('name = "spring-news"', 'name = "x"\nreply_to = "a@b.com"'), tmp_path)
    assert message == "campaign.toml: campaign.reply_to: unknown key here (it belongs in [message])"


def test_unknown_key_in_an_inline_table(tmp_path: Path) -> None:
    """A typo inside message.tracking names the nested key."""
    message = error_of(
        BASE.replace("[message]", "[message]\ntracking = { opens = true, link = true }"), tmp_path
    )
    assert message == "campaign.toml: message.tracking.link: unknown key (did you mean 'links'?)"


def test_path_is_not_a_manifest_key(tmp_path: Path) -> None:
    """The internal `path` field cannot be set from the file."""
    assert error_of('path = "/etc"\n' + BASE, tmp_path).startswith("campaign.toml: path: unknown key")


def test_invalid_toml_names_the_line(tmp_path: Path) -> None:
    """A TOML syntax error names the line and tomllib's reason."""
    text = BASE.replace('source = "recipients.csv"', "source\n")
    assert error_of(text, tmp_path).startswith(
        "campaign.toml: line 5: invalid TOML (Expected '=' after a key"
    )


def test_missing_table_and_key_are_named(tmp_path: Path) -> None:
    """A missing table and a missing key each say they are missing."""
    no_table = BASE.replace('[campaign]\nname = "spring-news"\n', "")
    assert error_of(no_table, tmp_path) == "campaign.toml: campaign: required table [campaign] is missing"
    no_key = BASE.replace('subject = "Hello {{ first_name }}"\n', "")
    assert error_of(no_key, tmp_path) == "campaign.toml: message.subject: required key is missing"


def test_missing_senders_asks_for_one(tmp_path: Path) -> None:
    """Without [[senders]] the error says to add one."""
    text = BASE.split("[[senders]]")[0]
    assert "senders: missing; add at least one [[senders]] table" in error_of(text, tmp_path)


def test_sender_field_error_names_the_list_index(tmp_path: Path) -> None:
    """A bad value in the third [[senders]] table is reported as senders[3].<key> (counted from 1)."""
    text = with_sender("") + '\n[[senders]]\nname = "carol"\ngrant_id = "g"\nper_second = 0\n'
    assert error_of(text, tmp_path) == "campaign.toml: senders[3].per_second: must be greater than 0 (got 0)"


def test_only_sender_with_a_bad_value_is_one_problem(tmp_path: Path) -> None:
    """A bad value in the only sender is not also reported as "no senders"."""
    message = error_of(BASE + "per_second = -1\n", tmp_path)
    assert message == "campaign.toml: senders[1].per_second: must be greater than 0 (got -1)"


def test_rate_given_twice_is_refused(tmp_path: Path) -> None:
    """per_second and per_minute together are ambiguous."""
    message = error_of(with_sender("per_second = 1\nper_minute = 30"), tmp_path)
    assert message == "campaign.toml: senders[2]: give per_second or per_minute, not both"


def test_wrong_types_say_what_was_given(tmp_path: Path) -> None:
    """A string where an integer belongs names both types."""
    message = error_of(with_sender('concurrency = "3"'), tmp_path)
    assert message == "campaign.toml: senders[2].concurrency: must be an integer (got a string)"


def test_concurrency_range_is_checked(tmp_path: Path) -> None:
    """concurrency above 64 is refused with the value given."""
    message = error_of(with_sender("concurrency = 300"), tmp_path)
    assert message == "campaign.toml: senders[2].concurrency: must be less than or equal to 64 (got 300)"


def test_tracking_flags_must_be_booleans(tmp_path: Path) -> None:
    """tracking.opens = "yes" is not silently taken as true."""
    message = error_of(BASE.replace("[message]", '[message]\ntracking = { opens = "yes" }'), tmp_path)
    assert message == "campaign.toml: message.tracking.opens: must be true or false (got a string)"


def test_message_needs_a_body_template(tmp_path: Path) -> None:
    """Without html, markdown or text the message table is refused."""
    message = error_of(BASE.replace('html = "templates/news.html.j2"\n', ""), tmp_path)
    assert message == "campaign.toml: message: give `html`, `markdown` or `text` (a template file)"


def test_subject_with_a_line_break_is_refused(tmp_path: Path) -> None:
    """A literal newline in the subject template could inject headers."""
    message = error_of(BASE.replace('"Hello {{ first_name }}"', '"Hello\\nBcc: x@y.com"'), tmp_path)
    assert message.startswith("campaign.toml: message.subject: contains a line feed (LF)")


def test_reply_to_must_be_an_address(tmp_path: Path) -> None:
    """reply_to is validated and normalised."""
    assert "message.reply_to: 'bob@' is not a valid address" in error_of(
        BASE.replace("[message]", '[message]\nreply_to = "bob@"'), tmp_path
    )
    good = parse(BASE.replace("[message]", '[message]\nreply_to = "Help@Example.COM"'), tmp_path)
    assert good.message.reply_to == "Help@example.com"


def test_addresses_are_kept_as_the_api_takes_them(tmp_path: Path) -> None:
    """Nylas refuses a participant address holding any non-ASCII character (402): an internationalised
    domain is kept in its ASCII form, and a non-ASCII part before @ is refused, naming the key."""
    good = parse(BASE.replace("[message]", '[message]\nreply_to = "help@Bücher.example"'), tmp_path)
    assert good.message.reply_to == "help@xn--bcher-kva.example"
    message = error_of(BASE.replace("[message]", '[message]\nreply_to = "jörg@example.com"'), tmp_path)
    assert message.startswith("campaign.toml: message.reply_to: 'jörg@example.com' is not a valid address")
    assert "non-ASCII" in message


UNSUB = '\n[unsubscribe]\nurl = "{url}"\nmailto = "{mailto}"\n'


def test_unsubscribe_url_must_be_https(tmp_path: Path) -> None:
    """An http unsubscribe URL is refused with the reason."""
    message = error_of(BASE + UNSUB.format(url="http://x.example/u", mailto="u@example.com"), tmp_path)
    assert message == (
        "campaign.toml: unsubscribe.url: must be an https:// URL "
        "(mail providers require https for one-click unsubscribe)"
    )


def test_unsubscribe_template_url_and_mailto_prefix(tmp_path: Path) -> None:
    """A templated https URL is kept as written; a mailto: prefix is dropped from mailto."""
    url = "https://example.com/u?t={{ unsubscribe_token }}"
    manifest = parse(BASE + UNSUB.format(url=url, mailto="mailto:Unsub@Example.com"), tmp_path)
    assert manifest.unsubscribe is not None
    assert manifest.unsubscribe.url == url
    assert manifest.unsubscribe.mailto == "Unsub@example.com"
    assert manifest.unsubscribe.secret_env == "CAMPAIGN_UNSUBSCRIBE_SECRET"


def test_env_names_that_look_like_secrets_are_refused_without_echo(tmp_path: Path) -> None:
    """A key pasted into key_env is refused and never repeated in the message."""
    text = '[api]\nkey_env = "nyk_v0_SeCrEt.value"\n' + BASE
    message = error_of(text, tmp_path)
    assert message.startswith(
        "campaign.toml: api.key_env: the value does not look like an environment variable name"
    )
    assert "SeCrEt" not in message


def test_api_uri_is_checked_and_trimmed(tmp_path: Path) -> None:
    """api.uri must be an http(s) URL; a trailing slash is dropped."""
    manifest = parse('[api]\nuri = "https://api.eu.nylas.com/"\n' + BASE, tmp_path)
    assert manifest.api.uri == "https://api.eu.nylas.com"
    assert "api.uri: 'api.eu.nylas.com' must be an https:// URL" in error_of(
        '[api]\nuri = "api.eu.nylas.com"\n' + BASE, tmp_path
    )


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ('{ "X Bad" = "v" }', "message.headers.\"X Bad\": header name 'X Bad' may only use printable ASCII"),
        ('{ "x-ok" = "a", "X-Ok" = "b" }', 'message.headers: "x-ok" and "X-Ok" are the same header'),
        ('{ "X-Tag" = "a\\r\\nBcc: x@y.com" }', 'message.headers."X-Tag": contains a carriage return (CR)'),
        ('{ "list-unsubscribe" = "<https://x>" }', 'message.headers."list-unsubscribe": campaign sets'),
        ('{ "List-Unsubscribe-Post" = "x" }', 'message.headers."List-Unsubscribe-Post": campaign sets'),
        ('{ "Subject" = "x" }', 'message.headers."Subject": campaign sets this header itself; use message'),
    ],
)
def test_custom_header_problems_name_the_header(tmp_path: Path, headers: str, expected: str) -> None:
    """Each bad custom header is reported under message.headers."<name>"."""
    message = error_of(BASE.replace("[message]", f"[message]\nheaders = {headers}"), tmp_path)
    assert message.startswith(f"campaign.toml: {expected}")


def test_good_custom_headers_are_kept(tmp_path: Path) -> None:
    """Valid custom headers keep their names and template values."""
    manifest = parse(
        BASE.replace("[message]", '[message]\nheaders = { "X-Campaign" = "{{ name }}" }'), tmp_path
    )
    assert manifest.message.headers == {"X-Campaign": "{{ name }}"}


def test_duplicate_sender_names_name_both_indices(tmp_path: Path) -> None:
    """Two senders called alice are reported with both positions."""
    text = BASE + '\n[[senders]]\nname = "alice"\ngrant_id = "g2"\n'
    message = error_of(text, tmp_path)
    assert message == (
        "campaign.toml: senders[2].name: 'alice' is already the name of senders[1]; "
        "sender names must be unique"
    )


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ('""', "campaign.name: must not be empty"),
        ('"a b"', "campaign.name: 'a b' may only use letters, digits, '.', '_' and '-'"),
        (f'"{"x" * 65}"', "campaign.name: must have at most 64 characters"),
    ],
)
def test_campaign_name_rules(tmp_path: Path, name: str, expected: str) -> None:
    """The campaign name must be 1–64 safe characters."""
    assert error_of(BASE.replace('"spring-news"', name), tmp_path) == f"campaign.toml: {expected}"


def test_delimiter_must_be_one_character(tmp_path: Path) -> None:
    """A two-character delimiter is refused; a tab is accepted."""
    text = BASE.replace("[recipients]", '[recipients]\ndelimiter = ";;"')
    assert error_of(text, tmp_path).startswith(
        "campaign.toml: recipients.delimiter: ';;' must be one character"
    )
    tab = parse(BASE.replace("[recipients]", '[recipients]\ndelimiter = "\\t"'), tmp_path)
    assert tab.recipients.delimiter == "\t"


def test_provider_must_be_known(tmp_path: Path) -> None:
    """A misspelt provider lists the accepted values."""
    message = error_of(with_sender('provider = "gmial"'), tmp_path)
    assert message.startswith("campaign.toml: senders[2].provider: must be 'gmail', 'google-workspace'")


def test_several_errors_report_the_first_and_a_count(tmp_path: Path) -> None:
    """The message stays one line and says how many other problems there are."""
    message = error_of(with_sender("burst = 0\nconcurrency = 0"), tmp_path)
    assert (
        message
        == "campaign.toml: senders[2].burst: must be greater than or equal to 1 (got 0) (and 1 more problem)"
    )
    assert "\n" not in message


def test_load_manifest_reads_a_file_with_a_bom(tmp_path: Path) -> None:
    """load_manifest reads UTF-8 with a BOM (as Notepad saves it)."""
    path = tmp_path / "campaign.toml"
    path.write_bytes(b"\xef\xbb\xbf" + BASE.encode())
    assert load_manifest(path).campaign.name == "spring-news"


def test_load_manifest_missing_file_is_an_input_file_error(tmp_path: Path) -> None:
    """A missing manifest exits 66 and names the path."""
    with pytest.raises(InputFileError, match="manifest not found") as info:
        load_manifest(tmp_path / "nope.toml")
    assert info.value.exit_code == 66
    assert "nope.toml" in str(info.value)


def test_load_manifest_folder_is_an_input_file_error(tmp_path: Path) -> None:
    """Giving a folder instead of the file is reported as such."""
    with pytest.raises(InputFileError, match="is a folder"):
        load_manifest(tmp_path)


def test_load_manifest_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    """A Latin-1 manifest is a manifest error naming the line."""
    path = tmp_path / "campaign.toml"
    path.write_bytes(BASE.replace("Hello", "H\xe9llo").encode("latin-1"))
    with pytest.raises(ManifestError, match=r"campaign.toml: line 8: not UTF-8 text") as info:
        load_manifest(path)
    assert info.value.exit_code == 78


def test_schema_describes_the_toml_shape() -> None:
    """The JSON schema has the top-level tables, no internal path, and descriptions for editors."""
    schema = build_manifest_schema()
    json.dumps(schema)  # it must be serialisable as printed by `campaign schema`
    properties = schema["properties"]
    assert isinstance(properties, dict)
    assert set(properties) == {
        "campaign",
        "api",
        "recipients",
        "message",
        "unsubscribe",
        "senders",
        "followups",
        "ledger",
    }
    assert schema["required"] == ["campaign", "recipients", "message", "senders"]
    assert schema["additionalProperties"] is False
    defs = schema["$defs"]
    assert isinstance(defs, dict)
    sender = defs["SenderSettings"]["properties"]
    assert "rolling 24 h" in sender["per_day"]["description"]
    assert all("description" in field for model in defs.values() for field in model["properties"].values())


@pytest.mark.parametrize(
    ("first", "second", "key", "value"),
    [
        ('grant_id = "grant-a"', 'grant_id = "grant-a"', "grant_id", "grant-a"),
        (
            'domain = "mail.example.com"\nfrom = "a@mail.example.com"',
            'domain = "mail.example.com"\nfrom = "b@mail.example.com"',
            "domain",
            "mail.example.com",
        ),
    ],
)
def test_two_senders_on_one_mailbox_are_refused_naming_both(
    tmp_path: Path, first: str, second: str, key: str, value: str
) -> None:
    """Two senders with one grant (or one domain) would double that mailbox's limits: refused, both named."""
    text = BASE.replace('grant_id = "grant-a"', first) + f'\n[[senders]]\nname = "bob"\n{second}\n'
    message = error_of(text, tmp_path)
    assert message == (
        f"campaign.toml: senders[2].{key}: 'bob' and 'alice' (senders[1]) both send through {key} {value!r}, "
        "which would double its pace and daily budget; keep one sender per mailbox"
    )
