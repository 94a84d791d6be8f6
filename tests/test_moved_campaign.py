"""A campaign's files in another folder are the same campaign: moved or renamed on one machine, or a copy
on each machine that shares a PostgreSQL ledger. The content fingerprint and the plan stamps count paths
from the campaign's folder, so nothing is refused, the plan is found checked, and nobody is mailed twice
(counted at the fake). A ledger begun before, whose fingerprint named the templates by their absolute
path, is taken as unchanged when its content is, and then holds today's form; a real edit is refused
whatever the form."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from contextlib import closing
from pathlib import Path

import pytest
from conftest import copy_newsletter, copy_sample
from postgres import fresh_database

from campaign.clock import SystemClock
from campaign.ledger import Ledger, ledger_site, open_ledger
from campaign.manifest import load_manifest
from campaign.pipeline import load_content_fingerprint, load_plan_stamp, load_rules_stamp
from campaign.testing import FakeNylas

NAME = "spring-newsletter"  # samples/newsletter's campaign
EVERYONE = [
    "ann.lee@example.com", "bob@example.org", "chen.wei@example.net", "dora@example.com", "eve@example.org"
]  # fmt: skip
REFUSED = "the subject, a template or a header changed since sending began"


@pytest.fixture(name="database", scope="module")
def _database():
    with fresh_database() as url:
        yield url


def _mailed(api: FakeNylas) -> Counter[str]:
    return Counter(delivery.payload["to"][0]["email"] for delivery in api.deliveries)


def _file_ledger(manifest: Path) -> Ledger:
    return open_ledger(manifest.with_name("campaign.ledger.sqlite"), clock=SystemClock(), campaign=NAME)


def _move(manifest: Path, to: Path) -> Path:
    """The campaign's folder (its ledger file inside) moved and renamed to `to`; its manifest there."""
    to.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(manifest.parent, to)
    return to / manifest.name


def test_a_moved_campaign_resumes_without_a_refusal_or_a_second_check(api, cli, tmp_path, preflights):
    manifest = copy_newsletter(api, tmp_path / "here")
    assert cli("run", manifest, "--yes", "--limit", "2").exit_code == 75
    moved = _move(manifest, tmp_path / "elsewhere" / "renamed")
    resumed = cli("resume", moved, "--yes")
    assert resumed.exit_code == 0, resumed.output
    assert "unchanged since it was checked, 3 to send" in resumed.stdout  # the plan stamp matched
    assert len(preflights) == 1
    assert sorted(_mailed(api)) == EVERYONE
    assert set(_mailed(api).values()) == {1}
    with closing(_file_ledger(moved)) as ledger:
        assert ledger.journal() == []  # no content change recorded


def test_two_folders_with_the_same_files_share_a_postgresql_campaign(
    api, cli, tmp_path, database, preflights
):
    """The README's several machines, each with the campaign's files (here: each in its own folder): the
    second finds the plan checked and checks nothing, and the first is not refused after it."""
    first = copy_newsletter(api, tmp_path / "machine-1", ledger=f'url = "{database}"')
    second = tmp_path / "machine-2" / "copy" / "campaign.toml"
    shutil.copytree(first.parent, second.parent)
    begun = cli("run", first, "--yes", "--limit", "2")
    assert begun.exit_code == 75, begun.output
    site = ledger_site(database)
    with closing(site.open(clock=SystemClock(), campaign=NAME, create=False)) as ledger:
        stamps = (ledger.plan_stamp(), ledger.rules_stamp(), ledger.content_fingerprint())
    joined = cli("run", second, "--yes")
    assert joined.exit_code == 0, joined.output
    assert "unchanged since it was checked, 3 to send" in joined.stdout
    assert len(preflights) == 1  # the second checked no row
    again = cli("run", first, "--yes")  # and the first is not refused in turn
    assert again.exit_code == 0, again.output
    assert len(preflights) == 1
    assert sorted(_mailed(api)) == EVERYONE
    assert set(_mailed(api).values()) == {1}
    with closing(site.open(clock=SystemClock(), campaign=NAME, create=False)) as ledger:
        assert (ledger.plan_stamp(), ledger.rules_stamp(), ledger.content_fingerprint()) == stamps
        assert ledger.journal() == []


def test_the_same_files_in_two_folders_have_the_same_fingerprint_and_stamps(tmp_path):
    """A body and a layout, one of them beside the campaign's folder (`../shared`): the whole tree moved
    elsewhere counts the same."""
    manifests = []
    for root in (tmp_path / "one", tmp_path / "two" / "deeper"):
        (root / "shared").mkdir(parents=True)
        (root / "shared" / "page.html.j2").write_text(
            '{% extends "base.html.j2" %}{% block content %}{{ body }}{% endblock %}'
        )
        manifest = copy_sample("newsletter", root)
        (manifest.parent / "note.md.j2").write_text("# Hello {{ first_name }}\n")
        text = manifest.read_text().replace(
            'html = "spring.html.j2"', 'markdown = "note.md.j2"\nlayout = "../shared/page.html.j2"'
        )
        manifest.write_text(text)
        manifests.append(load_manifest(manifest))
    counted = []
    for manifest in manifests:
        content = load_content_fingerprint(manifest)
        counted.append(
            (content, load_rules_stamp(manifest, content=content), load_plan_stamp(manifest, content=content))
        )
    assert counted[0] == counted[1]


def _record_as_before(manifest: Path) -> str:
    """The ledger's fingerprint and stamps as a campaign before this change recorded them: the fingerprint
    naming the templates by their absolute path, and stamps today's runs do not make. Returns it."""
    from campaign.pipeline._content import load_legacy_content_fingerprint

    legacy = load_legacy_content_fingerprint(load_manifest(manifest))
    assert legacy != load_content_fingerprint(load_manifest(manifest))
    with closing(_file_ledger(manifest)) as ledger:
        ledger._set_meta("content_fingerprint", legacy)
        ledger._set_meta("plan_stamp", "a stamp of absolute paths")
        ledger._set_meta("rules_stamp", "a stamp of absolute paths")
    return legacy


def test_a_ledger_with_the_legacy_fingerprint_is_unchanged_and_then_holds_todays(
    api, cli, tmp_path, preflights
):
    """Its stamps no longer match, so the list is checked again: that is all (no refusal, no second
    message). The ledger then holds the fingerprint every folder agrees on."""
    manifest = copy_newsletter(api, tmp_path / "begun")
    assert cli("run", manifest, "--yes", "--limit", "2").exit_code == 75
    _record_as_before(manifest)
    resumed = cli("resume", manifest, "--yes", "--limit", "1")
    assert resumed.exit_code == 75, resumed.output
    assert "recipients.csv: checked, 3 to send" in resumed.stdout  # checked again: the stamps differ
    assert len(preflights) == 2
    with closing(_file_ledger(manifest)) as ledger:
        assert ledger.content_fingerprint() == load_content_fingerprint(load_manifest(manifest))
        assert ledger.journal() == []  # not a change of content
    moved = _move(manifest, tmp_path / "moved")  # today's form: another folder agrees
    done = cli("resume", moved, "--yes")
    assert done.exit_code == 0, done.output
    assert "unchanged since it was checked, 2 to send" in done.stdout
    assert len(preflights) == 2
    assert sorted(_mailed(api)) == EVERYONE
    assert set(_mailed(api).values()) == {1}


def test_a_template_edited_in_a_moved_campaign_is_still_refused(api, cli, tmp_path):
    manifest = copy_newsletter(api, tmp_path / "here")
    assert cli("run", manifest, "--yes", "--limit", "2").exit_code == 75
    moved = _move(manifest, tmp_path / "there")
    assert cli("resume", moved, "--yes", "--limit", "1").exit_code == 75
    template = moved.parent / "spring.html.j2"
    template.write_text(template.read_text() + "<p>P.S.</p>\n")
    refused = cli("resume", moved, "--yes")
    assert refused.exit_code == 2, refused.output
    assert REFUSED in refused.stderr
    assert len(api.deliveries) == 3  # nothing sent
    allowed = cli("resume", moved, "--yes", "--allow-changed-content")
    assert allowed.exit_code == 0, allowed.output
    assert set(_mailed(api).values()) == {1}
    with closing(_file_ledger(moved)) as ledger:
        assert [entry.kind for entry in ledger.journal()] == ["content_changed"]


def test_a_template_edited_since_a_legacy_fingerprint_is_refused(api, cli, tmp_path):
    """The legacy form is recognised only for the content as it is today: an edit made since is refused."""
    manifest = copy_newsletter(api, tmp_path / "begun")
    assert cli("run", manifest, "--yes", "--limit", "2").exit_code == 75
    legacy = _record_as_before(manifest)
    template = manifest.parent / "spring.html.j2"
    template.write_text(template.read_text() + "<p>P.S.</p>\n")
    refused = cli("resume", manifest, "--yes")
    assert refused.exit_code == 2, refused.output
    assert REFUSED in refused.stderr
    assert len(api.deliveries) == 2
    with closing(_file_ledger(manifest)) as ledger:
        assert ledger.content_fingerprint() == legacy  # a refused run writes nothing


def _fingerprint_before_follow_ups(manifest: Path) -> str:
    """The content fingerprint as campaign recorded it before follow-ups (before 2026-12-05's 9b7ba8f):
    [message] and [unsubscribe] dumped whole, as they had no `deliver_at` then, the folder's path taken
    out of the text, then each template under its absolute path (here one text body, naming no other)."""
    loaded = load_manifest(manifest)
    message = loaded.message.model_dump(mode="json")
    del message["deliver_at"]
    assert loaded.unsubscribe is not None
    assert loaded.message.text is not None
    settings = {"message": message, "unsubscribe": loaded.unsubscribe.model_dump(mode="json")}
    text = json.dumps(settings, sort_keys=True, default=str).replace(
        json.dumps(f"{loaded.base_dir}/")[1:-1], ""
    )
    digest = hashlib.sha256(text.encode())
    body = loaded.message.text
    digest.update(f"\0{body}\0{body.read_text(encoding='utf-8')}".encode())
    return digest.hexdigest()


def test_a_campaign_begun_before_follow_ups_goes_on_after_the_upgrade(api, cli, tmp_path):
    """Its ledger's fingerprint has no `deliver_at` (follow-ups added the key to [message]): the first run
    after the upgrade was refused as an edit of the subject, a template or a header, none of which the
    user had touched. Now it goes on without a flag, nobody mailed twice, no change journaled; an edit
    made since is still refused."""
    manifest = copy_newsletter(api, tmp_path / "begun")
    (manifest.parent / "note.txt.j2").write_text("Spring news, {{ first_name }}\n", encoding="utf-8")
    manifest.write_text(manifest.read_text().replace('html = "spring.html.j2"', 'text = "note.txt.j2"'))
    assert cli("run", manifest, "--yes", "--limit", "2").exit_code == 75
    before = _fingerprint_before_follow_ups(manifest)
    with closing(_file_ledger(manifest)) as ledger:
        ledger._set_meta("content_fingerprint", before)
    note = manifest.parent / "note.txt.j2"
    note.write_text("Spring news, {{ first_name }}. P.S.\n", encoding="utf-8")
    refused = cli("resume", manifest, "--yes")
    assert refused.exit_code == 2, refused.output
    assert REFUSED in refused.stderr
    note.write_text("Spring news, {{ first_name }}\n", encoding="utf-8")
    done = cli("resume", manifest, "--yes")
    assert done.exit_code == 0, done.output
    assert sorted(_mailed(api)) == EVERYONE
    assert set(_mailed(api).values()) == {1}
    with closing(_file_ledger(manifest)) as ledger:
        assert ledger.content_fingerprint() == load_content_fingerprint(load_manifest(manifest))
        assert ledger.journal() == []
