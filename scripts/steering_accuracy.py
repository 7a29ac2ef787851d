"""Steering coefficients predicted in closed form against the ones measured on the model.

The vector is the mean difference of the shipped sentiment sets at the layer (the `steering`
family of the validation study); the prompts are the held-out half of the shipped corpus
(the validation study's seeded split), the last position of each. Per eps, the median and
p90 of ``|predicted / measured - 1|`` for each closed form, over all rows and over the rows
``steer`` marks ``reliable``. Also timed: the same call with ``exact=False`` (the closed forms
alone) against the full one (the closed forms and the coefficient measured on the model by
bisection), so the docs can say what the measurement costs beside the prediction.

    python scripts/steering_accuracy.py --model smollm2-135m --layer 15 --prompts 40 \
        --eps 0.1 0.5 --out docs/steering/accuracy-smollm2-135m.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import stable_regions as sr
from stable_regions.prompts import sentiment_prompts
from stable_regions.studies.validation import held_out_corpus

FORMS = ["coef_quadratic", "coef_pade", "coef_curve", "coef_calibrated"]


def buckets(frame) -> list[dict]:
    """The curve's error by how far apart its Pade and Taylor-path forms are and by the
    radius relative to |h|: what a reliability mark for steering rows can rest on."""
    apart = (frame["coef_pade"] / frame["coef_curve"] - 1).abs()
    err = (frame["coef_curve"] / frame["coef_exact"] - 1).abs()
    out = []
    for eps, at in frame.groupby("eps").groups.items():
        for lo, hi in ((0.0, 0.02), (0.02, 0.1), (0.1, np.inf)):
            for r_lo, r_hi in ((0.0, 0.1), (0.1, 0.5), (0.5, np.inf)):
                rel = frame.loc[at, "radius_relative"]
                sel = at[(apart[at] >= lo) & (apart[at] < hi) & (rel >= r_lo) & (rel < r_hi)]
                e = err[sel].dropna()
                if len(e):
                    out.append(
                        {
                            "eps": float(eps),
                            "pade_vs_curve": [lo, hi],
                            "radius_relative": [r_lo, r_hi],
                            "n": int(len(e)),
                            "median": float(np.median(e)),
                            "within_8pct": float(np.mean(e <= 0.08)),
                            "within_25pct": float(np.mean(e <= 0.25)),
                        }
                    )
    return [{k: (str(v) if isinstance(v, list) else v) for k, v in d.items()} for d in out]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layer", type=int, required=True)
    ap.add_argument("--prompts", type=int, default=40, help="held-out prompts used")
    ap.add_argument("--eps", type=float, nargs="+", default=[0.1, 0.5])
    ap.add_argument("--calibration", default=None, help="e.g. bundled")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rows", type=Path, default=None, help="also write every row (parquet)")
    args = ap.parse_args()

    adapter = sr.load(args.model)
    held_out = held_out_corpus(args.prompts)
    positive, negative = sentiment_prompts()
    vector = sr.mean_difference(adapter, positive, negative, layer=args.layer)

    def budget(exact: bool):
        return sr.steering_budget(
            adapter,
            held_out,
            vector=vector,
            layer=args.layer,
            eps=args.eps,
            positions="last",
            exact=exact,
            calibration=args.calibration,
        )

    start = time.perf_counter()
    budget(exact=False)
    seconds_closed_forms = time.perf_counter() - start
    start = time.perf_counter()
    result = budget(exact=True)
    seconds = time.perf_counter() - start
    frame = result.to_frame()
    summary = []
    for eps, rows in frame.groupby("eps"):
        for subset, part in (("all", rows), ("reliable", rows[rows["reliable"]])):
            entry = {"eps": float(eps), "rows": subset, "n": int(len(part))}
            for form in FORMS:
                err = (part[form] / part["coef_exact"] - 1).abs().dropna()
                if len(err):
                    entry[form] = {
                        "median": float(np.median(err)),
                        "p90": float(np.quantile(err, 0.9)),
                    }
            summary.append(entry)
    out_buckets = buckets(frame)
    if args.rows is not None:
        frame.to_parquet(args.rows, index=False)
    out = {
        "model": args.model,
        "layer": args.layer,
        "vector_norm": float(vector.norm()),
        "prompts": len(held_out),
        "positions": "last",
        "seconds": seconds,
        "seconds_closed_forms": seconds_closed_forms,
        "summary": summary,
        "by_agreement": out_buckets,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
