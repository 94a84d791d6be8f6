"""A campaign's ledger in PostgreSQL, from the command line: `[ledger] url` and `--ledger URL`.

End to end against the fake Nylas on loopback and a real PostgreSQL database; and the refusals (a
malformed URL, a password written down, an unreachable server, an unknown user), each one line with
its exit code, nothing sent, and never the password.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
from collections import Counter
from pathlib import Path

import anyio
import pytest
from conftest import API_KEY, SECRET, copy_newsletter
from postgres import fresh_database

from campaign.ledger import ledger_site
from campaign.testing import FakeNylas


@pytest.fixture(name="database", scope="module")
def _database():
    with fresh_database() as url:
        yield url


def _one_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert "Traceback" not in output
    return lines[0]


def test_a_campaign_runs_on_a_postgresql_ledger_and_resumes_from_it(api, cli, tmp_path, database):
    """The ledger and the unsubscribe store in one database: an opt-out recorded there is skipped."""
    manifest = copy_newsletter(api, tmp_path, ledger=f'url = "{database}"')
    manifest.write_text(
        manifest.read_text().replace(
            'secret_env = "CAMPAIGN_UNSUBSCRIBE_SECRET"',
            f'secret_env = "CAMPAIGN_UNSUBSCRIBE_SECRET"\nstore = "{database}"',
        )
    )
    opted_out = cli("suppress", "add", "eve@example.org", "--store", database)
    assert opted_out.exit_code == 0, opted_out.output
    first = cli("run", manifest, "--yes")
    assert first.exit_code == 0, first.output
    assert len(api.deliveries) == 4
    assert "eve@example.org" not in {d.payload["to"][0]["email"] for d in api.deliveries}
    assert not list(tmp_path.rglob("*.ledger.sqlite"))  # nothing of it went to a file
    assert not list(tmp_path.rglob("*.sqlite"))
    assert not list(tmp_path.rglob("*.ledger.url"))  # the manifest names the database: no marker needed

    again = cli("run", manifest, "--yes")
    assert again.exit_code == 0, again.output
    assert len(api.deliveries) == 4  # the database said who was mailed

    status = cli("status", manifest, "--json")
    assert status.exit_code == 0, status.output
    found = json.loads(status.stdout)
    assert found["ledger"] == database
    assert found["states"]["sent"] == 4
    assert found["skipped"]["unsubscribed"] == 1


def test_the_ledger_option_overrides_the_file_and_the_campaign_stays_apart(api, cli, tmp_path, database):
    """`--ledger` on every command reaches the same rows; the SQLite file beside the manifest is not used,
    and the sandbox keeps its own rows in the same database."""
    manifest = copy_newsletter(api, tmp_path / "a")
    manifest.write_text(manifest.read_text().replace('name = "spring-newsletter"', 'name = "by-option"'))
    sandbox = cli("run", manifest, "--yes", "--sandbox", "--ledger", database)
    assert sandbox.exit_code == 0, sandbox.output
    assert not api.deliveries
    assert not list(tmp_path.rglob("*.ledger.url"))  # the sandbox's rows leave no marker

    result = cli("run", manifest, "--yes", "--ledger", database)
    assert result.exit_code == 0, result.output
    assert len(api.deliveries) == 5  # the sandbox's rows marked nobody as sent
    assert not manifest.with_name("campaign.ledger.sqlite").exists()

    on_file = cli("status", manifest, "--json")  # the marker says where the campaign's ledger is
    assert on_file.exit_code == 2
    assert database in _one_line(on_file.output)
    in_database = json.loads(cli("status", manifest, "--json", "--ledger", database).stdout)
    assert in_database["states"]["sent"] == 5

    report = tmp_path / "report.csv"
    written = cli("report", manifest, "--out", report, "--ledger", database)
    assert written.exit_code == 0, written.output
    assert (
        report.read_text().count("\n") == 1 + 6
    )  # a header, then 5 sent and 1 suppressed (a duplicate has no row)


def test_the_suggested_next_command_reaches_the_same_ledger_when_pasted(api, cli, tmp_path, database):
    """`status` names the command that continues the campaign: split as a shell would, it is the manifest's
    path (a folder with a space in its name) and the `--ledger` URL, and running it sends the rest."""
    manifest = copy_newsletter(api, tmp_path / "my campaigns")
    manifest.write_text(manifest.read_text().replace('name = "spring-newsletter"', 'name = "pasted"'))
    early = cli("report", manifest, "--out", tmp_path / "early.csv", "--ledger", database)
    assert early.exit_code == 66
    start = early.output.partition("start with `")[2].partition("`")[0]
    assert shlex.split(start) == ["campaign", "run", str(manifest), "--ledger", database]
    assert cli(*shlex.split(start)[1:], "--yes", "--limit", "2").exit_code == 75
    status = json.loads(cli("status", manifest, "--json", "--ledger", database).stdout)
    [command] = status["next"][0]["commands"]
    assert shlex.split(command) == ["campaign", "resume", str(manifest), "--ledger", database]
    resumed = cli(*shlex.split(command)[1:], "--yes")
    assert resumed.exit_code == 0, resumed.output
    assert len(api.deliveries) == 5
    assert not manifest.with_name("campaign.ledger.sqlite").exists()


def test_a_url_with_a_password_is_refused_without_showing_it(api, cli, tmp_path):
    manifest = copy_newsletter(api, tmp_path, ledger='url = "postgresql://campaign:hunter2@127.0.0.1/db"')
    result = cli("run", manifest, "--yes")
    assert result.exit_code == 78
    line = _one_line(result.output)
    assert "ledger.url" in line
    assert "PGPASSWORD" in line
    assert "hunter2" not in result.output
    assert not api.deliveries

    plain = copy_newsletter(api, tmp_path / "b")
    for url in ("postgresql://campaign:hunter2@127.0.0.1/db", "postgresql://127.0.0.1/db?password=hunter2"):
        given = cli("status", plain, "--ledger", url)
        assert given.exit_code == 2
        assert "--ledger" in _one_line(given.output)
        assert "hunter2" not in given.output


@pytest.mark.parametrize(
    ("query", "secret"),
    [
        (f"sslpassword={API_KEY}", API_KEY),  # a secret parameter: libpq's key passphrase
        ("sslpassword=hunter2", "hunter2"),
        ("oauth_client_secret=hunter2", "hunter2"),
        (f"sslkey={API_KEY}", API_KEY),  # the API key pasted where a key file's path goes
        (f"application_name={SECRET}", SECRET),  # the unsubscribe secret, anywhere
        ("options=Zt4q9XbL2mWv7RcK1pNs8YdF3hJ6gQa0EuTo5LiBk", "Zt4q9XbL2mWv7RcK1pNs8YdF3hJ6gQa0EuTo5LiBk"),
    ],
)
def test_a_url_holding_another_secret_is_refused_without_showing_it(api, cli, tmp_path, query, secret):
    """Not only `password`: any parameter named like a password, secret or token, and any value that is
    or looks like a secret, is refused as a password is (exit 2 on the command line, 78 in the manifest)
    and never repeated, in --ledger, [ledger] url and an unsubscribe store's URL alike."""
    url = f"postgresql://campaign@127.0.0.1:1/db?connect_timeout=2&{query}"
    plain = copy_newsletter(api, tmp_path / "plain")
    given = cli("status", plain, "--ledger", url)
    assert given.exit_code == 2, given.output
    assert _one_line(given.output).startswith("error: --ledger: the URL holds ")
    assert secret not in given.output

    listed = cli("suppress", "list", "--store", url)
    assert listed.exit_code == 2, listed.output
    assert _one_line(listed.output).startswith("error: --store: the URL holds ")
    assert secret not in listed.output

    written = copy_newsletter(api, tmp_path / "written", ledger=f'url = "{url}"')
    result = cli("run", written, "--yes")
    assert result.exit_code == 78, result.output
    assert _one_line(result.output).startswith("error: campaign.toml: ledger.url: holds ")
    assert secret not in result.output
    assert not api.deliveries


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("mysql://127.0.0.1/db", "PostgreSQL URL"),
        ("postgresql://127.0.0.1:port/db", "port"),
    ],
)
def test_a_malformed_ledger_url_is_one_line_and_exit_2(api, cli, tmp_path, url, said):
    manifest = copy_newsletter(api, tmp_path)
    result = cli("run", manifest, "--yes", "--ledger", url)
    assert result.exit_code == 2
    assert said in _one_line(result.output)
    assert not api.deliveries
    assert not list(tmp_path.rglob("*.ledger.sqlite"))


def test_a_password_variable_that_is_not_set_is_exit_78(api, cli, tmp_path, monkeypatch, database):
    monkeypatch.delenv("CAMPAIGN_DB_PASSWORD", raising=False)
    ledger = f'url = "{database}"\npassword_env = "CAMPAIGN_DB_PASSWORD"'
    manifest = copy_newsletter(api, tmp_path, ledger=ledger)
    result = cli("run", manifest, "--yes")
    assert result.exit_code == 78
    assert "ledger.password_env" in _one_line(result.output)
    assert "CAMPAIGN_DB_PASSWORD" in result.output
    assert not api.deliveries


def test_an_unreachable_server_is_one_line_exit_74_and_nothing_sent(api, cli, tmp_path):
    """The line says to fix what gave the URL: the command's --ledger, or the manifest's [ledger] url."""
    url = "postgresql://postgres@127.0.0.1:1/nowhere"
    manifest = copy_newsletter(api, tmp_path / "by-option")
    for command in (("run", manifest, "--yes"), ("status", manifest)):
        result = cli(*command, "--ledger", url)
        assert result.exit_code == 74
        assert _one_line(result.output) == (
            f"error: {url}: cannot reach PostgreSQL (connection refused); start it or fix --ledger"
        )
    in_manifest = copy_newsletter(api, tmp_path / "in-manifest", ledger=f'url = "{url}"')
    for command in (("run", in_manifest, "--yes"), ("status", in_manifest)):
        result = cli(*command)
        assert result.exit_code == 74
        assert _one_line(result.output) == (
            f"error: {url}: cannot reach PostgreSQL (connection refused); start it or fix [ledger] url"
        )
    assert not api.deliveries


def test_a_refused_user_is_one_line_exit_74_and_the_password_is_never_shown(
    api, cli, tmp_path, monkeypatch, database
):
    monkeypatch.setenv("CAMPAIGN_DB_PASSWORD", "s3cret-never-shown")
    wrong_user = database.replace("postgresql://postgres@", "postgresql://no_such_role_here@")
    assert wrong_user != database
    ledger = f'url = "{wrong_user}"\npassword_env = "CAMPAIGN_DB_PASSWORD"'
    manifest = copy_newsletter(api, tmp_path, ledger=ledger)
    result = cli("run", manifest, "--yes")
    assert result.exit_code == 74
    assert "no_such_role_here" in _one_line(result.output)
    assert "s3cret-never-shown" not in result.output
    assert not api.deliveries


def test_status_shows_the_workers_of_a_shared_campaign(api, cli, cli_clock, tmp_path, database):
    """Each worker with its host, pid, the grants it holds and its last heartbeat; `--json` the same."""
    manifest = copy_newsletter(api, tmp_path, ledger=f'url = "{database}"')
    manifest.write_text(manifest.read_text().replace('name = "spring-newsletter"', 'name = "with-workers"'))
    assert cli("run", manifest, "--yes").exit_code == 0
    leases = ledger_site(database).leases("with-workers", cli_clock)
    assert leases is not None

    async def hold_founder() -> tuple[str, ...]:
        await leases.join()
        try:
            return await leases.acquire(["founder"], 1)
        finally:
            await leases.close()  # its worker and lease rows stay, as a live worker's

    assert anyio.run(hold_founder) == ("founder",)
    shown = cli("status", manifest)
    assert shown.exit_code == 0, shown.output
    line = next(line for line in shown.stdout.splitlines() if line.startswith("worker "))
    assert f"worker {leases.id} on {socket.gethostname()} (pid {os.getpid()}): founder" in line
    (worker,) = json.loads(cli("status", manifest, "--json").stdout)["workers"]
    assert (worker["id"], worker["grants"], worker["live"]) == (leases.id, ["founder"], True)
    cli_clock.advance(leases.expiry_s + 1)  # it stopped beating: gone, and its lease with it
    (gone,) = json.loads(cli("status", manifest, "--json").stdout)["workers"]
    assert (gone["grants"], gone["live"]) == ([], False)


def test_status_json_of_a_shared_campaign_has_its_workers_key_once_they_left(api, cli, tmp_path, database):
    """README: a campaign whose ledger is in PostgreSQL has a `workers` key last; a worker that ended left,
    so the list is empty, never missing. A SQLite ledger has no workers: no key."""
    manifest = copy_newsletter(api, tmp_path, ledger=f'url = "{database}"')
    manifest.write_text(manifest.read_text().replace('name = "spring-newsletter"', 'name = "workers-gone"'))
    assert cli("run", manifest, "--yes").exit_code == 0
    status = json.loads(cli("status", manifest, "--json").stdout)
    assert list(status)[-1] == "workers"
    assert status["workers"] == []

    in_a_file = copy_newsletter(api, tmp_path / "file")
    assert cli("run", in_a_file, "--yes").exit_code == 0
    assert "workers" not in json.loads(cli("status", in_a_file, "--json").stdout)


# --- one campaign, one ledger: switching between a file and a database mails nobody twice ----------------


def _switching(api: FakeNylas, tmp_path: Path, name: str, *, ledger: str = "") -> Path:
    """The newsletter sample as campaign `name`, sent to a fake whose Idempotency-Keys are past Nylas's
    replay window by the next send, as an hour later: a row sent again is delivered again, never hidden
    by a replay of its first answer."""
    api.idempotency_ttl_s = 0.0
    manifest = copy_newsletter(api, tmp_path, ledger=ledger)
    manifest.write_text(manifest.read_text().replace('name = "spring-newsletter"', f'name = "{name}"'))
    return manifest


def _mailed_once(api: FakeNylas) -> bool:
    """Whether every recipient the fake delivered to was mailed once (the five the sample sends)."""
    counts = Counter(delivery.payload["to"][0]["email"].lower() for delivery in api.deliveries)
    return len(counts) == 5 and set(counts.values()) == {1}


@pytest.mark.parametrize("named_by", ["option", "manifest"])
def test_a_campaign_begun_on_its_sqlite_ledger_is_not_started_over_in_a_database(
    api, cli, tmp_path, database, named_by
):
    """The file beside the manifest holds the campaign: a database that holds none of it is refused
    (resume's old hint was to `run … --ledger`, which planned afresh and mailed everyone again), one
    line naming both ledgers, nothing sent or written; the file goes on; moving it away is the way out."""
    manifest = _switching(api, tmp_path, f"begun-on-file-{named_by}")
    campaign_name = f"begun-on-file-{named_by}"
    first = cli("run", manifest, "--yes", "--limit", "2")
    assert first.exit_code == 75, first.output
    assert len(api.deliveries) == 2
    on_file = manifest.with_name("campaign.ledger.sqlite")
    plain = manifest.read_text()
    if named_by == "option":
        ledger: tuple[str, ...] = ("--ledger", database)
        keep = "leave out --ledger"
    else:
        manifest.write_text(plain + f'\n[ledger]\nurl = "{database}"\n')
        ledger = ()
        keep = "remove [ledger] url from campaign.toml"

    for command in ("run", "resume"):
        refused = cli(command, manifest, "--yes", *ledger)
        assert len(api.deliveries) == 2  # before, `run` planned afresh in the database: 7
        assert refused.exit_code == 2, refused.output
        line = _one_line(refused.output)
        assert database in line
        assert str(on_file) in line
        assert keep in line
        assert "campaign run" not in line  # never the command that would plan afresh in the database
    for reading in (("status",), ("preview", "--out", str(tmp_path / "preview"))):
        assert cli(*reading, manifest, *ledger).exit_code == 2
    assert not ledger_site(database).exists(campaign_name)
    assert not list(tmp_path.rglob("*.ledger.url"))

    manifest.write_text(plain)
    resumed = cli("resume", manifest, "--yes")  # the file goes on where it stopped
    assert resumed.exit_code == 0, resumed.output
    assert _mailed_once(api)

    # The way out the line gives, for whoever really means to start over in the database.
    moved = tmp_path / "moved-away"
    moved.mkdir()
    for part in manifest.parent.glob("campaign.ledger.sqlite*"):
        shutil.move(part, moved / part.name)
    manifest.write_text(plain if named_by == "option" else plain + f'\n[ledger]\nurl = "{database}"\n')
    over = cli("run", manifest, "--yes", *ledger)
    assert over.exit_code == 0, over.output
    assert len(api.deliveries) == 10


def test_a_campaign_begun_in_a_database_by_option_is_not_started_over_in_a_file(api, cli, tmp_path, database):
    """`run --ledger URL` leaves a marker beside the manifest: a command without `--ledger` that would
    start a new SQLite ledger is refused, one line naming the database and the option to add; `status`
    says where the ledger is. The sandbox is unaffected, and `--ledger` goes on with the campaign."""
    manifest = _switching(api, tmp_path, "begun-in-database")
    first = cli("run", manifest, "--yes", "--limit", "2", "--ledger", database)
    assert first.exit_code == 75, first.output
    assert len(api.deliveries) == 2
    marker = manifest.with_name("campaign.ledger.url")

    for command in (("run", "--yes"), ("resume", "--yes"), ("status",), ("status", "--json")):
        refused = cli(command[0], manifest, *command[1:])
        assert len(api.deliveries) == 2  # before, `run` started a new SQLite ledger: 7
        assert refused.exit_code == 2, refused.output
        line = _one_line(refused.output)
        assert f"--ledger {database}" in line
        assert str(marker) in line
        assert "not started" not in line
    assert marker.exists()
    assert not manifest.with_name("campaign.ledger.sqlite").exists()

    sandbox = cli("run", manifest, "--yes", "--sandbox")  # its own ledger, whatever the marker says
    assert sandbox.exit_code == 0, sandbox.output
    assert len(api.deliveries) == 2

    resumed = cli("resume", manifest, "--yes", "--ledger", database)
    assert resumed.exit_code == 0, resumed.output
    assert _mailed_once(api)
    assert cli("run", manifest, "--yes").exit_code == 2  # done, and still not to be done again
    assert _mailed_once(api)


def test_the_marker_holds_no_password_nor_a_secret_query_parameter(api, cli, tmp_path, database, monkeypatch):
    """The password comes from the environment (a secret in the URL's query is refused outright); a
    parameter the marker does not know may hold one, so it is left out: neither is written beside the
    manifest, nor shown by the refusal; the URL the marker names reaches the ledger."""
    monkeypatch.setenv("CAMPAIGN_DB_PASSWORD", "hunter2-db-password")
    monkeypatch.setenv("PGPASSWORD", "hunter2-db-password")
    manifest = _switching(api, tmp_path, "marker-secrets", ledger='password_env = "CAMPAIGN_DB_PASSWORD"')
    refused_url = cli("run", manifest, "--yes", "--ledger", f"{database}?sslpassword=s3cret-key-phrase")
    assert refused_url.exit_code == 2
    assert "s3cret" not in refused_url.output
    url = f"{database}?sslmode=disable&keepalives_idle=30&application_name=campaign-test"
    sent = cli("run", manifest, "--yes", "--ledger", url)
    assert sent.exit_code == 0, sent.output
    marker = manifest.with_name("campaign.ledger.url").read_text()
    assert "hunter2" not in marker
    assert "s3cret" not in marker
    assert "keepalives_idle" not in marker
    assert f"{database}?sslmode=disable&application_name=campaign-test" in marker

    refused = cli("run", manifest, "--yes")
    assert refused.exit_code == 2
    assert "hunter2" not in refused.output
    assert "s3cret" not in refused.output
    named = _one_line(refused.output).partition("--ledger ")[2].partition("`")[0]
    status = cli("status", manifest, "--json", "--ledger", *shlex.split(named))
    assert status.exit_code == 0, status.output
    assert json.loads(status.stdout)["states"]["sent"] == 5


def test_a_renamed_manifest_of_a_campaign_in_a_database_is_refused_by_its_marker(
    api, cli, tmp_path, database
):
    manifest = _switching(api, tmp_path, "renamed-in-database")
    assert cli("run", manifest, "--yes", "--ledger", database).exit_code == 0
    renamed = manifest.rename(manifest.with_name("spring.toml"))
    refused = cli("run", renamed, "--yes")
    assert refused.exit_code == 2
    assert "campaign.ledger.url" in _one_line(refused.output)
    assert _mailed_once(api)


def test_a_campaign_in_one_database_is_not_started_over_in_another(api, cli, tmp_path, database):
    manifest = _switching(api, tmp_path, "moved-database")
    assert cli("run", manifest, "--yes", "--limit", "2", "--ledger", database).exit_code == 75
    with fresh_database() as other:
        refused = cli("run", manifest, "--yes", "--ledger", other)
        assert refused.exit_code == 2
        line = _one_line(refused.output)
        assert other in line
        assert f"--ledger {database}" in line
    assert len(api.deliveries) == 2
    assert cli("resume", manifest, "--yes", "--ledger", database).exit_code == 0
    assert _mailed_once(api)
