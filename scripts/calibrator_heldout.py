"""Record, in each bundled calibrator, how its maps did against the closed forms on held-out
prompts, direction family by family: what ``Band.map_is_worse`` reads, so that ``analyze``
and ``steering_budget`` use a closed form as is wherever the map was worse.

The numbers come from the published validation summaries (``docs/validation/*/summary*.json``,
the held-out rows of the run that fitted each calibrator; the maps are checked to be the same
as that run's calibration file). At ``final`` the summaries have no ``curve`` row: the exact
curve there is the measured boundary itself (error 0 by construction), which is recorded as
such. Run from the repository root:

    python scripts/calibrator_heldout.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from stable_regions._support.files import write_json

BUNDLED = Path("src/stable_regions/calibrators")
RUNS = Path("docs/validation")
# calibrator -> (the run's summary, the run's calibration file)
SOURCES = {
    **{
        f"smollm2-135m-{k}": ("smollm2-135m-layers/summary.json", f"calibration-{k}.json")
        for k in (6, 12, 18, 24)
    },
    "smollm2-135m-embed": ("smollm2-135m-layers/summary-embed.json", "calibration-embed.json"),
    "smollm2-135m-15": ("smollm2-135m-inner/summary.json", "calibration-15.json"),
    "smollm2-135m-final": ("smollm2-135m/summary.json", "calibration.json"),
    **{
        f"gemma3-270m-{k}": ("gemma3-270m-layers/summary.json", f"calibration-{k}.json")
        for k in (4, 7, 11, 14)
    },
    "gemma3-270m-embed": ("gemma3-270m-layers/summary-embed.json", "calibration-embed.json"),
    "gemma3-270m-final": ("gemma3-270m/summary.json", "calibration.json"),
}
FAMILIES = ("all", "top", "steering")


def comparison(summary: pd.DataFrame, layer: str, eps: float) -> dict:
    """{family: {predictor: median relative error}} on the run's held-out rows."""
    rows = summary[(summary["layer"].astype(str) == layer) & (summary["eps"] == eps)]
    out = {}
    for family in FAMILIES:
        at = rows[rows["family"] == family]
        if at.empty:
            continue
        table = {r.predictor: round(float(r.median_rel_err), 6) for r in at.itertuples()}
        if layer == "final":
            table.setdefault("curve", 0.0)  # the exact curve is the measured boundary here
        out[family] = table
    return out


def main() -> None:
    for name, (summary_file, calibration_file) in SOURCES.items():
        path = BUNDLED / f"{name}.json"
        doc = json.loads(path.read_text())
        run_dir = RUNS / Path(summary_file).parent
        fitted = json.loads((run_dir / calibration_file).read_text())
        if [b["maps"] for b in fitted["bands"]] != [b["maps"] for b in doc["bands"]]:
            raise SystemExit(f"{name}: the maps differ from {run_dir / calibration_file}")
        summary = pd.DataFrame(json.loads((RUNS / summary_file).read_text()))
        for band in doc["bands"]:
            band["heldout"]["median_rel_err"] = comparison(summary, doc["layer"], band["eps"])
            worse = [
                f"{family}: {form}"
                for family, table in band["heldout"]["median_rel_err"].items()
                for form in ("curve", "pade")
                if form in table and table["calibrated"] > table[form]
            ]
            print(f"{name} eps {band['eps']:g}: map worse than {', '.join(worse) or 'nothing'}")
        write_json(path, doc)


if __name__ == "__main__":
    main()
