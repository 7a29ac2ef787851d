"""``stable-regions bench``: our closed forms and operators against the usual tools."""

from __future__ import annotations

import os

from ..errors import InvalidParameterError, StableRegionsError
from .console import add_model, console, fmt, load_with_status, progress


def add_parser(sub) -> None:
    bn = sub.add_parser(
        "bench",
        help="benchmarks: our closed forms and operators against the tools people would use instead",
        description=(
            "Each row times ours and the baselines in one process (warm-up, alternating repeats, "
            "median) and records ratio = baseline_s / ours_s, the accuracy of our answer against "
            "the baseline's and the row's peak RSS; writes one JSON file. Baselines from "
            "curvlinops-for-pytorch and hessian-eigenthings run when they are installed."
        ),
    )
    add_model(bn)
    bn.add_argument(
        "--quick", action="store_true", help="smaller sizes (about four minutes on 2 cores)"
    )
    bn.add_argument(
        "--rows",
        nargs="+",
        default=None,
        metavar="ROW",
        help="run only these rows (default all): top_eig_final, scan_document_final, "
        "predict_vs_measure, map_prompt, forward_multiples, pullback_hvp_mid, scale_llama3_1b, "
        "monitor_generate, monitor_vllm (vLLM in its own environment: $STABLE_REGIONS_VLLM_PYTHON), "
        "iso_kl",
    )
    bn.add_argument("--out", default="bench.json", metavar="FILE", help="default ./bench.json")


def run(args) -> int:
    from rich.table import Table

    from ..bench.rows import ROWS, run_bench, write_bench

    unknown = sorted(set(args.rows or []) - set(ROWS))
    if unknown:
        raise InvalidParameterError(
            f"unknown bench row(s) {', '.join(unknown)}: choose from {', '.join(ROWS)}"
        )
    if os.path.isdir(args.out):
        raise StableRegionsError(
            f"--out {args.out} is a directory: give a file name, e.g. bench.json"
        )
    err, adapter = load_with_status(args)
    with progress(err, "benchmark rows") as (tick, _):
        doc = run_bench(adapter, quick=args.quick, rows=args.rows, progress=tick)
    path = write_bench(doc, args.out)
    out = console(stderr=True)
    table = Table(title=f"{doc['model']}{' (quick)' if doc['quick'] else ''}", title_justify="left")
    for col in ("row", "ours s", "baseline", "baseline s", "ratio", "max rel err", "peak MB"):
        table.add_column(col, justify="left" if col in ("row", "baseline") else "right")
    for r in doc["rows"]:
        table.add_row(
            r["name"],
            fmt(r["ours_s"], 3) if r["ours_s"] is not None else "-",
            r["baseline"],
            fmt(r["baseline_s"], 3) if r["baseline_s"] is not None else "-",
            f"{r['ratio']:.3g}x" if r["ratio"] is not None else "-",
            f"{r['max_rel_err']:.2g}" if r["max_rel_err"] is not None else "-",
            f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") is not None else "-",
        )
    out.print(table)
    print(path)
    return 0
