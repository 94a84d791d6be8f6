"""The one-click unsubscribe endpoint over real HTTP on loopback: RFC 8058 POST, GET page, abuse, load."""

from __future__ import annotations

import html
import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import anyio
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from support import wait_until_listening

from campaign.errors import ManifestError
from campaign.testing import FakeClock, serve_on_loopback
from campaign.unsubscribe import (
    StoreError,
    SuppressionStore,
    make_token,
    open_store,
    token_candidates,
    url_carries_token,
)
from campaign.web import _unsubscribe, load_endpoint
from campaign.web._unsubscribe import MAX_BODY_BYTES, UnsubscribeEndpoint

SECRET = b"endpoint-test-secret-0123456789"
OLD_SECRET = b"endpoint-old-secret-9876543210"
CAMPAIGN = "spring"
ONE_CLICK = "List-Unsubscribe=One-Click"
FORM = {"content-type": "application/x-www-form-urlencoded"}


def _token(key: str = "ann@example.com", *, campaign: str = CAMPAIGN, secrets=(SECRET,)) -> str:
    return make_token(secrets=secrets, campaign=campaign, recipient_key=key)


def _rows(where: Path | str) -> list[tuple[str, str, str | None, str]]:
    """The store's entries as read on a connection of their own: in the file with sqlite3, else through
    a second store object (another process's view)."""
    if isinstance(where, Path):
        with sqlite3.connect(where) as db:
            return db.execute(
                "SELECT campaign, recipient_key, email, source FROM unsubscribes ORDER BY id"
            ).fetchall()
    reader = open_store(where, clock=FakeClock(), create=False)
    try:
        return [(e.campaign, e.recipient_key, e.email, e.source) for e in reader.entries()]
    finally:
        reader.close()


@pytest.fixture(name="store")
def _store(store_at) -> Iterator[SuppressionStore]:
    """The endpoint's store: a SQLite file, then (each test again) a PostgreSQL database."""
    store = open_store(store_at, clock=FakeClock())
    yield store
    store.close()


@pytest.fixture(name="url")
def _url(store) -> Iterator[str]:
    """The endpoint served on loopback; it verifies with the new secret and the old one (rotation)."""
    endpoint = UnsubscribeEndpoint(store, secrets=(SECRET, OLD_SECRET))
    with serve_on_loopback(endpoint) as base:
        yield f"{base}/unsubscribe"


def test_urlencoded_one_click_post_records_and_answers_200(url, store):
    """§7 item 20: the urlencoded RFC 8058 body unsubscribes that recipient from that campaign only."""
    response = httpx.post(url, params={"t": _token()}, content=ONE_CLICK, headers=FORM)
    assert response.status_code == 200
    assert _rows(store.path) == [(CAMPAIGN, "ann@example.com", "ann@example.com", "one-click")]


def test_multipart_one_click_post_records(url, store):
    """§7 item 21: a multipart/form-data body with the List-Unsubscribe part does the same."""
    response = httpx.post(
        url, params={"t": _token("bob@example.com")}, files={"List-Unsubscribe": (None, "One-Click")}
    )
    assert response.request.headers["content-type"].startswith("multipart/form-data")
    assert response.status_code == 200
    assert _rows(store.path) == [(CAMPAIGN, "bob@example.com", "bob@example.com", "one-click")]


def test_post_never_redirects_and_sets_no_cookie(url):
    """§7 item 22: no 3xx, no Set-Cookie, whether the token is good or bad, and no auth is asked for."""
    answers = [
        httpx.post(url, params={"t": _token()}, content=ONE_CLICK, headers=FORM, follow_redirects=False),
        httpx.post(url, params={"t": "forged"}, content=ONE_CLICK, headers=FORM, follow_redirects=False),
        httpx.get(url, params={"t": _token()}, follow_redirects=False),
    ]
    for response in answers:
        assert not 300 <= response.status_code < 400
        assert "set-cookie" not in response.headers
        assert "www-authenticate" not in response.headers
        assert "location" not in response.headers


def test_get_shows_a_confirmation_page_and_changes_nothing(url, store):
    """§7 item 23: GET answers 200 with a page whose button POSTs back; the store stays empty."""
    for _ in range(3):  # link scanners fetch more than once
        response = httpx.get(url, params={"t": _token()})
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
    assert _rows(store.path) == []
    page = response.text
    form = re.search(r'<form method="post" action="([^"]*)">(.*?)</form>', page, re.S)
    assert form is not None
    assert "<button" in form.group(2)
    fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]+)">', form.group(2)))
    assert fields["List-Unsubscribe"] == "One-Click"
    # A browser posts an empty action back to the page's own URL, token included.
    target = httpx.URL(str(response.url)).join(html.unescape(form.group(1)))
    clicked = httpx.post(target, data=fields)
    assert clicked.status_code == 200
    assert _rows(store.path) == [(CAMPAIGN, "ann@example.com", "ann@example.com", "page")]
    again = httpx.get(url, params={"t": _token()})
    assert "You are unsubscribed" in again.text


def test_repeated_post_is_harmless(url, store):
    """§7 item 24: posting again answers 200 and records nothing new."""
    for _ in range(3):
        response = httpx.post(url, params={"t": _token()}, content=ONE_CLICK, headers=FORM)
        assert response.status_code == 200
    assert len(_rows(store.path)) == 1


def test_tokens_are_scoped_to_campaign_and_recipient(url, store):
    """The same address from two campaigns is two entries; each token names exactly its recipient."""
    for campaign in ("spring", "autumn"):
        httpx.post(url, params={"t": _token(campaign=campaign)}, content=ONE_CLICK, headers=FORM)
    httpx.post(url, params={"t": _token("cus-42")}, content=ONE_CLICK, headers=FORM)
    assert _rows(store.path) == [
        ("spring", "ann@example.com", "ann@example.com", "one-click"),
        ("autumn", "ann@example.com", "ann@example.com", "one-click"),
        ("spring", "cus-42", None, "one-click"),
    ]


def test_invalid_tokens_get_the_same_bare_400(url, store):
    """Forged, truncated, other-secret, missing and junk tokens get one identical 400; nothing recorded."""
    good = _token()
    forged = good[:-1] + ("A" if good[-1] != "A" else "B")
    bad = [
        forged,
        good[:-4],
        _token(secrets=(b"someone-elses-secret-000000000",)),
        "",
        "x" * 5000,
        "<script>alert(1)</script>",
    ]
    bodies = set()
    for token in bad:
        for method in ("GET", "POST"):
            response = httpx.request(method, url, params={"t": token}, content=ONE_CLICK, headers=FORM)
            assert response.status_code == 400, (method, token[:20])
            bodies.add(response.text)
    assert len(bodies) == 1
    assert "script" not in bodies.pop()
    assert _rows(store.path) == []


def test_old_key_still_verifies_after_rotation(url, store):
    """A link signed with the previous secret (still listed second) unsubscribes."""
    response = httpx.post(url, params={"t": _token(secrets=(OLD_SECRET,))}, content=ONE_CLICK, headers=FORM)
    assert response.status_code == 200
    assert len(_rows(store.path)) == 1


def test_post_without_the_one_click_pair_changes_nothing(url, store):
    """A POST that is not RFC 8058's body (empty, other values) is refused with 400 and records nothing."""
    for body in ("", "List-Unsubscribe=Maybe", "unsubscribe=yes"):
        response = httpx.post(url, params={"t": _token()}, content=body, headers=FORM)
        assert response.status_code == 400
    assert _rows(store.path) == []


def test_other_content_types_are_refused(url, store):
    """JSON or plain text bodies are not forms: 415, nothing recorded."""
    response = httpx.post(url, params={"t": _token()}, json={"List-Unsubscribe": "One-Click"})
    assert response.status_code == 415
    assert _rows(store.path) == []


def test_body_size_is_limited_whether_declared_or_streamed(url, store):
    """A body over the limit gets 413, by Content-Length or while streaming a chunked body."""
    big = ONE_CLICK + "&x=" + "y" * MAX_BODY_BYTES
    declared = httpx.post(url, params={"t": _token()}, content=big, headers=FORM)
    assert declared.status_code == 413

    def chunks() -> Iterator[bytes]:
        yield ONE_CLICK.encode()
        for _ in range(40):
            yield b"&x=" + b"y" * 1024

    streamed = httpx.post(url, params={"t": _token()}, content=chunks(), headers=FORM)
    assert "content-length" not in streamed.request.headers
    assert streamed.status_code == 413
    assert _rows(store.path) == []


def test_multipart_file_parts_are_refused(url, store):
    """A multipart body carrying a file is a bad request, not an unsubscribe."""
    response = httpx.post(
        url,
        params={"t": _token()},
        data={"List-Unsubscribe": "One-Click"},
        files={"upload": ("a.txt", b"hello", "text/plain")},
    )
    assert response.status_code == 400
    assert _rows(store.path) == []


def test_token_in_the_last_path_segment_works(store):
    """A URL shaped /u/<token> (instead of ?t=) is understood."""
    endpoint = UnsubscribeEndpoint(store, secrets=(SECRET,))
    with serve_on_loopback(endpoint) as base:
        response = httpx.post(f"{base}/u/{_token()}", content=ONE_CLICK, headers=FORM)
    assert response.status_code == 200
    assert len(_rows(store.path)) == 1


def test_links_with_no_valid_token_anywhere_get_the_same_400(store):
    """Query values and path segments that hold no token, or a bad one (forged, cut short, another
    secret's), in the shapes a manifest may use: GET and POST get the one bare 400; nothing recorded."""
    good = _token()
    forged = good[:-1] + ("A" if good[-1] != "A" else "B")
    strangers = _token(secrets=(b"someone-elses-secret-000000000",))
    paths = [
        f"/unsubscribe?id={forged}",
        f"/unsubscribe?t=junk&id={good[:-4]}&utm_source=mail",
        f"/u/{forged}/confirm",
        f"/u/{strangers}.html",
        f"/u/{good[:-4]}.html?x={strangers}",
        "/u/confirm.html?id=",
    ]
    endpoint = UnsubscribeEndpoint(store, secrets=(SECRET, OLD_SECRET))
    bodies = set()
    with serve_on_loopback(endpoint) as base:
        for path in [f"/unsubscribe?t={forged}", *paths]:
            for method in ("GET", "POST"):
                response = httpx.request(method, f"{base}{path}", content=ONE_CLICK, headers=FORM)
                assert response.status_code == 400, (method, path)
                bodies.add(response.text)
    assert len(bodies) == 1
    assert "This link is not valid" in bodies.pop()
    assert _rows(store.path) == []


@pytest.mark.parametrize(
    ("shape", "carried"),
    [
        ("/unsubscribe?t={token}", True),
        ("/unsubscribe?id={token}&utm_source=mail", True),
        ("/u/{token}/confirm", True),
        ("/u/{token}.html?t=junk", True),
        ("/unsubscribe?t={upper}", False),  # `| upper`
        ("/unsubscribe?t={cut}", False),  # `[:10]`, `| truncate`
        ("/unsubscribe?t=ref-{token}", False),  # glued to other text
        ("/u/{token}x.html", False),
        ("/u/a={token}", False),  # a path segment, not a query value
        ("/u/Cork?2/{token}", False),  # a list value's '?': the token is in a query name
        ("/u#{token}", False),  # the fragment never reaches the server
    ],
)
def test_a_rendered_link_carries_its_token_exactly_when_the_endpoint_finds_it(tmp_path, shape, carried):
    """`url_carries_token`, which the composer asks of each rendered unsubscribe URL, says yes for the
    links the endpoint verifies and no for the others, whichever token a link of that shape holds."""
    token = _token()
    path = shape.format(token=token, upper=token.upper(), cut=token[:30])
    assert url_carries_token(f"https://example.com{path}", token) is carried
    other = _token("bob@example.com")  # the same shape again, judged from what was learnt of it
    assert url_carries_token(f"https://example.com{path.replace(token, other)}", other) is carried
    store = open_store(tmp_path / "store.sqlite", clock=FakeClock())
    try:
        with serve_on_loopback(UnsubscribeEndpoint(store, secrets=(SECRET,))) as base:
            page = httpx.get(f"{base}{path}")
    finally:
        store.close()
    assert page.status_code == (200 if carried else 400)


# Pieces of URLs around a token: delimiters, short words, token-shaped junk (it counts against the
# endpoint's bound on candidates), names the endpoint reads first, and encoded characters.
_URL_PIECES = st.sampled_from(
    ["/", "?", "&", "=", "#", ".", ".html", "u", "t=", "token=", "id=", "a=b", "x", "%2F", "%3D", "+"]
    + [f"junk{n:02d}" + "Zm9yZ2VkLXRva2VuLWp1bmst" for n in range(12)]
)


@settings(max_examples=400, deadline=None)
@given(
    before=st.lists(_URL_PIECES, max_size=14),
    after=st.lists(_URL_PIECES, max_size=6),
    host=st.sampled_from(["example.com", "example.com:8443", "EXAMPLE.com"]),
)
def test_url_carries_token_says_what_the_endpoint_would_find(before, after, host):
    """For any URL around a verbatim token, `url_carries_token` (string operations, for every row) agrees
    with the endpoint's own reading: urlsplit, parse_qsl and unquote, then `token_candidates`."""
    token = _token()
    url = f"https://{host}/" + "".join(before) + token + "".join(after)
    parts = urlsplit(url)
    found = token in token_candidates(parse_qsl(parts.query, keep_blank_values=True), unquote(parts.path))
    assert url_carries_token(url, token) is found, url


def test_a_url_stuffed_with_junk_answers_400_after_a_few_token_checks(store, monkeypatch):
    """Hundreds of token-shaped query values and path segments: a bare 400, and only a bounded handful
    of them is checked as a token (a hostile URL costs no more than a real one)."""
    checked: list[str] = []
    verify = _unsubscribe.verify_token

    def counting(token: str, **kwargs: Any) -> Any:
        checked.append(token)
        return verify(token, **kwargs)

    monkeypatch.setattr(_unsubscribe, "verify_token", counting)
    junk = [f"{n:04d}" + "Zm9yZ2VkLXRva2VuLWp1bmstdmFsdWUtMDEy" for n in range(300)]
    query = "&".join(f"j{n}={value}" for n, value in enumerate(junk[:200]))
    path = "/".join(junk[200:])
    endpoint = UnsubscribeEndpoint(store, secrets=(SECRET,))
    with serve_on_loopback(endpoint) as base:
        for method in ("GET", "POST"):
            checked.clear()
            response = httpx.request(method, f"{base}/{path}?{query}", content=ONE_CLICK, headers=FORM)
            assert response.status_code == 400
            assert "This link is not valid" in response.text
            assert 0 < len(checked) <= 20, len(checked)
    assert _rows(store.path) == []


@pytest.mark.parametrize("failure", [StoreError, RuntimeError])
def test_a_store_that_cannot_be_read_answers_503_for_the_page_as_for_the_post(
    store, monkeypatch, caplog, failure
):
    """A store locked or out of reach (StoreError), or failing in any other way (a bug): GET, HEAD and
    the one-click POST all answer 503 with Retry-After: 60 and the same short page (no bare 500, no
    traceback), so a mail provider retries; once it is back, GET works. A StoreError is told in the log,
    a line a route a minute (the HEAD, a GET within the minute, is counted, not logged), naming the route
    and the store's error, never the token; an unexpected error by its type alone: its text may quote
    the request."""
    endpoint = UnsubscribeEndpoint(store, secrets=(SECRET,))

    def unavailable(*_args: Any, **_kwargs: Any) -> Any:
        raise failure(f"{store.where}: database is locked")

    with serve_on_loopback(endpoint) as base, caplog.at_level("WARNING"):
        link = f"{base}/unsubscribe?t={_token()}"
        with monkeypatch.context() as patch:
            patch.setattr(store, "find", unavailable)
            patch.setattr(store, "record", unavailable)
            page = httpx.get(link)
            head = httpx.head(link)
            posted = httpx.post(link, content=ONE_CLICK, headers=FORM)
        for response in (page, head, posted):
            assert response.status_code == 503
            assert response.headers["retry-after"] == "60"
            assert response.headers["cache-control"] == "no-store"
        assert page.headers["content-type"].startswith("text/html")
        assert page.text == posted.text
        assert "Try again later" in page.text
        assert "locked" not in page.text
        assert "Traceback" not in page.text
        assert head.content == b""
        assert _rows(store.path) == []
        back = httpx.get(link)
    assert back.status_code == 200
    assert "Unsubscribe?" in back.text
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("campaign")]
    if failure is StoreError:
        told = f"the unsubscribe store failed ({store.where}: database is locked); answered 503"
        assert logged == [f"GET /unsubscribe: {told}", f"POST /unsubscribe: {told}"]
    else:
        expected = "an unsubscribe could not be read or recorded (RuntimeError); answered 503"
        assert logged == [expected] * 3
        assert "locked" not in caplog.text
    assert _token() not in caplog.text
    assert SECRET.decode() not in caplog.text


def test_pages_carry_no_store_and_noindex_headers(url):
    """Pages are not cached or indexed and cannot be framed."""
    response = httpx.get(url, params={"t": _token()})
    assert response.headers["cache-control"] == "no-store"
    assert "noindex" in response.headers["x-robots-tag"]
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]


def test_concurrent_posts_are_all_recorded_once(url, store):
    """100 concurrent POSTs (20 recipients, 5 each) all get 200; the store has exactly 20 entries."""
    keys = [f"r{n}@example.com" for n in range(20)]
    statuses: list[int] = []

    async def hammer() -> None:
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=50)) as client:

            async def one(key: str) -> None:
                response = await client.post(url, params={"t": _token(key)}, content=ONE_CLICK, headers=FORM)
                statuses.append(response.status_code)

            async with anyio.create_task_group() as group:
                for key in keys * 5:
                    group.start_soon(one, key)

    anyio.run(hammer)
    assert statuses == [200] * 100
    assert sorted(key for _, key, _, _ in _rows(store.path)) == sorted(keys)


def test_concurrent_writers_in_two_processes_share_the_store(store_at):
    """A second connection (as another process would hold) records while the endpoint records: both land."""
    path = store_at
    first = open_store(path, clock=FakeClock())
    second = open_store(path, clock=FakeClock())
    errors: list[BaseException] = []

    def write(store: SuppressionStore, prefix: str) -> None:
        try:
            for n in range(200):
                store.record(CAMPAIGN, f"{prefix}{n}@example.com", source="one-click")
        except BaseException as exc:  # collected: a thread's failure must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(s, p)) for s, p in ((first, "a"), (second, "b"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    first.close()
    second.close()
    assert errors == []
    assert len(_rows(path)) == 400


def test_app_mounts_inside_another_asgi_service(store):
    """Users can mount `.app` under a prefix in their own starlette app; the token comes from the URL."""
    endpoint = UnsubscribeEndpoint(store, secrets=(SECRET,))

    class Site:
        app = Starlette(
            routes=[
                Route("/", lambda _request: PlainTextResponse("home")),
                Mount("/mail/unsubscribe", app=endpoint.app),
            ]
        )

    with serve_on_loopback(Site()) as base:
        assert httpx.get(f"{base}/").text == "home"
        # Under a Mount the URL needs the slash after the prefix: starlette redirects without it.
        response = httpx.post(
            f"{base}/mail/unsubscribe/", params={"t": _token()}, content=ONE_CLICK, headers=FORM
        )
        path_style = httpx.post(
            f"{base}/mail/unsubscribe/{_token('bob@example.com')}", content=ONE_CLICK, headers=FORM
        )
    assert (response.status_code, path_style.status_code) == (200, 200)
    assert [key for _, key, _, _ in _rows(store.path)] == ["ann@example.com", "bob@example.com"]


def test_load_endpoint_reads_secrets_from_the_named_variable(tmp_path, monkeypatch):
    """load_endpoint takes secrets from the env var it is told, creates the store, never shows a secret."""
    monkeypatch.delenv("MY_UNSUB_SECRET", raising=False)
    with pytest.raises(ManifestError, match="MY_UNSUB_SECRET is not set"):
        load_endpoint(tmp_path / "u.sqlite", secret_env="MY_UNSUB_SECRET")
    monkeypatch.setenv("MY_UNSUB_SECRET", "short-one")
    with pytest.raises(ManifestError, match="at least 16") as caught:
        load_endpoint(tmp_path / "u.sqlite", secret_env="MY_UNSUB_SECRET")
    assert "short-one" not in str(caught.value)
    monkeypatch.setenv("MY_UNSUB_SECRET", f"{SECRET.decode()} {OLD_SECRET.decode()}")
    endpoint = load_endpoint(tmp_path / "u.sqlite", secret_env="MY_UNSUB_SECRET")
    try:
        with serve_on_loopback(endpoint) as base:
            response = httpx.post(
                base, params={"t": _token(secrets=(OLD_SECRET,))}, content=ONE_CLICK, headers=FORM
            )
        assert response.status_code == 200
    finally:
        endpoint.store.close()
    assert (tmp_path / "u.sqlite").stat().st_mode & 0o777 == 0o600


def test_serve_command_runs_the_endpoint_on_uvicorn(store_at):
    """`campaign unsubscribe serve --store … --port …` serves one-click POSTs into the store (a file, or
    a PostgreSQL database by its URL)."""
    store = store_at
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "CAMPAIGN_UNSUBSCRIBE_SECRET": SECRET.decode()}
    command = [
        sys.executable,
        "-m",
        "campaign",
        "unsubscribe",
        "serve",
        "--store",
        str(store),
        "--port",
        str(port),
    ]
    with subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as process:
        try:
            wait_until_listening(port, process)
            url = f"http://127.0.0.1:{port}/unsubscribe"
            response = httpx.post(url, params={"t": _token()}, content=ONE_CLICK, headers=FORM, timeout=5)
            assert response.status_code == 200
            assert "server" not in response.headers
        finally:
            process.terminate()
    assert _rows(store) == [(CAMPAIGN, "ann@example.com", "ann@example.com", "one-click")]


def test_serve_command_without_secret_exits_78(cli, tmp_path, monkeypatch):
    """With the secret variable unset the command stops with 78 and names the variable."""
    monkeypatch.delenv("CAMPAIGN_UNSUBSCRIBE_SECRET", raising=False)
    result = cli("unsubscribe", "serve", "--store", tmp_path / "u.sqlite")
    assert result.exit_code == 78
    assert "CAMPAIGN_UNSUBSCRIBE_SECRET" in result.stderr
    result = cli("unsubscribe", "serve", "--store", tmp_path / "u.csv")
    assert result.exit_code == 2
    assert ".sqlite" in result.stderr
