"""Opt-outs are honoured whatever their shape: suppression-file forms, key schemes, the token in the URL."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import polars as pl
import pytest
from conftest import SECRET, copy_newsletter, copy_sample
from test_token_signer import V1_ANN, V1_CUSTOMER
from test_unsubscribe_loop import FORM, ONE_CLICK, _https_url, _on, _with_store

from campaign.testing import FakeClock, serve_on_loopback
from campaign.unsubscribe import open_store, parse_secrets
from campaign.web._unsubscribe import UnsubscribeEndpoint

GRANT = "0b6c3a52-4a57-4b43-9a49-9b0c1f2d7e11"
SHIPPED_URL = "https://example.com/unsubscribe?t={{ unsubscribe_token }}"
TOKEN_RULE_LINE = (
    "error: campaign.toml: unsubscribe.url: must contain {{ unsubscribe_token }} as it is, unfiltered and "
    "outside any {% if %} or loop, e.g. 'https://example.com/u?t={{ unsubscribe_token }}' (the endpoint "
    "verifies the token exactly as signed, and refuses every click whose URL lacks it)"
)


def _mailed(api) -> list[str]:
    return sorted(d.payload["to"][0]["email"] for d in api.deliveries)


def _run_with_opt_outs(api, cli, tmp_path, opt_outs: str, *, more_rows: str = "") -> Path:
    """The newsletter sample with `opt_outs` as its suppression file (and `more_rows` after its list's),
    run to the end (exit 0); its manifest."""
    manifest = copy_sample("newsletter", tmp_path)
    recipients = manifest.parent / "recipients.csv"
    recipients.write_text(recipients.read_text() + more_rows)
    (manifest.parent / "unsubscribed.txt").write_text(opt_outs, encoding="utf-8")
    api.add_grant(GRANT, "maya@example.com")
    result = cli("run", manifest, "--yes")
    assert result.exit_code == 0, result.output
    return manifest


# --- item 6: suppression files in every common form ---------------------------------------------------------


def test_suppression_lines_in_common_forms_all_suppress(api, cli, tmp_path):
    """Display name + <>, quotes, a trailing ';', a trailing comment, mailto: each suppresses its address."""
    _run_with_opt_outs(
        api,
        cli,
        tmp_path,
        "# opt-outs pasted from everywhere\n"
        "Ann Lee <ann.lee@example.com>\n"
        '"bob@example.org"\n'
        "chen.wei@example.net;\n"
        "dora@example.com # left 2024\n"
        "\n"
        "mailto:Eve@Example.org,\n",
    )
    assert _mailed(api) == ["frank@example.com"]


def test_suppression_entries_with_invisible_characters_a_final_dot_or_a_mailto_query_suppress(
    api, cli, tmp_path
):
    """A zero-width space (and a BOM) after an address, a domain's final dot, a `mailto:` URL with its
    `?subject=`: each is read as its address and suppresses it (they used to be kept as written, matched
    nobody, and those people were mailed)."""
    opt_outs = "dora@example.com\u200b\n\ufeffeve@example.org.\nmailto:bob@example.org?subject=unsubscribe\n"
    _run_with_opt_outs(api, cli, tmp_path, opt_outs)
    assert _mailed(api) == ["ann.lee@example.com", "chen.wei@example.net", "frank@example.com"]


@pytest.mark.parametrize(
    ("line", "said"),
    [
        (
            "bob@example..org # bounced",
            "line 2: 'bob@example..org' is not a valid address: An email address cannot have two periods "
            "in a row; correct it",
        ),
        ("Ann Lee", "line 2 holds no email address; correct it"),
    ],
)
def test_a_suppression_entry_that_cannot_match_anyone_stops_preview_and_run(api, cli, tmp_path, line, said):
    """An entry that does not validate, or a line with no address (`Ann Lee`), is exit 65 naming the file,
    the line and why, in preview and run; nobody is mailed and no ledger is written."""
    manifest = copy_sample("newsletter", tmp_path)
    (manifest.parent / "unsubscribed.txt").write_text(
        f"frank@example.com\n{line}\nbob@example.org\n", encoding="utf-8"
    )
    api.add_grant(GRANT, "maya@example.com")
    for args in (("preview",), ("run", "--yes")):
        result = cli(*args[:1], manifest, *args[1:])
        assert result.exit_code == 65, result.output
        assert result.stderr.strip().splitlines() == [
            f"error: unsubscribed.txt: {said} (e.g. ann@example.com or Ann <ann@example.com>), "
            "or start the line with # to keep it as a comment"
        ]
    assert api.deliveries == []
    assert not (manifest.parent / "campaign.ledger.sqlite").exists()


def test_a_percent_encoded_mailto_entry_suppresses_its_address(api, cli, tmp_path):
    """`mailto:ann%2Bnews@…` suppresses ann+news (it was kept as `ann%2bnews@…`, and she was mailed);
    `mailto:bob%40example.org` suppresses bob (it stopped the run). A plain entry is taken as written."""
    opt_outs = (
        "mailto:ann%2Bnews@example.com\nmailto:bob%40example.org?subject=unsubscribe\neve%2Bx@example.org\n"
    )
    manifest = _run_with_opt_outs(
        api, cli, tmp_path, opt_outs, more_rows="ann+news@example.com,Ann News,Ann,Oslo\n"
    )
    assert _mailed(api) == [
        "ann.lee@example.com",
        "chen.wei@example.net",
        "dora@example.com",
        "eve@example.org",
        "frank@example.com",
    ]
    status = json.loads(cli("status", manifest, "--json").stdout)
    assert status["skipped"]["suppressed"] == 2


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (
            b"\nemail\nbob@example.org\n",
            "line 1 is blank, but it must name the columns (e.g. email,name); remove the blank lines above "
            "the header",
        ),
        (
            b",\nbob@example.org,\n",
            "line 1 (the header) names no column; the first line must name them (e.g. email,name)",
        ),
        (
            b"email,name\rbob@example.org,Bob\r",
            'uses CR-only line endings (classic Mac); save it as "CSV UTF-8" (Excel: Save As > CSV UTF-8)',
        ),
        (
            b"email\rbob@example.org\rfrank@example.com\r",
            'uses CR-only line endings (classic Mac); save it as "CSV UTF-8" (Excel: Save As > CSV UTF-8)',
        ),
    ],
)
def test_a_suppression_csv_that_would_read_as_empty_stops_preview_and_run(api, cli, tmp_path, content, said):
    """A blank first line, a header naming no column, CR-only line ends: each used to read the file as
    no one, and bob was mailed. Now exit 65 naming the file and what to do; nothing sent, no ledger."""
    manifest = copy_sample("newsletter", tmp_path)
    (manifest.parent / "optouts.csv").write_bytes(content)
    manifest.write_text(manifest.read_text().replace('"unsubscribed.txt"', '"optouts.csv"'))
    api.add_grant(GRANT, "maya@example.com")
    for args in (("preview",), ("run", "--yes")):
        result = cli(*args[:1], manifest, *args[1:])
        assert result.exit_code == 65, result.output
        assert result.stderr.strip().splitlines() == [f"error: optouts.csv: {said}"]
    assert api.deliveries == []
    assert not list(manifest.parent.glob("*.sqlite*"))


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
        assert result.stderr.strip().splitlines() == [TOKEN_RULE_LINE]
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


@pytest.mark.parametrize(
    "url",
    [
        # Read in the manifest's text: refused by every command that loads it.
        "https://example.com/u/{{ unsubscribe_token | upper }}",
        "https://example.com/u/{{ unsubscribe_token|lower }}",
        "https://example.com/u?t={{ unsubscribe_token | truncate(40) }}",
        "https://example.com/u?t={{ unsubscribe_token[:10] }}",
        "https://example.com/u?t={{ unsubscribe_token | replace('-', '+') }}",
        "https://example.com/u?t={{ (unsubscribe_token ~ city) | urlencode }}",
        # Read in what Jinja runs: refused before anything is checked or sent.
        "https://example.com/u?t={% if city %}{{ unsubscribe_token }}{% endif %}",
        "https://example.com/u?t={% for _ in [1] %}{{ unsubscribe_token }}{% endfor %}",
        "https://example.com/u?t={# {{ unsubscribe_token }} #}",
        "https://example.com/u?t={% set unsubscribe_token = city %}{{ unsubscribe_token }}",
        "https://example.com/u/{{ unsubscribe_token }}?c={{ unsubscribe_token | upper }}",
    ],
)
def test_a_url_that_changes_or_may_skip_the_token_is_refused(api, cli, tmp_path, url):
    """A filtered token, or one printed only sometimes, makes links the endpoint can never verify: exit
    78 naming unsubscribe.url and saying to print the token as it is; nothing is sent."""
    manifest = copy_sample("newsletter", tmp_path)
    manifest.write_text(manifest.read_text().replace(SHIPPED_URL, url))
    api.add_grant(GRANT, "maya@example.com")
    for args in (("preview",), ("run", "--yes")):
        result = cli(args[0], manifest, *args[1:])
        assert result.exit_code == 78, result.output
        assert result.stderr.strip().splitlines() == [TOKEN_RULE_LINE]
    assert api.deliveries == []


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/u?t=ref-{{ unsubscribe_token }}",
        "https://example.com/u/t={{ unsubscribe_token }}",
        "https://example.com/u/{{ unsubscribe_token }}x.html",
    ],
)
def test_a_url_that_always_hides_the_token_is_refused(api, cli, tmp_path, url):
    """A URL whose text around the token hides it from the endpoint (glued to other text, `t=` in the
    path) is found once, from one sample link: exit 78 naming unsubscribe.url; nothing is sent."""
    manifest = copy_sample("newsletter", tmp_path)
    manifest.write_text(manifest.read_text().replace(SHIPPED_URL, url))
    api.add_grant(GRANT, "maya@example.com")
    for args in (("preview",), ("run", "--yes")):
        result = cli(args[0], manifest, *args[1:])
        assert result.exit_code == 78, result.output
        assert result.stderr.strip().splitlines() == [
            "error: campaign.toml: unsubscribe.url renders a link without the recipient's token as a whole "
            "query value or path segment (where the endpoint looks for it), so a click on it could not "
            "unsubscribe; put {{ unsubscribe_token }} on its own, e.g. "
            "'https://example.com/u?t={{ unsubscribe_token }}'"
        ]
    assert api.deliveries == []


def test_a_row_whose_values_hide_the_token_is_a_row_problem(api, cli, tmp_path):
    """The list's values around the token can still hide it (here a city with '?': the rest of the path,
    token and all, becomes a query name, where the endpoint looks for no token). That row stops the run
    (exit 65, naming the row and unsubscribe.url); --skip-invalid sends the others, each with a link
    that unsubscribes."""
    manifest = copy_sample("newsletter", tmp_path)
    store_path = _with_store(manifest)
    text = manifest.read_text()
    manifest.write_text(text.replace(SHIPPED_URL, "https://example.com/u/{{ city }}/{{ unsubscribe_token }}"))
    listing = manifest.parent / "recipients.csv"
    listing.write_text(listing.read_text().replace("Cork", "Cork?2"))
    api.add_grant(GRANT, "maya@example.com")
    stopped = cli("run", manifest, "--yes")
    assert stopped.exit_code == 65, stopped.output
    assert stopped.stderr.startswith(
        "error: recipients.csv row 4: unsubscribe.url renders a link without the recipient's token as a "
        "whole query value or path segment (where the endpoint looks for it)"
    )
    assert api.deliveries == []

    sent = cli("run", manifest, "--yes", "--skip-invalid")
    assert sent.exit_code == 0, sent.output
    assert "dora@example.com" not in _mailed(api)
    assert len(api.deliveries) == 4
    store = open_store(store_path, clock=FakeClock())
    endpoint = UnsubscribeEndpoint(store, secrets=parse_secrets(SECRET))
    try:
        with serve_on_loopback(endpoint) as base:
            for delivery in api.deliveries:
                posted = httpx.post(_on(base, _https_url(delivery)), content=ONE_CLICK, headers=FORM)
                assert posted.status_code == 200
        assert len(store.entries()) == 4
    finally:
        store.close()


# --- items 7 and 9: opaque tokens that carry the address, matched across key schemes ---------------------


def _keyed_list(folder) -> None:
    """The sample list with a customer_id column (c1, c2, …) to key recipients by."""
    frame = pl.read_csv(folder / "recipients.csv")
    frame.with_columns(pl.format("c{}", pl.int_range(1, frame.height + 1)).alias("customer_id")).write_csv(
        folder / "recipients.csv"
    )


def test_a_one_click_from_a_keyed_campaign_stops_a_campaign_matching_by_address(api, cli, tmp_path):
    """Keyed campaign: the link names no one, the store gets key and address, the next campaign skips Ann."""
    manifest = copy_sample("newsletter", tmp_path)
    _keyed_list(manifest.parent)
    store_path = _with_store(manifest)
    keyed = manifest.read_text().replace(
        'name_column = "name"', 'name_column = "name"\nkey_column = "customer_id"'
    )
    manifest.write_text(keyed)
    api.add_grant(GRANT, "maya@example.com")
    first = cli("run", manifest, "--yes")
    assert first.exit_code == 0, first.output
    delivered = {d.payload["to"][0]["email"]: d for d in api.deliveries}
    link = _https_url(delivered["ann.lee@example.com"])
    token = parse_qs(urlsplit(link).query)["t"][0]
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    assert b"ann" not in raw.lower()
    assert b"c1" not in raw
    assert b"spring" not in raw

    store = open_store(store_path, clock=FakeClock())
    endpoint = UnsubscribeEndpoint(store, secrets=parse_secrets(SECRET))
    try:
        with serve_on_loopback(endpoint) as base:
            response = httpx.post(_on(base, link), content=ONE_CLICK, headers=FORM)
        assert response.status_code == 200
        assert [(e.campaign, e.recipient_key, e.email, e.source) for e in store.entries()] == [
            ("spring-newsletter", "c1", "ann.lee@example.com", "one-click")
        ]
    finally:
        store.close()

    # Another campaign on the same list and store, matching by address (no key_column).
    second = manifest.parent / "summer.toml"
    second.write_text(
        keyed.replace('key_column = "customer_id"\n', "").replace("spring-newsletter", "summer-newsletter")
    )
    before = len(api.deliveries)
    result = cli("run", second, "--yes")
    assert result.exit_code == 0, result.output
    mailed = sorted(d.payload["to"][0]["email"] for d in api.deliveries[before:])
    assert mailed == ["bob@example.org", "chen.wei@example.net", "dora@example.com", "eve@example.org"]


def test_a_link_sent_before_tokens_were_encrypted_still_unsubscribes(tmp_path):
    """A version 1 link (made by the previous release) POSTed over HTTP records its recipient."""
    secrets = parse_secrets("brand-new-secret-0123456789 old-secret-0123456789abcdef")
    store = open_store(tmp_path / "unsubscribes.sqlite", clock=FakeClock())
    endpoint = UnsubscribeEndpoint(store, secrets=secrets)
    try:
        with serve_on_loopback(endpoint) as base:
            for token in (V1_ANN, V1_CUSTOMER):
                response = httpx.post(
                    f"{base}/unsubscribe", params={"t": token}, content=ONE_CLICK, headers=FORM
                )
                assert response.status_code == 200
        assert [(e.campaign, e.recipient_key, e.email) for e in store.entries()] == [
            ("spring", "ann@example.com", "ann@example.com"),
            ("spring", "cust-42", None),
        ]
    finally:
        store.close()


def test_suppress_add_takes_an_address_in_the_same_forms(cli, tmp_path):
    """`suppress add 'Ann <Ann@Example.com>'` records ann@example.com; a bare name is refused (exit 65)."""
    store = tmp_path / "u.sqlite"
    added = cli("suppress", "add", "Ann <Ann@Example.com>", '"bob@example.org";', "--store", store)
    assert added.exit_code == 0, added.output
    assert added.stdout.startswith("2 added, 0 already there")
    refused = cli("suppress", "add", "Ann Lee", "--store", store)
    assert refused.exit_code == 65
    listed = cli("suppress", "list", "--store", store, "--json")
    assert [(e["recipient_key"], e["email"]) for e in json.loads(listed.stdout)] == [
        ("ann@example.com", "ann@example.com"),
        ("bob@example.org", "bob@example.org"),
    ]


# --- a store the campaign stops reading ---------------------------------------------------------------------


def _store_campaign(api, cli, tmp_path) -> Path:
    """The newsletter reading a.sqlite, where dora opted out, run for two recipients; its manifest."""
    manifest = copy_newsletter(api, tmp_path)
    text = manifest.read_text()
    manifest.write_text(text.replace("[unsubscribe]\n", '[unsubscribe]\nstore = "a.sqlite"\n'))
    assert cli("suppress", "add", "dora@example.com", "--store", manifest.parent / "a.sqlite").exit_code == 0
    first = cli("run", manifest, "--yes", "--limit", "2")
    assert first.exit_code == 75, first.output
    assert "note: unsubscribe store" not in first.output
    return manifest


@pytest.mark.parametrize("change", ["another store named", "store file deleted"])
def test_a_store_an_earlier_run_read_and_this_one_does_not_is_named_before_sending(
    api, cli, tmp_path, change
):
    """The manifest names b.sqlite instead (sent with --allow-changed-content), or a.sqlite was deleted:
    its opt-outs would no longer stop anyone, and the run says so before it sends, with the store's full
    path and how to keep them; a resume reading the same store as before says nothing of it."""
    manifest = _store_campaign(api, cli, tmp_path)
    old = manifest.parent / "a.sqlite"
    unchanged = cli("run", manifest, "--yes", "--limit", "1")
    assert unchanged.exit_code == 75, unchanged.output
    assert "note: unsubscribe store" not in unchanged.output
    if change == "another store named":
        manifest.write_text(manifest.read_text().replace('store = "a.sqlite"', 'store = "b.sqlite"'))
        said = "is no longer named: its opt-outs will not stop anyone this run mails; keep them with "
        said += f"`campaign suppress import {old} --store {manifest.parent / 'b.sqlite'}`"
    else:
        old.unlink()
        said = "is gone: its opt-outs will not stop anyone this run mails"
    result = cli("run", manifest, "--yes", "--allow-changed-content")
    assert result.exit_code == 0, result.output
    assert f"note: unsubscribe store {old}, read by this campaign's earlier runs, {said}" in " ".join(
        result.output.split()
    )
    assert "dora@example.com" not in _mailed(api)  # skipped when the store was read: the ledger keeps it
