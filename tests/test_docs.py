"""The reference pages say what the code does: every setting is documented, in its section, with
the command-line option that sets it."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest

from qllm.commands import serve
from qllm.kernel.config import EngineConfig
from qllm.server.config import LogConfig, ServerConfig

DOCS = Path(__file__).resolve().parent.parent / "docs"
SECTIONS = {"engine": EngineConfig, "server": ServerConfig, "log": LogConfig}


def documented(section: str) -> dict[str, str]:
    """key -> its 'option' cell, from the table under ``## `[section]` `` in configuration.md."""
    text = (DOCS / "configuration.md").read_text()
    body = text.split(f"## `[{section}]`", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells[3]
    return rows


@pytest.mark.parametrize("section", SECTIONS)
def test_the_configuration_reference_lists_every_key_of_each_section(section):
    keys = {f.name for f in msgspec.structs.fields(SECTIONS[section])}

    assert set(documented(section)) == keys


def serve_options() -> set[str]:
    import argparse

    parser = argparse.ArgumentParser()
    serve.add_parser(parser.add_subparsers())
    sub = parser._subparsers._group_actions[0].choices["serve"]
    return {opt for action in sub._actions for opt in action.option_strings if opt.startswith("--")}


def test_every_serve_option_is_in_the_reference_and_every_option_there_exists():
    named = {
        option
        for section in SECTIONS
        for cell in documented(section).values()
        for option in re.findall(r"--[a-z][a-z-]*", cell)
    }
    options = serve_options() - {"--help", "--config"}

    assert named == options
    cells = [cell for section in SECTIONS for cell in documented(section).values()]
    assert all(cell == "TOML only" or cell.startswith("`--") for cell in cells)
