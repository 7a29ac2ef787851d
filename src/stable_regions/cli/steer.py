"""``stable-regions steer``: the largest steering coefficient before the output drifts."""

from __future__ import annotations

import json
import sys

from ..errors import StableRegionsError
from .console import (
    add_eps,
    add_model,
    add_positions,
    console,
    fmt,
    load_with_status,
    parse_layer,
    parse_positions,
    progress,
)


def add_parser(sub) -> None:
    st = sub.add_parser(
        "steer",
        help="largest steering coefficient before the next-token KL exceeds eps, predicted and measured",
        description=(
            "For a steering vector added at a layer (c * vector), the largest coefficient c before "
            "KL(p || p_c) reaches eps, per prompt and position: closed form and measured on the model."
        ),
    )
    st.add_argument("prompts", nargs="*", help="prompts to steer (or --prompts FILE)")
    st.add_argument(
        "--prompts", dest="prompts_file", metavar="FILE", help="one prompt per line (\\n = newline)"
    )
    st.add_argument(
        "--layer",
        required=True,
        help="block index i (blocks.{i}.hook_resid_post), 'embed' or 'final'",
    )
    st.add_argument(
        "--vector",
        metavar="FILE",
        help="steering vector: .npy, .safetensors (one tensor, or one per layer: {layer: vector}) "
        "or a repeng control vector .gguf (the vector of --layer is used)",
    )
    st.add_argument(
        "--positive", metavar="FILE", help="prompt file; with --negative: vector = mean difference"
    )
    st.add_argument("--negative", metavar="FILE", help="prompt file of the other side")
    st.add_argument(
        "--save-vector",
        metavar="FILE.npy",
        help="write the vector used (handy with --positive/--negative)",
    )
    add_model(st)
    add_eps(st, [0.1])
    add_positions(st, default="last")
    st.add_argument("--no-exact", action="store_true", help="closed form only, no measurement")
    st.add_argument(
        "--calibration",
        default=None,
        metavar="PATH|bundled",
        help="a calibration of this layer (a calibration-LAYER.json from 'validate', or "
        "'bundled'): adds coef_calibrated",
    )
    st.add_argument(
        "--json",
        action="store_true",
        help="print one JSON document {model, layer, eps, rows, summary}",
    )


def run(args) -> int:
    import numpy as np
    from rich.table import Table

    from ..inputs import check_eps, json_value
    from ..steering import load_vector, mean_difference, read_prompts, steering_budget

    eps = check_eps(args.eps)
    positions = parse_positions(args.positions)
    prompts = list(args.prompts) + (read_prompts(args.prompts_file) if args.prompts_file else [])
    if not prompts:
        raise StableRegionsError("no prompts: give them as arguments or with --prompts FILE")
    if bool(args.vector) == bool(args.positive or args.negative):
        raise StableRegionsError(
            "give either --vector FILE or both --positive FILE and --negative FILE"
        )
    if not args.vector and not (args.positive and args.negative):
        raise StableRegionsError("--positive and --negative go together")
    positive = read_prompts(args.positive) if args.positive else None
    negative = read_prompts(args.negative) if args.negative else None
    err, adapter = load_with_status(args)
    layer = parse_layer(args.layer)
    hook = adapter.hook_for_layer(layer)
    if args.vector:
        vector = load_vector(args.vector, adapter.hook_dim(hook), layer)
    else:
        vector = mean_difference(adapter, positive, negative, layer)
    if args.save_vector:
        np.save(args.save_vector, vector.cpu().numpy())
    with progress(err, "steering") as (tick, _):
        result = steering_budget(
            adapter,
            prompts,
            vector,
            layer,
            eps=eps,
            positions=positions,
            exact=not args.no_exact,
            calibration=args.calibration,
            progress=tick,
        )
    summary = result.summary()
    if args.json:
        doc = {
            "model": result.model,
            "layer": result.layer,
            "eps": result.eps,
            "rows": [{k: json_value(v) for k, v in r.items()} for r in result.rows],
            "summary": [
                {k: json_value(v) for k, v in r.items()} for r in summary.to_dict("records")
            ],
        }
        sys.stdout.write(json.dumps(doc, ensure_ascii=False) + "\n")
        return 0
    out = console()
    table = Table(
        title=f"{result.model}: steering budget at layer '{result.layer}' (|vector| = {result.rows[0]['vector_norm']:.4g})",
        title_justify="left",
    )
    cols = ("prompt", "pos", "token", "eps", "quadratic", "corrected", "curve", "measured")
    for col in cols:
        table.add_column(col, justify="left" if col == "token" else "right")
    for r in result.rows:
        table.add_row(
            str(r["prompt_id"]),
            str(r["position"]),
            repr(r["token"])[1:-1],
            fmt(r["eps"], 3),
            fmt(r["coef_quadratic"]),
            fmt(r["coef_corrected"]),
            fmt(r["coef_curve"]) + ("" if r["reliable"] else " ?"),
            fmt(r["coef_exact"]),
        )
    out.print(table)
    s_table = Table(
        title="summary over prompts and positions: pick a coefficient below the 5th percentile",
        title_justify="left",
    )
    for col in ("eps", "n", "measured median", "measured p05", "curve median", "curve p05"):
        s_table.add_column(col, justify="right")
    for r in summary.to_dict("records"):
        s_table.add_row(
            fmt(r["eps"], 3),
            str(r["n"]),
            fmt(r["coef_exact_median"]),
            fmt(r["coef_exact_p05"]),
            fmt(r["coef_curve_median"]),
            fmt(r["coef_curve_p05"]),
        )
    out.print(s_table)
    out.print(
        "[dim]coefficient c of c * vector before KL(p || p_c) reaches eps at that position; "
        "inf = never; curve = the KL root along the logits' Taylor path (exact at final); "
        "? = outside the regime where it was validated (beyond 0.1 |h|, or the Pade form "
        "disagrees by more than 2%).[/dim]"
    )
    return 0
