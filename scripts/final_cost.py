"""Final-layer ``analyze`` of every position of a prompt against a forward pass of the same
tokens (all logits), with and without the measured boundary: one JSON line per run. Run it
from two trees side by side to compare them (``PYTHONPATH=OTHER/src python ...``):

    python scripts/final_cost.py smollm2-135m 64
    python scripts/final_cost.py llama3-1b-quick 64     # the bench's random 1B shape, 2 blocks
"""

import json
import sys
import time

import torch

import stable_regions as sr
from stable_regions.bench.scale import ScaleShape, _tokens, build_model

name, n = sys.argv[1], int(sys.argv[2])
if name.startswith("llama3-1b"):
    quick = name.endswith("quick")
    m = build_model(ScaleShape.make(quick), sr.load("smollm2-135m").tokenizer)
else:
    m = sr.load(name)
prompt = _tokens(m, n)
ids = m.tokenize(prompt)


def fwd():
    with torch.no_grad():
        m.forward(ids, use_cache=False)


fwd()
sr.analyze(m, prompt, eps=[0.1], positions="last", exact=False)
t = time.perf_counter()
fwd()
fwd()
f = (time.perf_counter() - t) / 2
out = {"model": name, "tokens": int(ids.shape[1]), "forward_s": round(f, 3), "src": sr.__file__}
for exact in (True, False):
    t = time.perf_counter()
    sr.analyze(m, prompt, eps=[0.1, 1.0], positions="all", exact=exact)
    s = time.perf_counter() - t
    out["exact" if exact else "no_exact"] = round(s, 2)
    out["ratio_" + ("exact" if exact else "no_exact")] = round(s / f, 1)
print(json.dumps(out), flush=True)
