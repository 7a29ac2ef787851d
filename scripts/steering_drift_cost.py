"""What ``kl_steer`` costs during generation: ``generate`` with a steering vector, the base
model's pass per step on its own key/value cache, against the same with that pass over the
whole sequence at every step (how it ran before), and against no steering; side by side, in
one process, each timed ``--repeats`` times (the median is printed).

    python scripts/steering_drift_cost.py --model smollm2-135m --tokens 64 --layer 15

The uncached pass is defined here (``WholeSequenceDrift``) as a reference; the library only
has the cached one. The two must give the same ``kl_steer`` (checked).
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import numpy as np
import torch

import stable_regions as sr
from stable_regions.studies import steering_drift
from stable_regions.studies.rollouts import token_kl

PROMPT = "The history of the printing press begins in the fifteenth century, when"


class WholeSequenceDrift(steering_drift.SteeringDrift):
    """The base model's logits from a pass over the whole sequence at every step."""

    def __call__(self, input_ids, scores):
        extra = input_ids.shape[1] - self.mask.shape[1]
        mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], extra)], 1)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        saved = self.spec.delta.clone()
        try:
            self.spec.delta.zero_()
            with torch.no_grad():
                base = self.adapter.forward(
                    input_ids, attention_mask=mask, position_ids=positions, use_cache=False
                ).logits[:, -1]
        finally:
            self.spec.delta.copy_(saved)
        self.forward_tokens += input_ids.shape[1]
        self.steps.append(token_kl(scores.detach(), base))
        return scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    adapter = sr.load(args.model)
    g = torch.Generator().manual_seed(0)
    vector = torch.randn(adapter.d_resid, generator=g)
    vector *= 2.0 / vector.norm()
    steering = {"vector": vector, "layer": args.layer, "coefficient": 1.0}
    options = dict(max_new_tokens=args.tokens, eps=[0.1], mode="fast")

    def run(kind: str):
        if kind == "plain":
            return sr.generate(adapter, PROMPT, **options).to_frame()
        if kind == "cached":
            return sr.generate(adapter, PROMPT, steering=steering, **options).to_frame()
        with mock.patch("stable_regions.studies.generation.SteeringDrift", WholeSequenceDrift):
            return sr.generate(adapter, PROMPT, steering=steering, **options).to_frame()

    seconds: dict[str, list[float]] = {"plain": [], "cached": [], "whole": []}
    frames = {}
    run("plain")  # warm-up
    for _ in range(args.repeats):
        for kind in seconds:
            start = time.perf_counter()
            frames[kind] = run(kind)
            seconds[kind].append(time.perf_counter() - start)
    np.testing.assert_allclose(frames["cached"].kl_steer, frames["whole"].kl_steer, rtol=1e-3)
    median = {k: statistics.median(v) for k, v in seconds.items()}
    prompt = adapter.tokenize(PROMPT).shape[1]
    n = len(frames["cached"])
    print(f"{adapter.name}, layer {args.layer}: prompt {prompt} tokens, {n} generated")
    print(f"base tokens: cached {prompt + n - 1}, whole {n * prompt + n * (n - 1) // 2}")
    for kind, s in median.items():
        print(f"{kind:>6}: {s:.2f} s (median of {args.repeats})")
    print(f"whole / cached: {median['whole'] / median['cached']:.2f}x; ", end="")
    print(f"cached / plain: {median['cached'] / median['plain']:.2f}x")


if __name__ == "__main__":
    main()
