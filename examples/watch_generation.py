"""Which generated tokens sit on a knife's edge?

    python examples/watch_generation.py

Generates with a StabilityMonitor attached (it never changes the scores) and prints the
tokens whose top choice flips before the KL reaches eps.
"""

import stable_regions as sr

model = sr.load("smollm2-135m")
generated = sr.generate(model, "The three primary colours are", max_new_tokens=16, eps=0.1)
print(generated.text)
tokens = generated.to_frame()
print(tokens[["step", "chosen_token", "chosen_prob", "radius_curve", "radius_flip", "fragile"]])
print(generated.summary())
