"""Calibration and summaries of a validation run: fitted per layer on training prompts only.

The split is by prompt, never by row: a seeded half of the prompts trains, the other half
judges. Inside the training half the calibration's feature is chosen (fit on one half of it,
scored on the other), so the held-out prompts judge the final calibrator and nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..._support.metrics import THRESHOLDS, relative_error
from ...calibration import (
    FEATURES,
    Band,
    Calibration,
    IsotonicRadius,
    band_edges,
    model_fingerprint,
)
from ...models import ModelAdapter
from .study import FAMILIES, PREDICTORS, seed_of

RAW_FEATURES = ("quadratic", "pade", "curve")  # closed forms a band may use unmapped


def split_prompts(digests: Sequence[str], train_fraction: float, seed: int) -> set[str]:
    """The digests of the training prompts: a seeded random subset (split by prompt, never by row)."""
    unique = sorted(set(digests))
    rng = np.random.default_rng(seed_of("split", seed))
    n_train = int(round(train_fraction * len(unique)))
    return {unique[i] for i in rng.permutation(len(unique))[:n_train]}


def held_out_corpus(
    count: int | None = None, train_fraction: float = 0.5, seed: int = 0
) -> list[str]:
    """The texts of the shipped corpus that a ``validate`` run with these settings (the
    defaults: half, seed 0) holds out, in corpus order; the first ``count`` of them."""
    from ...prompts import corpus

    prompts = corpus()
    train = split_prompts([p.digest for p in prompts], train_fraction, seed)
    return [p.text for p in prompts if p.digest not in train][:count]


def _score(predicted: np.ndarray, empirical: np.ndarray, quantile: float = 0.5) -> float:
    """A quantile (the median by default) of |log(predicted / empirical)| over finite pairs:
    the feature-selection criterion."""
    ok = np.isfinite(predicted) & np.isfinite(empirical) & (predicted > 0) & (empirical > 0)
    if not ok.any():
        return np.inf
    return float(np.quantile(np.abs(np.log(predicted[ok] / empirical[ok])), quantile))


def _calibration_columns(rows: pd.DataFrame) -> tuple[np.ndarray, ...]:
    return tuple(
        rows[c].to_numpy()
        for c in ("radius_quadratic", "radius_pade", "entropy", "radius_exact", "radius_curve")
    )


def _predict(band: Band, rows: pd.DataFrame) -> np.ndarray:
    return band.predict(
        rows["radius_quadratic"], rows["radius_pade"], rows["entropy"], rows["radius_curve"]
    )


def fit_calibration(
    frame: pd.DataFrame,
    adapter: ModelAdapter,
    layer: str,
    train: set[str],
    selection_quantile: float = 0.5,
) -> Calibration:
    """One isotonic map per eps, on the training prompts; the feature that wins on the others
    (by the ``selection_quantile`` of ``|log error|``: the median; a tail quantile was tried
    and lost at eps 0.1 and 1, docs/validation.md)."""
    rows = frame[frame["layer"] == layer]
    eps_values = sorted(rows["eps"].unique())
    is_train = rows["prompt_digest"].isin(train)
    # The feature is chosen inside the training prompts (fit on one half, score on the other),
    # so the held-out prompts judge the final calibrator and nothing else.
    inner = split_prompts(sorted(train), 0.5, seed=len(train))
    is_inner = rows["prompt_digest"].isin(inner)
    bands = []
    for e, (lo, hi) in zip(eps_values, band_edges(eps_values), strict=True):
        at = rows["eps"] == e
        scores = {}
        a, b = rows[at & is_train & is_inner], rows[at & is_train & ~is_inner]
        for feature in FEATURES:
            if a.empty or b.empty:  # too few training prompts to choose: the Pade form
                scores[feature] = 0.0 if feature == "pade" else np.inf
                continue
            band = Band.fit(e, lo, hi, feature, *_calibration_columns(a))
            scores[feature] = _score(
                _predict(band, b), b["radius_exact"].to_numpy(), selection_quantile
            )
        # A closed form as it is competes too: a map fitted on half the training prompts can
        # be worse on the other half than no map (inside the network at eps 1 it was)
        raw = {f"{f} (as is)": f for f in RAW_FEATURES if f"radius_{f}" in rows and not b.empty}
        for name, form in raw.items():
            scores[name] = _score(
                b[f"radius_{form}"].to_numpy(), b["radius_exact"].to_numpy(), selection_quantile
            )
        choice = min(scores, key=lambda f: scores[f])
        fit_rows, test_rows = rows[at & is_train], rows[at & ~is_train]
        if choice in raw:
            band = Band(e, lo, hi, raw[choice], [IsotonicRadius.identity()])
        else:
            band = Band.fit(e, lo, hi, choice, *_calibration_columns(fit_rows))
        predicted = _predict(band, test_rows)
        err = relative_error(predicted, test_rows["radius_exact"])
        band.heldout = {
            "n": int(len(test_rows)),
            "as_is": choice in raw,  # the closed form itself won the selection
            "selection_median_abs_log_error": {
                f: (float(v) if np.isfinite(v) else None) for f, v in scores.items()
            },
            **{k: float(np.mean(err <= t)) if len(err) else None for k, t in THRESHOLDS.items()},
            "median_rel_err": heldout_comparison(test_rows, err),
        }
        bands.append(band)
    return Calibration(adapter.name, model_fingerprint(adapter), layer, bands, sorted(train), None)


def heldout_comparison(test_rows: pd.DataFrame, calibrated_err: np.ndarray) -> dict:
    """{family: {predictor: median relative error}} on the held-out rows: the map's
    (``calibrated``) against each closed form as is, for every direction family and ``all``
    (what ``Band.map_is_worse`` reads)."""
    measured = test_rows["radius_exact"].to_numpy()
    errors = {"calibrated": np.asarray(calibrated_err, dtype=float)}
    for form in RAW_FEATURES:
        if f"radius_{form}" in test_rows:
            errors[form] = relative_error(test_rows[f"radius_{form}"].to_numpy(), measured)
    families = ["all"]
    if "family" in test_rows:
        families += sorted(test_rows["family"].unique())
    out = {}
    for family in families:
        at = np.ones(len(test_rows), bool) if family == "all" else (test_rows["family"] == family)
        at = np.asarray(at)
        table = {}
        for name, err in errors.items():
            finite = err[at][np.isfinite(err[at])]
            if finite.size:
                table[name] = round(float(np.median(finite)), 6)
        if table:
            out[family] = table
    return out


def apply_calibration(frame: pd.DataFrame, cal: Calibration) -> pd.DataFrame:
    """Fill ``radius_calibrated``; rows of prompts the calibration was fitted on become ``split=train``."""
    frame = frame.copy()
    rows = frame["layer"] == cal.layer
    for e in frame.loc[rows, "eps"].unique():
        at = rows & (frame["eps"] == e)
        frame.loc[at, "radius_calibrated"] = cal.predict(
            float(e),
            frame.loc[at, "radius_quadratic"].to_numpy(),
            frame.loc[at, "radius_pade"].to_numpy(),
            frame.loc[at, "entropy"].to_numpy(),
            frame.loc[at, "radius_curve"].to_numpy(),
        )
    # never smaller at a larger eps along one ray (``Calibration.predict_grid``)
    ray = ["prompt_id", "layer", "position", "family", "direction_index", "sign"]
    ordered = frame.loc[rows].sort_values("eps", kind="stable")
    frame.loc[ordered.index, "radius_calibrated"] = ordered.groupby(ray, sort=False)[
        "radius_calibrated"
    ].cummax()
    trained = set(cal.train_prompts)
    frame.loc[rows, "split"] = np.where(
        frame.loc[rows, "prompt_digest"].isin(trained), "train", "test"
    )
    return frame


def summarize(frame: pd.DataFrame, model: str) -> list[dict]:
    """Summary rows per (layer, family, eps, predictor) over held-out rows (``split == test``)."""
    test = frame[frame["split"] == "test"]
    out = []
    for (layer, e), group in test.groupby(["layer", "eps"], sort=True):
        families = ["all"] + [f for f in FAMILIES if f in set(group["family"])]
        for family in families:
            g = group if family == "all" else group[group["family"] == family]
            for predictor in PREDICTORS:
                pred = g[f"radius_{predictor}"].to_numpy()
                if predictor == "calibrated" and np.isnan(pred).all():
                    continue
                err = relative_error(pred, g["radius_exact"].to_numpy())
                out.append(
                    dict(
                        model=model,
                        layer=layer,
                        family=family,
                        eps=float(e),
                        predictor=predictor,
                        n=int(len(err)),
                        median_rel_err=float(np.median(err)),
                        p90_rel_err=float(np.quantile(err, 0.9)),
                        **{k: float(np.mean(err <= t)) for k, t in THRESHOLDS.items()},
                    )
                )
    return out
