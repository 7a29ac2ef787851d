"""The validation study: closed-form radii against measured boundaries, at any layer.

``validate`` runs it (``run.py``); ``final.FinalLayerStudy`` and ``inner.InnerLayerStudy``
measure one prompt at one layer; ``fitting`` calibrates and summarizes per layer; ``study``
holds what every layer shares (settings, families, rows).
"""

from ..._support.metrics import relative_error
from ...models.layers import check_layers
from .final import FinalLayerStudy
from .fitting import (
    apply_calibration,
    fit_calibration,
    held_out_corpus,
    split_prompts,
    summarize,
)
from .inner import InnerLayerStudy
from .run import (
    ValidationPlan,
    ValidationRun,
    calibration_file,
    finish_validation,
    measure_prompt,
    resolve_calibrations,
    study_prompts,
    study_settings,
    validate,
)
from .study import (
    FAMILIES,
    PREDICTORS,
    RESULT_COLUMNS,
    PositionRays,
    StudySettings,
    check_families,
    study_positions,
)

__all__ = [
    "FAMILIES",
    "PREDICTORS",
    "RESULT_COLUMNS",
    "FinalLayerStudy",
    "InnerLayerStudy",
    "PositionRays",
    "StudySettings",
    "ValidationPlan",
    "ValidationRun",
    "apply_calibration",
    "calibration_file",
    "check_families",
    "check_layers",
    "finish_validation",
    "fit_calibration",
    "held_out_corpus",
    "measure_prompt",
    "relative_error",
    "resolve_calibrations",
    "split_prompts",
    "study_positions",
    "study_prompts",
    "study_settings",
    "summarize",
    "validate",
]
