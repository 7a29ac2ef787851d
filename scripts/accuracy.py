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
    args = ap.parse_args()
    adapter = sr.load(args.model)
    start = time.time()
    df = pd.concat(
        [
            sr.analyze(adapter, p, eps=args.eps).to_frame().assign(prompt=i)
            for i, p in enumerate(PROMPTS)
        ]
    )
    print(
        f"model {args.model}: {len(PROMPTS)} prompts, {df.groupby(['prompt', 'position']).ngroups} positions, {time.time() - start:.0f} s"
    )
    print("| eps | n | quadratic median | quadratic p90 | corrected median | corrected p90 |")
    print("|---|---|---|---|---|---|")
    for e, g in df.groupby("eps"):
        q = (g.radius_quadratic / g.radius_exact - 1).abs()
        c = (g.radius_corrected / g.radius_exact - 1).abs()
        print(
            f"| {e:g} | {len(g)} | {q.median():.3%} | {q.quantile(0.9):.3%} | {c.median():.4%} | {c.quantile(0.9):.4%} |"
        )


if __name__ == "__main__":
    main()
