"""The README documents every command and every option the CLI has (the sqlite-utils habit)."""

from __future__ import annotations

import re
from typing import Any

import typer
from conftest import REPO

from campaign.cli import COMMANDS, _build_command, app


def _commands() -> list[tuple[str, Any]]:
    """Every command as the user types it (`run`, `suppress add`, …), with its click command.

    (typer carries its own copy of click: commands and options are told apart by their attributes.)
    """
    found: list[tuple[str, Any]] = []
    for name in COMMANDS:
        command = _build_command(name)
        if hasattr(command, "commands"):
            found += [(f"{name} {sub}", child) for sub, child in command.commands.items()]
        else:
            found.append((name, command))
    return found


def _readme() -> str:
    return (REPO / "README.md").read_text(encoding="utf-8")


def test_every_command_is_in_the_readme() -> None:
    """Each command appears in the README as `campaign <command>`."""
    readme = _readme()
    missing = [name for name, _ in _commands() if f"campaign {name}" not in readme]
    assert missing == []


def test_every_option_of_every_command_is_in_the_readme() -> None:
    """Each option (--yes, --min-age, …) of each command, and the root's --debug, appears in the README."""
    readme = _readme()
    documented = set(re.findall(r"--[a-z][a-z0-9-]*", readme))
    options = {
        (name, flag)
        for name, command in [*_commands(), ("", typer.main.get_command(app))]
        for parameter in command.params
        if parameter.param_type_name == "option"
        for flag in parameter.opts
        if flag.startswith("--") and flag != "--help"
    }
    assert len(options) > 20  # the walk found the options (run alone has seven)
    assert sorted(option for option in options if option[1] not in documented) == []
