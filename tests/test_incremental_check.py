"""Issue 15, incremental re-check: a run whose list changed renders only the rows added or changed
(and never the ones sent already); a changed template or manifest checks every row that may be sent.
Renders are counted through a seam (`Composer.render`), sends at the fake."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from campaign.render import Composer

GRANT = "grant-inc"


@pytest.fixture(name="renders")
def _renders(monkeypatch) -> Counter[str]:
    """Every render, by recipient key (the seam: the composer every run renders through)."""
    counted: Counter[str] = Counter()
    original = Composer.render

    def render(self, recipient, sender, *, previous=None):
        counted[recipient.key] += 1
        return original(self, recipient, sender, previous=previous)

    monkeypatch.setattr(Composer, "render", render)
    return counted


def _campaign(folder: Path, people: int) -> Path:
    folder.mkdir()
    (folder / "note.txt.j2").write_text("Hello {{ name }} from {{ city }}\n", encoding="utf-8")
    _write_rows(folder, [(f"p{n}@example.com", f"P {n}", "Berlin") for n in range(1, people + 1)])
    manifest = folder / "campaign.toml"
    manifest.write_text(
        '[campaign]\nname = "incremental"\n\n[recipients]\nsource = "r.csv"\nname_column = "name"\n\n'
        '[message]\nsubject = "Hi {{ name }}"\ntext = "note.txt.j2"\n\n'
        f'[[senders]]\nname = "a"\ngrant_id = "{GRANT}"\nemail = "a@corp.example.com"\nper_second = 100\n',
        encoding="utf-8",
    )
    return manifest


def _write_rows(folder: Path, rows: list[tuple[str, str, str]]) -> None:
    lines = ["email,name,city", *(f'{email},"{name}",{city}' for email, name, city in rows)]
    (folder / "r.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _rows(folder: Path) -> list[tuple[str, str, str]]:
    lines = (folder / "r.csv").read_text(encoding="utf-8").splitlines()[1:]
    return [tuple(part.strip('"') for part in line.split(",")) for line in lines]  # type: ignore[misc]


def _started(api, cli, tmp_path, renders) -> Path:
    """Six rows, two of them sent (--limit 2); the render count starts at zero after."""
    api.add_grant(GRANT, "a@corp.example.com")
    manifest = _campaign(tmp_path / "c", 6)
    assert cli("run", manifest, "--yes", "--limit", "2").exit_code == 75
    assert len(api.deliveries) == 2
    renders.clear()
    return manifest


def test_an_appended_row_alone_is_rendered_and_everyone_is_sent_once(api, cli, tmp_path, renders):
    manifest = _started(api, cli, tmp_path, renders)
    folder = manifest.parent
    _write_rows(folder, [*_rows(folder), ("p7@example.com", "P 7", "Lisbon")])
    result = cli("resume", manifest, "--yes")
    assert result.exit_code == 0, result.output
    # The check rendered the new row only; the sends render each of the five they send, once.
    sent_now = [d.payload["to"][0]["email"] for d in api.deliveries[2:]]
    assert sorted(sent_now) == [f"p{n}@example.com" for n in range(3, 8)]
    assert renders["p7@example.com"] == 2  # checked (new), then sent
    assert all(renders[email] == 1 for email in sent_now if email != "p7@example.com")  # sent only
    assert renders["p1@example.com"] == renders["p2@example.com"] == 0  # sent before: never again
    emails = [d.payload["to"][0]["email"] for d in api.deliveries]
    assert sorted(emails) == sorted(set(emails))


def test_a_changed_row_is_checked_again_and_refused_when_now_bad(api, cli, tmp_path, renders):
    manifest = _started(api, cli, tmp_path, renders)
    folder = manifest.parent
    rows = _rows(folder)
    rows[3] = ("p4@example.com", "P 4", "Porto")  # changed: checked again
    _write_rows(folder, rows)
    with pytest.MonkeyPatch.context() as patch:
        # Stop right after the check: the plan is all this test looks at.
        patch.setattr("campaign.cli.sending._confirm", lambda *_args, **_kwargs: False)
        assert cli("resume", manifest).exit_code == 0
    assert dict(renders) == {"p4@example.com": 1}
    rows[4] = ("p5@example.com", "P 5\r\nBcc: all@example.com", "Berlin")  # now a header injection
    _write_rows(folder, rows)
    renders.clear()
    refused = cli("resume", manifest, "--yes")
    assert refused.exit_code == 65, refused.output
    assert "row 5" in refused.output
    assert len(api.deliveries) == 2  # nothing sent
    assert set(renders) == {"p4@example.com", "p5@example.com"}  # unchanged since its record: p4 again


def test_a_changed_template_checks_every_row_that_may_be_sent(api, cli, tmp_path, renders):
    manifest = _started(api, cli, tmp_path, renders)
    (manifest.parent / "note.txt.j2").write_text("Hello again {{ name }}\n", encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("campaign.cli.sending._confirm", lambda *_args, **_kwargs: False)
        assert cli("resume", manifest, "--allow-changed-content").exit_code == 0
    assert sorted(renders) == [f"p{n}@example.com" for n in range(3, 7)]  # the sent two are never sent


def test_preview_renders_no_row_sent_already_and_counts_them(api, cli, tmp_path, renders):
    """The preview streams every row as a run would, and like a run it does not render rows the ledger
    holds as sent: they are counted and listed as already sent."""
    import json

    manifest = _started(api, cli, tmp_path, renders)
    result = cli("preview", manifest, "--json", "--out", tmp_path / "site")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["already_done_by_state"] == {"sent": 2}
    assert report["to_send"] == 4
    assert set(renders) == {f"p{n}@example.com" for n in range(3, 7)}
