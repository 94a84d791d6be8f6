"""A real `campaign` process killed at random moments, and interrupted by Ctrl-C, against a loopback fake.

The fake Nylas runs in this test process (so it outlives every kill) and the CLI runs as
a subprocess pointed at it by NYLAS_API_URI. Whatever the moment of death, after resume
and reconcile each recipient was delivered exactly once (idempotent replays are not
deliveries) and `status --json` agrees with what the fake received.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from support import fake_with_grants

from campaign.testing import FakeNylas, Fault
from campaign.testing.server import serve_on_loopback

API_KEY = "nyk_v0_crash_test_key_0123456789"
POLL_S = 0.01
SENDERS = ("north", "south")


def _write_campaign(folder: Path, *, recipients: int, timeout_s: float, per_second: float) -> Path:
    """A two-sender, plain-text campaign with a fast pace."""
    folder.mkdir()
    rows = "\n".join(f"person{n:03d}@example.com,Person {n}" for n in range(1, recipients + 1))
    (folder / "recipients.csv").write_text(f"email,name\n{rows}\n", encoding="utf-8")
    (folder / "note.txt.j2").write_text("Hello {{ name }},\nthis is a note.\n", encoding="utf-8")
    senders = "".join(
        f'\n[[senders]]\nname = "{name}"\ngrant_id = "grant-{name}"\nemail = "{name}@corp.example.com"\n'
        f"per_second = {per_second}\nconcurrency = 3\n"
        for name in SENDERS
    )
    manifest = folder / "campaign.toml"
    manifest.write_text(
        f'[campaign]\nname = "crash-test"\n\n[api]\ntimeout_s = {timeout_s}\n\n'
        '[recipients]\nsource = "recipients.csv"\nname_column = "name"\n\n'
        '[message]\nsubject = "A note for {{ name }}"\ntext = "note.txt.j2"\n' + senders,
        encoding="utf-8",
    )
    return manifest


def _fake() -> FakeNylas:
    return fake_with_grants(API_KEY, SENDERS)


def _start(url: str, *args: str | Path) -> subprocess.Popen[str]:
    env = {**os.environ, "NYLAS_API_URI": url, "NYLAS_API_KEY": API_KEY, "COLUMNS": "120"}
    command = [sys.executable, "-m", "campaign", *(str(arg) for arg in args)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(url: str, *args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    process = _start(url, *args)
    out, err = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def _wait_for(condition: Callable[[], bool], process: subprocess.Popen[str], *, limit_s: float = 30) -> bool:
    """Poll (bounded) until `condition` holds; False if the process ended first."""
    for _ in range(int(limit_s / POLL_S)):
        if condition():
            return True
        try:
            process.wait(timeout=POLL_S)
        except subprocess.TimeoutExpired:
            continue
        return condition()
    raise AssertionError("the campaign process made no progress")


def _status(url: str, manifest: Path) -> dict:
    result = _finish(url, "status", manifest, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _delivered(fake: FakeNylas) -> Counter[str]:
    return Counter(d.payload["to"][0]["email"] for d in fake.deliveries)


def test_sigkill_at_random_moments_then_resume_and_reconcile_mails_everyone_exactly_once(tmp_path):
    """Killed with SIGKILL at least 10 times mid-send with faults on; resumed each time; then reconciled."""
    recipients = 60
    manifest = _write_campaign(tmp_path / "c", recipients=recipients, timeout_s=1.0, per_second=20)
    fake = _fake()
    rng = random.Random(20260105)
    faults = [
        (Fault.NYLAS_RATE_LIMIT, {}),
        (Fault.PROVIDER_THROTTLE, {"retry_after_s": 0.5}),
        (Fault.UNAVAILABLE, {}),
        (Fault.TIMEOUT_AFTER_SEND, {}),
        (Fault.SLOW, {"delay_s": 1.5}),  # beyond the client's 1 s timeout: ambiguous, then 409 / replay
        (Fault.RESET_AFTER_SEND, {}),
    ]
    kills = 0
    with serve_on_loopback(fake) as url:
        for cycle in range(20):
            for fault, options in rng.sample(faults, k=2):
                fake.script(fault, **options)
            process = _start(url, "run" if cycle == 0 else "resume", manifest, "--yes")
            target = len(fake.requests) + rng.randint(1, 4)
            _wait_for(lambda target=target: len(fake.requests) >= target, process)
            try:  # a random moment after the target: mid-request, mid-write, or mid-backoff
                process.wait(timeout=rng.uniform(0, 0.15))
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGKILL)
                kills += 1
            process.communicate(timeout=30)
            assert max(_delivered(fake).values(), default=0) <= 1, f"mailed twice after {kills} kills"
            if kills >= 10:
                break
        assert kills >= 10
        fake.clear_faults()
        for _ in range(4):  # resume, then reconcile what is unknown, until done
            resumed = _finish(url, "resume", manifest, "--yes")
            assert resumed.returncode in (0, 1), resumed.stdout + resumed.stderr
            reconciled = _finish(url, "reconcile", manifest)
            assert reconciled.returncode == 0, reconciled.stdout + reconciled.stderr
            status = _status(url, manifest)
            if status["done"]:
                break
        delivered = _delivered(fake)
    assert status["done"] is True, status["states"]
    assert sorted(delivered) == [f"person{n:03d}@example.com" for n in range(1, recipients + 1)]
    assert set(delivered.values()) == {1}
    assert status["states"]["sent"] == len(fake.deliveries) == recipients
    assert {s: status["states"][s] for s in ("pending", "inflight", "unknown", "failed")} == dict.fromkeys(
        ("pending", "inflight", "unknown", "failed"), 0
    )
    assert sum(1 for r in fake.requests if r.replayed) >= 1  # resumed rows were settled by replays


@pytest.fixture(name="slow_campaign")
def _slow_campaign(tmp_path):
    """A campaign whose sends take a while, on a fake served on loopback."""
    manifest = _write_campaign(tmp_path / "c", recipients=30, timeout_s=20, per_second=20)
    fake = _fake()
    fake.latency_s = 0.2
    with serve_on_loopback(fake) as url:
        yield manifest, fake, url


def test_ctrl_c_stops_claiming_settles_sends_in_flight_and_exits_130(slow_campaign):
    """SIGINT mid-run: exit 130 with the resume command; nothing in flight or lost; resume completes."""
    manifest, fake, url = slow_campaign
    process = _start(url, "run", manifest, "--yes")
    _wait_for(lambda: len(fake.deliveries) >= 3 and fake.in_flight >= 1, process)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 130, out + err
    assert "Stopping" in err
    assert f"campaign resume {manifest}" in out
    status = _status(url, manifest)
    assert status["states"]["inflight"] == 0  # the sends in flight finished and were recorded
    assert status["states"]["sent"] == len(fake.deliveries) < 30
    resumed = _finish(url, "resume", manifest, "--yes")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert set(_delivered(fake).values()) == {1}
    assert len(fake.deliveries) == 30


def test_a_second_ctrl_c_quits_at_once_and_resume_settles_what_was_in_flight(slow_campaign):
    """Two SIGINTs while requests hang: exit 130 without waiting; rows stay in flight; resume sends once."""
    manifest, fake, url = slow_campaign
    fake.script(Fault.SLOW, times=6, delay_s=2)
    process = _start(url, "run", manifest, "--yes")
    _wait_for(lambda: fake.in_flight >= 2, process)
    process.send_signal(signal.SIGINT)
    assert process.stderr is not None
    first = process.stderr.readline()  # signals coalesce: wait until the first one is seen
    assert first.startswith("Stopping"), first
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 130, out + err
    assert "Quitting now" in err
    status = _status(url, manifest)
    assert status["states"]["inflight"] >= 1  # not waited for: left in flight, for resume
    resumed = _finish(url, "resume", manifest, "--yes")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert set(_delivered(fake).values()) == {1}
    assert len(fake.deliveries) == 30


def test_a_grant_id_changed_after_a_kill_never_resends_a_row_in_flight_through_the_new_grant(slow_campaign):
    """kill -9 while north's sends hang, north's grant_id edited, resume: the rows that were in flight
    become unknown (never sent through the new grant); reconcile finds them in the old grant; in the end
    each recipient got one message, and the new grant sent none of the ones in flight."""
    manifest, fake, url = slow_campaign
    fake.script(Fault.SLOW, grant_id="grant-north", times=3, delay_s=1.5)
    process = _start(url, "run", manifest, "--yes")
    _wait_for(lambda: fake.in_flight >= 2, process)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    for _ in range(int(10 / POLL_S)):  # bounded: the hung sends land at the fake (in the old grant)
        if fake.in_flight == 0:
            break
        time.sleep(POLL_S)
    assert fake.in_flight == 0
    hung = {d.payload["to"][0]["email"] for d in fake.deliveries if d.grant_id == "grant-north"}
    manifest.write_text(manifest.read_text(encoding="utf-8").replace('"grant-north"', '"grant-north-2"'))
    fake.add_grant("grant-north-2", "north@corp.example.com")
    resumed = _finish(url, "resume", manifest, "--yes")
    assert resumed.returncode == 1, resumed.stdout + resumed.stderr  # done, but some rows unknown
    assert _status(url, manifest)["states"]["unknown"] >= 2
    via_new = {d.payload["to"][0]["email"] for d in fake.deliveries if d.grant_id == "grant-north-2"}
    assert not hung & via_new
    assert set(_delivered(fake).values()) == {1}
    reconciled = _finish(url, "reconcile", manifest, "--min-age", "0s")
    assert reconciled.returncode == 0, reconciled.stdout + reconciled.stderr
    assert "found by metadata key2=" in reconciled.stdout
    assert "grant-north-2" not in reconciled.stdout
    final = _finish(url, "resume", manifest, "--yes")
    assert final.returncode == 0, final.stdout + final.stderr
    assert set(_delivered(fake).values()) == {1}
    assert len(fake.deliveries) == 30
    assert _status(url, manifest)["done"] is True


def test_sigkill_during_follow_ups_then_resume_mails_each_step_exactly_once(tmp_path):
    """A two-step campaign (the follow-up 5 s after step 1, so the first run surely ends before it is
    due; then sent with --wait) killed with SIGKILL at random moments while the follow-ups go out,
    faults on; resumed each time: each (recipient, step) is delivered once, and every follow-up
    answers its recipient's step-1 message."""
    recipients = 40
    manifest = _write_campaign(tmp_path / "c", recipients=recipients, timeout_s=1.0, per_second=20)
    (manifest.parent / "nudge.txt.j2").write_text("Just checking, {{ name }}.\n", encoding="utf-8")
    followup = '\n[[followups]]\nname = "nudge"\nafter = "5s"\ntext = "nudge.txt.j2"\n\n[[senders]]'
    text = manifest.read_text(encoding="utf-8").replace("\n[[senders]]", followup, 1)
    manifest.write_text(text, encoding="utf-8")
    fake = _fake()
    rng = random.Random(20261205)
    faults = [(Fault.TIMEOUT_AFTER_SEND, {}), (Fault.RESET_AFTER_SEND, {}), (Fault.UNAVAILABLE, {})]

    def per_step() -> Counter[tuple[str, str]]:
        return Counter(
            (d.payload["to"][0]["email"], d.payload.get("metadata", {}).get("step", "message"))
            for d in fake.deliveries
        )

    kills = 0
    with serve_on_loopback(fake) as url:
        first = _finish(url, "run", manifest, "--yes")  # step 1 only: the nudge is not due yet
        assert first.returncode == 75, first.stdout + first.stderr
        for _cycle in range(12):
            fault, options = rng.choice(faults)
            fake.script(fault, **options)
            process = _start(url, "resume", manifest, "--yes", "--wait")
            target = len(fake.requests) + rng.randint(1, 5)
            _wait_for(lambda target=target: len(fake.requests) >= target, process)
            try:
                process.wait(timeout=rng.uniform(0, 0.1))
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGKILL)
                kills += 1
            process.communicate(timeout=30)
            assert max(per_step().values(), default=0) <= 1, f"mailed a step twice after {kills} kills"
            if kills >= 5:
                break
        assert kills >= 3
        fake.clear_faults()
        for _ in range(4):
            resumed = _finish(url, "resume", manifest, "--yes", "--wait")
            assert resumed.returncode in (0, 1), resumed.stdout + resumed.stderr
            # The fake lists a sent message at once: a row it does not list was not sent (a cached 503).
            reconciled = _finish(url, "reconcile", manifest, "--min-age", "1s")
            assert reconciled.returncode == 0, reconciled.stdout + reconciled.stderr
            status = _status(url, manifest)
            if status["done"]:
                break
    assert status["done"] is True, status["steps"]
    delivered = per_step()
    assert set(delivered.values()) == {1}
    assert len(delivered) == 2 * recipients
    assert status["steps"]["nudge"]["sent"] == status["steps"]["message"]["sent"] == recipients
    firsts = {
        d.payload["to"][0]["email"]: d.id for d in fake.deliveries if "step" not in d.payload["metadata"]
    }
    for delivery in fake.deliveries:
        if delivery.payload["metadata"].get("step") == "nudge":
            assert delivery.payload["reply_to_message_id"] == firsts[delivery.payload["to"][0]["email"]]
