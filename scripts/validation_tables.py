"""Markdown tables of a validation run's summary.json (used for docs/validation.md).

python scripts/validation_tables.py DIR [DIR ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

FAMILIES = ["all", "top", "random", "eigenspace", "token", "interpolation", "steering"]


def pct(x: float) -> str:
    return f"{100 * x:.3g}%"


def tables(run: Path) -> str:
    rows = json.loads((run / "summary.json").read_text())
    model = rows[0]["model"]
    out = [f"### {model}", ""]
    out.append(
        "| family | eps | n | quadratic median | corrected median | calibrated median | "
        "quadratic p90 | corrected p90 | calibrated p90 | within 1% (q / c / cal) | "
        "within 8% (q / c / cal) | within 50% (q / c / cal) |"
    )
    out.append("|" + "---|" * 12)
    index = {(r["family"], r["eps"], r["predictor"]): r for r in rows}
    for family in FAMILIES:
        for eps in sorted({r["eps"] for r in rows}):
            got = [index.get((family, eps, p)) for p in ("quadratic", "corrected", "calibrated")]
            if got[0] is None:
                continue
            q, c, k = got
            k = k or {key: float("nan") for key in q}

            def trio(key: str, q=q, c=c, k=k) -> str:
                return " / ".join(f"{100 * r[key]:.1f}" for r in (q, c, k))

            out.append(
                f"| {family} | {eps:g} | {q['n']} | {pct(q['median_rel_err'])} | "
                f"{pct(c['median_rel_err'])} | {pct(k['median_rel_err'])} | {pct(q['p90_rel_err'])} | "
                f"{pct(c['p90_rel_err'])} | {pct(k['p90_rel_err'])} | {trio('within_1pct')} | "
                f"{trio('within_8pct')} | {trio('within_50pct')} |"
            )
    return "\n".join(out)


def by_entropy(run: Path) -> str:
    """Median relative error per entropy band of the next-token distribution (held-out rows)."""
    import numpy as np
    import pandas as pd

    from stable_regions.validation import relative_error

    frame = pd.read_parquet(run / "results.parquet")
    test = frame[frame["split"] == "test"]
    edges = [0.0, 0.5, 2.0, 4.0, np.inf]
    names = ["< 0.5", "0.5-2", "2-4", ">= 4"]
    out = [
        "| eps | entropy (nats) | n | quadratic median | corrected median | calibrated median |",
        "|---|---|---|---|---|---|",
    ]
    for eps, g in test.groupby("eps"):
        band = pd.cut(g["entropy"], edges, right=False, labels=names)
        for name in names:
            b = g[band == name]
            if b.empty:
                continue
            med = [
                np.median(relative_error(b[p], b["empirical"]))
                for p in ("quadratic", "corrected", "calibrated")
            ]
            out.append(f"| {eps:g} | {name} | {len(b)} | " + " | ".join(pct(m) for m in med) + " |")
    return "\n".join(out)


def copy_for_docs(run: Path, dest: Path) -> None:
    """summary.json, calibration.json, report.html and the report's figures as PNG files."""
    import base64
    import re
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    for name in ("summary.json", "calibration.json", "report.html"):
        if (run / name).exists():
            shutil.copy(run / name, dest / name)
    page = (run / "report.html").read_text(encoding="utf-8")
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    for name, data in zip(("scatter.png", "cdf.png", "entropy.png"), images, strict=True):
        (dest / name).write_bytes(base64.b64decode(data))


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
