"""`campaign preview`: the site for both samples, payloads byte-equal to what `run` sends, problems shown."""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from conftest import API_KEY, SECRET, copy_sample

from campaign.manifest import load_manifest
from campaign.testing import FakeNylas
from campaign.testing.server import serve_on_loopback


class RecordingApi:
    """The fake Nylas behind a recorder of each request's method, path and raw body bytes."""

    def __init__(self) -> None:
        self.fake = FakeNylas(api_key=API_KEY)
        self.requests: list[tuple[str, str, bytes]] = []

    @property
    def app(self) -> Any:
        return self._app

    async def _app(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.fake.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        self.requests.append((scope["method"], scope["path"], body))
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.fake.app(scope, replay, send)


@pytest.fixture(name="recorded")
def _recorded(monkeypatch) -> Iterator[RecordingApi]:
    """A fake Nylas on loopback that also keeps every request body as bytes."""
    api = RecordingApi()
    with serve_on_loopback(api) as url:
        monkeypatch.setenv("NYLAS_API_URI", url)
        monkeypatch.setenv("NYLAS_API_KEY", API_KEY)
        monkeypatch.setenv("CAMPAIGN_UNSUBSCRIBE_SECRET", SECRET)
        yield api


def _register(fake: FakeNylas, manifest_path: Path) -> None:
    for sender in load_manifest(manifest_path).senders:
        assert sender.grant_id is not None
        fake.add_grant(sender.grant_id, sender.email or "")


def _list_emails(folder: Path) -> list[str]:
    csv, parquet = folder / "recipients.csv", folder / "recipients.parquet"
    frame = pl.read_csv(csv, infer_schema=False) if csv.exists() else pl.read_parquet(parquet)
    return [value.strip() for value in frame["email"].to_list()]


@pytest.mark.parametrize(("sample", "messages"), [("newsletter", 5), ("outreach", 9)])
def test_preview_site_lists_everyone_and_its_payloads_are_what_run_sends(
    recorded, cli, tmp_path, sample, messages
):
    """Every row is in index.html; each message page's JSON is byte for byte the body `run` then POSTs."""
    manifest = copy_sample(sample, tmp_path)
    _register(recorded.fake, manifest)
    site = tmp_path / "site"
    result = cli("preview", manifest, "--out", site, "--sample", "20")
    assert result.exit_code == 0, result.output
    assert recorded.requests == []
    assert not (manifest.parent / "campaign.ledger.sqlite").exists()
    index = (site / "index.html").read_text(encoding="utf-8")
    for email in _list_emails(manifest.parent):
        assert html.escape(email) in index, email
    pages = sorted((site / "messages").glob("*.html"))
    assert len(pages) == messages
    preview_bodies: dict[str, bytes] = {}
    for page in pages:
        body = page.with_suffix(".json").read_bytes()
        preview_bodies[json.loads(body)["to"][0]["email"]] = body
        shown = re.search(r'<pre id="payload">(.*?)</pre>', page.read_text(encoding="utf-8"), re.DOTALL)
        assert shown is not None
        assert html.unescape(shown.group(1)).encode("utf-8") == body  # the page shows the exact bytes
        assert API_KEY not in page.read_text(encoding="utf-8")

    run = cli("run", manifest, "--yes")
    assert run.exit_code == 0, run.output
    sent = {json.loads(body)["to"][0]["email"]: (path, body) for _, path, body in recorded.requests}
    assert set(sent) == set(preview_bodies)
    for email, body in preview_bodies.items():
        assert sent[email][1] == body, email
        assert sent[email][0] in (site / "messages").joinpath(_page_for(site, email)).read_text(
            encoding="utf-8"
        )


def _page_for(site: Path, email: str) -> str:
    for page in (site / "messages").glob("*.html"):
        if json.loads(page.with_suffix(".json").read_bytes())["to"][0]["email"] == email:
            return page.name
    raise AssertionError(email)


def test_preview_defaults_to_a_site_beside_the_manifest_and_run_dry_run_matches(api, cli, tmp_path):
    """Without --out the site goes to <manifest stem>.preview/; `run --dry-run` does too; nothing is sent."""
    manifest = copy_sample("newsletter", tmp_path)
    result = cli("preview", manifest)
    assert result.exit_code == 0, result.output
    site = manifest.parent / "campaign.preview"
    assert (site / "index.html").is_file()
    assert len(list((site / "messages").glob("*.json"))) == 3  # --sample defaults to 3
    assert "Spring news for Ann" in result.stdout
    assert str(site / "index.html") in result.stdout.replace("\n", "")
    (site / "index.html").unlink()
    dry = cli("run", manifest, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert (site / "index.html").is_file()
    assert api.requests == []


def test_preview_json_has_counts_senders_schedule_and_samples(api, cli, tmp_path):
    """--json: counts, per-sender shares and limits, an ETA, and each sample's exact payload."""
    manifest = copy_sample("outreach", tmp_path)
    result = cli("preview", manifest, "--json", "--sample", "2")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["to_send"] == 9
    assert data["rows"] == 9
    assert data["problems"] == []
    senders = {sender["name"]: sender for sender in data["senders"]}
    assert sum(sender["messages"] for sender in senders.values()) == 9
    assert senders["bob"]["rate_per_s"] == pytest.approx(0.5)
    assert senders["bob"]["concurrency"] == 1
    assert senders["bob"]["per_day"] == 10000
    assert data["duration_s"] > 0
    assert data["finishes_at"] > data["starts_at"]
    assert len(data["samples"]) == 2
    site = Path(data["site"]).parent
    first = json.loads((site / "messages" / "0001.json").read_bytes())
    assert data["samples"][0]["payload"] == first
    grant = _grant(manifest, data["samples"][0]["sender"])
    assert data["samples"][0]["url"].endswith(
        f"/v3/grants/{grant}/messages/send?fields=include_basic_headers"
    )
    assert api.requests == []


def _grant(manifest: Path, sender: str) -> str:
    found = load_manifest(manifest).sender(sender).grant_id
    assert found is not None
    return found


def test_preview_counts_what_the_ledger_already_settled(api, cli, tmp_path):
    """After a partial run, preview counts the sent rows as already sent and offers only the rest."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(api, manifest)
    assert cli("run", manifest, "--yes", "--limit", "2").exit_code == 75
    data = json.loads(cli("preview", manifest, "--json").stdout)
    assert data["already_done_by_state"] == {"sent": 2}
    assert data["to_send"] == 3
    assert data["senders"][0]["used_last_24h"] == 2
    sent = {d.payload["to"][0]["email"] for d in api.deliveries}
    assert not sent & {sample["to"] for sample in data["samples"]}


BAD_ROWS = 'x-not-an-address,Nobody,Nobody,Rome\nzed@example.com,Zed,"Z\r\nBcc: evil@example.com",Oslo\n'


def test_failing_rows_are_shown_with_row_column_and_fix_and_exit_65(api, cli, tmp_path):
    """Each failing row: its number, column or field, and fix, in the terminal, the JSON and its own page."""
    manifest = copy_sample("newsletter", tmp_path)
    with (manifest.parent / "recipients.csv").open("a", encoding="utf-8", newline="") as handle:
        handle.write(BAD_ROWS)
    site = tmp_path / "site"
    result = cli("preview", manifest, "--out", site)
    assert result.exit_code == 65
    assert "recipients.csv row 8" in result.stderr
    assert "(and 1 more" in result.stderr
    flat = " ".join(result.stdout.split())
    assert "Rows with problems: 2" in flat
    assert "x-not-an-address" in flat
    data = json.loads(cli("preview", manifest, "--json", "--out", site).stdout)
    problems = {problem["row"]: problem for problem in data["problems"]}
    assert set(problems) == {8, 9}
    assert problems[8]["issues"][0]["where"] == 'column "email"'
    assert "--skip-invalid" in problems[8]["issues"][0]["message"]
    assert problems[9]["issues"][0]["where"] == "message.subject"
    page = (site / "problems" / "row-9.html").read_text(encoding="utf-8")
    assert "message.subject" in page
    assert "Bcc: evil@example.com" in page  # the row's cells, escaped as text
    index = (site / "index.html").read_text(encoding="utf-8")
    assert 'href="problems/row-8.html"' in index
    assert 'href="problems/row-9.html"' in index
    assert api.requests == []

    skipping = cli("preview", manifest, "--json", "--skip-invalid", "--out", site)
    assert skipping.exit_code == 0, skipping.output
    assert json.loads(skipping.stdout)["skipped"]["invalid"] == 2


def test_a_second_preview_replaces_the_pages_of_the_first(api, cli, tmp_path):
    """Pages a bigger earlier preview wrote (more samples, old problems) do not linger."""
    manifest = copy_sample("newsletter", tmp_path)
    site = tmp_path / "site"
    (site / "messages").mkdir(parents=True)
    (site / "notes.txt").write_text("mine", encoding="utf-8")
    assert cli("preview", manifest, "--out", site, "--sample", "5").exit_code == 0
    assert len(list((site / "messages").glob("*.json"))) == 5
    assert cli("preview", manifest, "--out", site, "--sample", "1").exit_code == 0
    assert [path.name for path in sorted((site / "messages").iterdir())] == ["0001.html", "0001.json"]
    assert (site / "notes.txt").read_text(encoding="utf-8") == "mine"
    # A page of the first is rewritten (content and owner-only mode), not kept.
    page = site / "messages" / "0001.html"
    page.write_text("stale", encoding="utf-8")
    page.chmod(0o644)
    assert cli("preview", manifest, "--out", site, "--sample", "1").exit_code == 0
    assert "Message 1" in page.read_text(encoding="utf-8")
    assert page.stat().st_mode & 0o777 == 0o600


def _one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("folder", ["problems", "messages"])
def test_a_symlinked_pages_folder_is_refused_and_what_it_points_at_is_untouched(api, cli, tmp_path, folder):
    """A `problems`/`messages` folder that is a link elsewhere: exit 66, one line naming it, and the
    files there that look like pages are neither removed nor overwritten; nothing is written."""
    manifest = copy_sample("newsletter", tmp_path)
    target = tmp_path / "elsewhere" / "target"
    target.mkdir(parents=True)
    for name in ("0001.json", "0001.html", "row-3.html"):
        (target / name).write_text(f"mine: {name}", encoding="utf-8")
    site = tmp_path / "out"
    site.mkdir()
    (site / folder).symlink_to(Path("..") / "elsewhere" / "target")
    result = cli("preview", manifest, "--out", site)
    assert result.exit_code == 66, result.output
    line = _one_error_line(result)
    assert f"{site / folder} is a symbolic link" in line
    assert "--out" in line
    assert sorted(path.name for path in target.iterdir()) == ["0001.html", "0001.json", "row-3.html"]
    for name in ("0001.json", "0001.html", "row-3.html"):
        assert (target / name).read_text(encoding="utf-8") == f"mine: {name}"
    assert sorted(path.name for path in site.iterdir()) == [folder]  # no index.html, no other folder


@pytest.mark.parametrize("name", ["index.html", "messages/0002.json", "messages/0003.html"])
def test_a_symlink_where_a_page_goes_is_refused_and_its_target_untouched(api, cli, tmp_path, name):
    """A link at a page's place (index.html, a sample's files): exit 66, one line naming it; the file it
    points at keeps its bytes and mode, and an earlier preview's pages are not removed."""
    manifest = copy_sample("newsletter", tmp_path)
    site = tmp_path / "out"
    (site / "messages").mkdir(parents=True)
    (site / "messages" / "0009.html").write_text("an earlier page", encoding="utf-8")
    victim = tmp_path / "elsewhere" / "victim.txt"
    victim.parent.mkdir()
    victim.write_text("victim", encoding="utf-8")
    victim.chmod(0o644)
    link = site / name
    link.symlink_to(victim)
    result = cli("preview", manifest, "--out", site)
    assert result.exit_code == 66, result.output
    assert f"{link} is a symbolic link" in _one_error_line(result)
    assert victim.read_text(encoding="utf-8") == "victim"
    assert victim.stat().st_mode & 0o777 == 0o644
    assert link.is_symlink()
    assert (site / "messages" / "0009.html").read_text(encoding="utf-8") == "an earlier page"
    assert not (site / "problems").exists()
    assert name == "index.html" or not (site / "index.html").exists()


def test_attachments_are_listed_with_sizes_and_a_multipart_send_is_shown_exactly(recorded, cli, tmp_path):
    """A 3.2 MB file makes the send multipart: the page lists it with its size, and both files match `run`."""
    manifest = copy_sample("newsletter", tmp_path)
    _register(recorded.fake, manifest)
    content = bytes(range(256)) * 12_500  # 3,200,000 bytes: past the 3 MB a JSON send may carry
    (manifest.parent / "report.bin").write_bytes(content)
    with manifest.open("a", encoding="utf-8") as handle:
        handle.write(
            '\n[[message.attachments]]\npath = "report.bin"\ncontent_type = "application/octet-stream"\n'
        )
    site = tmp_path / "site"
    result = cli("preview", manifest, "--out", site, "--sample", "1")
    assert result.exit_code == 0, result.output
    page = (site / "messages" / "0001.html").read_text(encoding="utf-8")
    assert "report.bin" in page
    assert "3,200,000 bytes" in page
    assert "multipart/form-data" in page
    whole = (site / "messages" / "0001.multipart").read_bytes()
    message_part = (site / "messages" / "0001.json").read_bytes()
    assert message_part in whole
    assert content in whole
    assert "attachments" not in json.loads(message_part)

    assert cli("run", manifest, "--yes").exit_code == 0
    sent = next(body for _, _, body in recorded.requests if b"ann.lee@example.com" in body)
    assert sent == whole
