"""``stable-regions scan``: every position of documents or a corpus, for about a forward pass."""

from __future__ import annotations

from ..errors import InvalidParameterError
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

PAGE_TOKENS = 20_000  # positions in a --html page: beyond this a page gets slow to open


def add_parser(sub) -> None:
    sc = sub.add_parser(
        "scan",
        help="every position of documents or a corpus: lambda_max and radius, for about the "
        "price of running the model",
        description=(
            "Runs the model over each document (in overlapping windows when it is long) and, "
            "at every position's pre-logit vector, finds lambda_max, its direction and the "
            "closed-form radii along it (radius_quadratic and radius_pade, nearest exit over "
            "both signs). Nothing is measured on the model: check positions with `analyze`. Writes "
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
    add_model(sc)
    add_eps(sc, [0.1])
    sc.add_argument(
        "--window",
        type=int,
        default=None,
        metavar="N",
        help="tokens per forward pass (default 1024 or the model's context, if shorter)",
    )
    sc.add_argument(
        "--overlap",
        type=int,
        default=None,
        metavar="N",
        help="tokens of context a window repeats from the one before (default window/8)",
    )
    add_run_directory(sc, "scan")
    add_ray(sc, "scan")
    sc.add_argument(
        "--html",
        metavar="FILE",
        help=f"also write a self-contained HTML page of the documents (the first {PAGE_TOKENS} "
        "positions)",
    )
    sc.add_argument(
        "--top", type=int, default=10, metavar="K", help="fragile positions to print (default 10)"
    )


def run(args) -> int:

    from .._support.inputs import check_eps
    from ..prompts import read_documents
    from ..studies.scan import document_windows, scan_corpus

    # Everything that can be wrong with the input fails here, before a model is loaded.
    eps = check_eps(args.eps)
    if args.window is not None:
        overlap = args.window // 8 if args.overlap is None else args.overlap
        document_windows(1, args.window, overlap)
    if args.top < 0:
        raise InvalidParameterError("--top must be 0 or more")
    if args.html:
        from ..viewer import check_html_path

        check_html_path(args.html)
    documents = read_documents(args.documents)
    settings = dict(
        eps=eps,
        window=args.window,
        overlap=args.overlap,
        resume=args.resume,
        overwrite=args.overwrite,
    )
    out = run_directory(args, "scan", "stable-regions scan", "scan")
    if args.ray is not None:
        run, model_name = _scan_on_ray(args, documents, settings, out)
    else:
        err, adapter = load_with_status(args)
        model_name = adapter.name
        with progress(err, "scanning tokens") as (tick, _):
            run = scan_corpus(adapter, documents, out=out, progress=tick, **settings)
    if args.top:
        e = run.frame.eps.iloc[0]
        print_frame(
            run.fragile(args.top),
            ["doc_id", "position", "token", "next_token", "next_prob", "lambda_max", "radius_pade"],
            title=f"{min(args.top, len(run.frame[run.frame.eps == e]))} most fragile positions "
            f"at eps {e:g} (of {len(run.frame[run.frame.eps == e])})",
            group=None,
        )
    if args.html:
        write_page(args.html, run.frame, model_name, console(stderr=True))
    for name in ("results.parquet", "summary.json", "radius.png"):
        print(run.out / name)
    return 0


def _scan_on_ray(args, documents, settings: dict, out: str):
    """``distributed.scan_corpus_ray`` with the command's options; the cluster is checked
    before anything is loaded or written."""
    from .. import models
    from ..studies.distributed import scan_corpus_ray

    err = console(stderr=True)
    cluster = ray_options(args)
    spec = args.model or models.DEFAULT_MODEL
    with progress(err, f"scanning tokens on Ray ({args.workers} workers)") as (tick, _):
        run = scan_corpus_ray(spec, documents, out=out, progress=tick, **settings, **cluster)
    return run, spec


def write_page(path: str, frame, model: str, err) -> None:
    """The viewer page of a scan: one text per document, in the scan's order, up to
    ``PAGE_TOKENS`` positions."""
    from ..viewer import ViewerSpec, write_viewer

    order = list(dict.fromkeys(frame["doc_id"]))
    first = frame[frame["eps"] == frame["eps"].iloc[0]]
    kept, total = [], 0
    for doc in order:
        n = int((first["doc_id"] == doc).sum())
        if kept and total + n > PAGE_TOKENS:
            break
        kept.append(doc)
        total += n
    shown = frame[frame["doc_id"].isin(kept)].assign(
        text=lambda f: f["doc_id"].map({d: i for i, d in enumerate(kept)})
    )
    spec = ViewerSpec(
        group="text",
        order="position",
        radius_columns=["radius_pade", "radius_quadratic"],
        fields=[(c, c) for c in ("position", "next_token", "next_prob", "entropy", "lambda_max")],
        alternatives=("top_tokens", "top_probs") if "top_tokens" in frame else None,
        alternatives_label="predicted next tokens",
        group_names={i: str(d) for i, d in enumerate(kept)},
    )
    note = (
        ""
        if len(kept) == len(order)
        else (
            f"The page shows the first {len(kept)} of {len(order)} documents ({total} positions); "
            "results.parquet has them all. "
        )
    )
    write_viewer(
        path,
        shown,
        spec,
        title=f"stable-regions scan: {model}",
        subtitle="each token coloured by the radius of the next-token distribution predicted at it",
        note=note + "radius_pade: the Pade closed form of the KL series along the top curvature "
        "direction, nearest exit over both signs. Hover a token for its numbers; click to pin.",
    )
    err.print(f"wrote {path}" + (f" ({len(kept)} of {len(order)} documents)" if note else ""))
