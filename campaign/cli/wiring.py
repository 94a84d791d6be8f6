"""Building what commands need from a manifest and the environment: the manifest itself (its secret
variables noted, so that no error shows their values), where the campaign's ledger lives and opening
it, the API key, URI and unsubscribe secrets from environment variables, a connected Nylas client, and
the sandbox's fake API in place of the real one.

It prints nothing and decides no exit code: problems are raised as CampaignErrors for the command.
The HTTP client and the fake API are imported by the functions that build them, so that commands
which only read the ledger (`status`) do not load httpx, starlette and uvicorn.
"""

from __future__ import annotations

import errno
import os
import shlex
import tempfile
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from campaign.cli.base import note_secret_envs
from campaign.clock import Clock
from campaign.errors import InputFileError, ManifestError, UsageError
from campaign.ledger import (
    FirstPlan,
    GrantLeases,
    Ledger,
    LedgerSite,
    SqliteSite,
    check_no_orphaned_ledger,
    ledger_marker_path,
    ledger_site,
)
from campaign.manifest import Manifest, check_ledger_url, load_manifest
from campaign.outputfiles import SymlinkRefusedError, make_private_dir
from campaign.redaction import secret_values
from campaign.unsubscribe import parse_secrets

if TYPE_CHECKING:
    from campaign.nylas import NylasClient
    from campaign.testing import FakeNylas

__all__ = [
    "SANDBOX_API_KEY",
    "SANDBOX_API_URI",
    "build_sandbox_api",
    "command_path",
    "connect_api",
    "ledger_candidates",
    "ledger_path_for",
    "load_campaign",
    "locate_ledger",
    "prepare_sandbox_outbox",
    "read_api_key",
    "read_api_uri",
    "read_ledger_password",
    "read_secrets",
    "register_sandbox_grants",
    "require_ledger",
    "sandbox_outbox_path",
    "write_sandbox_outbox",
]

SANDBOX_API_KEY = "sandbox-key"
SANDBOX_SECRET = "sandbox-unsubscribe-secret-not-for-real-mail"
SANDBOX_API_URI = "http://sandbox.nylas.test"  # never resolved: the sandbox is served in-process
# The sandbox's recipients answer a campaign with follow-ups this often (a reply; an out-of-office).
SANDBOX_REPLY_SHARE = 0.3
SANDBOX_AUTO_REPLY_SHARE = 0.1


def load_campaign(path: Path) -> Manifest:
    """The manifest at `path` (`load_manifest`), the variables holding its secrets noted for errors."""
    manifest = load_manifest(path)
    note_secret_envs(*manifest.secret_envs)
    return manifest


def ledger_path_for(manifest: Manifest, *, sandbox: bool) -> Path:
    """Where the campaign's ledger lives (the sandbox run's own one with `sandbox`)."""
    # A sandbox run keeps its own ledger, so that trying a campaign in the sandbox
    # never marks real recipients as sent.
    if sandbox:
        return _sandbox_folder(manifest) / "ledger.sqlite"
    return manifest.ledger_path


def sandbox_outbox_path(manifest: Manifest) -> Path:
    """Where the sandbox writes what it received (whatever ledger the run keeps)."""
    return _sandbox_folder(manifest) / "outbox"


def prepare_sandbox_outbox(manifest: Manifest) -> None:
    """Make sure the sandbox can write its outbox, before anything is sent to it: the folder is made
    (owner-only) if missing, read for its numbers, and a file is written and removed in it.
    InputFileError naming the folder if not, so that a bad outbox stops a command with nothing sent."""
    from campaign.testing import next_outbox_number

    outbox = sandbox_outbox_path(manifest)
    try:
        make_private_dir(outbox)
        next_outbox_number(outbox)
        # A file made for real, not os.access: what the writes will meet, whoever runs it.
        with tempfile.TemporaryFile(dir=outbox):
            pass
    except OSError as exc:
        # The folder named, not the probe's file: the user never made that one.
        raise _outbox_error(outbox, exc, where=outbox, done="nothing was sent") from exc


def write_sandbox_outbox(fake: FakeNylas, manifest: Manifest) -> int:
    """Write what `fake` received into the campaign's sandbox outbox; the number of its first file (the
    files of earlier runs stay: numbers go on from theirs). InputFileError naming the path if it cannot:
    the sends stand (the sandbox accepted them, and a run recorded them), only their copies are missing."""
    from campaign.testing import next_outbox_number

    outbox = sandbox_outbox_path(manifest)
    try:
        first = next_outbox_number(outbox)
        fake.write_outbox(outbox)
    except OSError as exc:
        done = "what the sandbox accepted stays sent (a run recorded it), only its copies are missing"
        where = Path(exc.filename) if isinstance(exc.filename, str) else outbox  # the file, if one failed
        raise _outbox_error(outbox, exc, where=where, done=done) from exc
    return first


def _outbox_error(outbox: Path, exc: OSError, *, where: Path, done: str) -> InputFileError:
    """The one line for an outbox that cannot be written: the path (`where`), why, what became of the
    sends (`done`), and what to do."""
    if isinstance(exc, SymlinkRefusedError):
        return InputFileError(
            f"{exc.path} is a symbolic link, and the sandbox writes its outbox through none; {done}; "
            "remove the link"
        )
    # mkdir's "File exists" of a file where the folder goes says too little.
    why = "not a folder" if exc.errno in (errno.EEXIST, errno.ENOTDIR) else exc.strerror or str(exc)
    folder = "it" if where == outbox else str(outbox)
    return InputFileError(
        f"{where}: the sandbox cannot write its outbox ({why}); {done}; make {folder} a folder you can write"
    )


def _sandbox_folder(manifest: Manifest) -> Path:
    return manifest.base_dir / f"{manifest.path.stem}.sandbox"


def locate_ledger(manifest: Manifest, *, sandbox: bool, url: str | None = None) -> LedgerSite:
    """Where the campaign's ledger lives: the database `url` (`--ledger`) or `[ledger] url` names, else
    the SQLite file beside the manifest. UsageError when the campaign's ledger is elsewhere, so that no
    command takes the campaign for one that never ran (`check_no_orphaned_ledger`): for a file, when it
    is missing but another ledger of this campaign is beside it (a renamed manifest) or its ledger
    marker names a database; for a database that holds no ledger of the campaign, when the SQLite
    ledger beside the manifest does, or the marker names another database. A database named by `url`
    alone (the manifest names none) leaves the marker when a command writes the campaign's ledger
    there. A sandbox run keeps its own ledger: its own file, or its own rows in the database (no marker,
    and nothing compared between the two)."""
    if url is not None:
        try:
            check_ledger_url(url, known=secret_values(manifest.secret_envs))
        except ValueError as exc:
            raise UsageError(f"--ledger: the URL {exc}") from None  # never echoed: it may hold a password
    path = ledger_path_for(manifest, sandbox=sandbox)
    candidates = ledger_candidates(manifest, sandbox=sandbox)
    named = url or manifest.ledger.url
    if named is None:
        check_no_orphaned_ledger(manifest, path, candidates)
        return SqliteSite(path)
    marker = None if sandbox or manifest.ledger.url is not None else ledger_marker_path(path)
    password = read_ledger_password(manifest)
    site = ledger_site(
        named,
        password=password,
        lease_s=manifest.ledger.lease_s,
        marker=marker,
        named_by_option=url is not None,
    )
    if sandbox:
        return _SandboxRows(site)
    check_no_orphaned_ledger(manifest, path, candidates, database=site, named_by_option=url is not None)
    return site


def read_ledger_password(manifest: Manifest) -> str | None:
    """The database password from the variable `[ledger] password_env` names; None when it names none
    (libpq then reads PGPASSWORD or ~/.pgpass itself)."""
    name = manifest.ledger.password_env
    if name is None:
        return None
    value = os.environ.get(name, "")
    if not value:
        message = (
            f"{manifest.path.name}: ledger.password_env: the environment variable {name} is not set; "
            "export the database password in it"
        )
        raise ManifestError(message)
    return value


class _SandboxRows:
    """A database's ledgers as a sandbox run keeps them: under the campaign's name plus ".sandbox", so
    that trying a campaign in the sandbox never marks its real recipients as sent."""

    def __init__(self, site: LedgerSite) -> None:
        self._site = site

    @property
    def where(self) -> str:
        return self._site.where

    def exists(self, campaign: str) -> bool:
        return self._site.exists(f"{campaign}.sandbox")

    def check_free(self, campaign: str) -> None:
        self._site.check_free(f"{campaign}.sandbox")

    def hold(self, campaign: str, *, wait: bool = False) -> AbstractContextManager[None]:
        return self._site.hold(f"{campaign}.sandbox", wait=wait)

    def open(
        self,
        *,
        clock: Clock,
        campaign: str,
        exclusive: bool = False,
        create: bool = True,
        read_only: bool = False,
    ) -> Ledger:
        return self._site.open(
            clock=clock,
            campaign=f"{campaign}.sandbox",
            exclusive=exclusive,
            create=create,
            read_only=read_only,
        )

    def first_plan(self, campaign: str, clock: Clock) -> FirstPlan | None:
        return self._site.first_plan(f"{campaign}.sandbox", clock)

    def leases(self, campaign: str, clock: Clock) -> GrantLeases | None:
        return self._site.leases(f"{campaign}.sandbox", clock)


def ledger_candidates(manifest: Manifest, *, sandbox: bool) -> list[Path]:
    """The ledgers beside the manifest that another manifest file name would have made, and (but for the
    sandbox's) the ledger markers left for campaigns in a database."""
    if sandbox:
        return list(manifest.base_dir.glob("*.sandbox/ledger.sqlite"))
    markers = manifest.base_dir.glob("*.ledger.url")  # ledger_marker_path of each ledger
    return [*manifest.base_dir.glob("*.ledger.sqlite"), *markers]


def require_ledger(manifest: Manifest, given: Path, *, sandbox: bool, url: str | None = None) -> LedgerSite:
    """The ledger's site; InputFileError if the campaign has not run yet (`given`: the manifest as typed)."""
    site = locate_ledger(manifest, sandbox=sandbox, url=url)
    if not site.exists(manifest.campaign.name):
        start = f"campaign run {command_path(given, url)}{' --sandbox' if sandbox else ''}"
        message = f"{site.where}: no ledger yet (the campaign has not run); start with `{start}`"
        raise InputFileError(message)
    return site


def command_path(manifest: Path, url: str | None) -> str:
    """The manifest as the user named it, with the `--ledger` they gave, as a shell takes them (quoted):
    the commands suggested to them next must reach the same ledger."""
    named = shlex.quote(str(manifest))
    return named if url is None else f"{named} --ledger {shlex.quote(url)}"


def read_api_key(manifest: Manifest, *, sandbox: bool = False) -> str:
    """The Nylas API key from the variable `api.key_env` names (the sandbox's own key with `sandbox`)."""
    if sandbox:
        return SANDBOX_API_KEY
    name = manifest.api.key_env
    value = os.environ.get(name, "").strip()
    if not value:
        message = (
            f"{manifest.path.name}: api.key_env: the environment variable {name} is not set; "
            "export your Nylas API key in it (or try the campaign with --sandbox)"
        )
        raise ManifestError(message)
    if not value.isascii() or not value.isprintable() or any(char.isspace() for char in value):
        # Never echoed: it is the key. A pasted key with a line break or a space would be sent as is
        # in the Authorization header (or refused by the HTTP library mid-run).
        message = (
            f"{manifest.path.name}: api.key_env: the value of {name} holds a space, line break, control "
            "or non-ASCII character; export the API key alone"
        )
        raise ManifestError(message)
    return value


def read_api_uri(manifest: Manifest) -> str:
    """The API's base URI: `api.uri`, else $NYLAS_API_URI, else Nylas's US region."""
    from campaign.nylas import DEFAULT_API_URI

    return manifest.api.uri or os.environ.get("NYLAS_API_URI") or DEFAULT_API_URI


def read_secrets(manifest: Manifest, *, sandbox: bool) -> tuple[bytes, ...] | None:
    """The unsubscribe secrets from `unsubscribe.secret_env` (None without [unsubscribe])."""
    if manifest.unsubscribe is None:
        return None
    name = manifest.unsubscribe.secret_env
    value = os.environ.get(name, "")
    if not value.strip() and sandbox:
        return parse_secrets(SANDBOX_SECRET)
    if not value.strip():
        message = (
            f"{manifest.path.name}: unsubscribe.secret_env: the environment variable {name} is not set; "
            "set it to a long random secret, e.g. from `openssl rand -base64 32`"
        )
        raise ManifestError(message)
    try:
        return parse_secrets(value)
    except ManifestError as exc:
        message = f"{manifest.path.name}: unsubscribe.secret_env ({name}): {exc}"
        raise ManifestError(message) from exc


@asynccontextmanager
async def connect_api(
    manifest: Manifest, *, api_key: str, clock: Clock, fake: FakeNylas | None = None
) -> AsyncIterator[NylasClient]:
    """A Nylas client for the manifest's API, or for the sandbox's `fake` served in-process."""
    import httpx

    from campaign.nylas import DEFAULT_CONNECTIONS, NylasClient, build_http_client

    transport = httpx.ASGITransport(app=fake.app) if fake is not None else None
    base_url = SANDBOX_API_URI if fake is not None else read_api_uri(manifest)
    # A pool with room for every request the senders may have in flight, each on a kept-alive connection.
    connections = max(DEFAULT_CONNECTIONS, sum(sender.concurrency for sender in manifest.senders))
    async with build_http_client(
        base_url=base_url, timeout_s=manifest.api.timeout_s, transport=transport, connections=connections
    ) as http:
        yield NylasClient(http, api_key=api_key, clock=clock)


def build_sandbox_api(
    manifest: Manifest | None,
    *,
    clock: Clock | None = None,
    listing_lag_s: float = 0.0,
    to_filter_broken: bool = False,
    gzip: bool = False,
    bounce_share: float = 0.0,
    reply_share: float | None = None,
    auto_reply_share: float | None = None,
) -> FakeNylas:
    """The fake Nylas API, with the manifest's senders as its grants and domains, and the provider
    quirks asked for: a listing lag and a broken `to` filter on every grant, gzip-encoded answers,
    a share of recipients whose messages bounce (a DSN in the sender's inbox, a notification), and
    shares of messages answered with a reply or an auto-reply in their thread (by default, for a
    campaign with follow-ups, SANDBOX_REPLY_SHARE and SANDBOX_AUTO_REPLY_SHARE, so that it shows)."""
    from campaign.testing import FakeNylas

    fake = FakeNylas(api_key=SANDBOX_API_KEY, clock=clock)
    fake.gzip_answers = gzip
    # Its mailboxes start empty each time, without the messages a run before sent: a follow-up
    # answering one of those must not be refused as a reply to a message filed away.
    fake.check_reply_to = False
    fake.bounce_share = bounce_share
    followups = manifest is not None and bool(manifest.followups)
    fake.reply_share = reply_share if reply_share is not None else SANDBOX_REPLY_SHARE * followups
    fake.auto_reply_share = (
        auto_reply_share if auto_reply_share is not None else SANDBOX_AUTO_REPLY_SHARE * followups
    )
    if manifest is not None:
        register_sandbox_grants(fake, manifest)
        for sender in manifest.senders:
            if sender.grant_id is not None:
                fake.set_listing_quirks(
                    sender.grant_id, lag_s=listing_lag_s, to_filter_broken=to_filter_broken
                )
    return fake


# The manifest names mailbox kinds; a Nylas grant names its provider (both Gmail kinds are "google").
_NYLAS_PROVIDER = {"gmail": "google", "google-workspace": "google"}


def register_sandbox_grants(fake: FakeNylas, manifest: Manifest) -> None:
    """Give `fake` a grant (of the sender's provider) or verified domain for each manifest sender."""
    for sender in manifest.senders:
        if sender.domain is not None:
            fake.add_domain(sender.domain)
        else:
            assert sender.grant_id is not None  # the manifest requires one of the two
            kind = sender.provider or "gmail"
            fake.add_grant(
                sender.grant_id,
                sender.email or f"{sender.name}@sandbox.example.com",
                provider=_NYLAS_PROVIDER.get(kind, kind),
            )
