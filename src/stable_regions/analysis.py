"""``analyze``: the stable-region geometry of every position of a prompt, beside the measured truth."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from .calibration import resolve_calibration
from .errors import StableRegionsError
from .geometry import (
    FisherOperator,
    PullbackOperator,
    RayCurve,
    effective_rank,
    linf_radius_bounds,
    radius_pade,
    radius_quadratic,
    series_coefficients,
)
from .heap import return_freed_memory
from .models import PRELOGIT, ModelAdapter, load, wrap
from .models.suffix import SuffixBatch
from .probes import RayKL, measure_boundaries, measure_from_suffix

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


def json_value(x):
    """A value for strict JSON: NaN -> None, +-inf -> "inf"/"-inf", numpy scalars -> Python."""
    if hasattr(x, "item") and not isinstance(x, (list, tuple)):
        x = x.item()
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
    eig_tol: float = 1e-8,
    calibration=None,
    progress: Callable[[int, int], None] | None = None,
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
            ``J^T F J`` and the model runs in float64.
        exact: measure the true boundary by running the model (``radius_exact``); NaN if False.
        rtol: relative tolerance of the measured boundary.
        eig_tol: Lanczos residual tolerance (relative to the top eigenvalue) inside the network.
        calibration: a calibration (``"bundled"``, a ``calibration.json`` path from
            ``stable-regions validate``, or a ``Calibration``) of this model and layer:
            fills ``radius_calibrated`` (NaN without one).
        progress: called as ``progress(done, total)`` after each position.
    """
    adapter = as_adapter(model)
    eps_list = check_eps(eps)
    hook = adapter.hook_for_layer(layer)
    cal = resolve_calibration(calibration, adapter, "final" if hook == PRELOGIT else str(layer))
    if cal is not None:
        for e in eps_list:
            cal.band_for(e)  # an eps outside the calibrated bands fails before any work
    ids = adapter.tokenize(prompt)
    pos = check_positions(positions, ids.shape[1])
    tokens = adapter.token_strings(ids[0])
    if hook == PRELOGIT:
        blocks = _prelogit_blocks(adapter, ids, pos, eps_list, exact, rtol)
    else:
        blocks = _inner_blocks(adapter.float64(), ids, hook, pos, eps_list, exact, rtol, eig_tol)

    rows: list[dict] = []
    directions: list[Tensor] = []
    done = 0
    for b in blocks:
        next_tokens = adapter.token_strings(b.top_token)
        for j, position in enumerate(b.positions):
            for e_idx, e in enumerate(eps_list):
                quadratic = float(radius_quadratic(b.lambda_max[j], e))
                rows.append(
                    dict(
                        position=position,
                        token=tokens[position],
                        next_token=next_tokens[j],
                        next_prob=float(b.top_prob[j]),
                        eps=e,
                        layer=str(layer),
                        entropy=float(b.entropy[j]),
                        lambda_max=float(b.lambda_max[j]),
                        effective_rank=float(b.effective_rank[j]),
                        radius_quadratic=quadratic,
                        radius_corrected=float(b.corrected[j, e_idx]),
                        radius_calibrated=_calibrated(
                            cal, e, quadratic, b.corrected[j, e_idx], b.entropy[j]
                        ),
                        radius_curve=float(b.curve[j, e_idx]),
                        radius_exact=float(b.measured[j, e_idx]),
                        radius_linf_lower=float(b.linf_lower[j, e_idx]),
                        radius_linf_upper=float(b.linf_upper[j, e_idx]),
                    )
                )
        directions.append(b.directions.cpu())
        done += len(b.positions)
        if progress is not None:
            progress(done, len(pos))
    return AnalysisResult(adapter.name, prompt, str(layer), eps_list, rows, torch.cat(directions))


def _calibrated(cal, eps: float, quadratic, corrected, entropy) -> float:
    """The calibrated radius of the nearest exit: the maps are increasing, so calibrating the
    nearer sign's prediction gives the smaller calibrated radius of the two."""
    if cal is None:
        return math.nan
    q, c, h = (np.array([float(x)]) for x in (quadratic, corrected, entropy))
    return float(cal.predict(eps, q, c, h)[0])


@dataclass
class _Block:
    """Per-position results of a block of positions; radii are (positions, eps), nearest exit over +-v."""

    positions: list[int]
    top_token: Tensor
    top_prob: Tensor
    entropy: Tensor
    lambda_max: Tensor
    effective_rank: Tensor
    directions: Tensor
    corrected: np.ndarray
    curve: np.ndarray
    measured: np.ndarray
    linf_lower: np.ndarray
    linf_upper: np.ndarray


def _nearest(radii: np.ndarray) -> np.ndarray:
    """(2P, E) with rays 2j, 2j+1 = +v, -v of position j -> (P, E): the nearest exit."""
    return np.minimum(radii[0::2], radii[1::2])


def _rays(a: Tensor, sign: float) -> Tensor:
    """(P, n) -> (2P, n): rows 2j, 2j+1 = ``a_j``, ``sign * a_j`` (the rays +v, -v of position j,
    the layout ``_nearest`` reads)."""
    return torch.stack([a, sign * a], dim=1).reshape(-1, a.shape[-1])


def _entropy(p: Tensor) -> Tensor:
    return -(p * torch.log(p.clamp_min(1e-300))).sum(-1) + 0.0  # + 0.0: no -0.0 for one-hot p


def _linf_radii(eps_list, lam: Tensor, diagonal: Tensor, corner: Tensor):
    """(P, E) lower and upper L-inf radii of the quadratic model (see geometry/linf.py)."""
    pairs = [linf_radius_bounds(e, lam, diagonal, corner) for e in eps_list]
    return tuple(np.stack([b[i].cpu().numpy() for b in pairs], axis=1) for i in (0, 1))


def _pade_radii(c2: Tensor, c3: Tensor, c4: Tensor, eps_list: list[float]) -> np.ndarray:
    return np.stack([radius_pade(c2, c3, e, c4).cpu().numpy() for e in eps_list], axis=1)


def positions_per_block(vocab_size: int) -> int:
    """Positions handled together (at the pre-logit vector and inside the network).

    The Lanczos products of a block and every (position, sign, eps) search advance in
    lockstep, so each step reads W once for many rows (the products are memory-bound), and
    inside the network each step is one batched pass. A block's (rays x V) float64 arrays
    stay ~130 MB (262k vocabulary).
    """
    return int(max(1, min(32, (1 << 26) // vocab_size)))


def _prelogit_blocks(
    adapter: ModelAdapter, ids: Tensor, pos: list[int], eps_list, exact: bool, rtol: float
):
    """The pre-logit vector: curvature from p and W, exact CGF curve, measured through the head."""
    head = adapter.head
    h_all = adapter.prelogits(ids)[pos]
    block = positions_per_block(head.vocab_size)
    for start in range(0, len(pos), block):
        h = h_all[start : start + block]
        P = h.shape[0]
        op = FisherOperator.from_head(head, h)
        lam, vecs = op.top_eigenpairs(k=1)
        lam, vecs = lam[:, 0], vecs[:, 0]
        rank = effective_rank(op.trace(), lam)
        corner = op.quadratic_form(torch.sign(vecs)[:, None])[:, 0]
        linf = _linf_radii(eps_list, lam, op.diagonal(), corner)
        top_p, top_i = op.p.max(-1)
        entropy = _entropy(op.p)
        del op

        # Rays 2j and 2j+1 are +v and -v at position j: eigenvectors have no sign.
        ray_h = h.repeat_interleave(2, dim=0)
        ray_v = _rays(vecs, -1.0)
        curve = RayCurve.from_head(head, ray_h, ray_v)
        predicted = _pade_radii(*curve.coefficients(), eps_list)  # (2P, E)
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
        yield _Block(
            pos[start : start + P],
            top_i,
            top_p,
            entropy,
            lam,
            rank,
            vecs,
            _nearest(predicted),
            _nearest(from_curve),
            _nearest(measured),
            *linf,
        )


def _inner_blocks(
    adapter: ModelAdapter,
    ids: Tensor,
    hook: str,
    pos: list[int],
    eps_list,
    exact: bool,
    rtol: float,
    eig_tol: float,
    trace: str = "exact",
):
    """A hook inside the network: pullback curvature J^T F J by JVP/VJP through the suffix only.

    ``adapter``: the float64 model for ``analyze``, the model itself for maps. A block of positions at a time (``SuffixBatch``: each
    position's token against the cached keys/values of the prompt, one batch row each), so
    the Lanczos products, derivatives and boundary searches of the block are batched passes.
    ``trace="estimate"`` (stability maps): the trace behind the effective rank from the
    Krylov space of the Lanczos run (free) plus 16 Hutchinson probes
    (``PullbackOperator.top_eigenpairs_and_trace``) instead of d products, and no L-inf radii
    (they need the exact diagonal).
    """
    E = len(eps_list)
    block = positions_per_block(adapter.vocab_size)
    for start in range(0, len(pos), block):
        chunk = pos[start : start + block]
        P = len(chunk)
        suffix = SuffixBatch(adapter, ids, hook, chunk)
        op = PullbackOperator.from_suffix(suffix)
        return_freed_memory()  # each stage's transients, not their sum with fragments
        if trace == "exact":
            lam, vecs = op.top_eigenpairs(k=1, tol=eig_tol)
            diagonal = op.diagonal()
            rank = effective_rank(diagonal.sum(-1), lam[:, 0])
            corner = op.quadratic_form(torch.sign(vecs[:, :1]))[:, 0]
            linf = _linf_radii(eps_list, lam[:, 0], diagonal, corner)
        else:
            lam, vecs, trace_g = op.top_eigenpairs_and_trace(k=1, tol=eig_tol, probes=16)
            rank = effective_rank(trace_g, lam[:, 0])
            linf = (np.full((P, E), np.nan), np.full((P, E), np.nan))
        v = vecs[:, 0]
        return_freed_memory()
        # Logit derivatives along +v; along -v the odd ones flip sign.
        derivs = suffix.directional_derivatives(v, order=3)
        c2, c3, c4 = series_coefficients(op.p, derivs)
        del derivs
        # along -v the odd derivatives a1, a3 flip: c3 flips, c2 and c4 do not
        c2, c3, c4 = (
            _rays(c[:, None], sign)[:, 0] for c, sign in ((c2, 1.0), (c3, -1.0), (c4, 1.0))
        )
        predicted = _pade_radii(c2, c3, c4, eps_list)  # (2P, E)
        if exact:
            measured = measure_from_suffix(
                suffix,
                _rays(v, -1.0),
                eps_list,
                rows=torch.arange(P).repeat_interleave(2),
                guesses=predicted,
                rtol=rtol,
            )
        else:
            measured = np.full_like(predicted, np.nan)
        top_p, top_i = op.p.max(-1)
        entropy = _entropy(op.p)
        # the recorded pass and the cache go now, not when the next block replaces them
        del suffix, op
        yield _Block(
            chunk,
            top_i,
            top_p,
            entropy,
            lam[:, 0],
            rank,
            v,
            _nearest(predicted),
            np.full((P, E), np.nan),
            _nearest(measured),
            *linf,
        )
