"""``analyze``: the stable-region geometry of every position of a prompt, beside the measured truth."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .calibration import resolve_calibration
from .engine import inner_blocks, prelogit_blocks, reliability
from .errors import StableRegionsError
from .geometry import radius_quadratic
from .inputs import as_adapter, check_eps, check_positions, json_value
from .models import PRELOGIT
from .models.precision import full_float32_products

COLUMNS = [
    "position",
    "token",
    "next_token",
    "next_prob",
    "eps",
    "layer",
    "entropy",
    "lambda_max",
    "effective_rank",
    "radius_quadratic",
    "radius_corrected",
    "radius_calibrated",
    "radius_curve",
    "radius_exact",
    "radius_linf_lower",
    "radius_linf_upper",
    "norm",
    "radius_relative",
    "reliable",
    "unreliable_reason",
]


@dataclass
class AnalysisResult:
    """What ``analyze`` found: one row per (position, eps), plus the top directions."""

    model: str
    prompt: str
    layer: str
    eps: list[float]
    rows: list[dict]
    directions: Tensor = field(
        repr=False
    )  # (positions, d): top eigenvector at each analysed position

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=COLUMNS)

    def to_json(self) -> dict:
        """``{"model", "layer", "eps", "rows"}``; NaN becomes null, infinities the strings "inf"/"-inf"."""
        return {
            "model": self.model,
            "layer": self.layer,
            "eps": self.eps,
            "rows": [{k: json_value(r[k]) for k in COLUMNS} for r in self.rows],
        }


@full_float32_products()
def analyze(
    model,
    prompt: str,
    eps: float | Sequence[float] = (0.01, 0.1, 1.0),
    positions: str | int | Sequence[int] = "all",
    layer: str | int = "final",
    exact: bool = True,
    *,
    rtol: float = 1e-6,
    eig_tol: float = 1e-8,
    trace: str | None = None,
    calibration=None,
    progress: Callable[[int, int], None] | None = None,
    stage: Callable[[str], None] | None = None,
) -> AnalysisResult:
    """Stable-region geometry of a prompt, each prediction beside the measured truth.

    Args:
        model: a bundled name / directory / .gguf path, a ``ModelAdapter``, or a loaded
            ``transformers`` causal LM (then use ``wrap(model, tokenizer)`` to give a tokenizer).
        prompt: the text; position ``i`` analyses the next-token distribution predicted at token ``i``.
        eps: KL thresholds in nats.
        positions: ``"all"``, ``"last"`` or token indices.
        layer: where the perturbation is added: ``"final"`` (the pre-logit vector, the input of
            the unembedding), ``"embed"`` (the input of block 0), or a block index ``i``
            (``blocks.{i}.hook_resid_post``). Inside the network the curvature is the pullback
            ``J^T F J``, computed in the model's own precision (float64 for probabilities,
            KL values and cumulants).
        exact: measure the true boundary by running the model (``radius_exact``); NaN if False.
        rtol: relative tolerance of the measured boundary.
        eig_tol: Lanczos residual tolerance (relative to the top eigenvalue) inside the network
            (at least what the model's precision reaches: ~1e-4 for a float32 model).
        trace: inside the network, how ``tr G`` behind the effective rank is found:
            ``"exact"`` (d forward-mode products: the exact diagonal, which the L-inf radii
            need) or ``"estimate"`` (the Krylov space of the Lanczos run plus 16 Hutchinson
            probes, within a few percent; L-inf radii NaN). Default: exact at ``embed``, where
            the L-inf radii are meant, estimate at blocks (the d products cost twice the rest
            of the analysis there). The pre-logit vector is always exact (O(V d)).
        calibration: a calibration (``"bundled"``, a ``calibration-LAYER.json`` path from
            ``stable-regions validate``, or a ``Calibration``) of this model and layer:
            fills ``radius_calibrated`` (NaN without one).
        progress: called as ``progress(done, total)`` after each block of positions.
        stage: called with the name of each stage as it begins (``suffix``, ``curvature``,
            ``trace`` or ``curvature and trace estimate``, ``derivatives``, ``measuring``):
            inner layers spend minutes in one block.
    """
    adapter = as_adapter(model)
    eps_list = check_eps(eps)
    if trace not in (None, "exact", "estimate"):
        raise StableRegionsError(f"trace must be 'exact' or 'estimate', got {trace!r}")
    hook = adapter.hook_for_layer(layer)
    cal = resolve_calibration(calibration, adapter, "final" if hook == PRELOGIT else str(layer))
    if cal is not None:
        for e in eps_list:
            cal.band_for(e)  # an eps outside the calibrated bands fails before any work
    ids = adapter.tokenize(prompt)
    pos = check_positions(positions, ids.shape[1])
    tokens = adapter.token_strings(ids[0])
    if hook == PRELOGIT:
        blocks = prelogit_blocks(adapter, ids, pos, eps_list, exact, rtol, stage)
    else:
        if trace is None:
            trace = "exact" if hook == adapter.hook_for_layer("embed") else "estimate"
        blocks = inner_blocks(adapter, ids, hook, pos, eps_list, exact, rtol, eig_tol, trace, stage)

    rows: list[dict] = []
    directions: list[Tensor] = []
    done = 0
    for b in blocks:
        next_tokens = adapter.token_strings(b.top_token)
        # to the host once per block: a float() per row would wait for the device each time
        norm, top_prob, entropy, lam, rank = (
            _host(x) for x in (b.norm, b.top_prob, b.entropy, b.lambda_max, b.effective_rank)
        )
        # the best closed form of each row: the exact curve at the pre-logit vector, the
        # Taylor path inside the network (the Pade form where no curve was computed)
        best = np.where(np.isnan(b.curve), b.corrected, b.curve)
        reliable, reason = reliability(best, norm[:, None], hook != PRELOGIT, b.corrected)
        for j, position in enumerate(b.positions):
            for e_idx, e in enumerate(eps_list):
                quadratic = float(radius_quadratic(lam[j], e))
                rows.append(
                    dict(
                        position=position,
                        token=tokens[position],
                        next_token=next_tokens[j],
                        next_prob=float(top_prob[j]),
                        eps=e,
                        layer=str(layer),
                        entropy=float(entropy[j]),
                        lambda_max=float(lam[j]),
                        effective_rank=float(rank[j]),
                        radius_quadratic=quadratic,
                        radius_corrected=float(b.corrected[j, e_idx]),
                        radius_calibrated=_calibrated(
                            cal,
                            e,
                            quadratic,
                            b.corrected[j, e_idx],
                            entropy[j],
                            b.curve[j, e_idx],
                        ),
                        radius_curve=float(b.curve[j, e_idx]),
                        radius_exact=float(b.measured[j, e_idx]),
                        radius_linf_lower=float(b.linf_lower[j, e_idx]),
                        radius_linf_upper=float(b.linf_upper[j, e_idx]),
                        norm=float(norm[j]),
                        radius_relative=float(best[j, e_idx] / max(norm[j], 1e-300)),
                        reliable=bool(reliable[j, e_idx]),
                        unreliable_reason=str(reason[j, e_idx]),
                    )
                )
        directions.append(b.directions.cpu())
        done += len(b.positions)
        if progress is not None:
            progress(done, len(pos))
    return AnalysisResult(adapter.name, prompt, str(layer), eps_list, rows, torch.cat(directions))


def _host(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def _calibrated(cal, eps: float, quadratic, corrected, entropy, taylor) -> float:
    """The calibrated radius of the nearest exit: the maps are increasing, so calibrating the
    nearer sign's prediction gives the smaller calibrated radius of the two."""
    return math.nan if cal is None else cal.predict_one(eps, quadratic, corrected, entropy, taylor)
