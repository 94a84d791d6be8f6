"""Issue 13 end to end over loopback: a fake whose listings lag behind its sends (and, like Microsoft,
whose `to` filter finds nothing), sends that answer 504 after going out, reconcile run too early and
again after the settle time, resumes in between: every recipient mailed exactly once, counted at the fake."""

from __future__ import annotations

from collections import Counter

import pytest
from conftest import API_KEY, copy_sample

from campaign.manifest import load_manifest
from campaign.testing import FakeNylas, Fault


@pytest.fixture(name="lagging")
def _lagging(_loopback, cli_clock, monkeypatch):
    """A fake on the CLI's clock (so its listing lag is measured in the same time), served on loopback."""
    switch, url = _loopback
    fake = FakeNylas(api_key=API_KEY, clock=cli_clock)
    switch.target = fake
    monkeypatch.setenv("NYLAS_API_URI", url)
    monkeypatch.setenv("NYLAS_API_KEY", API_KEY)
    monkeypatch.setenv("CAMPAIGN_UNSUBSCRIBE_SECRET", "realism-secret-0123456789abcdef")
    try:
        yield fake
    finally:
        switch.target = None


def _states(cli, manifest) -> dict[str, int]:
    import json

    return json.loads(cli("status", manifest, "--json").stdout)["states"]


@pytest.mark.parametrize("provider", ["google", "microsoft"])
def test_a_lagging_mailbox_never_turns_a_sent_message_into_a_second_one(
    lagging, cli, cli_clock, tmp_path, provider
):
    """504 after each send, a 10 s listing lag (and a broken `to` filter on Microsoft): reconcile at once
    calls nothing "not sent", resume sends nothing twice; after the settle time reconcile finds them all."""
    manifest = copy_sample("newsletter", tmp_path)
    (sender,) = load_manifest(manifest).senders
    lagging.add_grant(sender.grant_id, sender.email or "", provider=provider)
    lagging.set_listing_quirks(sender.grant_id, lag_s=10, to_filter_broken=provider == "microsoft")
    lagging.script(Fault.TIMEOUT_AFTER_SEND, times=5)
    run = cli("run", manifest, "--yes")
    assert run.exit_code == 1, run.output
    assert _states(cli, manifest)["unknown"] == 5
    early = cli("reconcile", manifest)
    assert early.exit_code == 1, early.output
    assert _states(cli, manifest)["pending"] == 0  # the bug: "not found yet" taken for "not sent"
    assert cli("resume", manifest, "--yes").exit_code == 1
    cli_clock.advance(15 * 60)
    late = cli("reconcile", manifest, "--json")
    assert late.exit_code == 0, late.output
    assert cli("resume", manifest, "--yes").exit_code == 0
    states = _states(cli, manifest)
    assert (states["sent"], states["unknown"], states["pending"]) == (5, 0, 0)
    delivered = Counter(d.payload["to"][0]["email"].lower() for d in lagging.deliveries)
    assert sorted(delivered.values()) == [1] * 5
