"""``stable-regions jacobian``: amplification through depth at one position."""

from __future__ import annotations

import json
import math
import sys

from .console import add_model, console, fmt, load_with_status, progress


def add_parser(sub) -> None:
    j = sub.add_parser(
        "jacobian",
        help="amplification across depth: top singular values of each block's Jacobian and of the map to the output",
        description=(
            "At one position: the top singular values of d resid_post[i] / d resid_pre[i] for each "
            "block i, and of the map from each layer to the pre-logit vector (the input of the "
            "unembedding), by Lanczos on J^T J with JVP/VJP products in the model's precision."
        ),
    )
    j.add_argument("prompt", help="the text")
    add_model(j)
    j.add_argument("--position", type=int, default=-1, help="token index (default -1, the last)")
    j.add_argument("-k", type=int, default=3, help="singular values per map (default 3)")
    j.add_argument("--tol", type=float, default=1e-6, help="Lanczos tolerance (default 1e-6)")
    j.add_argument("--plot", metavar="FILE.png", help="also draw the profile into this PNG")
    j.add_argument("--json", action="store_true", help="print one JSON document instead of a table")


def run(args) -> int:
    from rich.markup import escape
    from rich.table import Table

    from ..plotting import save
    from ..studies.jacobian import jacobian_profile

    if args.plot:
        from .._support.files import check_output_file

        check_output_file(args.plot, ".png", "--plot")
    err, adapter = load_with_status(args)
    with progress(err, "Jacobian spectra") as (tick, _):
        profile = jacobian_profile(
            adapter,
            args.prompt,
            position=args.position,
            k=args.k,
            eig_tol=args.tol,
            progress=tick,
        )
    if args.plot:
        err.print(f"wrote {save(profile.plot(), args.plot)}")
    if args.json:
        sys.stdout.write(json.dumps(profile.to_json(), ensure_ascii=False) + "\n")
        return 0
    out = console()
    table = Table(
        title=f"{profile.model}: amplification at position {profile.position} ({profile.token!r})",
        title_justify="left",
    )
    table.add_column("layer", justify="right")
    table.add_column("|resid|", justify="right")
    table.add_column("block sigma (top " + str(profile.k) + ")", justify="right")
    table.add_column("to output sigma (top " + str(profile.k) + ")", justify="right")
    table.add_column("to output", justify="left")
    top = max(r["output_s1"] for r in profile.rows)
    for r in profile.rows:
        block = " ".join(fmt(r[f"block_s{j + 1}"], 3) for j in range(profile.k))
        output = " ".join(fmt(r[f"output_s{j + 1}"], 3) for j in range(profile.k))
        bar_len = 0 if not top > 0 else round(24 * math.log1p(r["output_s1"]) / math.log1p(top))
        table.add_row(str(r["layer"]), fmt(r["activation_norm"], 4), block, output, "#" * bar_len)
    out.print(table)
    note = (
        "block sigma: top singular values of d resid_post[i] / d resid_pre[i] (one block); "
        "to output: of d prelogit / d resid at that layer (the rest of the network up to the "
        "unembedding). Perturbation and readout at the same position."
    )
    out.print(f"[dim]{escape(note)}[/dim]")
    return 0
