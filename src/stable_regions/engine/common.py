"""What both engines share: the ``Block`` they yield, block sizes, tolerances, and the
closed forms along given directions (the KL series and the Taylor-path roots from the
logits' derivatives, the ``reliable`` flag)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..budget import equal_parts, graph_bytes, rows_recordable, rows_within
from ..geometry import (
    LogitHead,
    PullbackOperator,
    TaylorPathKL,
    effective_rank,
    linf_radius_bounds,
    radius_pade,
    series_coefficients,
    top_curvature,
    top_eigenpair_float64,
)
from ..models import PRELOGIT, ModelAdapter
from ..models.suffix import SuffixBatch
from ..probes import measure_boundaries

# Inside the network the Taylor-path radius is trusted where it stays within RELIABLE_RELATIVE
# of the activation's norm and the Pade form of the same series agrees with it to
# RELIABLE_AGREEMENT (their disagreement measures the higher orders). On held-out corpus
# prompts (docs/validation.md, "Inside the network"), SmolLM2 block 15 / Gemma-3 block 9:
# such rays were within 1% at eps 0.01 on 98.6% / 97.8%, within 8% at eps 0.1 on 99.8% /
# 98.9%, within 50% at eps 1 on 99.6% / 98.2%. The norm alone did not transfer: Gemma's
# residual norm is large, so nearly every ray there lies within 0.1 |h|, errors or not.
RELIABLE_RELATIVE = 0.1
RELIABLE_AGREEMENT = 0.02

Stage = Callable[[str], None]


def quiet(_: str) -> None:
    """A stage callback that does nothing."""
    return None


@dataclass(kw_only=True)
class Block:
    """Per-position results of a block of positions; radii are (positions, eps), nearest exit
    over +-v (NaN where not computed), named by their form (``vocabulary.FORMS``)."""

    positions: list[int]
    next_token_id: Tensor  # (P,)
    next_prob: Tensor  # (P,)
    entropy: Tensor  # (P,) nats
    lambda_max: Tensor  # (P,)
    effective_rank: Tensor  # (P,)
    directions: Tensor  # (P, d) top eigenvectors
    pade: np.ndarray
    curve: np.ndarray
    exact: np.ndarray
    linf_lower: np.ndarray
    linf_upper: np.ndarray
    activation_norm: Tensor  # (P,) |h|: the activation's norm at the perturbed layer


def nearest(radii: np.ndarray) -> np.ndarray:
    """(2P, E) with rays 2j, 2j+1 = +v, -v of position j -> (P, E): the nearest exit."""
    return np.minimum(radii[0::2], radii[1::2])


def rays(a: Tensor, sign: float) -> Tensor:
    """(P, n) -> (2P, n): rows 2j, 2j+1 = ``a_j``, ``sign * a_j`` (the rays +v, -v of position
    j, the layout ``nearest`` reads)."""
    return torch.stack([a, sign * a], dim=1).reshape(-1, a.shape[-1])


def entropy(p: Tensor) -> Tensor:
    """Entropy (nats) of each row of ``p``."""
    return -(p * torch.log(p.clamp_min(1e-300))).sum(-1) + 0.0  # + 0.0: no -0.0 for one-hot p


def pade_radii(c2: Tensor, c3: Tensor, c4: Tensor, eps_list: Sequence[float]) -> np.ndarray:
    """(R, E): the [2/2] Pade radius of each ray's KL series at each eps."""
    return np.stack([radius_pade(c2, c3, e, c4).cpu().numpy() for e in eps_list], axis=1)


def linf_radii(eps_list, lam: Tensor, diagonal: Tensor, corner: Tensor):
    """(P, E) lower and upper L-inf radii of the quadratic model (see geometry/linf.py)."""
    pairs = [linf_radius_bounds(e, lam, diagonal, corner) for e in eps_list]
    return tuple(np.stack([b[i].cpu().numpy() for b in pairs], axis=1) for i in (0, 1))


def positions_per_block(vocab_size: int, inner: bool = False) -> int:
    """Positions handled together (at the pre-logit vector and inside the network).

    Every (position, sign, eps) search of a block advances in lockstep, so each step is one
    batched evaluation (inside the network, one batched pass). At the pre-logit vector the
    block's (rays x V) float64 arrays (two rays per position) stay within the shared
    budget, at most 32 positions; its top directions come from a search batch of several
    blocks (``positions_per_search``).

    Inside the network (``inner=True``) at most 64: each pass there has a fixed cost (the
    Python of the blocks, the nest of derivative passes) that more rows share
    (docs/performance.md)."""
    return rows_within(2 * vocab_size, 8, cap=64 if inner else 32)


def positions_per_recorded_block(
    adapter: ModelAdapter, hook: str, n_positions: int, keys: int = 0
) -> int:
    """Positions per block inside the network: ``positions_per_block`` (inner), fewer where
    the pass recorded through the blocks after ``hook`` (their activations, and the attention
    over ``keys`` cached keys: the prompt's length) would outgrow ``budget.graph_bytes``, and
    blocks of equal size (64 positions at a cap of 40 are two blocks of 32, not 40 + 24).
    SmolLM2's default map of 64 positions: blocks of 32 from the embedding to block 4 and
    of 64 after; with blocks of 64 everywhere it peaked at 1.76 GB instead of 1.70 GB (both
    before the trace probes went float32 and wider: 1.86 GB with them)."""
    start = adapter.hook_points().index(hook)
    blocks = sum(1 for h in adapter.hook_points()[start + 1 :] if h.endswith("hook_resid_post"))
    width = adapter.d_resid + (getattr(adapter.config, "intermediate_size", None) or 0)
    itemsize = torch.finfo(adapter.compute_dtype).bits // 8
    cap = rows_recordable(
        blocks,
        width,
        itemsize,
        cap=positions_per_block(adapter.vocab_size, True),
        nested=not adapter.taylor_mode,
        heads=getattr(adapter.config, "num_attention_heads", None) or 0,
        keys=keys,
        budget=graph_bytes(adapter.device),
    )
    return equal_parts(n_positions, cap)


def positions_per_search(vocab_size: int) -> int:
    """Positions whose top directions one Lanczos run finds at a linear head: their float32
    probabilities within the array budget, at most 64. Its products with W are matrix
    products of that many rows, which run several times faster per row than a block's
    (``positions_per_block``) at large vocabularies (docs/performance.md)."""
    return rows_within(vocab_size, 4, cap=64)


def eig_tolerance(requested: float, dtype: torch.dtype) -> float:
    """The Lanczos tolerance a product in ``dtype`` can reach: products carry roundoff of
    ~1e2 units of the last place, so a float32 model stops at ~1e-4 relative residual (the
    eigenvalue's error is second order in it, below the products' own roundoff)."""
    return max(requested, 1e3 * torch.finfo(dtype).eps)


def top_vectors_linear(
    head: LogitHead, h: Tensor, u0: Tensor, tol: float, rtol: float = 1e-8
) -> Tensor:
    """Top eigenvectors (P, d) of ``H`` at pre-logit vectors ``h`` (P, d) of a linear head
    whose float64 logits are ``u0`` (P, V), every product with W in the weight's dtype.

    One position: ``top_eigenpair_float64`` (a Krylov space grown from the likely tokens'
    restricted problem, float64 where it decides the answer, stopped at relative accuracy
    ``rtol`` by a Kato-Temple estimate: 3-5 passes over W). Several: ``top_curvature``, all
    positions' Lanczos products in lockstep over vocabulary chunks (residual ``tol``), the
    faster from a few positions on (docs/performance.md)."""
    weight = head.weight
    if len(h) == 1:
        return top_eigenpair_float64(weight, h, bias=head.bias, rtol=rtol)[1]
    logits = u0.to(weight.dtype)  # the search reads the logits the model itself computes
    found = top_curvature(weight, logits, tol=tol, max_iter=min(64, head.d_model), refine=False)
    return found.vector


def summing_head(adapter: ModelAdapter) -> LogitHead:
    """The model's own head for products and sums: as stored for float32 / float64, the
    adapter's one float32 copy of the head for a 16-bit one (``ModelAdapter.summing_head``)."""
    return adapter.summing_head


def logit_derivatives(adapter: ModelAdapter, suffix: SuffixBatch, v: Tensor) -> list[Tensor]:
    """``[a1, a2, a3]`` (R, V) float64: the logits' first three derivatives along ``v`` (R, d),
    one direction per row of ``suffix``, from one pass of jets (or one nest of three
    forward-mode levels: ``SuffixBatch.directional_derivatives``). With a linear head the pass
    stops at the pre-logit vector and the head maps ``h1, h2, h3`` once."""
    head = adapter.stored_head
    if head.is_linear and PRELOGIT not in suffix.hooks:
        hs = suffix.directional_derivatives(v, 3, target=PRELOGIT)
        # one product for all three: the weight is upcast once (64 rows of SmolLM2: 94 ms
        # against 128 ms)
        return list(head.direction_float64(torch.cat(hs)).split(len(v)))
    return suffix.directional_derivatives(v, 3)


def taylor_radii(
    logp: Tensor,
    derivs: list[Tensor],
    origin: Tensor,
    eps_list: list[float],
    scale: np.ndarray,
    guesses: np.ndarray | None = None,
    rtol: float = 1e-6,
) -> np.ndarray:
    """(2N, E): the first crossings along the logits' Taylor paths (``TaylorPathKL``) of N
    directions with both signs (rays 2i, 2i + 1 = +v, -v of direction i, at origin
    ``origin[i]`` with log-probabilities ``logp`` (P, V)); ``scale`` (2N,) the origins' norms:
    the search starts at 1e-3 of it (each step is O(V), no pass through the network) and gives
    up at 1e6 of it; ``guesses`` only speed up the refinement."""
    path = TaylorPathKL(logp, derivs, origin=origin, both_signs=True)
    return measure_boundaries(
        path, eps_list, guesses=guesses, t_start=1e-3 * scale, t_max=1e6 * scale, rtol=rtol
    )


def scan_start(guesses: np.ndarray) -> np.ndarray:
    """Where a measurement through the network starts along each ray (R,): a quarter of the
    smallest predicted crossing (R, E). A scan from ``1e-3 |x0|`` spent most of its passes far
    below the boundary; at a quarter of it the KL is ~1/16 of the smallest eps by the series,
    which agrees with the model to fourth order (and the search still walks down where the KL
    there is already above it). ``0`` (the default start) where no prediction is finite."""
    finite = np.where(np.isfinite(guesses) & (guesses > 0), guesses, np.inf).min(1)
    return np.where(np.isfinite(finite), 0.25 * finite, 0.0)


def reliability(
    radius: np.ndarray, norm: np.ndarray, inner: bool, series: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(reliable, reason)`` of closed-form radii (any shape) at activations of norm
    ``norm`` (broadcast). Inside the network the Taylor-path radius is trusted up to
    ``RELIABLE_RELATIVE |h|``, where the Pade radius ``series`` (same shape) agrees with it to
    ``RELIABLE_AGREEMENT``, and not where the path never reaches eps; at the pre-logit vector
    the curve is exact."""
    radius = np.asarray(radius, dtype=float)
    reliable = np.ones(radius.shape, dtype=bool)
    reason = np.full(radius.shape, "", dtype=object)
    if not inner:  # at the pre-logit vector the curve is exact: even "never" (inf) is the answer
        return reliable, reason
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = radius / np.maximum(np.asarray(norm, dtype=float), 1e-300)
        if series is not None:
            apart = np.abs(np.asarray(series, dtype=float) / radius - 1.0)
            apart = np.where(np.isnan(apart), np.inf, apart)
            split = apart > RELIABLE_AGREEMENT
            reliable &= ~split
            reason[split] = (
                f"the Pade and Taylor-path radii differ by more than {RELIABLE_AGREEMENT:.0%}: "
                "the series' higher orders matter here"
            )
    far = relative > RELIABLE_RELATIVE
    reliable &= ~far
    reason[far] = f"radius beyond {RELIABLE_RELATIVE:g} |h|, where the Taylor path is not validated"
    none = ~np.isfinite(radius)
    reliable &= ~none
    reason[none] = "no crossing along the Taylor path"
    return reliable, reason


def series_along(
    adapter: ModelAdapter, suffix: SuffixBatch, p: Tensor, v: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``(c2, c3, c4)`` (P,) of the KL series along ``+v`` (P, d) from the suffix's hook.

    The logit derivatives ``a1, a2`` and ``Cov_p(a1, a3)`` by ``SuffixBatch.series_derivatives``.
    With a linear head the passes stop at the pre-logit vector and the head maps the
    derivatives once (``a_k = W h_k``, ``(F a1) . a3 = (W^T F a1) . h3``): the nest then carries
    (P, d) tangents, not (P, V) logits in every branch. A softcapped head is not linear: the
    passes run to the logits, as they do from the pre-logit vector itself."""
    head = adapter.stored_head

    def fisher(a1: Tensor) -> Tensor:  # F a1 = p * (a1 - p . a1)
        return p * (a1 - (p * a1).sum(-1, keepdim=True))

    if not head.is_linear or PRELOGIT in suffix.hooks:  # no blocks between: the logits
        a1, a2, cov13 = suffix.series_derivatives(v, fisher)
        return series_coefficients(p, [a1, a2], cov13=cov13)

    def pulled_back(h1: Tensor) -> Tensor:  # W^T F W h1, at least in float32
        return head.transpose_wide(fisher(head.direction_float64(h1)))

    h1, h2, cov13 = suffix.series_derivatives(v, pulled_back, target=PRELOGIT)
    a = [head.direction_float64(h) for h in (h1, h2)]
    return series_coefficients(p, a, cov13=cov13)


def closed_forms_along(
    adapter: ModelAdapter,
    suffix: SuffixBatch,
    v: Tensor,
    p: Tensor,
    eps_list: list[float],
    rtol: float,
    *,
    logp: Tensor | None = None,
    origin: Tensor | None = None,
    graph_free: bool = False,
) -> tuple[Tensor, np.ndarray, np.ndarray]:
    """``(c2 (R,), pade (2R, E), taylor (2R, E))`` along ``v`` (R, d), one direction per row of
    ``suffix`` with next-token probabilities ``p`` (R, V); the radii for ``+v`` and ``-v``
    (rays 2i, 2i + 1).

    The logits' derivatives ``a1..a3`` (``logit_derivatives``) give the series. Where the
    model runs in Taylor mode they always do; otherwise the nest of three forward-mode levels
    is slower at one recorded block than ``series_along`` (two levels and a reverse pass),
    which then gives the series, unless ``graph_free`` asks for the derivatives, which record
    no graph (many positions at once). With ``logp`` (P, V) (the log-probabilities at the
    origins, row i at ``origin[i]``) the derivatives also give the Taylor-path roots
    (``taylor_radii``); without, ``taylor`` is NaN (stability maps)."""
    if logp is not None or graph_free or adapter.taylor_mode:
        derivs = logit_derivatives(adapter, suffix, v)
        c2, c3, c4 = series_coefficients(p, derivs)
    else:
        c2, c3, c4 = series_along(adapter, suffix, p, v)
    # along -v the odd derivatives a1, a3 flip: c3 flips, c2 and c4 do not
    k2, k3, k4 = (rays(c[:, None], sign)[:, 0] for c, sign in ((c2, 1.0), (c3, -1.0), (c4, 1.0)))
    pade = pade_radii(k2, k3, k4, eps_list)
    taylor = np.full_like(pade, np.nan)
    if logp is not None:
        scale = suffix.x0.norm(dim=-1).clamp_min(1e-6).repeat_interleave(2).cpu().numpy()
        taylor = taylor_radii(logp, derivs, origin, eps_list, scale, pade, rtol)
    return c2, pade, taylor


def top_and_rank_estimate(
    op: PullbackOperator, tol: float, probes: int = 16
) -> tuple[Tensor, Tensor, Tensor]:
    """``(lambda_max (P,), effective rank (P,), top eigenvector (P, d))`` with ``tr G`` the
    Krylov space's trace plus ``probes`` Hutchinson probes (16: what maps and ``analyze`` at
    blocks use); ``probes=0``: no trace, the rank NaN."""
    if probes == 0:
        lam, vecs = op.top_eigenpairs(k=1, tol=tol)
        return lam[:, 0], torch.full_like(lam[:, 0], torch.nan), vecs[:, 0]
    lam, vecs, trace_g = op.top_eigenpairs_and_trace(k=1, tol=tol, probes=probes)
    return lam[:, 0], effective_rank(trace_g, lam[:, 0]), vecs[:, 0]
