"""Architecture rules that keep the codebase readable: imports point down, one clock."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "campaign"
PROJECT = PACKAGE.parent


def test_the_import_contracts_hold():
    """pyproject's import-linter contracts: layers import only downward, only the CLI imports
    typer and rich, the core loads no web server, the fake API does not import the client."""
    lint_imports = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run(
        [str(lint_imports), "--config", str(PROJECT / "pyproject.toml"), "--no-cache"],
        capture_output=True,
        text=True,
        check=False,
        cwd=PROJECT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "heavy"),
    [
        ("campaign.nylas", "aiohttp"),  # the transport loads only when a client without one is built
        ("campaign.status", "polars"),  # `campaign status` is quick on any ledger
        ("campaign.ledger", "polars"),
        ("campaign.manifest", "jinja2"),
    ],
)
def test_a_package_face_stays_light(module, heavy):
    """Importing a package's public face loads none of the heavy libraries it does not need."""
    code = f"import sys, {module}; print({heavy!r} in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


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
