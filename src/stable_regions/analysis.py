"""``analyze``: the stable-region geometry of every position of a prompt, beside the measured truth."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from .errors import StableRegionsError
from .geometry import FisherOperator, RayCurve, effective_rank, radius_pade, radius_quadratic
from .models import PRELOGIT, ModelAdapter, load, wrap
from .probes import measure_boundaries, prelogit_kl

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
    "radius_curve",
    "radius_exact",
]

COLUMN_DOCS = {
    "position": "token index in the prompt (0-based); the distribution is the next-token prediction there",
    "token": "the token at that position",
    "next_token": "the most likely next token",
    "next_prob": "its probability",
    "eps": "KL threshold in nats",
    "layer": "where the perturbation is added ('final' = the pre-logit vector)",
    "entropy": "entropy of the next-token distribution, nats",
    "lambda_max": "top eigenvalue of the curvature H = W^T (diag p - p p^T) W",
    "effective_rank": "tr H / lambda_max: how many directions share the curvature",
    "radius_quadratic": "sqrt(2 eps / lambda_max): the published closed form",
    "radius_corrected": "fourth-order closed form ([2/2] Pade of the cumulant series), nearest exit over +-v",
    "radius_curve": "first crossing of the exact closed-form KL curve (CGF), nearest exit over +-v",
    "radius_exact": "measured: smallest t with KL >= eps running the model, nearest exit over +-v",
}


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
            "rows": [{k: _json_value(r[k]) for k in COLUMNS} for r in self.rows],
        }


def _json_value(x):
    if isinstance(x, float):
        if math.isnan(x):
            return None
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
    return x


def as_adapter(model) -> ModelAdapter:
    if isinstance(model, ModelAdapter):
        return model
    if isinstance(model, str):
        return load(model)
    if isinstance(model, nn.Module):
        return wrap(model)
    raise StableRegionsError(
        f"expected a model name, path, ModelAdapter or transformers model, got {type(model).__name__}"
    )


def check_eps(eps: float | Sequence[float]) -> list[float]:
    values = [eps] if isinstance(eps, (int, float)) else list(eps)
    if not values:
        raise StableRegionsError(
            "no eps given: pass one or more KL thresholds > 0, e.g. 0.01 0.1 1.0"
        )
    out = []
    for e in values:
        try:
            x = float(e)
        except (TypeError, ValueError):
            raise StableRegionsError(
                f"eps {e!r} is not a number: give a KL threshold > 0 in nats"
            ) from None
        if not math.isfinite(x) or x <= 0:
            raise StableRegionsError(f"eps must be a finite number > 0 (KL in nats), got {e}")
        out.append(x)
    return out


def check_positions(positions, n: int) -> list[int]:
    if positions == "all":
        return list(range(n))
    if positions == "last":
        return [n - 1]
    if isinstance(positions, int):
        positions = [positions]
    if isinstance(positions, str):
        raise StableRegionsError(
            f"positions must be 'all', 'last' or a list of token indices, got {positions!r}"
        )
    out = []
    for p in positions:
        if not isinstance(p, (int, np.integer)) or not -n <= int(p) < n:
            raise StableRegionsError(
                f"position {p} is out of range: the prompt has {n} token{'s' if n != 1 else ''} (0..{n - 1})"
            )
        out.append(int(p) % n)
    if not out:
        raise StableRegionsError("no positions given")
    return out


def analyze(
    model,
    prompt: str,
    eps: float | Sequence[float] = (0.01, 0.1, 1.0),
    positions: str | int | Sequence[int] = "all",
    layer: str | int = "final",
    exact: bool = True,
    *,
    rtol: float = 1e-6,
    progress: Callable[[int, int], None] | None = None,
) -> AnalysisResult:
    """Stable-region geometry of a prompt, each prediction beside the measured truth.

    Args:
        model: a bundled name / directory / .gguf path, a ``ModelAdapter``, or a loaded
            ``transformers`` causal LM (then use ``wrap(model, tokenizer)`` to give a tokenizer).
        prompt: the text; position ``i`` analyses the next-token distribution predicted at token ``i``.
        eps: KL thresholds in nats.
        positions: ``"all"``, ``"last"`` or token indices.
        layer: ``"final"`` (the pre-logit vector).
        exact: measure the true boundary by running the model (``radius_exact``); NaN if False.
        rtol: relative tolerance of the measured boundary.
        progress: called as ``progress(done, total)`` after each position.
    """
    adapter = as_adapter(model)
    eps_list = check_eps(eps)
    hook = adapter.hook_for_layer(layer)
    if hook != PRELOGIT:
        raise StableRegionsError(
            f"layer {layer!r}: only layer='final' (the pre-logit vector) is supported so far"
        )
    ids = adapter.tokenize(prompt)
    pos = check_positions(positions, ids.shape[1])
    tokens = adapter.token_strings(ids[0])
    head = adapter.head
    h_all = adapter.prelogits(ids)[pos]

    rows: list[dict] = []
    directions = torch.empty(len(pos), adapter.d_model, dtype=torch.float64)
    chunk = max(1, (1 << 24) // head.vocab_size)  # keep (chunk x V) float64 blocks ~128 MB
    done = 0
    for start in range(0, len(pos), chunk):
        h = h_all[start : start + chunk]
        op = FisherOperator.from_head(head, h)
        lam, vecs = op.top_eigenpairs(k=1)
        lam, vecs = lam[:, 0], vecs[:, 0]
        rank = effective_rank(op.trace(), lam)
        logp = torch.log(op.p.clamp_min(1e-300))
        entropy = -(op.p * logp).sum(-1) + 0.0  # + 0.0 turns -0.0 (one-hot p) into 0.0
        top_p, top_i = op.p.max(-1)
        next_tokens = adapter.token_strings(top_i)
        for j in range(h.shape[0]):
            i = start + j
            v = vecs[j]
            directions[i] = v
            signed = torch.stack([v, -v])
            curve = RayCurve.from_head(head, h[j], signed)
            c2, c3, c4 = curve.coefficients()
            scale = max(float(h[j].norm()), 1e-6)
            # Per sign: closed-form radii, then the exact curve's and the model's crossings
            # (the closed form only seeds the search brackets).
            predicted = [
                [float(radius_pade(c2[s], c3[s], e, c4[s])) for e in eps_list] for s in (0, 1)
            ]
            search = dict(t_start=1e-3 * scale, t_max=1e6 * scale, rtol=rtol)
            from_curve = [
                measure_boundaries(_curve_kl(curve, s), eps_list, guesses=predicted[s], **search)
                for s in (0, 1)
            ]
            measured = None
            if exact:
                measured = [
                    measure_boundaries(
                        prelogit_kl(head.logits, h[j], signed[s]),
                        eps_list,
                        guesses=from_curve[s],
                        **search,
                    )
                    for s in (0, 1)
                ]
            for e_idx, e in enumerate(eps_list):
                rows.append(
                    dict(
                        position=pos[i],
                        token=tokens[pos[i]],
                        next_token=next_tokens[j],
                        next_prob=float(top_p[j]),
                        eps=e,
                        layer=str(layer),
                        entropy=float(entropy[j]),
                        lambda_max=float(lam[j]),
                        effective_rank=float(rank[j]),
                        radius_quadratic=float(radius_quadratic(lam[j], e)),
                        radius_corrected=min(r[e_idx] for r in predicted),
                        radius_curve=min(r[e_idx] for r in from_curve),
                        radius_exact=min(m[e_idx] for m in measured) if measured else math.nan,
                    )
                )
            done += 1
            if progress is not None:
                progress(done, len(pos))
    return AnalysisResult(adapter.name, prompt, str(layer), eps_list, rows, directions)


def _curve_kl(curve: RayCurve, sign_index: int):
    def f(ts: np.ndarray) -> np.ndarray:
        return curve.kl(torch.as_tensor(ts))[:, sign_index].numpy()

    return f
