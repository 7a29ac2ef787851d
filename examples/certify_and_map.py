"""A provably safe ball at the last position, and where in depth a prompt is fragile.

    python examples/certify_and_map.py

Writes certify/ and map/ (json, parquet and png each).
"""

import stable_regions as sr

model = sr.load("smollm2-135m")
prompt = "The capital of France is"
cert = sr.certify(model, prompt, eps=[0.1, 1.0], positions="last")
print(cert.to_frame()[["eps", "radius_certified", "radius_attack", "tightness"]])
cert.save("certify")
smap = sr.stability_map(model, prompt, layers=["embed", 8, 15, 22, "final"])
print(smap.summary()[["layer", "median_radius_pade", "median_radius_relative"]])
smap.save("map")
