"""``stable-regions`` command line: one module per command, ``console`` for what they share.

Each command module has ``add_parser(subparsers)`` and ``run(args) -> exit code``. A
``StableRegionsError`` (bad input, a missing model) is one line ``error: ...`` and exit 2;
anything else is a bug: one line and exit 1 (``--debug`` for the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ..errors import StableRegionsError, one_line
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stable-regions",
        description="How far can a language model's internal state be pushed before its output changes?",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show full tracebacks for unexpected errors"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS.values():
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    try:
        return COMMANDS[args.command].run(args)
    except StableRegionsError as exc:
        print(f"error: {exc}", file=sys.stderr)
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


def quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import warnings

    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
