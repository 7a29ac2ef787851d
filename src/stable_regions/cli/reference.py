"""The command-line reference page (docs/reference/cli.md), generated from the parser itself,
so that it lists every command and option the code has, with the code's own help."""

from __future__ import annotations

import argparse


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(found[0].choices) if found else {}


def _usage(parser: argparse.ArgumentParser) -> str:
    text = parser.format_usage().strip().removeprefix("usage: ")
    return " ".join(text.split())


def _options(parser: argparse.ArgumentParser) -> list[str]:
    lines = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if action.option_strings:
            name = ", ".join(f"`{o}`" for o in action.option_strings)
            if action.nargs != 0 and action.metavar is not None:
                name += f" `{action.metavar}`"
            elif action.nargs != 0 and action.choices:
                name += f" `{{{','.join(map(str, action.choices))}}}`"
            elif action.nargs != 0:
                name += f" `{action.dest.upper()}`"
        else:
            name = f"`{action.metavar or action.dest}`"
        name = name.replace("|", "\\|")
        help_text = (action.help or "").replace("%(default)s", str(action.default))
        help_text = help_text.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {name} | {help_text} |")
    return lines


def markdown(parser: argparse.ArgumentParser) -> str:
    """docs/reference/cli.md for ``parser``."""
    out = [
        "# Command line",
        "",
        "Generated from the parser (`stable_regions.cli.reference`): every command and option.",
        "Bad input is one line `error: ...` on stderr and exit status 2; `--json` and `--csv`",
        "write the same columns as the Python results ([Columns](../columns.md)).",
        "",
        "```",
        _usage(parser),
        "```",
        "",
    ]
    for name, sub in _subcommands(parser).items():
        out += [f"## {name}", "", sub.description or "", "", "```", _usage(sub), "```", ""]
        options = _options(sub)
        if options:
            out += ["| argument | meaning |", "|---|---|", *options, ""]
        for nested_name, nested in _subcommands(sub).items():
            out += [f"### {name} {nested_name}", "", nested.description or "", ""]
            out += ["```", _usage(nested), "```", ""]
            options = _options(nested)
            if options:
                out += ["| argument | meaning |", "|---|---|", *options, ""]
    return "\n".join(line.rstrip() for line in out).rstrip() + "\n"
