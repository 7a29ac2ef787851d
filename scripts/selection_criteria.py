"""How the calibration's feature selection criterion changes held-out accuracy, offline.

For each finished validation run given (its ``results.parquet``), each inner layer is
refitted on the run's own training prompts with the feature chosen by each quantile of
``|log error|`` (``fit_calibration(selection_quantile=q)``; the median is what `validate`
uses), and judged on the held-out prompts: the share within 1% / 8% / 50% at eps 0.01 / 0.1
/ 1 over all rays and for the worst family, and the median and 90th percentile of the
relative error. Prints one row per run, layer, eps and quantile, then the means over layers.

    python scripts/selection_criteria.py RUN_DIR [RUN_DIR ...] [--quantiles 0.5 0.9]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

import stable_regions as sr
from stable_regions._support.metrics import relative_error
from stable_regions.studies.validation.fitting import apply_calibration, fit_calibration
from stable_regions.vocabulary import upgrade

TARGET = {0.01: 0.01, 0.1: 0.08, 1.0: 0.5}  # issue 16's thresholds per eps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--quantiles", nargs="+", type=float, default=[0.5, 0.9])
    args = ap.parse_args()
    rows = []
    for run in args.runs:
        frame = upgrade(pd.read_parquet(run / "results.parquet"), "validate", str(run))
        manifest = json.loads((run / "manifest.json").read_text())
        adapter = sr.load(manifest.get("record", manifest)["model"])
        for layer in sorted(set(frame["layer"]) - {"final"}):
            at_layer = frame[frame["layer"] == layer]
            train = set(at_layer.loc[at_layer["split"] == "train", "prompt_digest"])
            for q in args.quantiles:
                cal = fit_calibration(frame, adapter, layer, train, selection_quantile=q)
                out = apply_calibration(at_layer, cal)
                out = out[~out["prompt_digest"].isin(train)]
                for eps, threshold in TARGET.items():
                    band = out[np.isclose(out["eps"], eps)]
                    err = relative_error(
                        band["radius_calibrated"].to_numpy(), band["radius_exact"].to_numpy()
                    )
                    within = pd.Series(err <= threshold, index=band.index)
                    rows.append(
                        dict(
                            run=run.name,
                            layer=layer,
                            eps=eps,
                            quantile=q,
                            within=float(within.mean()),
                            worst_family=float(within.groupby(band["family"]).mean().min()),
                            median=float(np.median(err)),
                            p90=float(np.quantile(err, 0.9)),
                        )
                    )
    table = pd.DataFrame(rows)
    pd.set_option("display.width", 200)
    print(table.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    print(table.groupby(["eps", "quantile"])[["within", "worst_family", "median", "p90"]].mean())


if __name__ == "__main__":
    main()
