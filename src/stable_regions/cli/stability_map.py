"""``stable-regions map``: radius, lambda_max and effective rank over layers x positions."""

from __future__ import annotations

from .console import add_model, add_positions, load_with_status, parse_positions, progress


def add_parser(sub) -> None:
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
    add_model(mp)
    mp.add_argument("--eps", type=float, default=0.1, help="KL threshold in nats (default 0.1)")
    mp.add_argument(
        "--layers",
        nargs="+",
        default=None,
        metavar="L",
        help="'embed', 'final', block indices, or 'all' (default: embed, 8 evenly spaced blocks, final)",
    )
    add_positions(mp)
    mp.add_argument(
        "--relative",
        action="store_true",
        help="plot radius / |h| (the activation's norm there), so that layers of different "
        "activation scales compare; map.json has both",
    )
    mp.add_argument(
        "--rank-probes",
        default="16",
        metavar="N",
        help="Hutchinson probes behind the effective rank inside the network (default 16); "
        "0: no effective rank, the radii and lambda_max about 30%% sooner",
    )
    mp.add_argument(
        "--out",
        default="stability-map",
        metavar="DIR",
        help="output directory (default ./stability-map)",
    )


def run(args) -> int:
    from .._support.files import check_output_dir
    from .._support.inputs import check_eps
    from ..studies.maps import stability_map

    check_eps([args.eps])
    probes = _probes(args.rank_probes)
    positions = parse_positions(args.positions)
    check_output_dir(args.out, "--out")
    err, adapter = load_with_status(args)
    with progress(err, "stability map") as (tick, _):
        result = stability_map(
            adapter,
            args.prompt,
            eps=args.eps,
            layers=args.layers,
            positions=positions,
            rank_probes=probes,
            progress=tick,
        )
    out = result.save(args.out, relative=args.relative)
    for name in ("map.json", "map.parquet", "map.png"):
        print(out / name)
    return 0


def _probes(text: str) -> int:
    from ..errors import StableRegionsError

    if not text.isdigit():
        raise StableRegionsError(
            f"--rank-probes must be a whole number >= 0 (0: no effective rank), got {text!r}"
        )
    return int(text)
