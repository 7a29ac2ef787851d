"""What the usual way of choosing a steering coefficient costs: bisection over rollouts.

For each of the first N held-out corpus prompts (the validation study's seeded split), the
coefficient ``c`` of the mean-difference sentiment vector at which the greedy continuation of
``--tokens`` tokens, with ``c * vector`` added at every position of the layer (as repeng and
steering-vectors steer), first differs from the unsteered one; found by bisection on ``c``
over ``--steps`` steps, one generation per step. The criterion stands in for a person or a
classifier reading the text: this measures the search's cost (generations, seconds), not
which coefficient a reader would pick, so compare its seconds per prompt with
``scripts/steering_accuracy.py``'s.

    python scripts/rollout_bisection.py --model smollm2-135m --layer 15 --prompts 10 \
        --out docs/steering/rollout-bisection-smollm2-135m.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import stable_regions as sr
from stable_regions.prompts import sentiment_prompts
from stable_regions.studies.validation import held_out_corpus


def continuation(adapter, ids: torch.Tensor, tokens: int) -> list[int]:
    with torch.no_grad():
        out = adapter.model.generate(
            ids, max_new_tokens=tokens, do_sample=False, pad_token_id=adapter.tokenizer.eos_token_id
        )
    return out[0, ids.shape[1] :].tolist()


def bisect_rollouts(
    adapter, ids: torch.Tensor, hook: str, vector: torch.Tensor, tokens: int, steps: int
) -> tuple[float, float, int]:
    """``(lo, hi, generations)``: the greedy continuation is unchanged at ``lo * vector`` and
    changed at ``hi * vector`` (``hi`` doubles from 1 until it changes; past 1024, ``inf``)."""
    plain = continuation(adapter, ids, tokens)
    generations = 1

    def changed(c: float) -> bool:
        nonlocal generations
        generations += 1
        with adapter.added(hook, c * vector):
            return continuation(adapter, ids, tokens) != plain

    lo, hi = 0.0, 1.0
    while not changed(hi):
        if hi > 1e3:
            return lo, float("inf"), generations
        lo, hi = hi, 2 * hi
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if changed(mid) else (mid, hi)
    return lo, hi, generations


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layer", type=int, required=True)
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=16, help="tokens generated per rollout")
    ap.add_argument("--steps", type=int, default=10, help="bisection steps per prompt")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    adapter = sr.load(args.model)
    held_out = held_out_corpus(args.prompts)
    positive, negative = sentiment_prompts()
    vector = sr.mean_difference(adapter, positive, negative, layer=args.layer).to(torch.float32)
    hook = adapter.hook_for_layer(args.layer)
    rows = []
    start = time.perf_counter()
    for text in held_out:
        t0 = time.perf_counter()
        ids = adapter.tokenize(text)
        _, hi, generations = bisect_rollouts(adapter, ids, hook, vector, args.tokens, args.steps)
        rows.append(
            {
                "coefficient": hi if hi != float("inf") else None,  # never changed: JSON null
                "generations": generations,
                "seconds": time.perf_counter() - t0,
            }
        )
    seconds = time.perf_counter() - start
    out = {
        "model": args.model,
        "layer": args.layer,
        "vector_norm": float(vector.norm()),
        "prompts": len(held_out),
        "tokens_per_rollout": args.tokens,
        "bisection_steps": args.steps,
        "seconds": seconds,
        "seconds_per_prompt": seconds / max(1, len(held_out)),
        "generations_per_prompt": sum(r["generations"] for r in rows) / max(1, len(rows)),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    main()
