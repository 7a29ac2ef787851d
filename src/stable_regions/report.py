"""``report.html`` of a validation run: one self-contained page (figures inlined as PNG data).

Scatter plots of predicted vs measured radii on log axes, error CDFs per eps and family, the
median error per entropy bin, the summary table beside the published figures, and the
model and settings used.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
import pandas as pd

from ._support.files import write_text
from ._support.metrics import SUMMARY_COLUMNS, relative_error
from .plotting import new_figure

PUBLISHED = (
    "Published (Golmant 2026, quadratic form): top eigendirection at small eps within 1% of the "
    "measured boundary on Qwen3-1.7B and within 8% across Qwen3-1.7B, Llama-3.2-1B and "
    "Pythia-1B; other directions at large eps, after one isotonic calibration, 54-73% of "
    "measurements within 50%."
)
COLORS = {
    "top": "#d62728",
    "random": "#7f7f7f",
    "eigenspace": "#ff7f0e",
    "token": "#1f77b4",
    "interpolation": "#2ca02c",
    "steering": "#9467bd",
}
STYLES = {"quadratic": ":", "pade": "-", "curve": "-.", "calibrated": "--"}


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _predictors(frame: pd.DataFrame) -> list[str]:
    optional = [
        f
        for f in ("curve", "calibrated")
        if f"radius_{f}" in frame and frame[f"radius_{f}"].notna().any()
    ]
    return ["quadratic", "pade", *optional]


def _scatter(test: pd.DataFrame, eps_values, predictors) -> str:
    fig, axes = new_figure(
        len(predictors), len(eps_values), figsize=(4 * len(eps_values), 3.6 * len(predictors))
    )
    rng = np.random.default_rng(0)
    for c, e in enumerate(eps_values):
        g = test[(test["eps"] == e) & np.isfinite(test["radius_exact"])]
        if len(g) > 4000:  # keep the page light; the parquet has every row
            g = g.iloc[np.sort(rng.choice(len(g), 4000, replace=False))]
        for r, predictor in enumerate(predictors):
            ax = axes[r][c]
            for family, fg in g.groupby("family"):
                ok = np.isfinite(fg[f"radius_{predictor}"])
                ax.scatter(
                    fg.loc[ok, "radius_exact"],
                    fg.loc[ok, f"radius_{predictor}"],
                    s=4,
                    alpha=0.5,
                    color=COLORS.get(family, "k"),
                    label=family,
                )
            lo = np.nanmin(g["radius_exact"]) if len(g) else 1e-3
            hi = np.nanmax(g["radius_exact"]) if len(g) else 1.0
            ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("measured radius")
            ax.set_ylabel(f"{predictor} prediction")
            ax.set_title(f"{predictor}, eps {e:g}")
            if r == 0 and c == 0:
                ax.legend(fontsize=7, markerscale=3)
    return _png(fig)


def _cdfs(test: pd.DataFrame, eps_values, families, predictors) -> str:
    fig, axes = new_figure(
        len(eps_values),
        len(families),
        figsize=(2.8 * len(families), 2.5 * len(eps_values)),
        sharex=True,
        sharey=True,
    )
    for r, e in enumerate(eps_values):
        for c, family in enumerate(families):
            ax = axes[r][c]
            g = test[(test["eps"] == e) & (test["family"] == family)]
            for predictor in predictors:
                err = np.sort(relative_error(g[f"radius_{predictor}"], g["radius_exact"]))
                if len(err):
                    y = np.arange(1, len(err) + 1) / len(err)
                    ax.step(np.clip(err, 1e-7, 1e2), y, STYLES[predictor], label=predictor, lw=1.2)
            for t in (0.01, 0.08, 0.5):
                ax.axvline(t, color="0.8", lw=0.7)
            ax.set_xscale("log")
            ax.set_xlim(1e-7, 1e2)
            ax.set_title(f"{family}, eps {e:g}", fontsize=9)
            if r == len(eps_values) - 1:
                ax.set_xlabel("|pred / measured - 1|")
            if c == 0:
                ax.set_ylabel("fraction")
            if r == 0 and c == 0:
                ax.legend(fontsize=7)
    return _png(fig)


def _by_entropy(test: pd.DataFrame, eps_values, predictors) -> str:
    fig, axes = new_figure(1, len(eps_values), figsize=(4 * len(eps_values), 3.2))
    edges = np.array([0, 0.1, 0.5, 1, 2, 3, 4, 6, 12.5])
    mids = np.sqrt(np.maximum(edges[:-1], 0.03) * edges[1:])
    for c, e in enumerate(eps_values):
        ax = axes[0][c]
        g = test[test["eps"] == e]
        bins = np.digitize(g["entropy"], edges) - 1
        for predictor in predictors:
            err = relative_error(g[f"radius_{predictor}"], g["radius_exact"])
            med = [
                np.median(err[bins == b]) if np.any(bins == b) else np.nan for b in range(len(mids))
            ]
            ax.plot(mids, med, "o" + STYLES[predictor], label=predictor, ms=3)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("entropy of p (nats)")
        ax.set_ylabel("median |pred / measured - 1|")
        ax.set_title(f"eps {e:g}")
        if c == 0:
            ax.legend(fontsize=7)
    return _png(fig)


def _table(summary: list[dict]) -> str:
    cols = SUMMARY_COLUMNS[1:]  # the model is in the header
    head = "".join(f"<th>{c}</th>" for c in cols)
    body = []
    for row in summary:
        cells = []
        for c in cols:
            v = row[c]
            if c in ("median_rel_err", "p90_rel_err"):
                text = f"{100 * v:.3g}%"
            elif c.startswith("within"):
                text = f"{100 * v:.1f}%"
            else:
                text = html.escape(str(v))
            cells.append(f"<td>{text}</td>")
        style = ' class="all"' if row["family"] == "all" else ""
        body.append(f"<tr{style}>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _layer_section(layer: str, test: pd.DataFrame, summary: list[dict], calibration) -> str:
    """Figures and table of one layer's held-out rows."""
    eps_values = sorted(test["eps"].unique())
    families = [f for f in COLORS if f in set(test["family"])]
    predictors = _predictors(test)
    figures = [
        ("Predicted vs measured radius (held-out prompts)", _scatter(test, eps_values, predictors)),
        ("Error CDFs per eps and family", _cdfs(test, eps_values, families, predictors)),
        (
            "Median error by entropy of the next-token distribution",
            _by_entropy(test, eps_values, predictors),
        ),
    ]
    cal_text = "none"
    if calibration is not None:
        bands = ", ".join(f"eps {b.eps:g}: {b.feature}" for b in calibration.bands)
        cal_text = (
            f"isotonic per eps band, fitted on {len(calibration.train_prompts)} prompts "
            f"(features chosen inside the training prompts: {bands})"
        )
    where = (
        "the pre-logit vector"
        if layer == "final"
        else ("the embedding output" if layer == "embed" else f"the output of block {layer}")
    )
    figs_html = "".join(
        f"<h3>{html.escape(t)}</h3><img src='{src}' alt='{html.escape(t)}'>" for t, src in figures
    )
    rows = [r for r in summary if str(r["layer"]) == layer]
    return (
        f"<h2 id='layer-{html.escape(layer)}'>Layer {html.escape(layer)} ({where})</h2>"
        f"<p>{len(test)} held-out rows; calibration: {html.escape(cal_text)}</p>"
        f"{figs_html}<h3>Summary</h3>{_table(rows)}"
    )


def write_report(
    path: Path, frame: pd.DataFrame, summary: list[dict], record: dict, calibrations: dict
) -> Path:
    """The page of a run: its settings, then one section per layer."""
    test = frame[frame["split"] == "test"]
    settings = record.get("settings", {})
    layers = [str(x) for x in settings.get("layers", sorted(test["layer"].unique()))]
    meta = [
        ("model", record.get("model")),
        (
            "prompts",
            f"{record.get('n_prompts')} ({test['prompt_digest'].nunique()} held out for the summary)",
        ),
        ("rows", f"{len(frame)} ({len(test)} held out)"),
        ("eps", ", ".join(f"{e:g}" for e in settings.get("eps", []))),
        ("layers", ", ".join(layers)),
        ("families", ", ".join(settings.get("families", []))),
        ("positions per prompt", settings.get("positions_per_prompt")),
        (
            "measurement",
            "first crossing of KL(p || p_t) along each ray, through the model's head at "
            "'final' and through the rest of the network inside it, relative tolerance "
            f"{settings.get('rtol')}",
        ),
    ]
    meta_html = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in meta
    )
    toc = " &middot; ".join(
        f"<a href='#layer-{html.escape(x)}'>{html.escape(x)}</a>" for x in layers
    )
    sections = "".join(
        _layer_section(x, test[test["layer"] == x], summary, calibrations.get(x))
        for x in layers
        if (test["layer"] == x).any()
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>stable-regions validation: {html.escape(str(record.get("model")))}</title>
<style>
body {{ font-family: sans-serif; max-width: 1300px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; font-size: 13px; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 3px 7px; text-align: right; }}
tr.all td {{ font-weight: bold; background: #f4f4f4; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>Validation: {html.escape(str(record.get("model")))}</h1>
<table>{meta_html}</table>
<p>{html.escape(PUBLISHED)}</p>
<p>Relative error is |predicted / measured - 1|; every figure and table uses held-out prompts only.
quadratic = sqrt(2 eps / v<sup>T</sup>Gv) (published); pade = [2/2] Pad&eacute; of the KL series;
curve = the exact KL root along the cubic Taylor path of the logits (at 'final' the path is
exact, so this is the exact root from p and W alone); calibrated = isotonic map of the form
chosen per layer.</p>
<p>Layers: {toc}</p>
{sections}
</body></html>
"""
    return write_text(path, page)
