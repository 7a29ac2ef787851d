"""A model you loaded yourself stays on its device, in its dtype.

    python examples/your_own_model.py

Loads the bundled model's directory with transformers (any local causal LM with
safetensors weights works the same) and analyses it through sr.wrap.
"""

from transformers import AutoModelForCausalLM, AutoTokenizer

import stable_regions as sr
from stable_regions.models.store import model_dir

path = model_dir("smollm2-135m")  # any local model directory
hf_model = AutoModelForCausalLM.from_pretrained(path)
tokenizer = AutoTokenizer.from_pretrained(path)
model = sr.wrap(hf_model, tokenizer, name="my-smollm2")
result = sr.analyze(model, "Hello, my name is", eps=0.1, layer=15, positions="last")
print(result.to_frame()[["token", "radius_curve", "radius_exact", "reliable", "activation_norm"]])
