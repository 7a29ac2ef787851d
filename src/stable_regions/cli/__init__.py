"""``stable-regions`` command line: one module per command, ``console`` for what they share.

Each command module has ``add_parser(subparsers)`` and ``run(args) -> exit code``. A
``StableRegionsError`` (bad input, a missing model) is one line ``error: ...`` and exit 2;
anything else is a bug: one line and exit 1 (``--debug`` for the traceback).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence

from ..errors import StableRegionsError, StableRegionsWarning, one_line
from . import (
    analyze,
    bench,
    certify,
    generate,
    jacobian,
    models,
    scan,
    stability_map,
    steer,
    validate,
)
from .threads import fitted_threads

COMMANDS = {
    "analyze": analyze,
    "steer": steer,
    "certify": certify,
    "generate": generate,
    "jacobian": jacobian,
    "map": stability_map,
    "validate": validate,
    "scan": scan,
    "bench": bench,
    "models": models,
}
LIGHT_COMMANDS = {"models"}  # no computing: the thread count stays as it is


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stable-regions",
        description="How far can a language model's internal state be pushed before its output changes?",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show full tracebacks for unexpected errors"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS.values():
        module.add_parser(sub)
    return parser


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("stable-regions")
    except metadata.PackageNotFoundError:
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_libraries()
    try:
        if args.command in LIGHT_COMMANDS:
            return COMMANDS[args.command].run(args)
        with fitted_threads(lambda text: print(f"note: {text}", file=sys.stderr)):
            return COMMANDS[args.command].run(args)
    except StableRegionsError as exc:
        print(f"error: {as_flags(str(exc), _subparser(parser, args.command))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: still one line unless asked for more
        if args.debug:
            raise
        print(
            f"internal error: {type(exc).__name__}: {one_line(exc)} (rerun with --debug for a traceback)",
            file=sys.stderr,
        )
        return 1


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def as_flags(message: str, parser: argparse.ArgumentParser) -> str:
    """A library message in the command's words: the parameters it names in backticks
    (`` `out` ``, `` `resume=True` ``, `` `layers=[7]` ``) become the command's flags
    (``--out``, ``--resume``, ``--layers 7``); other backticked text stays as it is."""
    flags = {
        a.dest: next(o for o in a.option_strings if o.startswith("--"))
        for a in parser._actions
        if any(o.startswith("--") for o in a.option_strings)
    }

    def flag(match: re.Match) -> str:
        name, value = match.group(1), match.group(3)
        if name not in flags:
            return match.group(0)
        if value is None or value == "True":
            return flags[name]
        value = re.sub(r"[\[\]'\",]", " ", value).split()
        return " ".join([flags[name], *value])

    return re.sub(r"`(\w+)(=([^`]*))?`", flag, message)


def _note(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"note: {one_line(message)}", file=sys.stderr)


def quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import warnings

    warnings.filterwarnings("ignore")
    # ours say something the user should know: one line each, once
    warnings.filterwarnings("once", category=StableRegionsWarning)
    warnings.showwarning = _note
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
