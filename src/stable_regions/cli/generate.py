"""``stable-regions generate``: generate text and watch its stability token by token."""

from __future__ import annotations

import json
import math
import sys
from contextlib import nullcontext

from .console import add_chat, add_eps, add_model, console, load_with_status
from .tables import print_frame, write_csv

# terminal colours for the radius, fragile (small) to stable (large), on a log scale
SHADES = ["bold red", "dark_orange", "yellow", "green", "bold green"]


def add_parser(sub) -> None:
    a = sub.add_parser(
        "generate",
        help="generate text and record, for every new token, how far the model's state could "
        "move before the output changes",
        description=(
            "Generates from PROMPT with a StabilityMonitor attached: for every new token its "
            "probability, the entropy, lambda_max of the pre-logit curvature, the radius along "
            "the top curvature direction at each eps, the distance to the next argmax flip, "
            "and a fragility flag. Prints the text coloured by radius and the most fragile "
            "tokens; --json and --html write the numbers."
        ),
    )
    a.add_argument("prompt", help="the text to continue")
    add_model(a)
    add_chat(a)
    a.add_argument(
        "--max-new-tokens", default="32", metavar="N", help="tokens to generate (default 32)"
    )
    add_eps(a, [0.1])
    a.add_argument(
        "--mode",
        default="fast",
        help="fast (default: a bracket on lambda_max, one product with W per token) or exact "
        "(Lanczos, the exact radius along the top direction, and a certified radius)",
    )
    how = a.add_mutually_exclusive_group()
    how.add_argument(
        "--greedy",
        dest="greedy",
        action="store_true",
        default=True,
        help="greedy decoding (default)",
    )
    how.add_argument("--sample", dest="greedy", action="store_false", help="sample from the model")
    a.add_argument("--csv", action="store_true", help="print every column as CSV on stdout instead")
    a.add_argument("--seed", type=int, default=None, help="random seed for --sample")
    a.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="flag tokens whose radius_curve is below this (default: where the argmax "
        "flips before the KL reaches eps)",
    )
    a.add_argument(
        "--direction",
        action="append",
        default=[],
        metavar="FILE",
        help="a direction at the pre-logit vector to monitor too (.safetensors: every tensor "
        "in it; .npy; or a text file of numbers); repeatable",
    )
    a.add_argument(
        "--json", action="store_true", help="print one JSON document {model, prompt, text, rows}"
    )
    a.add_argument("--html", metavar="FILE", help="also write a self-contained HTML page")


def run(args) -> int:
    from .._support.inputs import check_eps
    from ..studies.generation import check_new_tokens, generate
    from ..studies.token_geometry import check_mode
    from ..viewer import check_html_path

    n = str(args.max_new_tokens)
    check_new_tokens(int(n) if n.lstrip("-").isdigit() else n)
    check_mode(args.mode)
    eps = check_eps(args.eps)
    if args.html:
        check_html_path(args.html)
    directions = load_directions(args.direction)
    err, adapter = load_with_status(args)
    with err.status("generating", spinner="dots") if err.is_terminal else nullcontext():
        result = generate(
            adapter,
            args.prompt,
            max_new_tokens=int(n),
            eps=eps,
            mode=args.mode,
            greedy=args.greedy,
            seed=args.seed,
            chat=args.chat,
            threshold=args.threshold,
            directions=directions or None,
        )
    frame = result.to_frame()
    if args.html:
        write_page(args.html, frame, adapter.name, args.prompt, args.mode)
        err.print(f"wrote {args.html}")
    if args.json:
        sys.stdout.write(json.dumps(result.to_json(), ensure_ascii=False) + "\n")
    elif args.csv:
        write_csv(frame)
    else:
        print_text(args.prompt, frame, eps[0])
        print_fragile(frame, eps[0])
    return 0


def load_directions(paths: list[str]) -> dict:
    """``{name: vector}`` from files (safetensors, .npy without pickles, or text)."""
    import numpy as np
    import torch

    from ..errors import StableRegionsError

    out = {}
    for path in paths:
        try:
            if path.endswith(".safetensors"):
                from safetensors.torch import load_file

                for name, v in load_file(path).items():
                    out[name] = v.reshape(-1) if v.ndim > 1 and v.shape[0] == 1 else v
                continue
            if path.endswith(".npy"):
                arr = np.load(path, allow_pickle=False)
            else:
                arr = np.loadtxt(path, dtype=np.float64, ndmin=1)
        except (OSError, ValueError) as exc:
            raise StableRegionsError(f"cannot read direction file {path!r}: {exc}") from None
        out[path.rsplit("/", 1)[-1].rsplit(".", 1)[0]] = torch.as_tensor(
            np.asarray(arr, np.float64)
        )
    return out


def write_page(path: str, frame, model: str, prompt: str, mode: str) -> None:
    from ..viewer import ViewerSpec, write_viewer

    columns = ["radius_curve", "radius_quadratic", "radius_flip"]
    columns += [c for c in frame.columns if c.startswith("radius_") and c not in columns]
    spec = ViewerSpec(
        group="sequence",
        order="step",
        text="chosen_token",
        radius_columns=columns,
        fields=[
            ("chosen_prob", "chosen_prob"),
            ("next_prob", "next_prob"),
            ("entropy", "entropy"),
            ("lambda_max", "lambda_max"),
            ("lambda_lower", "lambda_lower"),
            ("lambda_upper", "lambda_upper"),
            ("step", "step"),
            ("fragile", "fragile"),
        ],
        alternatives=("top_tokens", "top_probs"),
        alternatives_label="the distribution it was drawn from",
        group_names={0: "generated"},
        prefixes={0: prompt},
    )
    write_viewer(
        path,
        frame,
        spec,
        title=f"stable-regions generate: {model}",
        subtitle=f"mode {mode}; each generated token coloured by the radius of the distribution it came from",
        note="radius_curve: the distance along the top curvature direction of the pre-logit "
        "curvature before KL(p || p') reaches eps; radius_quadratic = sqrt(2 eps / lambda_max); "
        "radius_flip: the least move that lets another token overtake the top one. "
        "Grey text: the prompt. Hover a token for its numbers; click to pin.",
    )


def shade(radius: float, lo: float, hi: float) -> str:
    if not (isinstance(radius, float) and math.isfinite(radius) and radius > 0):
        return "dim"
    if hi <= lo:
        return SHADES[-1]
    frac = (math.log(radius) - math.log(lo)) / (math.log(hi) - math.log(lo))
    return SHADES[min(len(SHADES) - 1, int(frac * len(SHADES)))]


def print_text(prompt: str, frame, eps: float) -> None:
    from rich.text import Text

    out = console()
    rows = frame[frame["eps"] == eps].sort_values("step")
    radii = [r for r in rows["radius_curve"] if math.isfinite(r) and r > 0]
    lo, hi = (min(radii), max(radii)) if radii else (1.0, 1.0)
    text = Text(prompt, style="dim")
    for token, radius in zip(rows["chosen_token"], rows["radius_curve"], strict=True):
        text.append(token, style=shade(float(radius), lo, hi))
    out.print(text)
    legend = Text(f"\nradius at eps {eps:g} (log scale): ")
    for i, style in enumerate(SHADES):
        value = math.exp(math.log(lo) + (i + 0.5) / len(SHADES) * (math.log(hi) - math.log(lo)))
        legend.append(f" ~{value:.3g} ", style=style)
    legend.append("  (red: fragile)")
    out.print(legend)


FRAGILE_COLUMNS = [
    "step",
    "chosen_token",
    "chosen_prob",
    "entropy",
    "radius_curve",
    "radius_flip",
    "fragile",
]


def print_fragile(frame, eps: float, k: int = 10) -> None:
    rows = frame[frame["eps"] == eps].nsmallest(k, "radius_curve")
    print_frame(
        rows,
        FRAGILE_COLUMNS,
        title=f"the {len(rows)} most fragile tokens (smallest radius_curve at eps {eps:g})",
        group=None,
    )
