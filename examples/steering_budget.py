"""How large can a steering coefficient be before the output drifts?

    python examples/steering_budget.py

Builds a sentiment vector after block 12 from two small prompt sets, then measures the
largest coefficient at eps 0.1 and 0.5 on new prompts, closed form beside measured.
"""

import stable_regions as sr

model = sr.load("smollm2-135m")
positive = ["I love this", "What a great day", "This is wonderful"]
negative = ["I hate this", "What an awful day", "This is terrible"]
vector = sr.mean_difference(model, positive, negative, layer=12)
budget = sr.steering_budget(
    model, ["Tell me about your day.", "The weather is"], vector=vector, layer=12, eps=[0.1, 0.5]
)
print(budget.to_frame()[["prompt_id", "eps", "coef_curve", "coef_exact", "reliable"]])
print(budget.summary()[["eps", "coef_exact_median", "coef_exact_p05"]])
