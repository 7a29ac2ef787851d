"""The table in docs/concepts/reading.md: median activation norm, radius and radius / |h| at
three layers of SmolLM2, top curvature direction, one prompt, no measurement.

    python scripts/reading_radius.py
"""

from __future__ import annotations

import stable_regions as sr

PROMPT = "The capital of France is Paris, and the capital of Italy is"


def main() -> None:
    model = sr.load("smollm2-135m")
    print("| layer | eps | activation_norm | radius_curve | radius_relative | reliable |")
    print("|---|---|---|---|---|---|")
    for layer in ("embed", 15, "final"):
        frame = sr.analyze(model, PROMPT, eps=[0.01, 0.1, 1.0], layer=layer, exact=False)
        frame = frame.to_frame()
        for eps, g in frame.groupby("eps"):
            print(
                f"| {layer} | {eps:g} | {g.activation_norm.median():.3g} | "
                f"{g.radius_curve.median():.3g} | {g.radius_relative.median():.3g} | "
                f"{g.reliable.mean():.0%} |"
            )


if __name__ == "__main__":
    main()
