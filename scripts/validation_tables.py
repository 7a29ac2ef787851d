"""Markdown tables of a validation run's summary.json (used for docs/validation.md): per layer,
per family and eps, every predictor side by side; then the median error per entropy band.

python scripts/validation_tables.py DIR [DIR ...] [--docs DEST]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

FAMILIES = ["all", "top", "random", "eigenspace", "token", "interpolation", "steering"]
PREDICTORS = ["quadratic", "pade", "curve", "calibrated"]
SHORT = {"quadratic": "q", "pade": "p", "curve": "c", "calibrated": "cal"}


def pct(x: float) -> str:
    return f"{100 * x:.3g}%"


def tables(run: Path) -> str:
    rows = json.loads((run / "summary.json").read_text())
    model = rows[0]["model"]
    out = []
    for layer in dict.fromkeys(str(r["layer"]) for r in rows):
        at = [r for r in rows if str(r["layer"]) == layer]
        preds = [p for p in PREDICTORS if any(r["predictor"] == p for r in at)]
        names = " / ".join(SHORT[p] for p in preds)
        out += [f"### {model}, layer {layer}", ""]
        out.append(
            "| family | eps | n | "
            + " | ".join(f"{p} median" for p in preds)
            + " | "
            + " | ".join(f"{p} p90" for p in preds)
            + f" | within 1% ({names}) | within 8% ({names}) | within 50% ({names}) |"
        )
        out.append("|" + "---|" * (3 + 2 * len(preds) + 3))
        index = {(r["family"], r["eps"], r["predictor"]): r for r in at}
        for family in FAMILIES:
            for eps in sorted({r["eps"] for r in at}):
                got = [index.get((family, eps, p)) for p in preds]
                if got[0] is None:
                    continue

                def trio(key: str, got=got) -> str:
                    return " / ".join(f"{100 * r[key]:.1f}" for r in got)

                out.append(
                    f"| {family} | {eps:g} | {got[0]['n']} | "
                    + " | ".join(pct(r["median_rel_err"]) for r in got)
                    + " | "
                    + " | ".join(pct(r["p90_rel_err"]) for r in got)
                    + f" | {trio('within_1pct')} | {trio('within_8pct')} | {trio('within_50pct')} |"
                )
        out.append("")
    return "\n".join(out)


def by_entropy(run: Path) -> str:
    """Median relative error per entropy band of the next-token distribution (held-out rows)."""
    import numpy as np
    import pandas as pd

    from stable_regions.studies.validation import relative_error
    from stable_regions.vocabulary import upgrade

    frame = upgrade(pd.read_parquet(run / "results.parquet"), "validate", str(run))
    test = frame[frame["split"] == "test"]
    preds = [p for p in PREDICTORS if f"radius_{p}" in test and test[f"radius_{p}"].notna().any()]
    edges = [0.0, 0.5, 2.0, 4.0, np.inf]
    names = ["< 0.5", "0.5-2", "2-4", ">= 4"]
    out = [
        "| layer | eps | entropy (nats) | n | " + " | ".join(f"{p} median" for p in preds) + " |",
        "|" + "---|" * (4 + len(preds)),
    ]
    for (layer, eps), g in test.groupby(["layer", "eps"], sort=False):
        band = pd.cut(g["entropy"], edges, right=False, labels=names)
        for name in names:
            b = g[band == name]
            if b.empty:
                continue
            med = [np.median(relative_error(b[f"radius_{p}"], b["radius_exact"])) for p in preds]
            out.append(
                f"| {layer} | {eps:g} | {name} | {len(b)} | "
                + " | ".join(pct(m) for m in med)
                + " |"
            )
    return "\n".join(out)


def copy_for_docs(run: Path, dest: Path) -> None:
    """summary.json, the calibrations, report.html and the report's figures as PNG files."""
    import base64
    import re
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    for path in [run / "summary.json", run / "report.html", *run.glob("calibration-*.json")]:
        if path.exists():
            shutil.copy(path, dest / path.name)
    page = (run / "report.html").read_text(encoding="utf-8")
    sections = re.split(r"<h2 id='layer-", page)[1:]
    for section in sections:
        layer = section.split("'", 1)[0]
        images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", section)
        for name, data in zip(("scatter", "cdf", "entropy"), images, strict=True):
            (dest / f"{name}-{layer}.png").write_bytes(base64.b64decode(data))


if __name__ == "__main__":
    args = sys.argv[1:]
    docs = None
    if "--docs" in args:
        i = args.index("--docs")
        docs = Path(args[i + 1])
        del args[i : i + 2]
    for arg in args:
        print(tables(Path(arg)))
        print()
        print(by_entropy(Path(arg)))
        print()
        if docs is not None:
            copy_for_docs(Path(arg), docs / Path(arg).name)
