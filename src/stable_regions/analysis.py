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
from .probes import RayKL, measure_boundaries

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
    # Blocks of positions: the Lanczos products of a block and every (position, sign, eps)
    # search advance in lockstep, so each step reads W once for many rows (the products are
    # memory-bound). A block's (rays x V) float64 arrays stay ~130 MB (262k vocabulary).
    block = int(max(1, min(32, (1 << 26) // head.vocab_size)))
    done = 0
    for start in range(0, len(pos), block):
        h = h_all[start : start + block]
        P = h.shape[0]
        op = FisherOperator.from_head(head, h)
        lam, vecs = op.top_eigenpairs(k=1)
        lam, vecs = lam[:, 0], vecs[:, 0]
        directions[start : start + P] = vecs.cpu()
        rank = effective_rank(op.trace(), lam)
        entropy = -(op.p * torch.log(op.p.clamp_min(1e-300))).sum(-1) + 0.0  # + 0.0: no -0.0
        top_p, top_i = op.p.max(-1)
        next_tokens = adapter.token_strings(top_i)
        del op

        # Rays 2j and 2j+1 are +v and -v at position j: eigenvectors have no sign.
        ray_h = h.repeat_interleave(2, dim=0)
        ray_v = torch.stack([vecs, -vecs], dim=1).reshape(2 * P, -1)
        curve = RayCurve.from_head(head, ray_h, ray_v)
        c2, c3, c4 = curve.coefficients()
        predicted = np.stack(
            [radius_pade(c2, c3, e, c4).numpy() for e in eps_list], axis=1
        )  # (2P, E)
        scale = ray_h.norm(dim=-1).clamp_min(1e-6).cpu().numpy()
        search = dict(t_start=1e-3 * scale, t_max=1e6 * scale, rtol=rtol)
        # The closed forms only seed the search brackets; they never decide the answer.
        from_curve = measure_boundaries(curve, eps_list, guesses=predicted, **search)
        if exact:
            measured = measure_boundaries(
                RayKL(head.logits, ray_h, ray_v), eps_list, guesses=from_curve, **search
            )
        else:
            measured = np.full_like(from_curve, np.nan)

        nearest = lambda a: np.minimum(a[0::2], a[1::2])  # noqa: E731  (P, E): min over +v, -v
        pred_n, curve_n, meas_n = nearest(predicted), nearest(from_curve), nearest(measured)
        for j in range(P):
            i = start + j
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
                        radius_corrected=float(pred_n[j, e_idx]),
                        radius_curve=float(curve_n[j, e_idx]),
                        radius_exact=float(meas_n[j, e_idx]),
                    )
                )
        done += P
        if progress is not None:
            progress(done, len(pos))
    return AnalysisResult(adapter.name, prompt, str(layer), eps_list, rows, directions)
