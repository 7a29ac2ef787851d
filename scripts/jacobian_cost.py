"""``jacobian_profile`` against a forward pass of the same tokens, per layer shown, on prompts
of 1, 13 and 64 tokens (issue 35's target: at most 10 forward passes per layer, with no
growth on short prompts). Run from the repository root:

    python scripts/jacobian_cost.py smollm2-135m gemma3-270m
"""

from __future__ import annotations

import sys
import time

import torch

import stable_regions as sr
from stable_regions.bench.scale import _tokens


def main(names: list[str]) -> None:
    for name in names:
        model = sr.load(name)
        for n in (1, 13, 64):
            prompt = "hello" if n == 1 else _tokens(model, n)
            ids = model.tokenize(prompt)

            def forward(ids=ids, model=model):
                with torch.no_grad():
                    model.forward(ids, use_cache=False)

            forward()
            start = time.perf_counter()
            for _ in range(3):
                forward()
            forward_s = (time.perf_counter() - start) / 3
            start = time.perf_counter()
            profile = sr.jacobian_profile(model, prompt, k=3)
            seconds = time.perf_counter() - start
            layers = len(profile.rows)
            print(
                f"{name}: {ids.shape[1]} tokens, forward {forward_s:.3f} s, jacobian "
                f"{seconds:.1f} s over {layers} layers: {seconds / (forward_s * layers):.1f} "
                "forward passes per layer",
                flush=True,
            )


if __name__ == "__main__":
    main(sys.argv[1:] or ["smollm2-135m"])
