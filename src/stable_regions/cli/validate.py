"""``stable-regions validate``: closed forms against measured boundaries over a corpus."""

from __future__ import annotations

import os

from ..errors import InvalidParameterError, StableRegionsError
from .console import (
    add_eps,
    add_model,
    add_ray,
    add_run_directory,
    console,
    load_with_status,
    progress,
    ray_options,
    run_directory,
)
from .tables import print_frame


def add_parser(sub) -> None:
    va = sub.add_parser(
        "validate",
        help="validation study: closed-form radii vs measured boundaries over a prompt corpus",
        description=(
            "For several positions of every prompt, at each layer asked for (--layers), and six "
            "direction families (both signs), the "
            "published quadratic radius, the Pade radius and an isotonic calibration, "
            "each against the boundary measured on the model. Writes DIR/results.parquet, "
            "DIR/summary.json, DIR/report.html (and DIR/calibration-LAYER.json when fitting); results "
            "are written per prompt as the run goes, and --resume continues an interrupted run."
        ),
    )
    add_model(va)
    va.add_argument(
        "--prompts",
        metavar="FILE",
        help="one prompt per line (a literal \\n is a newline) or .jsonl with a 'text' field "
        "(default: the shipped corpus)",
    )
    add_eps(va, [0.01, 0.1, 1.0])
    va.add_argument(
        "--layers",
        nargs="+",
        default=["final"],
        metavar="L",
        help="any of embed, block indices and final, each once (default final); e.g. "
        "--layers embed 7 15 final",
    )
    va.add_argument(
        "--families",
        nargs="+",
        default=None,
        metavar="F",
        help="direction families (default all): top random eigenspace token interpolation steering",
    )
    va.add_argument(
        "--calibration",
        default="fit",
        metavar="PATH|bundled|fit|none",
        help="fit (default: isotonic on half the prompts, evaluated on the other half), the "
        "calibrations shipped for a bundled model, a calibration-LAYER.json (one-layer runs), "
        "the folder of a finished run (its calibration of every layer), or none",
    )
    va.add_argument(
        "--positions-per-prompt",
        type=int,
        default=3,
        metavar="N",
        help="positions measured per prompt, evenly spread, the last included (default 3)",
    )
    add_run_directory(va, "validation")
    add_ray(va, "measure the prompts")


def run(args) -> int:
    from .._support.inputs import check_eps
    from ..prompts import read_prompt_file
    from ..studies.validation import check_families, check_layers, validate

    # Everything that can be wrong with the input fails here, before a model is loaded.
    check_eps(args.eps)
    check_layers(args.layers)
    check_families(args.families)
    prompts = read_prompt_file(args.prompts) if args.prompts else None
    if args.calibration not in ("fit", "bundled", "none") and not os.path.exists(args.calibration):
        raise StableRegionsError(
            f"calibration {args.calibration} not found (use a file, a run's folder, 'bundled', "
            "'fit' or 'none')"
        )
    if args.positions_per_prompt < 1:
        raise InvalidParameterError("--positions-per-prompt must be at least 1")
    options = dict(
        eps=args.eps,
        layers=args.layers,
        families=args.families,
        calibration=args.calibration,  # validate() reads "none", "fit", "bundled", paths
        resume=args.resume,
        overwrite=args.overwrite,
        positions_per_prompt=args.positions_per_prompt,
    )
    out = run_directory(args, "validation", "stable-regions validate", "validation run")
    if args.ray is not None:
        from .. import models
        from ..studies.distributed import validate_ray

        err = console(stderr=True)
        cluster = ray_options(args)
        spec = args.model or models.DEFAULT_MODEL
        with progress(err, f"validating prompts on Ray ({args.workers} workers)") as (tick, _):
            run = validate_ray(
                spec,
                prompts,
                out=out,
                progress=tick,
                **cluster,
                **options,
            )
    else:
        err, adapter = load_with_status(args)
        with progress(err, "validating prompts") as (tick, _):
            run = validate(adapter, prompts, out=out, progress=tick, **options)
    print_summary(run)
    from ..studies.validation import calibration_file

    names = ["results.parquet", "summary.json", "report.html"]
    for name in names + [calibration_file(layer) for layer in run.calibrations]:
        if (run.out / name).exists():
            print(run.out / name)
    return 0


SUMMARY_COLUMNS = [
    "layer",
    "eps",
    "predictor",
    "n",
    "median_rel_err",
    "within_8pct",
    "within_50pct",
]


def print_summary(run) -> None:
    summary = run.summary()
    rows = summary[summary.family == "all"]
    note = ""
    if "final" in set(rows.layer):
        note = (
            "At 'final' the curve is the exact KL root of the head (p and W alone), so its "
            "error is the measurement's tolerance; a calibrated row there that matches it "
            "kept that form as it is. summary.json has every family and statistic."
        )
    print_frame(  # on stderr: stdout keeps only the paths of the files written
        rows,
        SUMMARY_COLUMNS,
        title="held-out prompts, all families",
        group=None,
        note=note,
        stderr=True,
    )
