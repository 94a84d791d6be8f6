"""Opt-outs are honoured whatever their shape: suppression-file forms, key schemes, the token in the URL."""

from __future__ import annotations

import polars as pl
from conftest import copy_sample

GRANT = "0b6c3a52-4a57-4b43-9a49-9b0c1f2d7e11"


def _mailed(api) -> list[str]:
    return sorted(d.payload["to"][0]["email"] for d in api.deliveries)


# --- item 6: suppression files in every common form ---------------------------------------------------------


def test_suppression_lines_in_common_forms_all_suppress(api, cli, tmp_path):
    """Display name + <>, quotes, a trailing ';', a trailing comment, mailto: each suppresses its address."""
    manifest = copy_sample("newsletter", tmp_path)
    (manifest.parent / "unsubscribed.txt").write_text(
        "# opt-outs pasted from everywhere\n"
        "Ann Lee <ann.lee@example.com>\n"
        '"bob@example.org"\n'
        "chen.wei@example.net;\n"
        "dora@example.com # left 2024\n"
        "\n"
        "mailto:Eve@Example.org,\n",
        encoding="utf-8",
    )
    api.add_grant(GRANT, "maya@example.com")
    result = cli("run", manifest, "--yes")
    assert result.exit_code == 0, result.output
    assert _mailed(api) == ["frank@example.com"]


def test_suppression_csv_column_with_display_names_suppresses(api, cli, tmp_path):
    """A CSV `email` column holding `Name <address>` and quoted values suppresses those addresses."""
    manifest = copy_sample("newsletter", tmp_path)
    pl.DataFrame(
        {"email": ["Ann Lee <ann.lee@example.com>", "'bob@example.org'", "frank@example.com ;"]}
    ).write_csv(manifest.parent / "optouts.csv")
    manifest.write_text(manifest.read_text().replace('"unsubscribed.txt"', '"optouts.csv"'))
    api.add_grant(GRANT, "maya@example.com")
    result = cli("run", manifest, "--yes")
    assert result.exit_code == 0, result.output
    assert _mailed(api) == ["chen.wei@example.net", "dora@example.com", "eve@example.org"]


def test_a_suppression_line_without_an_address_stops_preview_and_run(api, cli, tmp_path):
    """`Ann Lee` (no address) is exit 65 naming the file and line, in preview and run; nobody is mailed."""
    manifest = copy_sample("newsletter", tmp_path)
    (manifest.parent / "unsubscribed.txt").write_text(
        "frank@example.com\nAnn Lee\nbob@example.org\n", encoding="utf-8"
    )
    api.add_grant(GRANT, "maya@example.com")
    for command in ("preview", "run"):
        result = cli(command, manifest, "--yes") if command == "run" else cli(command, manifest)
        assert result.exit_code == 65, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1
        assert lines[0] == (
            "error: "
            "unsubscribed.txt: line 2 holds no email address; correct it (e.g. ann@example.com or "
            "Ann <ann@example.com>), or start the line with # to keep it as a comment"
        )
    assert api.deliveries == []
    assert not (manifest.parent / "campaign.ledger.sqlite").exists()


def test_a_parquet_cell_without_an_address_is_named_by_row(api, cli, tmp_path):
    """In a Parquet list the unreadable value is named by its row."""
    manifest = copy_sample("newsletter", tmp_path)
    pl.DataFrame({"email": ["frank@example.com", "eve at example dot org"]}).write_parquet(
        manifest.parent / "optouts.parquet"
    )
    manifest.write_text(manifest.read_text().replace('"unsubscribed.txt"', '"optouts.parquet"'))
    result = cli("preview", manifest)
    assert result.exit_code == 65, result.output
    assert "optouts.parquet: row 2 holds no email address" in result.stderr


# --- item 8: the one-click URL must carry the token --------------------------------------------------------


def test_an_unsubscribe_url_without_the_token_is_refused(api, cli, tmp_path):
    """`url = "https://example.com/unsubscribe"` is exit 78 naming unsubscribe.url; nothing is sent."""
    manifest = copy_sample("newsletter", tmp_path)
    manifest.write_text(
        manifest.read_text().replace("/unsubscribe?t={{ unsubscribe_token }}", "/unsubscribe")
    )
    api.add_grant(GRANT, "maya@example.com")
    for args in (("preview",), ("run", "--yes")):
        result = cli(args[0], manifest, *args[1:])
        assert result.exit_code == 78, result.output
        assert result.stderr.strip().splitlines() == [
            "error: campaign.toml: unsubscribe.url: must contain {{ unsubscribe_token }}, e.g. "
            "'https://example.com/u?t={{ unsubscribe_token }}' (the endpoint refuses every click whose "
            "URL has no token)"
        ]
    assert api.deliveries == []


def test_the_token_may_be_filtered_or_in_the_path(api, cli, tmp_path):
    """`{{unsubscribe_token|urlencode}}` in the path is a token-bearing URL: accepted and sent."""
    manifest = copy_sample("newsletter", tmp_path)
    manifest.write_text(
        manifest.read_text().replace(
            "/unsubscribe?t={{ unsubscribe_token }}", "/u/{{unsubscribe_token|urlencode}}"
        )
    )
    api.add_grant(GRANT, "maya@example.com")
    result = cli("run", manifest, "--yes")
    assert result.exit_code == 0, result.output
    assert len(api.deliveries) == 5
