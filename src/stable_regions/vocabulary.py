"""One name per concept: every column a study writes, defined once.

Every frame, JSON document, Parquet file and CLI table names its columns from ``COLUMNS``.
A radius is always ``radius_<form>`` and a steering coefficient ``coef_<form>``, where the
form says how the number was found:

- ``quadratic``: ``sqrt(2 eps / v^T G v)``, the published closed form (second order);
- ``pade``: the [2/2] Pade form of the KL's fourth-order series along the ray;
- ``curve``: the first root of a closed-form KL curve along the ray. At the pre-logit vector
  of a linear head this is the model's own KL (the head is the whole map), so it is exact;
  inside the network it is the KL along the logits' cubic Taylor path;
- ``calibrated``: a closed form mapped through a calibration fitted on measured boundaries;
- ``exact``: the first crossing of eps measured by running the model itself.

``upgrade`` renames the columns of files written by earlier versions (``validate`` and
``scan`` run directories, calibration files) and says so once.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import StableRegionsWarning

#: How a radius or coefficient was found (the suffix of ``radius_<form>``, ``coef_<form>``;
#: the ``predictor`` of a validation summary).
FORMS = ("quadratic", "pade", "curve", "calibrated", "exact")


@dataclass(frozen=True)
class Column:
    """A column: its ``name``, what it means, and its ``units`` (empty where it has none)."""

    name: str
    meaning: str
    units: str = ""

    def describe(self) -> str:
        return f"{self.meaning} ({self.units})" if self.units else self.meaning


LAYER_UNITS = "L2 norm, in the units of the perturbed layer"
COEF_UNITS = "multiples of the steering vector"

_FORM_MEANING = {
    "quadratic": "sqrt(2 eps / curvature): the published second-order closed form",
    "pade": "the [2/2] Pade form of the KL's fourth-order series along the ray",
    "curve": (
        "the first root of the KL along the ray from a closed-form curve: exact at the "
        "pre-logit vector, the logits' cubic Taylor path inside the network"
    ),
    "calibrated": "a closed form mapped through a calibration fitted on measured boundaries",
    "exact": "the first crossing of eps measured by running the model",
}

_COLUMNS = [
    # where and what
    Column("model", "the model's name"),
    Column("prompt_id", "index or id of the prompt"),
    Column("prompt_digest", "digest of the prompt's text (keeps fitted prompts out of tests)"),
    Column("kind", "the prompt's kind in the corpus (prose, code, chat, ...)"),
    Column("doc_id", "id of the corpus document"),
    Column("generation", "index of the generate call"),
    Column("sequence", "index of the sequence in the batch"),
    Column("request", "the id of a request to a serving engine (vLLM)"),
    Column("step", "generation step"),
    Column("position", "token index in the prompt; its next-token distribution is analysed"),
    Column("token", "the token at this position"),
    Column("chosen_token", "the token generated at this step"),
    Column("chosen_token_id", "its id (-1 before the step's token is known)"),
    Column("chosen_prob", "its probability under the step's distribution", "probability"),
    Column("next_token", "the most likely next token"),
    Column("next_token_id", "its id"),
    Column("next_prob", "its probability", "probability"),
    Column("top_tokens", "the likeliest next tokens, most likely first"),
    Column("top_token_ids", "their ids"),
    Column("top_probs", "their probabilities", "probability"),
    Column("layer", "where the perturbation is added: final, embed or a block index"),
    Column("hook", "the hook point of the layer (TransformerLens names)"),
    Column("eps", "KL threshold", "nats"),
    Column("norm", "the norm of the ball a certificate covers: l2 or linf"),
    Column("family", "how the direction was chosen (top eigenvector, random, ...)"),
    Column("direction_index", "index of the direction within its family"),
    Column("sign", "+1 or -1: which way along the direction"),
    Column("split", "train or test (calibration fitting)"),
    # the distribution and the geometry
    Column("entropy", "entropy of the next-token distribution", "nats"),
    Column(
        "activation_norm", "|h|: the norm of the activation at the perturbed layer", LAYER_UNITS
    ),
    Column("vector_norm", "the steering vector's norm", LAYER_UNITS),
    Column("lambda_max", "top eigenvalue of the curvature G (H at the pre-logit vector)"),
    Column("lambda_lower", "a lower bound on lambda_max"),
    Column("lambda_upper", "an upper bound on lambda_max"),
    Column("curvature", "v^T G v along this row's unit direction (lambda_max along the top one)"),
    Column("effective_rank", "tr G / lambda_max"),
    Column("residual", "the eigen-search's relative residual"),
    # radii
    *(Column(f"radius_{form}", f"radius: {_FORM_MEANING[form]}", LAYER_UNITS) for form in FORMS),
    Column(
        "calibrated_form",
        "what radius_calibrated (coef_calibrated) is: the calibrator's feature mapped ('pade "
        "mapped'), or a closed form as is ('curve as is') where the map was worse on held-out "
        "prompts along such directions",
    ),
    Column("radius_relative", "the best closed-form radius divided by activation_norm", "fraction"),
    Column("radius_flip", "least L2 move of the pre-logit vector that changes the top token"),
    Column("radius_certified", "a ball on which the KL provably stays below eps", LAYER_UNITS),
    Column("radius_attack", "the nearest exit found by gradient ascent (an upper bound)"),
    Column("radius_linf_lower", "L-inf radius of the quadratic model, lower bound"),
    Column("radius_linf_upper", "L-inf radius of the quadratic model, upper bound"),
    Column("certified_by", "which bound certified the ball"),
    Column("tightness", "radius_certified / radius_attack (1 is tight)"),
    Column("reliable", "whether the closed form is inside the range where it was validated"),
    Column("unreliable_reason", "why not, where it is not"),
    Column("fragile", "radius_flip < radius_curve, or radius_curve below the user's threshold"),
    # steering
    *(
        Column(f"coef_{form}", f"steering coefficient: {_FORM_MEANING[form]}", COEF_UNITS)
        for form in FORMS
    ),
    # the iso-KL coefficient (steering every position; studies.iso_kl)
    Column("vector", "the steering vector's name"),
    Column("kl_target", "the budget the statistic of per-token KL is solved for", "nats"),
    Column("kl_stat", "the statistic of per-token KL: mean, p50, p90, p95 or max"),
    Column("new_tokens", "greedy tokens per continuation"),
    Column(
        "coef_rollout",
        "iso-KL coefficient by the rollout definition: steered greedy rollouts re-scored by "
        "the base model, solved for the target",
        COEF_UNITS,
    ),
    Column(
        "coef_measured",
        "iso-KL coefficient teacher forced along the base model's continuation, confirmed by "
        "one rollout (one solver step from it where it missed)",
        COEF_UNITS,
    ),
    Column(
        "coef_predicted",
        "iso-KL coefficient from every token's logits along the coefficient to first order, "
        "the softmax exact (one pass of first-order jets)",
        COEF_UNITS,
    ),
    Column(
        "kl_confirmed",
        "the rollout definition's statistic at the teacher-forced answer (the confirming rollout)",
        "nats",
    ),
    Column("reached", "whether the rollout definition reaches the target below 1e4 x the vector"),
    *(
        Column(f"evaluations_{form}", f"evaluations of the statistic by the {form} solver")
        for form in ("rollout", "measured")
    ),
    *(
        Column(
            f"forward_tokens_{form}",
            f"tokens through the model's forward pass for coef_{form} (a greedy step is one)",
        )
        for form in ("rollout", "measured", "predicted")
    ),
    *(
        Column(f"seconds_{form}", f"wall time for coef_{form}", "s")
        for form in ("rollout", "measured", "predicted")
    ),
    Column("kl_steer", "KL(p_steer || p_base) of this generated token's distribution", "nats"),
    Column("kl_steer_cumulative", "kl_steer summed over the continuation so far", "nats"),
    Column("kl_spike", "kl_steer above the spike threshold (steering's spike_kl)"),
    # substitutions
    Column("substitute", "the nearby token substituted"),
    Column("substitute_id", "its id"),
    Column("distance", "|x(substitute) - x(token)| at the embedding", LAYER_UNITS),
    Column("kl_substituted", "KL after substituting the token and running the model", "nats"),
    Column("flips_predicted", "radius_curve < distance"),
    Column("flips_measured", "kl_substituted > eps"),
    # summaries
    Column("predictor", "the radius form evaluated: quadratic, pade, curve or calibrated"),
    Column("n", "rows summarised"),
    Column("positions", "positions scanned in the document"),
    Column("min_position", "the position of the smallest radius_pade (in a document or a layer)"),
    Column("min_token", "the token at min_position"),
    # Jacobian spectra (numbered: block_s1, block_s2, ...)
    Column("block_s<j>", "j-th singular value of the block's own Jacobian"),
    Column("output_s<j>", "j-th singular value of the map from the layer to the pre-logit vector"),
    Column("median_rel_err", "median of |predicted / radius_exact - 1|"),
    Column("p90_rel_err", "90th percentile of |predicted / radius_exact - 1|"),
    Column("within_1pct", "share of rows within 1% of radius_exact", "fraction"),
    Column("within_8pct", "share of rows within 8% of radius_exact", "fraction"),
    Column("within_50pct", "share of rows within 50% of radius_exact", "fraction"),
]

#: Every column by name.
COLUMNS: dict[str, Column] = {c.name: c for c in _COLUMNS}

#: Names written by earlier versions, per study, and the names that replaced them.
RENAMED: dict[str, dict[str, str]] = {
    "analyze": {"radius_corrected": "radius_pade", "norm": "activation_norm"},
    "scan": {"radius_corrected": "radius_pade"},
    "monitor": {
        "radius_corrected": "radius_curve",
        "token": "chosen_token",
        "token_id": "chosen_token_id",
        "prob": "chosen_prob",
        "top_token_id": "next_token_id",
        "top_prob": "next_prob",
    },
    "steer": {"coef_corrected": "coef_pade"},
    "validate": {
        "quadratic": "radius_quadratic",
        "corrected": "radius_pade",
        "taylor": "radius_curve",
        "calibrated": "radius_calibrated",
        "empirical": "radius_exact",
        "norm": "activation_norm",
    },
    "map": {"norm": "activation_norm"},
    "jacobian": {"resid_norm": "activation_norm"},
    # a calibration's features and a summary's predictors are forms
    "forms": {"corrected": "pade", "taylor": "curve"},
}


STATISTICS = {"median": "median", "min": "minimum", "max": "maximum", "p05": "5th percentile"}


def lookup(name: str) -> Column | None:
    """The column ``name``: a numbered one (``block_s3``) by its family (``block_s<j>``), a
    summary statistic (``median_radius_pade``, ``coef_pade_p05``) by what it summarises."""
    column = COLUMNS.get(re.sub(r"_s\d+$", "_s<j>", name))
    if column is not None:
        return column
    for stat, words in STATISTICS.items():
        for base in (name.removeprefix(f"{stat}_"), name.removesuffix(f"_{stat}")):
            if base != name and base in COLUMNS:
                of = COLUMNS[base]
                return Column(name, f"{words} of {base}: {of.meaning}", of.units)
    return None


def meanings(names: Iterable[str]) -> dict[str, str]:
    """``{name: meaning (units)}`` of the vocabulary's columns among ``names``; a name of
    the user's own (a monitor direction ``radius_<name>``) is described as such."""
    out = {}
    for name in names:
        column = lookup(name)
        out[name] = column.describe() if column else "a column of the user's own naming"
    return out


def describe(frame, names: Iterable[str] | None = None):
    """``frame`` with ``frame.attrs["columns"]`` the meanings of its columns; returned."""
    frame.attrs["columns"] = meanings(frame.columns if names is None else names)
    return frame


def upgrade(frame, study: str, source: str = "a file"):
    """Rename the columns an earlier version wrote for ``study`` (``RENAMED``) in place,
    with one warning naming them; a frame already in today's names is returned as is."""
    renames = {old: new for old, new in RENAMED[study].items() if old in frame.columns}
    renames = {old: new for old, new in renames.items() if new not in frame.columns}
    if renames:
        listed = ", ".join(f"{old} -> {new}" for old, new in renames.items())
        warnings.warn(
            f"{source} was written by an earlier version of stable-regions; "
            f"read its columns under today's names ({listed})",
            OldNamesWarning,
            stacklevel=2,
        )
        frame = frame.rename(columns=renames)
    return frame


def upgrade_name(name: str, study: str) -> str:
    """Today's name of ``name`` (itself where it was not renamed)."""
    return RENAMED[study].get(name, name)


class OldNamesWarning(StableRegionsWarning):
    """A file written by an earlier version was read under today's column names."""


def markdown() -> str:
    """docs/columns.md: the forms, every column, and the names earlier versions wrote."""
    lines = [
        "# Columns",
        "",
        "Every frame, JSON document, Parquet file and table that stable-regions writes names",
        "its columns from one list (`stable_regions.vocabulary`); this page is generated from",
        'it. A frame carries the same meanings in `frame.attrs["columns"]`.',
        "",
        "## How a radius was found",
        "",
        "A radius is `radius_<form>` and a steering coefficient `coef_<form>`:",
        "",
        *(f"- `{form}`: {_FORM_MEANING[form]}." for form in FORMS),
        "",
        "## Every column",
        "",
        "| column | meaning | units |",
        "|---|---|---|",
        *(f"| `{c.name}` | {c.meaning} | {c.units} |" for c in _COLUMNS),
        "",
        "Summaries name a statistic of a column: `median_<column>`, `min_<column>`,",
        "`<column>_median`, `<column>_p05`.",
        "",
        "## Names written by earlier versions",
        "",
        "Files an earlier version wrote (run directories of `validate` and `scan`, calibration",
        "files) are read under today's names, with a warning that lists the renames.",
        "",
        "| study | earlier name | today |",
        "|---|---|---|",
        *(
            f"| {study} | `{old}` | `{new}` |"
            for study, renames in RENAMED.items()
            for old, new in renames.items()
        ),
        "",
    ]
    return "\n".join(lines)


def check_known(names: Iterable[str]) -> None:
    """Raise ``KeyError`` naming any of ``names`` the vocabulary does not define (tests and
    the docs' column table use it: a study must not write a column nobody defined)."""
    unknown = [n for n in names if lookup(n) is None]
    if unknown:
        raise KeyError(f"columns not in the vocabulary: {unknown}")
