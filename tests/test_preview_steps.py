"""The preview of a campaign with follow-ups: every step's message for each sample, in `--json`, on the
console, and on the site as one tab per step (clicked in a real browser); the senders' windows."""

from __future__ import annotations

import json
from pathlib import Path

from test_followups import PEOPLE, write_campaign
from test_preview_browser import open_page  # noqa: F401 - the fixture, shared

SECRET_ENV = {"CAMPAIGN_UNSUBSCRIBE_SECRET": "preview-steps-secret-0123456789abcdef"}


def _preview_json(cli, manifest: Path, out: Path, *extra: str) -> dict:
    result = cli("preview", manifest, "--out", out, "--json", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_json_has_every_step_of_each_sample_and_the_steps(cli, tmp_path, monkeypatch):
    monkeypatch.setenv(*next(iter(SECRET_ENV.items())))
    manifest = write_campaign(tmp_path / "c", people=PEOPLE[:2], sender='window = "Mon-Fri 09:00-17:30"')
    report = _preview_json(cli, manifest, tmp_path / "site", "--sample", "2")
    assert report["steps"] == ["message", "nudge", "last-call"]
    for sample, email in zip(report["samples"], PEOPLE[:2], strict=True):
        assert sample["to"] == email
        assert "reply_to_message_id" not in sample["payload"]
        nudge, last = sample["steps"]
        assert (nudge["step"], nudge["after"], last["step"], last["after"]) == (
            "nudge",
            "2d",
            "last-call",
            "3d",
        )
        assert nudge["subject"] == last["subject"] == f"Re: {sample['subject']}"
        assert nudge["payload"]["reply_to_message_id"]  # a stand-in until step 1 is sent
        assert nudge["payload"]["metadata"]["key3"] == "nudge"
        assert nudge["payload"]["to"] == sample["payload"]["to"]
    sender = report["senders"][0]
    assert sender["window"] == "Mon-Fri 09:00-17:30 UTC"
    assert "finishes_at" in sender
    assert "window_opens" in sender
    site = tmp_path / "site" / "messages"
    first_nudge = report["samples"][0]["steps"][0]
    assert json.loads((site / "0001.nudge.json").read_text()) == first_nudge["payload"]
    assert (site / "0001.last-call.json").exists()


def test_a_campaign_without_follow_ups_previews_as_before(cli, tmp_path, monkeypatch):
    monkeypatch.setenv(*next(iter(SECRET_ENV.items())))
    manifest = write_campaign(tmp_path / "c", people=PEOPLE[:1])
    text = manifest.read_text()
    manifest.write_text(text[: text.index("[[followups]]")] + text[text.index("[[senders]]") :])
    report = _preview_json(cli, manifest, tmp_path / "site")
    assert "steps" not in report
    assert "steps" not in report["samples"][0]
    assert "window" not in report["senders"][0]
    page = (tmp_path / "site" / "messages" / "0001.html").read_text()
    assert 'class="steps"' not in page
    assert sorted(p.name for p in (tmp_path / "site" / "messages").iterdir()) == ["0001.html", "0001.json"]


def test_the_console_lists_the_steps_and_windows(cli, tmp_path, monkeypatch):
    monkeypatch.setenv(*next(iter(SECRET_ENV.items())))
    manifest = write_campaign(
        tmp_path / "c", people=PEOPLE[:1], sender='window = "Mon-Fri 09:00-17:30"\ntimezone = "Asia/Tokyo"'
    )
    result = cli("preview", manifest, "--out", tmp_path / "site", "--sample", "0")
    assert result.exit_code == 0, result.output
    assert "Steps: message, nudge, last-call" in result.output
    assert "nudge: 2d after the step before" in result.output
    assert "window Mon-Fri 09:00-17:30 Asia/Tokyo" in result.output


def test_the_site_has_one_tab_per_step_in_a_real_browser(cli, tmp_path, monkeypatch, open_page):  # noqa: F811
    """Clicking a step's tab shows that step's headers, body and request, and hides the others."""
    monkeypatch.setenv(*next(iter(SECRET_ENV.items())))
    manifest = write_campaign(tmp_path / "c", people=PEOPLE[:1])
    report = _preview_json(cli, manifest, tmp_path / "site", "--sample", "1")
    (sample,) = report["samples"]
    watched = open_page((tmp_path / "site" / "messages" / "0001.html").as_uri())
    page = watched.page
    tabs = page.locator(".steps > label")
    assert tabs.all_inner_texts() == ["1. message", "2. nudge", "3. last-call"]
    panels = [page.locator(f"#panel-{n}") for n in range(3)]
    assert [panel.is_visible() for panel in panels] == [True, False, False]
    tabs.nth(1).click()
    assert [panel.is_visible() for panel in panels] == [False, True, False]
    nudge = panels[1]
    assert f"Re: {sample['subject']}" in nudge.inner_text()
    assert "reply_to_message_id" in nudge.inner_text()
    assert "2d after the step before" in nudge.inner_text()
    assert "stops on reply, bounce, unsubscribe" in nudge.inner_text()
    assert "About Renewal for P1 (message)" in nudge.locator("pre.payload").inner_text()
    tabs.nth(2).click()
    assert [panel.is_visible() for panel in panels] == [False, False, True]
    assert "Last note, P1" in panels[2].inner_text()
    assert watched.errors == []
    assert watched.dialogs == []
    index = open_page((tmp_path / "site" / "index.html").as_uri()).page
    assert index.locator("h2", has_text="Steps").count() == 1
