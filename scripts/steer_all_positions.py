"""How the one-position steering budget compares with steering every position (what repeng
and steering-vectors do), measured on the model.

    python scripts/steer_all_positions.py --out docs/steering/all-positions.json

For each prompt: ``steering_budget``'s measured ``coef_exact`` at the last position, and the
coefficient at which adding ``c * vector`` at every position of the same layer moves the
last position's next-token distribution by eps (a scan and bisection over full forward
passes). The vector: the mean difference of the shipped sentiment sets at the layer.
"""

from __future__ import annotations

import argparse
import json
from importlib import resources

import numpy as np
import torch

import stable_regions as sr
from stable_regions._support.files import write_json
from stable_regions.prompts import corpus


def kl_all_positions(adapter, ids, hook, vector, c, logp0):
    with adapter.added(hook, c * vector), torch.no_grad():
        logits = adapter.forward(ids, use_cache=False).logits[0, -1].to(torch.float64)
    logq = torch.log_softmax(logits, -1)
    return float((logp0.exp() * (logp0 - logq)).sum())


def coefficient_all_positions(adapter, ids, hook, vector, eps, start):
    with torch.no_grad():
        logp0 = torch.log_softmax(adapter.forward(ids, use_cache=False).logits[0, -1].double(), -1)
    lo, hi = 0.0, start
    while kl_all_positions(adapter, ids, hook, vector, hi, logp0) < eps:
        lo, hi = hi, hi * 1.5
        if hi > 1e6:
            return float("inf")
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        lo, hi = (
            (mid, hi)
            if kl_all_positions(adapter, ids, hook, vector, mid, logp0) < eps
            else (lo, mid)
        )
    return hi


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    adapter = sr.load(args.model)
    data = resources.files("stable_regions") / "data"
    pos = [t for t in data.joinpath("sentiment_positive.txt").read_text().splitlines() if t.strip()]
    neg = [t for t in data.joinpath("sentiment_negative.txt").read_text().splitlines() if t.strip()]
    vector = sr.mean_difference(adapter, pos, neg, layer=args.layer)
    hook = adapter.hook_for_layer(args.layer)
    eps = [0.1, 1.0]
    prompts = [p.text for p in corpus()][: args.prompts]
    result = sr.steering_budget(adapter, prompts, vector=vector, layer=args.layer, eps=eps)
    frame = result.to_frame()
    rows = []
    for i, prompt in enumerate(prompts):
        ids = adapter.tokenize(prompt)
        for e in eps:
            one = float(frame[(frame.prompt_id == i) & (frame.eps == e)].coef_exact.iloc[0])
            every = coefficient_all_positions(adapter, ids, hook, vector, e, one / 8)
            rows.append({"prompt_id": i, "eps": e, "one_position": one, "all_positions": every})
    ratios = {
        str(e): np.array([r["all_positions"] / r["one_position"] for r in rows if r["eps"] == e])
        for e in eps
    }
    doc = {
        "model": adapter.name,
        "layer": args.layer,
        "vector_norm": float(vector.norm()),
        "rows": rows,
        "all_over_one": {
            e: {"median": float(np.median(v)), "min": float(v.min()), "max": float(v.max())}
            for e, v in ratios.items()
        },
    }
    write_json(args.out, doc)
    print(json.dumps(doc["all_over_one"], indent=1))


if __name__ == "__main__":
    main()
