"""A self-contained HTML page of per-token stability: ``generate``, ``scan`` and ``analyze``
write it with ``--html``.

The page inlines its script, its styles and its data (one JSON document in a
``<script type="application/json">``): it opens offline, from a file, with no network. Tokens
are coloured by a radius on a log scale (red: fragile) with a legend; whitespace is shown
(a space as a middle dot, a newline as a return sign); hovering a token, or clicking it to pin
it, shows its numbers and its top alternative tokens; an SVG plot shows the radius along the
text. Selectors switch eps and the radius column.
"""

from __future__ import annotations

import html
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import pandas as pd

from .._support.files import check_output_file
from .._support.inputs import json_value
from ..errors import StableRegionsError


def check_html_path(path: str | os.PathLike) -> Path:
    """The page's path, refused before any work where it does not end in ``.html``, is a
    directory, or cannot be written."""
    return check_output_file(path, ".html", "--html")


@dataclass
class ViewerSpec:
    """How a frame becomes a page: one row per token and eps, grouped into texts.

    ``group``: the column naming each text (a sequence, a document), ``order``: the token
    order within it; ``text``: the token's string; ``radius_columns``: the radii to colour by
    (the first is the default); ``fields``: (column, label) shown in the tooltip;
    ``alternatives``: (tokens column, probabilities column) of list values, or None.
    """

    group: str
    order: str
    text: str = "token"
    radius_columns: Sequence[str] = ("radius_curve",)
    fields: Sequence[tuple[str, str]] = ()
    alternatives: tuple[str, str] | None = None
    alternatives_label: str = "top alternatives"
    group_names: dict = field(default_factory=dict)
    prefixes: dict = field(default_factory=dict)


def page_data(frame: pd.DataFrame, spec: ViewerSpec) -> dict:
    """The JSON document the page reads (also what tests compare the page against)."""
    missing = [
        c
        for c in [spec.group, spec.order, spec.text, "eps", *spec.radius_columns]
        if c not in frame.columns
    ]
    if missing:
        raise StableRegionsError(f"the frame has no column(s) {missing} for the viewer")
    eps = sorted(frame["eps"].unique().tolist())
    groups = []
    for name, rows in frame.groupby(spec.group, sort=True):
        tokens = []
        for _, tok in rows.groupby(spec.order, sort=True):
            by_eps = tok.set_index("eps")
            first = tok.iloc[0]
            entry = {
                "text": str(first[spec.text]),
                "radius": {
                    c: [json_value(by_eps[c].get(e, float("nan"))) for e in eps]
                    for c in spec.radius_columns
                },
                "values": {label: json_value(first[col]) for col, label in spec.fields},
            }
            if spec.alternatives is not None:
                names, probs = (first[c] for c in spec.alternatives)
                entry["alternatives"] = [
                    [str(a), json_value(b)] for a, b in zip(names, probs, strict=True)
                ]
            tokens.append(entry)
        key = name.item() if hasattr(name, "item") else name
        groups.append(
            {
                "name": str(spec.group_names.get(key, key)),
                "prefix": spec.prefixes.get(key, ""),
                "tokens": tokens,
            }
        )
    return {
        "eps": [float(e) for e in eps],
        "radius_columns": list(spec.radius_columns),
        "alternatives_label": spec.alternatives_label,
        "groups": groups,
    }


def page(data: dict, title: str, subtitle: str = "", note: str = "") -> str:
    """The HTML text: the data inlined (``</`` escaped so no string ends the script)."""
    assets = resources.files(__package__)
    script = assets.joinpath("viewer.js").read_text(encoding="utf-8")
    style = assets.joinpath("viewer.css").read_text(encoding="utf-8")
    payload = json.dumps(data, ensure_ascii=False, allow_nan=False).replace("</", "<\\/")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>{style}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="sub">{html.escape(subtitle)}</p>
<div class="controls">
<label>eps <select id="eps"></select></label>
<label>radius <select id="radius"></select></label>
</div>
<div class="legend"><span id="legend-label"></span>
<div><div class="bar" id="legend-bar"></div><div class="ticks" id="legend-ticks"></div></div></div>
<div id="groups"></div>
<svg class="plot" id="plot" role="img" aria-label="radius along the text"></svg>
<p class="note">{html.escape(note)}</p>
<div id="tip"></div>
<script type="application/json" id="sr-data">{payload}</script>
<script>{script}</script>
</body></html>
"""


def write_viewer(
    path: str | os.PathLike,
    frame: pd.DataFrame,
    spec: ViewerSpec,
    title: str,
    subtitle: str = "",
    note: str = "",
) -> Path:
    """Write the page to ``path`` whole or not at all (a temporary file, then a rename)."""
    out = check_html_path(path)
    text = page(page_data(frame, spec), title, subtitle, note)
    fd, tmp = tempfile.mkstemp(dir=out.parent if str(out.parent) else ".", suffix=".html.tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as an ordinary new file, not mkstemp's 0600
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
