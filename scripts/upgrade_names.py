"""Rewrite the artefacts published under docs/ in today's column names (``vocabulary``).

The numbers are unchanged: an earlier version wrote them under older names (``corrected``
for the Pade form, ``taylor`` for the curve, ``empirical`` for the measured radius, ``norm``
for the activation's norm). Run from the repository root:

    python scripts/upgrade_names.py docs
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from stable_regions._support.files import write_json
from stable_regions.vocabulary import RENAMED, upgrade_name


def _form(name: str) -> str:
    base = name.removesuffix("_by_entropy").removesuffix(" (as is)")
    return name.replace(base, upgrade_name(base, "forms"))


def upgrade_document(obj):
    """The JSON document ``obj`` in today's names, or ``None`` where nothing changed."""
    if isinstance(obj, dict) and obj.get("format") == "stable-regions-calibration":
        for band in obj["bands"]:
            band["feature"] = _form(band["feature"])
            scores = band.get("heldout", {}).get("selection_median_abs_log_error")
            if scores:
                band["heldout"]["selection_median_abs_log_error"] = {
                    _form(k): v for k, v in scores.items()
                }
        return obj
    if isinstance(obj, list) and obj and isinstance(obj[0], dict) and "predictor" in obj[0]:
        return [{**row, "predictor": _form(row["predictor"])} for row in obj]
    if isinstance(obj, dict) and {"layers", "positions", "radius"} <= set(obj):  # a map
        renames = {"radius": "radius_pade", **RENAMED["map"]}
        return {renames.get(k, k): v for k, v in obj.items() if k != "radius_kind"}
    return None


def main(root: str) -> None:
    for path in sorted(Path(root).rglob("*.json")):
        before = path.read_text(encoding="utf-8")
        upgraded = upgrade_document(json.loads(before))
        if (
            upgraded is not None
            and json.dumps(upgraded, ensure_ascii=False, indent=1) + "\n" != before
        ):
            write_json(path, upgraded)
            print(f"upgraded {path}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs")
