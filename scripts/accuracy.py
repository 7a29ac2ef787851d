"""Accuracy of the closed forms against the measured boundary.

A few varied prompts (every position, or the last N with --positions N), top eigendirection,
nearest exit over both signs. Prints median and 90th-percentile relative error
|predicted / measured - 1| per eps.

    python scripts/accuracy.py --model smollm2-135m                     # pre-logit vector
    python scripts/accuracy.py --model smollm2-135m --layer 15 --prompts 3 --positions 4
"""

from __future__ import annotations

import argparse
import time

import pandas as pd

import stable_regions as sr

PROMPTS = [
    "The capital of France is Paris, and",
    "def add(a, b):\n    return",
    "1, 1, 2, 3, 5, 8,",
    "Le chat dort sur le canapé.",
    "Q: Who wrote Hamlet?\nA: William",
    "Once upon a time, in a small village by the sea, there lived",
    "import numpy as np\nx = np.zeros((3, 4))\nprint(x.",
    "Die Hauptstadt von Deutschland ist",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--eps", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    ap.add_argument("--layer", default="final", help="'final', 'embed' or a block index")
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help="use the first N prompts")
    ap.add_argument(
        "--positions", type=int, default=0, help="only the last N positions of each prompt (0: all)"
    )
    args = ap.parse_args()
    adapter = sr.load(args.model)
    layer = int(args.layer) if args.layer.lstrip("-").isdigit() else args.layer
    prompts = PROMPTS[: args.prompts]
    start = time.time()
    frames = []
    for i, prompt in enumerate(prompts):
        n = adapter.tokenize(prompt).shape[1]
        positions = list(range(max(0, n - args.positions), n)) if args.positions else "all"
        res = sr.analyze(adapter, prompt, eps=args.eps, layer=layer, positions=positions)
        frames.append(res.to_frame().assign(prompt=i))
    df = pd.concat(frames)
    n_pos = df.groupby(["prompt", "position"]).ngroups
    print(
        f"model {args.model}, layer {layer}: {len(prompts)} prompts, {n_pos} positions, {time.time() - start:.0f} s"
    )
    print("| eps | n | quadratic median | quadratic p90 | pade median | pade p90 |")
    print("|---|---|---|---|---|---|")
    for e, g in df.groupby("eps"):
        q = (g.radius_quadratic / g.radius_exact - 1).abs()
        c = (g.radius_pade / g.radius_exact - 1).abs()
        print(
            f"| {e:g} | {len(g)} | {q.median():.3%} | {q.quantile(0.9):.3%} | {c.median():.4%} | {c.quantile(0.9):.4%} |"
        )


if __name__ == "__main__":
    main()
