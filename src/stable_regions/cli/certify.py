"""``stable-regions certify``: the certified radius, the worst case found, and the closed form."""

from __future__ import annotations

import json
import math
import sys

from .console import (
    RIGHT,
    add_eps,
    add_model,
    add_positions,
    cell,
    console,
    fmt,
    load_with_status,
    parse_layer,
    parse_positions,
    progress,
    titled_table,
)


def add_parser(sub) -> None:
    a = sub.add_parser(
        "certify",
        help="a certified radius (no perturbation inside moves the output by more than eps), "
        "beside the worst case a search finds",
        description=(
            "For each position and eps: radius_certified, a proven radius of the ball (or box) "
            "inside which KL(p || p') <= eps for every perturbation (at 'final', and at the last "
            "block through the final norm; NaN elsewhere, with the reason); radius_attack, the "
            "smallest exit a projected-gradient search finds (an upper bound); and the quadratic "
            "radius and measured exit along the top curvature direction."
        ),
    )
    a.add_argument("prompt", help="the text to certify")
    add_model(a)
    add_eps(a, [0.01, 0.1, 1.0])
    a.add_argument(
        "--layer",
        default="final",
        help="'final' = the pre-logit vector (default), 'embed', or a block index i "
        "(blocks.{i}.hook_resid_post); the last block is certified through the final norm",
    )
    a.add_argument(
        "--norm",
        default="l2",
        help="l2 (a ball, default) or linf (a box; radii in L-inf units)",
    )
    add_positions(a)
    a.add_argument(
        "--substitutions",
        default=None,
        metavar="K",
        help="also swap each position's token for its K nearest tokens in the input embedding: "
        "the predicted and the measured effect on the next-token distribution",
    )
    a.add_argument(
        "--plot",
        metavar="FILE.png",
        help="also draw the radii along the prompt into this PNG: certified below, the worst "
        "case found above, one panel per eps",
    )
    a.add_argument(
        "--json",
        action="store_true",
        help="print one JSON document {model, layer, norm, eps, rows} instead of a table",
    )


def run(args) -> int:
    from ..certify import certify, check_norm
    from ..errors import StableRegionsError
    from ..inputs import check_eps

    eps = check_eps(args.eps)  # fail fast, before loading a model
    norm = check_norm(args.norm)
    substitutions = 0
    if args.substitutions is not None:
        text = str(args.substitutions)
        if not text.isdigit() or int(text) < 1:
            raise StableRegionsError(
                f"--substitutions must be a number of nearest tokens K >= 1, got {text!r}"
            )
        substitutions = int(text)
    if args.plot:
        from ..files import check_output_file

        check_output_file(args.plot, ".png", "--plot")
    positions = parse_positions(args.positions)
    layer = parse_layer(args.layer)
    err, adapter = load_with_status(args)
    adapter.hook_for_layer(layer)  # a bad layer fails before any work
    with progress(err, "certifying positions") as (tick, stage):
        result = certify(
            adapter,
            args.prompt,
            eps=eps,
            layer=layer,
            norm=norm,
            positions=positions,
            substitutions=substitutions,
            progress=tick,
            stage=stage,
        )
    if args.plot:
        err.print(f"wrote {result.plot(args.plot)}")
    if args.json:
        sys.stdout.write(json.dumps(result.to_json(), ensure_ascii=False) + "\n")
    else:
        print_table(result)
        if result.substitutions:
            print_substitutions(result)
    return 0


def print_table(result) -> None:
    out = console()
    unit = "L2" if result.norm == "l2" else "L-inf"
    right = RIGHT
    table = titled_table(
        f"{result.model}, layer '{result.layer}': {unit} radius before KL reaches eps",
        [
            ("pos", right),
            ("token", cell(14)),
            ("next (p)", cell(20)),
            ("eps", right),
            ("certified", right),
            ("attack", right),
            ("tightness", right),
            ("quadratic", right),
            ("top dir. exit", right),
        ],
    )
    last = None
    reasons = set()
    for r in result.rows:
        first = r["position"] != last
        if first and last is not None:
            table.add_section()
        last = r["position"]
        if not math.isfinite(r["radius_certified"]):
            reasons.add(r["certified_by"])
        table.add_row(
            str(r["position"]) if first else "",
            repr(r["token"])[1:-1] if first else "",
            f"{repr(r['next_token'])[1:-1]} ({r['next_prob']:.2f})" if first else "",
            fmt(r["eps"], 3),
            fmt(r["radius_certified"]),
            fmt(r["radius_attack"]),
            fmt(r["tightness"], 3),
            fmt(r["radius_quadratic"]),
            fmt(r["radius_exact"]),
        )
    out.print(table)
    for reason in sorted(reasons):
        out.print(f"[yellow]certified: {reason}[/yellow]")
    out.print(
        "[dim]certified: proven, no perturbation of that size moves the next-token "
        "distribution by KL > eps (nats); attack: the smallest exit a gradient search found "
        "(the true radius lies between the two); tightness = certified / attack; quadratic = "
        "sqrt(2 eps / lambda_max) along the top curvature direction, and that direction's "
        "measured exit.[/dim]"
    )


def print_substitutions(result) -> None:
    out = console()
    right = RIGHT
    table = titled_table(
        "token substitutions at the embedding (K nearest tokens in the input embedding)",
        [
            ("pos", right),
            ("token -> substitute", cell(28)),
            ("distance", right),
            ("eps", right),
            ("predicted", right),
            ("measured", right),
            ("KL swapped", right),
            ("flips (pred / meas)", right),
        ],
    )
    for r in result.substitutions:
        table.add_row(
            str(r["position"]),
            f"{repr(r['token'])[1:-1]} -> {repr(r['substitute'])[1:-1]}",
            fmt(r["distance"]),
            fmt(r["eps"], 3),
            fmt(r["radius_predicted"]),
            fmt(r["radius_exact"]),
            fmt(r["kl_substituted"]),
            f"{'yes' if r['flips_predicted'] else 'no'} / {'yes' if r['flips_measured'] else 'no'}",
        )
    out.print(table)
    out.print(
        "[dim]distance: |x(substitute) - x(token)| entering block 0; predicted: the Taylor-path "
        "radius along that move (a flip is predicted where it is below the distance); "
        "measured: the first crossing of eps along it; KL swapped: the next-token KL after "
        "actually substituting the token (a flip where it exceeds eps).[/dim]"
    )
