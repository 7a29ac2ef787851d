"""How far can each position's pre-logit vector move before the next token changes?

    python examples/analyze_a_prompt.py

Prints the closed-form radius beside the measured one at the last positions, the summary,
and writes analysis/analyze.{json,parquet,png}.
"""

import stable_regions as sr

model = sr.load("smollm2-135m")
result = sr.analyze(
    model, "The capital of France is Paris, and the capital of Italy is", eps=[0.01, 0.1, 1.0]
)
frame = result.to_frame()
print(
    frame[["position", "token", "eps", "radius_curve", "radius_exact", "radius_quadratic"]].tail(6)
)
print(result.summary()[["eps", "median_radius_curve", "radius_quadratic_median_rel_err"]])
print("wrote", result.save("analysis"))
