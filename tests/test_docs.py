"""The README's two set-up commands stay true: CI runs the test one verbatim."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", quick, flags=re.S)


def test_readme_has_exactly_two_setup_commands():
    commands = _readme_commands()
    assert len(commands) == 2
    assert all(c.startswith("pip install torch==2.13.0 && ") for c in commands)
    assert "stable-regions analyze" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _readme_commands()[1] in ci


def test_readme_columns_match_the_dataframe():
    from stable_regions.analysis import COLUMNS

    text = (ROOT / "README.md").read_text()
    for col in COLUMNS:
        assert f"`{col}`" in text, col


def test_readme_command_lines_list_every_command_and_option():
    import argparse

    from stable_regions.cli import build_parser

    text = (ROOT / "README.md").read_text()
    block = text.split("## Command line", 1)[1].split("```", 2)[1]
    lines = [line for line in block.splitlines() if line.startswith("stable-regions ")]
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        mine = [line for line in lines if line.split()[1] == name]
        assert mine, f"`stable-regions {name}` is missing from the README's command lines"
        nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        options = {o for a in parser._actions for o in a.option_strings if o.startswith("--")}
        options |= {
            o
            for n in nested
            for p in n.choices.values()
            for a in p._actions
            for o in a.option_strings
            if o.startswith("--")
        }
        for option in options - {"--help"}:
            assert any(option in line for line in mine), f"{name} {option} is not in the README"
