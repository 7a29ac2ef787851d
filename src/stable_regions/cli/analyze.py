"""``stable-regions analyze``: the geometry of every position of a prompt beside the truth."""

from __future__ import annotations

import json
import math
import sys

from .console import (
    add_eps,
    add_model,
    add_positions,
    cell,
    console,
    fmt,
    load_with_status,
    parse_positions,
    progress,
)


def add_parser(sub) -> None:
    a = sub.add_parser(
        "analyze",
        help="stable-region geometry of every position of a prompt, beside the measured truth",
        description=(
            "For each position: the top curvature eigenvalue of the next-token distribution, the "
            "closed-form radii along the top eigendirection, and the boundary measured on the model."
        ),
    )
    a.add_argument("prompt", help="the text to analyze")
    add_model(a)
    add_eps(a, [0.01, 0.1, 1.0])
    add_positions(a)
    a.add_argument(
        "--layer",
        default="final",
        help="where to perturb: 'final' = the pre-logit vector (default), 'embed' = the input of "
        "block 0, or a block index i = the residual stream after block i (blocks.{i}.hook_resid_post)",
    )
    a.add_argument(
        "--trace",
        choices=["exact", "estimate"],
        default=None,
        help="inside the network: the exact trace behind eff.rank and the L-inf radii (d "
        "products) or an estimate (a few percent; no L-inf radii). Default: exact at embed, "
        "estimate at blocks",
    )
    a.add_argument(
        "--calibration",
        metavar="PATH|bundled",
        help="add radius_calibrated from a calibration of this model and layer "
        "(a calibration-LAYER.json written by 'validate', or 'bundled': the shipped calibrator of this layer or of the nearest shipped block)",
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
    a.add_argument(
        "--html",
        metavar="FILE",
        help="also write a self-contained HTML page: the prompt coloured by radius, every "
        "position's numbers on hover",
    )


def run(args) -> int:
    from ..analysis import analyze
    from ..inputs import check_eps

    eps = check_eps(args.eps)  # fail fast, before loading a model
    positions = parse_positions(args.positions)
    if args.html:
        from ..viewer import check_html_path

        check_html_path(args.html)
    err, adapter = load_with_status(args)
    with progress(err, "analyzing positions") as (tick, stage):
        result = analyze(
            adapter,
            args.prompt,
            eps=eps,
            positions=positions,
            layer=args.layer,
            exact=not args.no_exact,
            trace=args.trace,
            calibration=args.calibration,
            progress=tick,
            stage=stage,
        )
    if args.html:
        write_page(args.html, result, adapter)
        err.print(f"wrote {args.html}")
    if args.json:
        sys.stdout.write(json.dumps(result.to_json(), ensure_ascii=False) + "\n")
    else:
        print_table(result, exact=not args.no_exact)
    return 0


RADII = [
    "radius_corrected",
    "radius_exact",
    "radius_curve",
    "radius_calibrated",
    "radius_quadratic",
    "radius_linf_lower",
    "radius_linf_upper",
]


def write_page(path: str, result, adapter) -> None:
    """The viewer page of an analysis: each position's token coloured by the radius of the
    distribution it predicts, its alternatives from one more forward pass."""
    from ..viewer import ViewerSpec, write_viewer

    frame = result.to_frame().assign(text=0)
    names, probs = adapter.next_token_alternatives(adapter.tokenize(result.prompt))
    frame["top_tokens"] = [names[i] for i in frame.position]
    frame["top_probs"] = [probs[i].tolist() for i in frame.position]
    spec = ViewerSpec(
        group="text",
        order="position",
        radius_columns=[c for c in RADII if frame[c].notna().any()],
        fields=[
            (c, c)
            for c in (
                "position",
                "next_token",
                "next_prob",
                "entropy",
                "lambda_max",
                "effective_rank",
                "norm",
                "reliable",
            )
        ],
        alternatives=("top_tokens", "top_probs"),
        alternatives_label="predicted next tokens",
        group_names={0: f"layer '{result.layer}'"},
    )
    write_viewer(
        path,
        frame,
        spec,
        title=f"stable-regions analyze: {result.model}",
        subtitle="each token coloured by the radius of the next-token distribution predicted "
        "at it (analysed positions only)",
        note="radius_corrected: the best closed form along the top curvature direction; "
        "radius_exact: the boundary measured on the model; radius_quadratic = "
        "sqrt(2 eps / lambda_max). Hover a token for its numbers; click to pin.",
    )


def print_table(result, exact: bool) -> None:
    from rich import box
    from rich.table import Table

    out = console()
    table = Table(
        title=f"{result.model}, layer '{result.layer}': radius along the top curvature direction (nearest exit over +-v)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    right = dict(justify="right", no_wrap=True)
    calibrated = any(not math.isnan(r["radius_calibrated"]) for r in result.rows)
    extra = [("calibrated", right), ("cal err", right)] if calibrated else []
    for col, kw in [
        ("pos", right),
        ("token", cell(14)),
        ("next (p)", cell(20)),
        ("entropy", right),
        ("lambda_max", right),
        ("eff.rank", right),
        ("eps", right),
        ("quadratic", right),
        ("corrected", right),
        ("measured", right),
        ("quad err", right),
        ("corr err", right),
        *extra,
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
            fmt(r["entropy"], 3) if first else "",
            fmt(r["lambda_max"]) if first else "",
            fmt(r["effective_rank"], 3) if first else "",
            fmt(r["eps"], 3),
            fmt(r["radius_quadratic"]),
            fmt(r["radius_corrected"]),
            fmt(meas),
            err(r["radius_quadratic"]),
            err(r["radius_corrected"]),
            *([fmt(r["radius_calibrated"]), err(r["radius_calibrated"])] if calibrated else []),
        )
    out.print(table)
    out.print(
        "[dim]radius: L2 distance, in the units of the activation at that layer, before "
        "KL(p || p_t) reaches eps (nats). lambda_max: top eigenvalue of the curvature (W^T F W at "
        "'final', the pullback J^T F J inside). quadratic = sqrt(2 eps / lambda_max), the published "
        "form; corrected = 4th-order Pade of the KL series; measured = running the model; "
        "err = predicted / measured - 1; inf = the KL never reaches eps along that line."
        + (" calibrated = isotonic calibration fitted by 'validate'." if calibrated else "")
        + "[/dim]"
    )
