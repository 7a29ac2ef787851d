"""``stable-regions analyze``: the geometry of every position of a prompt beside the truth."""

from __future__ import annotations

from ..errors import InvalidParameterError
from .console import (
    add_chat,
    add_eps,
    add_model,
    add_positions,
    add_prompt,
    each_prompt,
    load_with_status,
    parse_positions,
    prompts_of,
)
from .tables import (
    add_table_options,
    calibrated_note,
    check_columns,
    chosen_columns,
    print_frame,
    write_results,
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
    add_prompt(a, "the text to analyze")
    add_chat(a)
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
        "--direction",
        metavar="FILE",
        help="a direction of your own instead of the top curvature direction: a vector file "
        "(.npy, .safetensors, repeng .gguf) of the layer's width; the radii are along +u, "
        "u = the vector / its norm (the steering coefficient times the vector's norm)",
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
        help="print one JSON document {model, prompt, layer, eps, rows} instead of a table",
    )
    add_table_options(a, DEFAULT_COLUMNS)
    a.add_argument(
        "--html",
        metavar="FILE",
        help="also write a self-contained HTML page: the prompt coloured by radius, every "
        "position's numbers on hover",
    )


def run(args) -> int:
    from .._support.inputs import check_eps
    from ..studies.analysis import COLUMNS as ALL_COLUMNS
    from ..studies.analysis import analyze

    if not args.direction:
        check_columns(args.columns, ALL_COLUMNS)
    eps = check_eps(args.eps)  # fail fast, before loading a model
    positions = parse_positions(args.positions)
    prompts = prompts_of(args)
    if args.html:
        from ..viewer import check_html_path

        check_html_path(args.html)
        if len(prompts) > 1:
            raise InvalidParameterError("--html writes the page of one prompt: give one prompt")
    if args.direction:
        return along_direction(args, eps, positions, prompts)
    err, adapter = load_with_status(args)
    results = each_prompt(
        err,
        prompts,
        "analyzing positions",
        lambda prompt, tick, stage: analyze(
            adapter,
            prompt,
            eps=eps,
            positions=positions,
            layer=args.layer,
            exact=not args.no_exact,
            trace=args.trace,
            calibration=args.calibration,
            chat=args.chat,
            progress=tick,
            stage=stage,
        ),
    )
    if args.html:
        write_page(args.html, results[0], adapter)
        err.print(f"wrote {args.html}")
    write_results(results, args, print_table)
    return 0


DIRECTION_COLUMNS = [
    "prompt_id",
    "position",
    "token",
    "eps",
    "radius_curve",
    "radius_exact",
    "reliable",
]


def along_direction(args, eps, positions, prompts) -> int:
    """``--direction``: the radii along the user's unit direction ``+u`` at the layer, from
    ``steering_budget`` (a coefficient of the vector times its norm is a distance along u)."""
    import json
    import sys

    from ..results import frame_records
    from ..studies.steering import load_vector
    from ..vocabulary import FORMS, describe
    from .steer import budget_of
    from .tables import write_csv

    if args.html or args.trace:
        raise InvalidParameterError(
            "--html and --trace describe the top curvature direction: leave them out with --direction"
        )
    err, adapter = load_with_status(args)
    dim = adapter.hook_dim(adapter.hook_for_layer(args.layer))
    vector = load_vector(args.direction, dim, adapter.layer_name(args.layer))
    result = budget_of(
        args, err, adapter, prompts, vector, args.layer, eps, positions, "analyzing positions"
    )
    frame = result.to_frame()
    for form in FORMS:
        frame[f"radius_{form}"] = frame.pop(f"coef_{form}") * result.vector_norm
    frame = describe(frame.drop(columns=["vector_norm"]))
    if args.json:
        doc = {**result.to_json(), "direction": str(args.direction), "rows": frame_records(frame)}
        sys.stdout.write(json.dumps(doc, ensure_ascii=False) + "\n")
    elif args.csv:
        write_csv(frame)
    else:
        print_frame(
            frame,
            chosen_columns(frame, args.columns, DIRECTION_COLUMNS),
            title=f"{result.model}, layer '{result.layer}': radius along +u, u = "
            f"{args.direction} / {result.vector_norm:.4g}",
            group=None,
            note="A radius is how far (L2) the activation moves along +u before KL(p || p_u) "
            "reaches eps. " + calibrated_note(frame),
        )
    return 0


RADII = [
    "radius_curve",
    "radius_exact",
    "radius_pade",
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
                "activation_norm",
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
        note="radius_curve: the KL root along the top curvature direction (exact at 'final', "
        "the logits' Taylor path inside); radius_exact: the boundary measured on the model; "
        "radius_pade: the Pade form of the KL series; radius_quadratic = sqrt(2 eps / "
        "lambda_max). Hover a token for its numbers; click to pin.",
    )


DEFAULT_COLUMNS = [
    "position",
    "token",
    "next_token",
    "eps",
    "radius_curve",
    "radius_exact",
    "reliable",
]


def print_table(result, args) -> None:
    frame = result.to_frame()
    default = list(DEFAULT_COLUMNS)
    if args.no_exact:
        default.remove("radius_exact")
        default.insert(default.index("radius_curve"), "radius_pade")
    if frame["radius_calibrated"].notna().any():
        default.insert(default.index("radius_curve") + 1, "radius_calibrated")
    print_frame(
        frame,
        chosen_columns(frame, args.columns, default),
        title=f"{result.model}, layer '{result.layer}': radius along the top curvature "
        "direction (nearest exit over +-v)",
        note="A radius is how far (L2, in the layer's units) the activation moves before "
        "KL(p || p_t) reaches eps; compare it with activation_norm (radius_relative). inf: "
        "the KL never reaches eps that way. --columns all shows every column. "
        + calibrated_note(frame),
    )
