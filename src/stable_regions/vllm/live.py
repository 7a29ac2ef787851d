"""A live view of a running engine's records, for a server: per engine process, a small JSON
file beside the records (``live-<pid>.json``) with the running counts, rewritten at most
every ``EVERY_S`` seconds as records are written (an atomic replace: a reader never sees half
a file). ``live(directory)`` adds up every process's file.

What it holds, per eps: tokens recorded, how many were fragile (``radius_flip <
radius_curve``), and a histogram of ``radius_curve`` over log-spaced bins (``EDGES``), the
first and last bin open-ended; and the number of requests seen.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np

EVERY_S = 0.5
EDGES = [10.0**k for k in np.arange(-3.0, 3.01, 0.25)]  # radius_curve bins, 1e-3 to 1e3


class LiveCounts:
    """The counts of one directory in one engine process."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / f"live-{os.getpid()}.json"
        self.requests: set[str] = set()
        self.tokens: dict[float, int] = {}
        self.fragile: dict[float, int] = {}
        self.histogram: dict[float, list[int]] = {}
        self.written = 0.0
        self.dirty = False

    def add(self, records: list[dict]) -> None:
        self.dirty = self.dirty or bool(records)
        for row in records:
            e = float(row["eps"])
            self.requests.add(str(row["request"]))
            self.tokens[e] = self.tokens.get(e, 0) + 1
            self.fragile[e] = self.fragile.get(e, 0) + int(bool(row["fragile"]))
            counts = self.histogram.setdefault(e, [0] * (len(EDGES) + 1))
            r = row["radius_curve"]
            if isinstance(r, float) and math.isfinite(r) and r > 0:
                counts[int(np.searchsorted(EDGES, r, side="right"))] += 1

    def write(self, force: bool = False) -> None:
        """The file, where the counts changed and ``EVERY_S`` has passed since the last one
        (or ``force``)."""
        now = time.time()
        if not self.dirty or (not force and now - self.written < EVERY_S):
            return
        doc = {
            "pid": os.getpid(),
            "updated": now,
            "requests": len(self.requests),
            "edges": EDGES,
            "eps": {
                str(e): {
                    "tokens": self.tokens[e],
                    "fragile": self.fragile[e],
                    "radius_curve_counts": self.histogram[e],
                }
                for e in sorted(self.tokens)
            },
        }
        partial = self.path.with_suffix(".json.part")
        partial.write_text(json.dumps(doc))
        os.replace(partial, self.path)
        self.written, self.dirty = now, False


def live(directory: str | Path) -> dict:
    """Every engine process's running counts under ``directory``, added up: ``requests``,
    and per eps ``tokens``, ``fragile``, ``fragile_share`` and ``radius_curve_counts`` over
    ``edges`` (the first count is below ``edges[0]``, the last above ``edges[-1]``).

    Examples
    --------
    >>> sr.vllm.live("/srv/records")["eps"]["0.1"]["fragile_share"]  # doctest: +SKIP
    """
    out: dict = {"requests": 0, "updated": None, "edges": EDGES, "eps": {}}
    for file in sorted(Path(directory).glob("live-*.json")):
        try:
            doc = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        out["requests"] += doc["requests"]
        out["updated"] = max(out["updated"] or 0.0, doc["updated"])
        for e, counts in doc["eps"].items():
            mine = out["eps"].setdefault(
                e, {"tokens": 0, "fragile": 0, "radius_curve_counts": [0] * (len(EDGES) + 1)}
            )
            mine["tokens"] += counts["tokens"]
            mine["fragile"] += counts["fragile"]
            both = zip(mine["radius_curve_counts"], counts["radius_curve_counts"], strict=True)
            mine["radius_curve_counts"] = [a + b for a, b in both]
    for counts in out["eps"].values():
        counts["fragile_share"] = counts["fragile"] / counts["tokens"] if counts["tokens"] else 0.0
    return out
