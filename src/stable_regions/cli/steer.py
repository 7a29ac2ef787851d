"""``stable-regions steer``: the largest steering coefficient before the output drifts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import StableRegionsError
from ..results import frame_records
from .console import (
    add_chat,
    add_eps,
    add_model,
    add_positions,
    load_with_status,
    parse_layer,
    parse_positions,
    progress,
)
from .tables import (
    add_table_options,
    calibrated_note,
    check_columns,
    chosen_columns,
    print_frame,
    write_csv,
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
        action="append",
        help="block index i (blocks.{i}.hook_resid_post), 'embed' or 'final'; with --iso-kl "
        "it may be repeated (--layer 5 --layer 15): one row per layer, a {layer: vector} file "
        "or the mean difference giving each layer its own vector",
    )
    st.add_argument(
        "--vector",
        metavar="FILE",
        help="steering vector: .npy, .safetensors (one tensor, one per layer: {layer: vector}, "
        "or steering-lite's) or a repeng control vector .gguf (the vector of --layer is used)",
    )
    st.add_argument(
        "--positive", metavar="FILE", help="prompt file; with --negative: vector = mean difference"
    )
    st.add_argument("--negative", metavar="FILE", help="prompt file of the other side")
    st.add_argument(
        "--save-vector",
        metavar="FILE",
        help="write the vector used (handy with --positive/--negative): .npy; with --iso-kl "
        "also .safetensors (steering-lite's layout) or .gguf (repeng's), the coefficient in the "
        "file's metadata",
    )
    add_model(st)
    add_chat(st)
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
        help="print one JSON document {model, layer, eps, vector_norm, rows, summary}",
    )
    st.add_argument(
        "--iso-kl",
        metavar="TARGET",
        default=None,
        help="instead of the per-position budget: the coefficient at which --stat of the "
        "per-token KL(p_steer || p_base) over --tokens greedy tokens per prompt reaches TARGET "
        "nats, the vector added at every position (coef_rollout, coef_measured, coef_predicted)",
    )
    st.add_argument(
        "--stat",
        default="p95",
        help="with --iso-kl: mean, p50, p90, p95 (default) or max of the per-token KL",
    )
    st.add_argument(
        "--tokens",
        default="50",
        metavar="T",
        help="with --iso-kl: greedy tokens per continuation (default 50)",
    )
    add_table_options(st, DEFAULT_COLUMNS)


DEFAULT_COLUMNS = [
    "prompt_id",
    "position",
    "token",
    "eps",
    "coef_curve",
    "coef_exact",
    "reliable",
]


def run(args) -> int:
    from .._support.inputs import check_eps
    from ..studies.steering import STEER_COLUMNS as ALL_COLUMNS

    if args.iso_kl is not None:
        return run_iso_kl(args)
    check_columns(args.columns, ALL_COLUMNS)
    eps = check_eps(args.eps)
    positions = parse_positions(args.positions)
    if len(args.layer) > 1:
        raise StableRegionsError(
            f"the per-position budget takes one --layer, got {len(args.layer)}; several layers "
            "go with --iso-kl"
        )
    err, adapter, prompts, vector, layer = _loaded(args)
    result = budget_of(args, err, adapter, prompts, vector, layer, eps, positions, "steering")
    return _emit(args, result, lambda: print_tables(result, args))


def _emit(args, result, tables) -> int:
    """--json (the rows and the summary), --csv, or ``tables()`` on the terminal."""
    if args.json:
        doc = {**result.to_json(), "summary": frame_records(result.summary())}
        sys.stdout.write(json.dumps(doc, ensure_ascii=False) + "\n")
    elif args.csv:
        write_csv(result.to_frame())
    else:
        tables()
    return 0


def budget_of(args, err, adapter, prompts, vector, layer, eps, positions, label: str):
    """``steering_budget`` with the command's options (``--no-exact``, ``--calibration``,
    ``--chat``) and a progress bar: ``steer`` and ``analyze --direction``."""
    from ..studies.steering import steering_budget

    with progress(err, label) as (tick, _):
        return steering_budget(
            adapter,
            prompts,
            vector=vector,
            layer=layer,
            eps=eps,
            positions=positions,
            exact=not args.no_exact,
            calibration=args.calibration,
            chat=args.chat,
            progress=tick,
        )


def _loaded(args, formats: tuple[str, ...] = (".npy",)):
    """``(stderr console, adapter, prompts, vector, layer)``: the inputs checked before the
    model loads, then the vector (saved as ``.npy`` where asked; other ``formats`` are the
    caller's to write). A vector file that carries a budget says so. With several
    ``--layer``: ``layer`` is their list and ``vector`` a ``{layer: vector}`` dict."""
    from .._support.files import check_output_file
    from ..errors import OutputPathError
    from ..studies.vectors import read_budget

    prompts, positive, negative = _inputs(args)
    layers = _layers(args.layer)
    if args.save_vector and len(layers) > 1:
        # a file of several layers is steered at all of them at once by the libraries that
        # read it; these rows are one layer each
        raise StableRegionsError(
            "--save-vector writes one layer's vector and budget: give one --layer"
        )
    if args.save_vector:
        suffix = Path(args.save_vector).suffix.lower()
        if suffix not in formats:
            raise OutputPathError(
                f"--save-vector writes {', '.join(formats)} here, got {args.save_vector!r}"
            )
        check_output_file(args.save_vector, None, "--save-vector")
    err, adapter = load_with_status(args)
    vectors = _vectors(args, adapter, layers, positive, negative)
    layer, vector = (layers[0], vectors[layers[0]]) if len(layers) == 1 else (layers, vectors)
    budget = read_budget(args.vector) if args.vector else {}
    if budget.get("coefficient"):
        err.print(
            f"note: {args.vector} carries coefficient {budget['coefficient']} (the "
            f"{budget.get('kl_stat', '?')} of per-token KL = {budget.get('kl_target', '?')} nats "
            f"over {budget.get('new_tokens', '?')} tokens at layer {budget.get('layer', '?')}, "
            f"{budget.get('model', '?')})",
            highlight=False,
        )
    return err, adapter, prompts, vector, layer


def _layers(texts: list[str]) -> list:
    """The ``--layer`` values, each once."""
    layers = [parse_layer(text) for text in texts]
    repeated = sorted({str(x) for x in layers if layers.count(x) > 1})
    if repeated:
        raise StableRegionsError(f"--layer {', '.join(repeated)} given more than once")
    return layers


def _inputs(args) -> tuple[list[str], list[str] | None, list[str] | None]:
    """The prompts, and the two prompt sets of a mean-difference vector, checked."""
    from ..studies.steering import read_prompts

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
    return prompts, positive, negative


def _vectors(args, adapter, layers, positive, negative) -> dict:
    """``{layer: vector}`` from ``--vector``, or the mean difference (one pass per prompt for
    every layer); a one-layer vector is saved as ``.npy`` where asked."""
    import numpy as np

    from ..studies.steering import load_vector, mean_difference

    if args.vector:
        vectors = {
            layer: load_vector(args.vector, adapter.hook_dim(adapter.hook_for_layer(layer)), layer)
            for layer in layers
        }
    else:
        vectors = mean_difference(adapter, positive, negative, layer=list(layers))
    if args.save_vector and args.save_vector.lower().endswith(".npy"):
        np.save(args.save_vector, vectors[layers[0]].cpu().numpy())
    return vectors


ISO_KL_TABLE = ["vector", "coef_rollout", "coef_measured", "coef_predicted", "reliable"]


def run_iso_kl(args) -> int:
    """``--iso-kl TARGET``: the coefficient for a KL budget over a continuation (``iso_kl``)."""
    from ..studies.iso_kl import ISO_KL_COLUMNS, check_iso_kl_options, iso_kl

    check_columns(args.columns, ISO_KL_COLUMNS)
    target, stat, tokens = check_iso_kl_options(args.iso_kl, args.stat, args.tokens)
    if args.calibration:
        raise StableRegionsError("--calibration goes with the per-position budget, not --iso-kl")
    err, adapter, prompts, vector, layer = _loaded(args, (".npy", ".safetensors", ".gguf"))
    result = iso_kl(
        adapter, prompts, vector=vector, layer=layer, target=target, stat=stat, tokens=tokens,
        chat=args.chat, progress=lambda line: err.print(line, highlight=False),
    )  # fmt: skip
    if args.save_vector and not args.save_vector.lower().endswith(".npy"):
        _save_with_budget(args.save_vector, vector, result, adapter)
        err.print(f"wrote {args.save_vector} with its coefficient", highlight=False)

    def tables() -> None:
        frame = result.to_frame()
        print_frame(
            frame,
            chosen_columns(frame, args.columns, ISO_KL_TABLE),
            title=f"{result.model}: the coefficient at which the {stat} of per-token KL over "
            f"{tokens} tokens reaches {target:g} nats, the vector at every position of layer "
            f"'{result.layer}'",
            group=None,
            note="Costs: --columns forward_tokens_rollout,forward_tokens_measured,... or --json.",
        )

    return _emit(args, result, tables)


def _save_with_budget(path: str, vector, result, adapter) -> None:
    """The vector with the coefficient found (``coef_rollout``, the reference; the other two
    beside it) in the file's metadata (``vectors.write_vector_file``)."""
    from ..studies.vectors import write_vector_file

    row = result.rows[0]
    budget = {
        **({"coefficient": row["coef_rollout"]} if row["reached"] else {}),
        **{f"coef_{f}": row[f"coef_{f}"] for f in ("rollout", "measured", "predicted")},
        "kl_target": result.kl_target,
        "kl_stat": result.kl_stat,
        "new_tokens": result.new_tokens,
        "layer": result.layer,
        "model": result.model,
    }
    hint = getattr(adapter.model.config, "model_type", "")
    write_vector_file(path, {result.layer: vector}, budget=budget, model_hint=hint)


SUMMARY_COLUMNS = [
    "eps",
    "n",
    "coef_exact_median",
    "coef_exact_p05",
    "coef_curve_median",
    "coef_curve_p05",
]


def print_tables(result, args) -> None:
    frame = result.to_frame()
    default = list(DEFAULT_COLUMNS)
    if frame["coef_calibrated"].notna().any():
        default.insert(default.index("coef_curve") + 1, "coef_calibrated")
    print_frame(
        frame,
        chosen_columns(frame, args.columns, default),
        title=f"{result.model}: steering budget at layer '{result.layer}' "
        f"(vector_norm = {result.vector_norm:.4g})",
        group=None,
        note="A coefficient c of c * vector before KL(p || p_c) reaches eps at that position. "
        + calibrated_note(frame),
    )
    print_frame(
        result.summary(),
        SUMMARY_COLUMNS,
        title="over prompts and positions: pick a coefficient below the 5th percentile",
        group=None,
    )
