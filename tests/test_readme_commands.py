"""The README documents every command and every option the CLI has (the sqlite-utils habit), and every key
of the `--json` outputs it shows."""

from __future__ import annotations

import json
import re
from typing import Any

import typer
from conftest import REPO, copy_newsletter

from campaign.cli import COMMANDS, _build_command, app
from campaign.testing import Fault


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


def _json_example(heading: str) -> Any:
    """The JSON block that follows `heading` in the README (its `…` keys stand for values left out)."""
    readme = _readme()
    block = re.search(r"```json\n(.*?)```", readme[readme.index(heading) :], re.S)
    assert block is not None, heading
    return json.loads(block.group(1))


def _keys(mapping: dict[str, Any]) -> list[str]:
    return [key for key in mapping if key != "…"]


def test_the_status_json_example_has_every_key_status_prints_in_its_order(api, cli, tmp_path):
    """A started campaign with rows left: the README's example names each key `status --json` prints, at
    the top, in a sender and in a `next` entry, in the order printed, and no key it does not print."""
    manifest = copy_newsletter(api, tmp_path)
    assert cli("run", manifest, "--yes", "--limit", "3").exit_code == 75
    shown = cli("status", manifest, "--json")
    assert shown.exit_code == 0, shown.output
    status = json.loads(shown.stdout)
    example = _json_example("### `status --json`")
    assert _keys(example) == list(status)
    assert _keys(example["senders"]["founder"]) == list(status["senders"]["founder"])
    assert _keys(example["next"][0]) == list(status["next"][0])
    assert _keys(example["states"]) == list(status["states"])


def test_the_preview_json_example_has_every_key_preview_prints_in_its_order(api, cli, tmp_path):
    """The README's `preview --json` example names each key printed at the top, in a sender and in a
    sample, in the order printed, and no key it does not print."""
    manifest = copy_newsletter(api, tmp_path)
    shown = cli("preview", manifest, "--json")
    assert shown.exit_code == 0, shown.output
    preview = json.loads(shown.stdout)
    example = _json_example("### `preview --json`")
    assert _keys(example) == list(preview)
    assert _keys(example["senders"][0]) == list(preview["senders"][0])
    assert _keys(example["samples"][0]) == list(preview["samples"][0])


def test_the_reconcile_json_example_has_every_key_reconcile_prints_in_its_order(api, cli, tmp_path):
    """A row left unknown (a 504 after the send) is found by reconcile: the README's `reconcile --json`
    example names each key printed at the top and in a decision, in the order printed."""
    manifest = copy_newsletter(api, tmp_path)
    api.script(Fault.TIMEOUT_AFTER_SEND, times=1)
    assert cli("run", manifest, "--yes").exit_code == 1
    settled = cli("reconcile", manifest, "--json")
    assert settled.exit_code == 0, settled.output
    printed = json.loads(settled.stdout)
    assert [decision["verdict"] for decision in printed["decisions"]] == ["sent"]
    example = _json_example("### `reconcile --json`")
    assert _keys(example) == list(printed)
    assert _keys(example["decisions"][0]) == list(printed["decisions"][0])


def test_the_suppress_list_json_example_has_every_key_it_prints_in_its_order(cli, tmp_path):
    """The README's `suppress list --json` example names each key of an entry, in the order printed."""
    store = tmp_path / "unsubscribes.sqlite"
    assert cli("suppress", "add", "ann@example.com", "--store", store).exit_code == 0
    shown = cli("suppress", "list", "--store", store, "--json")
    assert shown.exit_code == 0, shown.output
    (entry,) = json.loads(shown.stdout)
    example = _json_example("### `suppress list --json`")
    assert isinstance(example, list)
    assert _keys(example[0]) == list(entry)


def test_only_the_commands_that_send_say_their_sandbox_sends():
    """`preview` sends nothing and `events pull` only reads (README): their `--sandbox` help must not say
    it sends to the fake API, as `run`, `resume` and `send-test` do."""
    sending = {"run", "resume", "send-test"}
    helps = {
        name: parameter.help
        for name, command in _commands()
        for parameter in command.params
        if "--sandbox" in getattr(parameter, "opts", ())
    }
    assert {"preview", "events pull", "status", "retry", "report"} <= set(helps)
    assert sorted(name for name, text in helps.items() if "Send to" in text) == sorted(sending)


def test_the_wait_help_names_every_wait_the_readme_gives_it():
    """README: `--wait` waits out a quota, a shut send window, a follow-up not due yet and an API that
    cannot be reached, instead of exit 75; its help said only the quota."""
    for name in ("run", "resume"):
        command = dict(_commands())[name]
        (wait,) = (parameter for parameter in command.params if "--wait" in parameter.opts)
        for what in ("quota", "window", "follow-up", "exit 75", "cannot be reached"):
            assert what in wait.help, (name, what)
