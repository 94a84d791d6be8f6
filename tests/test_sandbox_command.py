"""`campaign sandbox` switches for provider quirks: --listing-lag, --broken-to-filter, --gzip
(`campaign.cli.wiring.build_sandbox_api` builds what the command serves).

Each switch must take effect, not only parse: the lag on the fake's clock in-process (no
sleeping), and all three through a real `campaign sandbox` process.
"""

from __future__ import annotations

import httpx
import pytest
from conftest import copy_sample
from support import serve_sandbox

from campaign.cli.wiring import build_sandbox_api
from campaign.errors import UsageError
from campaign.manifest import load_manifest
from campaign.testing import FakeClock, FakeNylas

SANDBOX_KEY = {"Authorization": "Bearer sandbox-key"}


@pytest.fixture(name="serve")
def _serve(_loopback):
    """Serve a fake on conftest's loopback server for this test; returns its base URL."""
    switch, url = _loopback

    def serve(fake: FakeNylas) -> str:
        switch.target = fake
        return url

    try:
        yield serve
    finally:
        switch.target = None


def _send(http: httpx.Client, grant: str, n: int) -> httpx.Response:
    body = {
        "to": [{"email": f"r{n}@example.com"}],
        "subject": f"Hello {n}",
        "body": "<p>Hi</p>",
        "metadata": {"key1": "spring", "key2": f"r{n}@example.com"},
    }
    return http.post(f"/v3/grants/{grant}/messages/send", json=body)


def _listed(http: httpx.Client, grant: str, **query: str) -> list[str]:
    response = http.get(f"/v3/grants/{grant}/messages", params=query)
    assert response.status_code == 200, response.text
    return [m["to"][0]["email"] for m in response.json()["data"]]


def test_the_sandbox_fake_lists_a_message_only_after_the_lag_and_never_by_to(tmp_path, serve):
    """--listing-lag 10s --broken-to-filter --gzip, on a fake clock: a sent message is found by
    metadata and in the Sent folder 10 s after its send, not before; `to` never finds it; answers
    are gzipped."""
    manifest = copy_sample("newsletter", tmp_path)
    (sender,) = load_manifest(manifest).senders
    clock = FakeClock()
    fake = build_sandbox_api(
        load_manifest(manifest), clock=clock, listing_lag_s=10, to_filter_broken=True, gzip=True
    )
    with httpx.Client(base_url=serve(fake), headers=SANDBOX_KEY, timeout=5) as http:
        sent = _send(http, sender.grant_id, 1)
        assert sent.status_code == 200
        assert sent.headers["content-encoding"] == "gzip"
        sent_folder = fake.sent_folder_id(sender.grant_id)
        for waited in (0, 9):
            clock.advance(waited)
            assert _listed(http, sender.grant_id, metadata_pair="key1:spring") == []
            assert _listed(http, sender.grant_id, **{"in": sent_folder}) == []
        clock.advance(1)
        assert _listed(http, sender.grant_id, metadata_pair="key1:spring") == ["r1@example.com"]
        assert _listed(http, sender.grant_id, **{"in": sent_folder}) == ["r1@example.com"]
        assert _listed(http, sender.grant_id, to="r1@example.com") == []
    assert len(fake.deliveries) == 1
    assert fake.gzip_answered == 8  # every answer: one send, seven lists


def test_without_switches_the_sandbox_fake_is_tidy(tmp_path, serve):
    """The control: no lag (listed at once), `to` works, answers are not compressed."""
    manifest = copy_sample("newsletter", tmp_path)
    (sender,) = load_manifest(manifest).senders
    fake = build_sandbox_api(load_manifest(manifest), clock=FakeClock())
    with httpx.Client(base_url=serve(fake), headers=SANDBOX_KEY, timeout=5) as http:
        assert "content-encoding" not in _send(http, sender.grant_id, 1).headers
        assert _listed(http, sender.grant_id, metadata_pair="key1:spring") == ["r1@example.com"]
        assert _listed(http, sender.grant_id, to="r1@example.com") == ["r1@example.com"]
    assert fake.gzip_answered == 0


def test_campaign_sandbox_process_applies_the_switches(tmp_path):
    """`campaign sandbox MANIFEST --listing-lag 1h --broken-to-filter --gzip` as a real process:
    a message just sent is not listed yet, `to` finds nothing, and the answers are gzipped."""
    manifest = copy_sample("newsletter", tmp_path)
    (sender,) = load_manifest(manifest).senders
    with (
        serve_sandbox(manifest, "--listing-lag", "1h", "--broken-to-filter", "--gzip") as base,
        httpx.Client(base_url=base, headers=SANDBOX_KEY, timeout=5) as http,
    ):
        sent = _send(http, sender.grant_id, 1)
        assert sent.status_code == 200
        assert sent.headers["content-encoding"] == "gzip"
        assert _listed(http, sender.grant_id, metadata_pair="key1:spring") == []
        assert _listed(http, sender.grant_id, to="r1@example.com") == []


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--listing-lag", "soon"], "--listing-lag: 'soon' is not a duration"),
        (["--broken-to-filter"], "give MANIFEST"),
        (["--listing-lag", "10s"], "give MANIFEST"),
    ],
)
def test_sandbox_switches_are_checked_before_anything_is_served(cli, args, says):
    """A bad duration, or a listing quirk without a manifest's grants to apply it to: exit 2."""
    result = cli("sandbox", *args)
    assert result.exit_code == UsageError.exit_code
    assert says in result.output
