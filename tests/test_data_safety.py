"""Data that must stay data, through the CLI (issue 12, items 10-14 and 17-19): list cells never become
markup, formulas, terminal escapes or Python reprs; long values are cut; a secret pasted where a
variable name belongs is never echoed; extreme limits are refused; private files are owner-only."""

from __future__ import annotations

import stat
from pathlib import Path

import polars as pl
import pytest
from conftest import API_KEY

from campaign.outputfiles import neutralise_formulas

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
    for command in ("preview", "run"):
        result = cli(command, manifest, *(["--yes"] if command == "run" else []))
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
    added = cli("suppress", "add", "--store", store, "--", "=cmd@example.com", "-x@example.com", "ok@example.com")
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
    assert files and {_mode(path) for path in files} == {0o600}
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
