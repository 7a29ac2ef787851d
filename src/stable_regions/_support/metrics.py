"""How a prediction is scored against a measurement: the error and the summary's thresholds."""

from __future__ import annotations

import numpy as np

THRESHOLDS = {"within_1pct": 0.01, "within_8pct": 0.08, "within_50pct": 0.5}
SUMMARY_COLUMNS = [
    "model",
    "layer",
    "family",
    "eps",
    "predictor",
    "n",
    "median_rel_err",
    "p90_rel_err",
    *THRESHOLDS,
]


def relative_error(predicted: np.ndarray, empirical: np.ndarray) -> np.ndarray:
    """``|predicted / empirical - 1|``; 0 where both are infinite, inf where only one is."""
    predicted, empirical = np.asarray(predicted, float), np.asarray(empirical, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        err = np.abs(predicted / empirical - 1.0)
    both_inf = np.isposinf(predicted) & np.isposinf(empirical)
    one_inf = np.isposinf(predicted) ^ np.isposinf(empirical)
    err[both_inf] = 0.0
    err[one_inf] = np.inf
    return err
