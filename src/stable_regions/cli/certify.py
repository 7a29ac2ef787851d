"""``stable-regions certify``: the certified radius, the worst case found, and the closed form."""

from __future__ import annotations

from .console import (
    add_chat,
    add_eps,
    add_model,
    add_positions,
    add_prompt,
    console,
    each_prompt,
    load_with_status,
    parse_layer,
    parse_positions,
    prompts_of,
)
from .tables import add_table_options, check_columns, chosen_columns, print_frame, write_results


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
    add_prompt(a, "the text to certify")
    add_chat(a)
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
        help="print one JSON document {model, prompt, layer, norm, eps, rows} instead of a table",
    )
    add_table_options(a, DEFAULT_COLUMNS)


def run(args) -> int:
    from .._support.inputs import check_eps
    from ..errors import InvalidParameterError
    from ..plotting import save
    from ..studies.certify import COLUMNS as ALL_COLUMNS
    from ..studies.certify import certify, check_norm

    check_columns(args.columns, ALL_COLUMNS)
    eps = check_eps(args.eps)  # fail fast, before loading a model
    norm = check_norm(args.norm)
    substitutions = 0
    if args.substitutions is not None:
        text = str(args.substitutions)
        if not text.isdigit() or int(text) < 1:
            raise InvalidParameterError(
                f"--substitutions must be a number of nearest tokens K >= 1, got {text!r}"
            )
        substitutions = int(text)
    prompts = prompts_of(args)
    if args.plot:
        from .._support.files import check_output_file

        check_output_file(args.plot, ".png", "--plot")
        if len(prompts) > 1:
            raise InvalidParameterError("--plot draws one prompt: give one prompt")
    positions = parse_positions(args.positions)
    layer = parse_layer(args.layer)
    err, adapter = load_with_status(args)
    adapter.hook_for_layer(layer)  # a bad layer fails before any work
    results = each_prompt(
        err,
        prompts,
        "certifying positions",
        lambda prompt, tick, stage: certify(
            adapter,
            prompt,
            eps=eps,
            layer=layer,
            norm=norm,
            positions=positions,
            substitutions=substitutions,
            chat=args.chat,
            progress=tick,
            stage=stage,
        ),
    )
    if args.plot:
        err.print(f"wrote {save(results[0].plot(), args.plot)}")
    write_results(results, args, print_tables)
    return 0


def print_tables(result, args) -> None:
    print_table(result, args)
    if result.substitutions:
        print_substitutions(result)


DEFAULT_COLUMNS = [
    "position",
    "token",
    "eps",
    "radius_certified",
    "radius_attack",
    "tightness",
    "radius_exact",
]
SUBSTITUTION_COLUMNS = [
    "position",
    "token",
    "substitute",
    "eps",
    "distance",
    "radius_curve",
    "kl_substituted",
    "flips_predicted",
    "flips_measured",
]


def print_table(result, args) -> None:
    frame = result.to_frame()
    unit = "L2" if result.norm == "l2" else "L-inf"
    print_frame(
        frame,
        chosen_columns(frame, args.columns, DEFAULT_COLUMNS),
        title=f"{result.model}, layer '{result.layer}': {unit} radius before KL reaches eps",
        note="The true radius lies between radius_certified (proven) and radius_attack (found).",
    )
    out = console()
    for reason in sorted(set(frame.loc[frame.radius_certified.isna(), "certified_by"])):
        out.print(f"[yellow]certified_by: {reason}[/yellow]")


def print_substitutions(result) -> None:
    frame = result.substitutions_frame()
    print_frame(
        frame,
        SUBSTITUTION_COLUMNS,
        title="token substitutions at the embedding (K nearest tokens in the input embedding)",
        group=None,
    )
