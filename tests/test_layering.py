"""Architecture rules that keep the codebase readable: imports point down, one clock."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "campaign"
CORE = [
    "campaign.errors",
    "campaign.clock",
    "campaign.models",
    "campaign.headers",
    "campaign.manifest._load",
    "campaign.manifest._settings",
    "campaign.manifest._message",
    "campaign.recipients._audience",
    "campaign.recipients._listfile",
    "campaign.render._compose",
    "campaign.render._templating",
    "campaign.render._markup",
    "campaign.render._attachments",
    "campaign.unsubscribe._tokens",
    "campaign.plan._ratelimit",
    "campaign.plan._assign",
    "campaign.nylas._payload",
    "campaign.nylas._client",
    "campaign.nylas._answers",
    "campaign.ledger._ledger",
    "campaign.pipeline._preflight",
    "campaign.dispatch._loop",
    "campaign.dispatch._types",
    "campaign.dispatch._retries",
    "campaign.preview",
    "campaign.preview._json",
    "campaign.preview._site",
    "campaign.preview._assets",
    "campaign.send_test",
    "campaign.recipients._firstrows",
    "campaign.render._checks",
    "campaign.status",
    "campaign.pipeline._resume",
    "campaign.manifest._starter",
    "campaign.timetext",
]
FACE_ONLY = ["typer", "rich", "uvicorn", "starlette"]
# The terminal output outside the CLI package: output.py and its live progress display.
RICH_OUTPUT = {Path("output.py"), Path("progress.py")}


@pytest.mark.parametrize("module", CORE)
def test_core_modules_load_no_cli_terminal_or_server_libraries(module):
    """Importing a core module in a fresh interpreter loads neither typer, rich, uvicorn nor starlette."""
    # httpx's own command-line entry point (httpx._main) imports rich when it is installed;
    # blocking that one module (httpx tolerates its absence) shows what *our* code loads.
    code = (
        "import sys, json; sys.modules['httpx._main'] = None; "
        f"import {module}; print(json.dumps(sorted(m for m in {FACE_ONLY!r} if m in sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout) == []


def test_only_cli_imports_typer_and_only_cli_and_output_import_rich():
    """typer appears only in the campaign/cli/ package; rich only there and in the output modules."""
    offenders = []
    seen = set()
    for path in PACKAGE.rglob("*.py"):
        where = path.relative_to(PACKAGE)
        in_cli = where.parts[0] == "cli"
        imported = _imported_modules(path)
        if in_cli:
            seen |= imported & {"typer", "rich"}
        if "typer" in imported and not in_cli:
            offenders.append(f"{where} imports typer")
        if "rich" in imported and not in_cli and where not in RICH_OUTPUT:
            offenders.append(f"{where} imports rich")
    assert offenders == []
    assert seen == {"typer", "rich"}, "the scan must see the CLI package's own imports"


def test_the_fake_api_does_not_import_the_client():
    """campaign.testing is written from the API reference, not from our client's wire code."""
    for path in (PACKAGE / "testing").rglob("*.py"):
        imported = _imported_modules(path, full=True)
        assert not imported & {"campaign.nylas._client", "campaign.models", "campaign.dispatch._loop"}, (
            path.name
        )


def test_only_clock_reads_time_or_sleeps():
    """Outside clock.py (and the test doubles), nothing calls time.time/monotonic, datetime.now or sleep."""
    forbidden = {"time", "monotonic", "perf_counter", "now", "utcnow", "sleep", "today"}
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "clock.py" or "testing" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr in forbidden:
                base = node.value
                name = base.id if isinstance(base, ast.Name) else getattr(base, "attr", "")
                if name in {"time", "datetime", "anyio", "asyncio", "date"}:
                    offenders.append(f"{path.name}:{node.lineno} {name}.{node.attr}")
    assert offenders == []


def _imported_modules(path: Path, *, full: bool = False) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        else:
            continue
        found.update(name if full else name.split(".")[0] for name in names)
    return found


def test_a_client_over_a_given_transport_does_not_load_aiohttp():
    """Preview captures requests over a mock transport: building that client must not import aiohttp."""
    code = (
        "import sys, httpx\n"
        "from campaign.nylas._client import build_http_client\n"
        "build_http_client(base_url='https://api.us.nylas.com', timeout_s=5,"
        " transport=httpx.MockTransport(lambda request: httpx.Response(200)))\n"
        "print('aiohttp' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
