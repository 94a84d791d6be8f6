"""Data that must stay data, through the CLI (issue 12, items 10-14 and 17-19): list cells never become
markup, formulas, terminal escapes or Python reprs; long values are cut; a secret pasted where a
variable name belongs, or into any other key, is never echoed; extreme limits are refused; private
files are owner-only."""

from __future__ import annotations

import errno
import re
import stat
from datetime import UTC, date, datetime
from html.parser import HTMLParser
from pathlib import Path

import polars as pl
import pytest
from conftest import API_KEY, SECRET
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jinja2.compiler import CodeGenerator

from campaign.outputfiles import neutralise_formulas, open_private_folder, write_private_bytes
from campaign.render import _templating as templating

MANIFEST = """\
[campaign]
name = "safety"

[recipients]
source = "recipients.csv"
name_column = "name"

[message]
subject = "Hello {{ first_name }}"
html = "message.html.j2"

[unsubscribe]
url = "https://example.com/u/{{ unsubscribe_token }}"

[[senders]]
name = "alice"
grant_id = "grant-alice"
email = "alice@corp.example.com"
per_second = 50
"""
CSV = "email,name,first_name\nann@example.com,Ann Lee,Ann\nbob@example.com,Bob Stone,Bob\n"


def _write(folder: Path, *, manifest: str = MANIFEST, csv: str = CSV, template: str = "<p>Hi</p>\n") -> Path:
    (folder / "campaign.toml").write_text(manifest, encoding="utf-8")
    (folder / "recipients.csv").write_text(csv, encoding="utf-8")
    (folder / "message.html.j2").write_text(template, encoding="utf-8")
    return folder / "campaign.toml"


def _one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


def _preview_and_run(cli, manifest: Path) -> list:
    """The same campaign through `preview` and `run --yes`: bad input must stop both alike."""
    return [cli("preview", manifest), cli("run", manifest, "--yes")]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---- 17: a value pasted where a variable NAME belongs ----------------------------------------------


@pytest.mark.parametrize(
    ("table", "key", "pasted"),
    [
        ("api", "key_env", API_KEY),
        ("api", "key_env", "nyk_v0_SeCrEt"),
        ("unsubscribe", "secret_env", "test-unsubscribe-secret-0123456789abcdef"),
        ("unsubscribe", "secret_env", "s3cr3t"),
        # In capitals and digits, as a variable's name is written: upper-case hex, a random token.
        ("api", "key_env", "DA39A3EE5E6B4B0D3255BFEF95601890AFD80709"),
        ("unsubscribe", "secret_env", "A8F3KL9QZ2XV7MN4PR6TY1WB5CD0EG8HQ"),
        # A TOTP seed (base32: capitals and digits 2-7), as short as they come, and of 160 bits.
        ("api", "key_env", "JBSWY3DPEHPK3PXP"),
        ("unsubscribe", "secret_env", "GASF2H7NCGGOQPMVJIEW7EIOWE3DJFPO"),
    ],
)
def test_a_secret_pasted_as_a_variable_name_is_refused_without_echo(api, cli, tmp_path, table, key, pasted):
    """`key_env = "<the key>"`: exit 78, one line naming the key and not repeating the value."""
    text = MANIFEST.replace("[recipients]", f'[api]\nkey_env = "{pasted}"\n\n[recipients]')
    if table == "unsubscribe":
        text = MANIFEST.replace("[[senders]]", f'secret_env = "{pasted}"\n\n[[senders]]')
    api.add_grant("grant-alice", "alice@corp.example.com")
    for command in ("run", "preview", "status"):
        result = cli(command, _write(tmp_path, manifest=text), *(["--yes"] if command == "run" else []))
        assert result.exit_code == 78, result.output
        assert _one_error_line(result) == (
            f"error: campaign.toml: {table}.{key}: the value does not look like an environment variable "
            "name (capitals, digits and '_', e.g. MY_VAR); put the NAME of the variable here, never the "
            "secret itself"
        )
        assert pasted not in result.output
        assert pasted.lower() not in result.output.lower()
    assert api.requests == []
    assert not list(tmp_path.glob("*.sqlite*"))


@pytest.mark.parametrize(
    ("command", "option", "pasted"),
    [
        (("unsubscribe", "serve"), "--secret-env", "s3cr3t-VALUE"),
        (("unsubscribe", "serve"), "--secret-env", "A8F3KL9QZ2XV7MN4PR6TY1WB5CD0EG8HQ"),
        (("serve",), "--webhook-secret-env", "E3B0C44298FC1C149AFBF4C8996FB92427AE41E4"),
    ],
)
def test_a_secret_pasted_as_secret_env_of_the_endpoint_is_refused_without_echo(
    cli, tmp_path, command, option, pasted
):
    """`unsubscribe serve --secret-env <the secret>`: exit 2, one line, the value not repeated, no store;
    also a secret in capitals and digits, which is written as a variable's name is."""
    result = cli(*command, "--store", tmp_path / "u.sqlite", option, pasted)
    assert result.exit_code == 2, result.output
    assert _one_error_line(result) == (
        f"error: {option}: the value does not look like an environment variable name (capitals, digits "
        "and '_', e.g. MY_VAR); put the NAME of the variable here, never the secret itself"
    )
    assert pasted.lower() not in result.output.lower()
    assert not (tmp_path / "u.sqlite").exists()


# ---- 17b: a secret pasted into a key that takes a value, not a variable's name ---------------------

NOT_SHOWN = "(a value that looks like a secret, not shown)"
# What a user may paste into the wrong key: the API key and the unsubscribe secret the environment holds
# (the `api` fixture exports them), a Nylas key the environment does not hold, a random token.
PASTED = {
    "the API key": API_KEY,
    "the unsubscribe secret": SECRET,
    "another Nylas key": "nyk_v0_Xq3PwLm9RtZ2KsVb7YhN4CdJ8FgU1oEa6TiW0rQyHs5",
    "a random token": "Zt4q9XbL2mWv7RcK1pNs8YdF3hJ6gQa0EuTo5LiBk",
}
# Where it lands: (the manifest edited, the exit code, the error line with NOT_SHOWN for the value).
WRONG_KEYS = {
    "api.uri": (
        ("[recipients]", '[api]\nuri = "{pasted}"\n\n[recipients]'),
        78,
        f"error: campaign.toml: api.uri: {NOT_SHOWN} must be an https:// URL such as https://api.us.nylas.com",
    ),
    "senders.email": (
        ('email = "alice@corp.example.com"', 'email = "{pasted}"'),
        78,
        f"error: campaign.toml: senders[1].email: {NOT_SHOWN} is not a valid address (An email address "
        "must have an @-sign)",
    ),
    "message.reply_to": (
        ('html = "message.html.j2"', 'html = "message.html.j2"\nreply_to = "{pasted}"'),
        78,
        f"error: campaign.toml: message.reply_to: {NOT_SHOWN} is not a valid address (An email address "
        "must have an @-sign)",
    ),
    "unsubscribe.mailto": (
        ("[[senders]]", 'mailto = "{pasted}"\n\n[[senders]]'),
        78,
        f"error: campaign.toml: unsubscribe.mailto: {NOT_SHOWN} is not a valid address (An email address "
        "must have an @-sign)",
    ),
    "recipients.delimiter": (
        ('name_column = "name"', 'name_column = "name"\ndelimiter = "{pasted}"'),
        78,
        f'error: campaign.toml: recipients.delimiter: {NOT_SHOWN} must be one character, e.g. ";" or "\\t"',
    ),
    "recipients.source": (
        ('source = "recipients.csv"', 'source = "{pasted}"'),
        65,
        f"error: {NOT_SHOWN}: unknown file type '(none)'; use a .csv or .parquet file",
    ),
    "recipients.source (.csv)": (
        ('source = "recipients.csv"', 'source = "{pasted}.csv"'),
        66,
        f"error: {NOT_SHOWN}: recipient list not found; check the path in the manifest",
    ),
    "recipients.suppress": (
        ('name_column = "name"', 'name_column = "name"\nsuppress = ["{pasted}"]'),
        66,
        f"error: {NOT_SHOWN}: suppression list not found; check the path in the manifest",
    ),
}


def _assert_not_shown(result, secret: str) -> None:
    for output in (result.stdout, result.stderr):
        assert secret not in output
        assert secret.lower() not in output.lower()
        assert "nyk_" not in output


@pytest.mark.parametrize("what", list(PASTED))
@pytest.mark.parametrize("key", list(WRONG_KEYS))
def test_a_secret_pasted_into_a_wrong_key_is_never_echoed(api, cli, tmp_path, key, what):
    """A key or secret in api.uri, an address, the delimiter or a list's path: the exit code and the line
    that key's error always has, with the value not shown."""
    (old, new), code, line = WRONG_KEYS[key]
    pasted = PASTED[what]
    manifest = _write(tmp_path, manifest=MANIFEST.replace(old, new.format(pasted=pasted)))
    api.add_grant("grant-alice", "alice@corp.example.com")
    for result in _preview_and_run(cli, manifest):
        assert result.exit_code == code, result.output
        assert _one_error_line(result) == line
        _assert_not_shown(result, pasted)
    assert not api.deliveries


def test_the_secret_of_a_variable_the_manifest_names_is_never_echoed(api, cli, tmp_path, monkeypatch):
    """A key of any form is known by its variable: the one api.key_env names, when set."""
    key = "acme-plain-words-api-key-of-ours"  # no Nylas prefix, nothing random about it: only its variable
    monkeypatch.setenv("ACME_NYLAS_KEY", key)
    text = MANIFEST.replace(
        "[recipients]", f'[api]\nkey_env = "ACME_NYLAS_KEY"\nuri = "{key}"\n\n[recipients]'
    )
    result = cli("preview", _write(tmp_path, manifest=text))
    assert result.exit_code == 78, result.output
    assert _one_error_line(result) == (
        f"error: campaign.toml: api.uri: {NOT_SHOWN} must be an https:// URL such as https://api.us.nylas.com"
    )
    _assert_not_shown(result, key)


# Keys whose text campaign shows (preview, report) or sends (headers, the From name, the link): a secret
# pasted there passes their own checks, so it is refused as a secret, by its key.
SHOWN_KEYS = {
    "campaign.name": ('name = "safety"', 'name = "{pasted}"'),
    "senders[1].name": ('name = "alice"', 'name = "{pasted}"'),
    "senders[1].from_name": ("per_second = 50", 'per_second = 50\nfrom_name = "Ann {pasted}"'),
    "message.subject": ('subject = "Hello {{ first_name }}"', 'subject = "Hello {pasted}"'),
    'message.headers."X-Campaign"': (
        'html = "message.html.j2"',
        'html = "message.html.j2"\nheaders = {{ "X-Campaign" = "{pasted}" }}',
    ),
    f"message.headers.{NOT_SHOWN}": (
        'html = "message.html.j2"',
        'html = "message.html.j2"\nheaders = {{ "{pasted}" = "x" }}',
    ),
    "unsubscribe.url": ("u/{{ unsubscribe_token }}", "u/{{{{ unsubscribe_token }}}}?k={pasted}"),
}


@pytest.mark.parametrize("what", ["the API key", "the unsubscribe secret", "another Nylas key"])
@pytest.mark.parametrize("key", list(SHOWN_KEYS))
def test_a_secret_pasted_into_a_key_that_is_shown_or_sent_is_refused(api, cli, tmp_path, key, what):
    """A secret that would pass a key's own check (a name, a subject, a header, the link) is refused by its
    key, exit 78, not shown; nothing is sent and no ledger is written."""
    old, new = SHOWN_KEYS[key]
    text = MANIFEST.replace(old, new.format(pasted=PASTED[what]), 1)
    assert text != MANIFEST
    manifest = _write(tmp_path, manifest=text)
    api.add_grant("grant-alice", "alice@corp.example.com")
    for result in _preview_and_run(cli, manifest):
        assert result.exit_code == 78, result.output
        assert _one_error_line(result) == (
            f"error: campaign.toml: {key}: holds a secret (an API key, or the value of a secret variable "
            "such as NYLAS_API_KEY), which would be shown and sent; remove it: secrets live only in "
            "environment variables"
        )
        _assert_not_shown(result, PASTED[what])
    assert not api.deliveries
    assert not list(tmp_path.glob("*.sqlite*"))


def test_a_random_looking_name_is_no_secret(api, cli, tmp_path):
    """Only a known secret or a Nylas key is refused: a campaign named by a random hex id still runs."""
    manifest = _write(
        tmp_path, manifest=MANIFEST.replace('name = "safety"', 'name = "c0ffee00d15ea5e0123456789abcdef0"')
    )
    api.add_grant("grant-alice", "alice@corp.example.com")
    result = cli("run", manifest, "--yes")
    assert result.exit_code == 0, result.output
    assert len(api.deliveries) == 2


@pytest.mark.parametrize("what", ["the API key", "the unsubscribe secret", "another Nylas key"])
def test_a_secret_in_a_list_cell_is_named_by_row_and_column_and_never_kept(api, cli, tmp_path, what):
    """A list cell holding a secret stops the run like any bad cell (exit 65, its row and column named, the
    value not shown); with --skip-invalid the other rows are sent, and neither the messages, the preview,
    the ledger nor the report holds the secret."""
    pasted = PASTED[what]
    csv = CSV.replace("Bob Stone,Bob", f"Bob Stone,Bob {pasted} x")
    manifest = _write(tmp_path, manifest=MANIFEST.replace("<p>Hi</p>", "<p>Hi {{ first_name }}</p>"), csv=csv)
    api.add_grant("grant-alice", "alice@corp.example.com")
    for result in _preview_and_run(cli, manifest):
        assert result.exit_code == 65, result.output
        assert 'row 2, column "first_name": holds a secret' in result.output
        _assert_not_shown(result, pasted)
    assert not api.deliveries
    result = cli("preview", manifest, "--skip-invalid", "--out", tmp_path / "site")
    assert result.exit_code == 0, result.output
    _assert_not_shown(result, pasted)
    result = cli("run", manifest, "--yes", "--skip-invalid")
    assert result.exit_code == 0, result.output
    _assert_not_shown(result, pasted)
    assert [d.payload["to"][0]["email"] for d in api.deliveries] == ["ann@example.com"]
    report = cli("report", manifest, "--out", tmp_path / "report.csv")
    assert report.exit_code == 0, report.output
    written = [
        p for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".j2" and p.name != "recipients.csv"
    ]
    assert any(p.suffix == ".sqlite" for p in written)
    for path in written:
        assert pasted.encode() not in path.read_bytes(), path
        assert b"nyk_" not in path.read_bytes(), path


def test_a_short_secret_is_refused_as_a_whole_cell_only(api, cli, tmp_path, monkeypatch):
    """A short secret (a database password may be an everyday word) is one only as a cell's whole value."""
    monkeypatch.setenv("PGPASSWORD", "hunter2")
    csv = CSV.replace("Ann Lee,Ann", "Ann Lee,hunter2 fan").replace("Bob Stone,Bob", "Bob Stone, hunter2 ")
    manifest = _write(tmp_path, csv=csv)
    result = cli("preview", manifest)
    assert result.exit_code == 65, result.output
    assert 'row 2, column "first_name": holds a secret' in result.output
    assert "Hello hunter2 fan" in result.output  # row 1: the word inside a longer value is no secret
    assert re.search(r"rows with problems\s*│ 1 ", result.output)


@pytest.mark.parametrize("named", [False, True])
def test_the_error_printer_masks_a_secret_any_message_repeats(api, cli, tmp_path, monkeypatch, named):
    """The last check: a message that repeats a secret's value (here a list file named after it, which
    exists and is refused for its content) is printed with the value masked, for the variables campaign
    knows of (NYLAS_API_KEY, the unsubscribe secret's, …) and those the manifest names."""
    secret, text = SECRET, MANIFEST
    if named:
        secret = "acme-plain-words-api-key-of-ours"
        monkeypatch.setenv("ACME_NYLAS_KEY", secret)
        text = MANIFEST.replace("[recipients]", '[api]\nkey_env = "ACME_NYLAS_KEY"\n\n[recipients]')
    manifest = _write(tmp_path, manifest=text.replace("recipients.csv", f"{secret}.csv"))
    (tmp_path / f"{secret}.csv").write_bytes(b"\xff\xfe" + CSV.encode("utf-16-le"))
    result = cli("preview", manifest)
    assert result.exit_code == 65, result.output
    said = 'error: ***.csv: is UTF-16 text; save it as "CSV UTF-8" (comma delimited)'
    assert _one_error_line(result) == said
    _assert_not_shown(result, secret)


@pytest.mark.parametrize("pasted", [API_KEY, "nyk_v0_Xq3PwLm9RtZ2KsVb7YhN4CdJ8FgU1oEa6TiW0rQyHs5"])
def test_a_debug_traceback_never_shows_a_secret_either(api, cli, tmp_path, pasted):
    """--debug prints the traceback (pydantic's own text repeats the value given): masked too."""
    text = MANIFEST.replace("[recipients]", f'[api]\nuri = "{pasted}"\n\n[recipients]')
    result = cli("--debug", "preview", _write(tmp_path, manifest=text))
    assert result.exit_code == 78
    assert "Traceback" in result.stderr
    _assert_not_shown(result, pasted)


# ---- 18: extreme limits ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "key", "said"),
    [
        ("per_second = inf", "senders[1].per_second", "must be a finite number (got inf)"),
        ("per_second = -inf", "senders[1].per_second", "must be a finite number (got -inf)"),
        ("per_second = nan", "senders[1].per_second", "must be a finite number (got nan)"),
        (
            "per_second = 1e-300",
            "senders[1].per_second",
            "must be between 1.16e-05 (one send a day) and 1000 (got 1e-300)",
        ),
        (
            "per_second = 1e300",
            "senders[1].per_second",
            "must be between 1.16e-05 (one send a day) and 1000 (got 1e+300)",
        ),
        (
            "per_minute = 1e-10",
            "senders[1].per_minute",
            "must be between 0.000694 (one send a day) and 60000 (got 1e-10)",
        ),
        ("per_minute = inf", "senders[1].per_minute", "must be a finite number (got inf)"),
        (
            "per_second = 50\nburst = 9223372036854775807",
            "senders[1].burst",
            "must be less than or equal to 10000 (got 9223372036854775807)",
        ),
        (
            "per_second = 50\nper_day = 9223372036854775807",
            "senders[1].per_day",
            "must be less than or equal to 10000000 (got 9223372036854775807)",
        ),
        (
            "per_second = 50\nper_day_messages = 100000000000",
            "senders[1].per_day_messages",
            "must be less than or equal to 10000000 (got 100000000000)",
        ),
        ("per_second = 50\n[api]\ntimeout_s = nan", "api.timeout_s", "must be a finite number (got nan)"),
        (
            "per_second = 50\n[api]\ntimeout_s = 1e-300",
            "api.timeout_s",
            "must be greater than or equal to 1 (got 1e-300)",
        ),
    ],
)
def test_extreme_limits_are_refused_with_the_key_named(api, cli, tmp_path, line, key, said):
    """inf, nan, 1e-300 and huge values: exit 78 naming the key; no overflow, no hang, nothing sent."""
    manifest = _write(tmp_path, manifest=MANIFEST.replace("per_second = 50", line))
    api.add_grant("grant-alice", "alice@corp.example.com")
    for result in _preview_and_run(cli, manifest):
        assert result.exit_code == 78, result.output
        assert _one_error_line(result) == f"error: campaign.toml: {key}: {said}"
    assert api.requests == []
    assert not list(tmp_path.glob("*.sqlite*"))


# ---- 11: spreadsheet formulas in CSV output ----------------------------------------------------------

FORMULAS = ["=HYPERLINK(1)", "k1", "+1+2", "k3", "-3+4", "k5", "@SUM(A1)"]


def test_report_and_suppress_export_csv_neutralise_formulas_and_parquet_keeps_them(api, cli, tmp_path):
    """A cell starting with = + - @ TAB CR is written with a leading ' in CSV; Parquet keeps it raw."""
    keys = FORMULAS
    rows = "".join(f"n{n}@example.com,N{n},N{n},{key}\n" for n, key in enumerate(keys))
    text = MANIFEST.replace('name_column = "name"', 'name_column = "name"\nkey_column = "id"')
    manifest = _write(tmp_path, manifest=text, csv="email,name,first_name,id\n" + rows)
    api.add_grant("grant-alice", "alice@corp.example.com")
    assert cli("run", manifest, "--yes").exit_code == 0
    assert cli("report", manifest, "--out", tmp_path / "r.csv").exit_code == 0
    assert cli("report", manifest, "--out", tmp_path / "r.parquet").exit_code == 0
    written = pl.read_csv(tmp_path / "r.csv", infer_schema=False)
    assert written["key"].to_list() == ["'" + k if k[0] in "=+-@\t\r" else k for k in keys]
    assert pl.read_parquet(tmp_path / "r.parquet")["key"].to_list() == keys
    # The store's export: an address added by hand starting with '=' or '-' is a valid address.
    store = tmp_path / "u.sqlite"
    addresses = ("=cmd@example.com", "-x@example.com", "ok@example.com")
    added = cli("suppress", "add", "--store", store, "--", *addresses)
    assert added.exit_code == 0, added.output
    assert cli("suppress", "export", tmp_path / "s.csv", "--store", store).exit_code == 0
    assert cli("suppress", "export", tmp_path / "s.parquet", "--store", store).exit_code == 0
    exported = pl.read_csv(tmp_path / "s.csv", infer_schema=False)
    assert sorted(exported["email"].to_list()) == ["'-x@example.com", "'=cmd@example.com", "ok@example.com"]
    raw = pl.read_parquet(tmp_path / "s.parquet")["email"].to_list()
    assert sorted(raw) == ["-x@example.com", "=cmd@example.com", "ok@example.com"]


def test_tab_and_cr_starts_are_neutralised_too():
    """The list loader strips cells, so TAB and CR starts reach a CSV only through e.g. an API error text."""
    frame = pl.DataFrame({"a": ["\tx", "\rx", "x=1", None], "n": [-1, 2, 3, 4]})
    assert neutralise_formulas(frame).to_dict(as_series=False) == {
        "a": ["'\tx", "'\rx", "x=1", None],
        "n": [-1, 2, 3, 4],
    }


# ---- 19: private files ----------------------------------------------------------------------------


def test_files_holding_tokens_or_personal_data_are_owner_only(api, cli, tmp_path):
    """Preview site, report and sandbox outbox: files 0600, the folders made for them 0700."""
    manifest = _write(tmp_path, template='<p>Hi {{ first_name }} <a href="{{ unsubscribe_url }}">x</a></p>\n')
    api.add_grant("grant-alice", "alice@corp.example.com")
    assert cli("preview", manifest).exit_code == 0
    site = tmp_path / "campaign.preview"
    assert _mode(site) == 0o700
    files = [path for path in site.rglob("*") if path.is_file()]
    assert files
    assert {_mode(path) for path in files} == {0o600}
    assert {_mode(path) for path in site.rglob("*") if path.is_dir()} == {0o700}
    assert cli("run", manifest, "--sandbox", "--yes").exit_code == 0
    outbox = tmp_path / "campaign.sandbox" / "outbox"
    assert _mode(outbox) == 0o700
    assert {_mode(path) for path in outbox.iterdir()} == {0o600}
    assert len(list(outbox.iterdir())) == 4  # a JSON payload and an HTML body per recipient
    for name in ("r.csv", "r.parquet"):
        (tmp_path / name).write_text("old, world-readable\n")
        (tmp_path / name).chmod(0o644)
        assert cli("report", manifest, "--sandbox", "--out", tmp_path / name).exit_code == 0
        assert _mode(tmp_path / name) == 0o600
    assert pl.read_csv(tmp_path / "r.csv")["email"].to_list() == ["ann@example.com", "bob@example.com"]


def test_report_and_export_refuse_a_symlink_at_the_file_they_write(api, cli, tmp_path):
    """`report --out` and `suppress export` onto a link: exit 66, one line naming it; the file it
    points at keeps its bytes and mode."""
    manifest = _write(tmp_path)
    api.add_grant("grant-alice", "alice@corp.example.com")
    assert cli("run", manifest, "--yes").exit_code == 0
    store = tmp_path / "u.sqlite"
    assert cli("suppress", "add", "--store", store, "ann@example.com").exit_code == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("victim\n")
    victim.chmod(0o644)
    for name, command in (
        ("r.csv", ("report", manifest, "--out")),
        ("r.parquet", ("report", manifest, "--out")),
        ("s.csv", ("suppress", "export", "--store", store)),
        ("s.txt", ("suppress", "export", "--store", store)),
    ):
        link = tmp_path / name
        link.symlink_to(victim)
        result = cli(*command, link)
        assert result.exit_code == 66, result.output
        assert f"{link} is a symbolic link" in _one_error_line(result)
        assert victim.read_text() == "victim\n"
        assert _mode(victim) == 0o644


def test_a_symlink_swapped_in_after_the_check_is_not_followed(tmp_path, monkeypatch):
    """The open itself refuses a link (O_NOFOLLOW), for a link the check before it did not see."""
    victim = tmp_path / "victim.txt"
    victim.write_text("victim\n")
    victim.chmod(0o644)
    link = tmp_path / "out.csv"
    link.symlink_to(victim)
    monkeypatch.setattr(Path, "is_symlink", lambda _self: False)  # as if the link came after the check
    with pytest.raises(OSError, match=r"symbolic link") as raised:
        write_private_bytes(link, b"data")
    assert raised.value.errno == errno.ELOOP
    folder = tmp_path / "messages"
    folder.symlink_to(tmp_path)
    with pytest.raises(OSError, match=r"symbolic link|Not a directory") as raised:
        open_private_folder(folder)  # Linux says ENOTDIR for O_DIRECTORY | O_NOFOLLOW on a link
    assert raised.value.errno in {errno.ELOOP, errno.ENOTDIR}
    monkeypatch.undo()
    assert victim.read_text() == "victim\n"
    assert _mode(victim) == 0o644


# ---- 10: a value in a Markdown body stays literal text ----------------------------------------------

MARKDOWN_MANIFEST = """\
[campaign]
name = "{name}"

[recipients]
source = "recipients.parquet"

[message]
subject = "News"
markdown = "body.md.j2"
layout = "layout.html.j2"

[[senders]]
name = "alice"
grant_id = "grant-alice"
email = "alice@corp.example.com"
per_second = 1000
burst = 100
concurrency = 8
"""
# The value in every Markdown context a template puts it: heading, paragraph start and middle,
# emphasis, link text and destination, list item, table cell, blockquote, raw HTML attribute.
MARKDOWN_BODY = """\
# Title {{ v }}

{{ v }}

Hello {{ v }}, **{{ v }}** and *{{ v }}*.

[{{ v }}](https://example.com/{{ v|urlencode }}) and <span title="{{ v }}">{{ v }}</span>

- item {{ v }}
- {{ v }}

| a | b |
|---|---|
| {{ v }} | x |

> {{ v }}
"""
MARKER = "VALUEMARKER"
_HTML_TEXT_CHARACTERS = st.characters(
    exclude_categories=["Cs"],
    exclude_characters="".join(
        chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)] if chr(c) not in "\t\n\x0c\r"
    ),
)


class _Parsed(HTMLParser):
    """The elements and attributes of an HTML body, and its text (as a reader sees it)."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[object] = []
        self.text: list[str] = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, sorted(name for name, _ in attrs)))
        self.text.extend(f"[{name}={value}]" for name, value in sorted(attrs) if name != "href")

    def handle_endtag(self, tag):
        self.tags.append(f"/{tag}")

    def handle_data(self, data):
        self.text.append(data)


def _send_markdown(cli, api, folder: Path, values: list[str]) -> dict[str, str]:
    """Run a Markdown campaign over `values` (column v) and return the HTML body each address got."""
    folder.mkdir()
    (folder / "campaign.toml").write_text(MARKDOWN_MANIFEST.format(name=folder.name), encoding="utf-8")
    (folder / "body.md.j2").write_text(MARKDOWN_BODY, encoding="utf-8")
    (folder / "layout.html.j2").write_text("<div>{% block content %}{% endblock %}</div>", encoding="utf-8")
    emails = [f"r{n}@example.com" for n in range(len(values))]
    pl.DataFrame({"email": emails, "v": values}).write_parquet(folder / "recipients.parquet")
    before = len(api.deliveries)
    result = cli("run", folder / "campaign.toml", "--yes")
    assert result.exit_code == 0, result.output
    delivered = api.deliveries[before:]
    assert len(delivered) == len(values)  # counted at the fake: every row mailed once
    return {d.payload["to"][0]["email"]: d.payload["body"] for d in delivered}


def test_markdown_lookalikes_from_the_list_are_sent_as_text(api, cli, tmp_path):
    """The reported cells: no link, no remote image, no heading, no bold in what is sent."""
    api.add_grant("grant-alice", "alice@corp.example.com")
    values = ["[Verify](https://evil.example/login)", "![](https://tracker.example/p.gif)", "# Suspended"]
    values += ["**URGENT**", "<script>x</script>", "line\n\n    code", "a  \nb", "1. one", "x | y"]
    bodies = _send_markdown(cli, api, tmp_path / "reported", values)
    reference = _Parsed(_send_markdown(cli, api, tmp_path / "reference", [MARKER])["r0@example.com"])
    for number, value in enumerate(values):
        parsed = _Parsed(bodies[f"r{number}@example.com"])
        assert parsed.tags == reference.tags, value
        assert "".join(parsed.text) == "".join(reference.text).replace(MARKER, value)
        assert "evil.example" not in str(parsed.tags)
        assert "tracker" not in str(parsed.tags)


def test_markdown_values_stay_text_when_jinja_compiles_with_its_own_code_generator(
    api, cli, tmp_path, monkeypatch
):
    """The stock-Jinja fallback (private hooks missing) sends exactly the bodies the fast path sends."""
    api.add_grant("grant-alice", "alice@corp.example.com")
    values = ["[Verify](https://evil.example/login)", "# Suspended", "**URGENT**", "<b>x</b> & 'y'", "a\n\nb"]
    fast = _send_markdown(cli, api, tmp_path / "fast", values)
    monkeypatch.setattr(templating._Environment, "code_generator_class", CodeGenerator)
    stock = _send_markdown(cli, api, tmp_path / "stock", values)
    assert stock == fast
    assert "[Verify](https://evil.example/login)</p>" in stock["r0@example.com"]  # text, not a link
    assert 'href="https://evil' not in "".join(stock.values())


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(values=st.lists(st.text(_HTML_TEXT_CHARACTERS, min_size=1), min_size=1, max_size=12))
def test_any_value_in_a_markdown_body_reaches_the_reader_as_literal_text(api, cli, tmp_path, values):
    """Over arbitrary strings: the sent HTML has exactly the template's elements and attributes, and
    its text is the template's with each value, character for character. Characters HTML text cannot
    hold (NUL and other control characters but TAB, LF, FF, CR) are left out; so is an empty value:
    it adds no text, so `**{{ v }}**` is the template's own `****`."""
    api.add_grant("grant-alice", "alice@corp.example.com")
    folders = [path for path in tmp_path.iterdir() if path.name.startswith("c")]
    bodies = _send_markdown(cli, api, tmp_path / f"c{len(folders)}", [MARKER, *values])
    reference = _Parsed(bodies["r0@example.com"])
    for number, value in enumerate(values, start=1):
        parsed = _Parsed(bodies[f"r{number}@example.com"])
        assert parsed.tags == reference.tags
        assert "".join(parsed.text) == "".join(reference.text).replace(MARKER, value)


# ---- 12: terminal escapes; 14: long values ---------------------------------------------------------

ESCAPE_MANIFEST = MANIFEST.replace('subject = "Hello {{ first_name }}"', 'subject = "Hello"')


def test_preview_shows_control_characters_and_markup_from_the_list_as_text(api, cli, tmp_path):
    """ESC/BEL sequences and rich markup in cells reach the terminal spelled out, never raw or styled."""
    cell = "Ann \x1b]0;owned\x07 [bold red]B[/] \u202etxt"
    csv = f'email,name,first_name\nann@example.com,Ann,"{cell}"\nbad\x1b[31m@,Bob,Bob\n'
    manifest = _write(tmp_path, manifest=ESCAPE_MANIFEST, csv=csv, template="<p>Hi {{ first_name }}</p>\n")
    result = cli("preview", manifest)
    assert result.exit_code == 65, result.output
    assert not {"\x1b", "\x07", "\u202e"} & set(result.output)
    assert r"Hi Ann \x1b]0;owned\x07 [bold red]B[/] \u202etxt" in result.output  # the sample body
    assert r"bad\x1b[31m@" in result.output  # the address column of the problems table
    assert api.requests == []


def test_suppress_list_shows_control_characters_as_text(cli, tmp_path):
    """A key with an escape sequence, as a store holds it, is listed spelled out."""
    store = tmp_path / "u.sqlite"
    assert cli("suppress", "add", "--store", store, "--key", "k\x1b[2J[blink]x").exit_code == 0
    result = cli("suppress", "list", "--store", store)
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output
    assert result.output.splitlines()[0].endswith(r"  manual     -                     k\x1b[2J[blink]x")


def test_preview_cuts_a_long_value_and_refuses_a_long_display_name(api, cli, tmp_path):
    """A 1 MB cell is printed cut with an ellipsis; a 1 MB display name is a row error naming the column."""
    huge = "x" * 1_000_000
    csv = f"email,name,first_name\nann@example.com,Ann,{huge}\nbob@example.com,{huge},Bob\n{huge}@,C,C\n"
    manifest = _write(tmp_path, manifest=ESCAPE_MANIFEST, csv=csv, template="<p>{{ first_name }}</p>\n")
    result = cli("preview", manifest)
    assert result.exit_code == 65
    assert len(result.output) < 20_000  # row 3's 1 MB address too is cut in the problems table
    unwrapped = result.output.replace("\n", "")
    assert "x" * 600 + "…" in unwrapped  # the sample body, cut
    assert "x" * 601 not in unwrapped
    cells = result.output.replace("│", " ").split()
    assert "1,000,000" in cells  # row 2's problem: its name, wrapped in its table cell
    run = cli("run", manifest, "--yes")
    assert run.exit_code == 65
    assert _one_error_line(run) == (
        'error: recipients.csv row 2, column "name": the display name is 1,000,000 characters, more than '
        "256; check that the column holds names; fix or remove the row, or run with --skip-invalid (and 1 "
        "more; `campaign preview` lists them all); nothing was sent"
    )
    assert api.requests == []


# ---- 13: Parquet types and UTF-16 ----------------------------------------------------------------

PARQUET_MANIFEST = (
    MANIFEST.replace('source = "recipients.csv"', 'source = "recipients.parquet"')
    .replace("[unsubscribe]\n", "")
    .replace('url = "https://example.com/u/{{ unsubscribe_token }}"\n', "")
)


def test_parquet_binary_dates_and_numbers_are_sent_as_deliberate_text(api, cli, tmp_path):
    """Binary as UTF-8, dates as ISO 8601, numbers as numbers: never `b'Cat'` or a Python repr."""
    manifest = _write(
        tmp_path,
        manifest=PARQUET_MANIFEST,
        template="<p>{{ first_name }} {{ joined }} {{ seen }} {{ visits }} {{ score }}</p>\n",
    )
    pl.DataFrame(
        {
            "email": [b"cat@example.com"],
            "name": [b"Cat Stevens"],
            "first_name": [b"Cat"],
            "joined": [date(2024, 5, 1)],
            "seen": [datetime(2024, 5, 1, 9, 30, tzinfo=UTC)],
            "visits": [3],
            "score": [2.5],
        }
    ).write_parquet(tmp_path / "recipients.parquet")
    api.add_grant("grant-alice", "alice@corp.example.com")
    result = cli("run", manifest, "--yes")
    assert result.exit_code == 0, result.output
    [delivery] = api.deliveries
    assert delivery.payload["to"] == [{"email": "cat@example.com", "name": "Cat Stevens"}]
    assert delivery.payload["subject"] == "Hello Cat"
    assert delivery.payload["body"] == "<p>Cat 2024-05-01 2024-05-01T09:30:00+00:00 3 2.5</p>\n"


@pytest.mark.parametrize(
    ("column", "said"),
    [
        (
            pl.Series("name", [b"Ann", b"\xffB"], dtype=pl.Binary),
            'recipients.parquet: column "name": row 2 holds binary data that is not UTF-8 text; store the '
            "column as UTF-8 text and export the list again",
        ),
        (
            pl.Series("name", [{"first": "Ann", "last": "Lee"}, {"first": "Bob", "last": "Stone"}]),
            "recipients.parquet: column \"name\" holds nested values (Struct({'first': String, 'last': "
            "String})), not text; flatten it into text columns (e.g. first_name, last_name) and export the "
            "list again",
        ),
        (
            pl.Series("name", [["Ann"], ["Bob"]]),
            'recipients.parquet: column "name" holds nested values (List(String)), not text; flatten it into '
            "text columns (e.g. first_name, last_name) and export the list again",
        ),
    ],
)
def test_parquet_columns_without_one_text_form_are_refused(api, cli, tmp_path, column, said):
    """Non-UTF-8 binary, struct and list columns: exit 65, one line naming file, column (and row)."""
    manifest = _write(tmp_path, manifest=PARQUET_MANIFEST)
    emails = pl.Series("email", ["ann@example.com", "bob@example.com"])
    pl.DataFrame([emails, column, pl.Series("first_name", ["Ann", "Bob"])]).write_parquet(
        tmp_path / "recipients.parquet"
    )
    api.add_grant("grant-alice", "alice@corp.example.com")
    for result in _preview_and_run(cli, manifest):
        assert result.exit_code == 65, result.output
        assert _one_error_line(result) == f"error: {said}"
    assert api.requests == []
    assert not list(tmp_path.glob("*.sqlite*"))


def test_a_utf16_csv_without_a_byte_order_mark_is_refused_in_one_line(api, cli, tmp_path):
    """UTF-16 without BOM is valid UTF-8 full of NULs: refused naming the file, never sent with NULs."""
    manifest = _write(tmp_path)
    (tmp_path / "recipients.csv").write_bytes(CSV.encode("utf-16-le"))
    api.add_grant("grant-alice", "alice@corp.example.com")
    result = cli("run", manifest, "--yes")
    assert result.exit_code == 65, result.output
    assert _one_error_line(result) == (
        "error: recipients.csv: holds NUL bytes, so it is UTF-16 text without a byte order mark (or not "
        'text); save it as "CSV UTF-8" (comma delimited)'
    )
    assert api.requests == []


@pytest.mark.parametrize("rows", [1, 5_000])  # in the first 4 KB (the UTF-16 test reads them), or far past
def test_one_stray_nul_in_a_cell_is_named_by_row_and_column_not_taken_for_utf16(api, cli, tmp_path, rows):
    """A NUL in one cell is a control character to remove, named by its row and column; nothing is sent,
    whether it is near the start of the file or deep in it."""
    filler = "".join(f"r{n}@example.com,R {n},R\n" for n in range(rows))
    csv = f"email,name,first_name\n{filler}bob@example.com,Bob Stone,Bo\x00b\n"
    manifest = _write(tmp_path, csv=csv)
    api.add_grant("grant-alice", "alice@corp.example.com")
    for result in _preview_and_run(cli, manifest):
        assert result.exit_code == 65, result.output
        assert _one_error_line(result) == (
            f'error: recipients.csv: row {rows + 1}, column "first_name" (line {rows + 2}): holds a NUL byte '
            "(U+0000), a control character; remove it and save the file again"
        )
    assert api.requests == []
    assert not list(tmp_path.glob("*.sqlite*"))


def test_a_huge_cell_is_a_row_problem_before_anything_is_sent(api, cli, tmp_path):
    """A message with no attachments whose list cell takes it past Nylas's 25 MB is refused in the check,
    naming the row (it failed at send time, after the other rows had gone out, and --skip-invalid could
    not skip it)."""
    csv = (
        "email,name,first_name,note\nann@example.com,Ann,Ann,hi\nbob@example.com,Bob,Bob," + "x" * 26_000_000
    )
    manifest = _write(tmp_path, csv=csv + "\ncat@example.com,Cat,Cat,hi\n", template="<p>{{ note }}</p>\n")
    api.add_grant("grant-alice", "alice@corp.example.com")
    result = cli("run", manifest, "--yes")
    assert result.exit_code == 65, result.output
    assert "row 2: the message comes to 26.0 MB; Nylas sends at most 25 MB per message" in result.output
    assert not api.deliveries
    result = cli("run", manifest, "--yes", "--skip-invalid")
    assert result.exit_code == 0, result.output
    assert sorted(d.payload["to"][0]["email"] for d in api.deliveries) == [
        "ann@example.com",
        "cat@example.com",
    ]


@pytest.mark.parametrize("configured", [False, True])
def test_a_list_column_named_unsubscribe_url_never_becomes_the_link(api, cli, tmp_path, configured):
    """`unsubscribe_url` is campaign's own: with [unsubscribe] the signed link, without it not defined. A
    column of that name (here a javascript: URL) never reaches the footer's href."""
    text = (
        MANIFEST
        if configured
        else MANIFEST.replace('[unsubscribe]\nurl = "https://example.com/u/{{ unsubscribe_token }}"\n', "")
    )
    assert ("[unsubscribe]" in text) is configured
    csv = "email,name,first_name,unsubscribe_url\nann@example.com,Ann,Ann,javascript:alert(document.cookie)\n"
    link = '<a href="{{ unsubscribe_url }}">Unsubscribe</a>'
    footer = "<p>Hi</p>{% if unsubscribe_url is defined %}" + link + "{% endif %}\n"
    manifest = _write(tmp_path, manifest=text, csv=csv, template=footer)
    api.add_grant("grant-alice", "alice@corp.example.com")
    result = cli("run", manifest, "--yes")
    assert result.exit_code == 0, result.output
    (delivery,) = api.deliveries
    body = delivery.payload["body"]
    assert "javascript:" not in body
    assert ('<a href="https://example.com/u/' in body) is configured
    assert ("Unsubscribe" in body) is configured


def test_a_header_value_over_32_kb_is_a_row_problem(api, cli, tmp_path):
    """Gmail bounces a message whose single header value passes 32 KB (552 5.3.4): a list cell rendered
    into a custom header is refused in the check, naming the row and the header."""
    text = MANIFEST.replace(
        'html = "message.html.j2"', 'html = "message.html.j2"\nheaders = { "X-Ref" = "{{ ref }}" }'
    )
    csv = (
        "email,name,first_name,ref\nann@example.com,Ann,Ann,r1\nbob@example.com,Bob,Bob,"
        + "x" * 40_000
        + "\n"
    )
    result = cli("run", _write(tmp_path, manifest=text, csv=csv), "--yes")
    assert result.exit_code == 65, result.output
    assert (
        "row 2: message.headers.X-Ref is 40,000 characters; Gmail refuses a header value over 32 KB"
        in result.output
    )
    assert not api.deliveries
