"""The command table: commands load their modules on demand, yet the CLI looks and behaves as before."""

from __future__ import annotations

import json
import subprocess
import sys

from campaign.cli import COMMANDS

SUBCOMMANDS = {"unsubscribe": ("serve",), "suppress": ("add", "import", "export", "list")}


def test_help_lists_every_command_in_the_table_order(cli):
    """`campaign --help` shows each command once, in the order of the table."""
    result = cli("--help")
    assert result.exit_code == 0
    lines = [line.strip("│ ").split(" ", 1)[0] for line in result.stdout.splitlines()]
    listed = [word for word in lines if word in COMMANDS]
    assert listed == list(COMMANDS)


def test_every_command_in_the_table_builds(cli):
    """Each entry names a real command (or group) whose own help works."""
    for name in COMMANDS:
        result = cli(name, "--help")
        assert result.exit_code == 0, (name, result.output)
        assert "Usage:" in result.output
    for group, names in SUBCOMMANDS.items():
        shown = cli(group, "--help").stdout
        assert all(f" {name} " in shown for name in names), (group, shown)


def test_a_mistyped_command_is_refused_with_a_suggestion(cli):
    """A typo is a usage error (exit 2) that names the command meant, as typer does for a full table."""
    result = cli("statsu", "x.toml")
    assert result.exit_code == 2
    assert "Did you mean 'status'?" in result.output


def test_starting_the_cli_loads_no_command_module():
    """Importing the CLI (what every command pays) loads none of the commands' own modules."""
    code = (
        "import sys, json; import campaign.cli; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('campaign.cli.'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(result.stdout))
    command_modules = {module for module, _ in COMMANDS.values()}
    assert "campaign.cli.base" in loaded
    assert not loaded & command_modules
