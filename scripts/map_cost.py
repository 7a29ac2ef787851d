"""The default stability map of a 16-token prompt, timed, with its grids saved for comparing
two trees (``PYTHONPATH=OTHER/src python ...``): one JSON line per run.

    python scripts/map_cost.py smollm2-135m map-new.npz
    python scripts/map_cost.py smollm2-135m map-bare.npz 0    # rank_probes=0: no effective rank
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

import stable_regions as sr
from stable_regions.bench.scale import _tokens


def main(name: str, out: str, rank_probes: int = 16) -> None:
    model = sr.load(name)
    prompt = _tokens(model, 16)
    sr.analyze(model, "warm up", positions="last", exact=False)
    start = time.perf_counter()
    smap = sr.stability_map(model, prompt, eps=0.1, rank_probes=rank_probes)
    seconds = time.perf_counter() - start
    np.savez(
        out,
        lambda_max=smap.lambda_max,
        radius_pade=smap.radius_pade,
        effective_rank=smap.effective_rank,
    )
    cells = int(smap.lambda_max.size)
    row = {"model": name, "seconds": round(seconds, 2), "cells": cells, "rank_probes": rank_probes}
    print(json.dumps(row))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(x) for x in sys.argv[3:4]))
