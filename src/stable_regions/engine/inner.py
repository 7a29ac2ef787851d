"""The engine inside the network: the pullback curvature through the suffix of the model,
the closed forms from the logits' derivatives (Taylor mode), the boundary measured through
the suffix."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from .._support.heap import return_freed_memory
from ..geometry import (
    PullbackOperator,
    effective_rank,
)
from ..models import ModelAdapter
from ..models.suffix import SuffixBatch
from ..probes import measure_from_suffix
from .common import (
    Block,
    Stage,
    closed_forms_along,
    eig_tolerance,
    entropy,
    linf_radii,
    nearest,
    positions_per_block,
    positions_per_recorded_block,
    quiet,
    rays,
    scan_start,
)


def inner_blocks(
    adapter: ModelAdapter,
    ids: Tensor,
    hook: str,
    pos: list[int],
    eps_list: list[float],
    exact: bool,
    rtol: float,
    eig_tol: float,
    trace: str = "exact",
    stage: Stage | None = None,
    shared_cache: SuffixBatch | None = None,
    curve: bool = True,
) -> Iterator[Block]:
    """A hook inside the network: pullback curvature J^T F J by JVP/VJP through the suffix only.

    A block of positions at a time (``SuffixBatch``: each position's token against the cached
    keys/values of the prompt, one batch row each), so the Lanczos products, derivatives and
    boundary searches of the block are batched passes. ``trace="exact"``: d forward-mode
    products give the diagonal (the effective rank and the L-inf radii). ``trace="estimate"``
    (stability maps, ``analyze`` at blocks): the trace from the Krylov space of the Lanczos run (free) plus 16
    Hutchinson probes, and no L-inf radii. ``stage(name)`` is called as each stage begins.
    ``shared_cache``: a suffix of the same prompt whose cached keys and values reach the
    last position (several layers of one prompt then share one pass over the prompt).
    ``curve``: the radius along the logits' cubic Taylor path (``taylor_radii``; its
    derivatives ``a1..a3`` also give the Pade form), else only the Pade form from the cheaper
    ``series_along`` (stability maps, where the model is not in Taylor mode), or, where the
    positions need several recorded blocks, from one pass of derivatives over all of them
    (``_map_chunks``).
    """
    stage = stage or quiet
    E = len(eps_list)
    tol = eig_tolerance(eig_tol, adapter.compute_dtype)
    block = positions_per_recorded_block(adapter, hook, len(pos), ids.shape[1])
    # maps whose positions the graph budget splits: the series of several blocks together
    cap = positions_per_block(adapter.vocab_size, inner=True)
    span = -(-len(pos) // -(-len(pos) // cap))  # equal chunks of at most cap positions
    if block < span and not (curve or exact) and trace == "estimate":
        yield from _map_chunks(
            adapter, ids, hook, pos, eps_list, tol, block, span, stage, shared_cache
        )
        return
    for start in range(0, len(pos), block):
        chunk = pos[start : start + block]
        P = len(chunk)
        stage("suffix")
        suffix = SuffixBatch(adapter, ids, hook, chunk, shared_cache=shared_cache)
        op = PullbackOperator.from_suffix(suffix)
        return_freed_memory()  # each stage's transients, not their sum with fragments
        if trace == "exact":
            stage("curvature")
            lam, vecs = op.top_eigenpairs(k=1, tol=tol)
            stage("trace")
            diagonal = op.diagonal()
            rank = effective_rank(diagonal.sum(-1), lam[:, 0])
            corner = op.quadratic_form(torch.sign(vecs[:, :1]))[:, 0]
            linf = linf_radii(eps_list, lam[:, 0], diagonal, corner)
            lam, v = lam[:, 0], vecs[:, 0]
        else:
            stage("curvature and trace estimate")
            lam, rank, v = _top_and_rank_estimate(op, tol)
            linf = (np.full((P, E), np.nan), np.full((P, E), np.nan))
        p = op.p
        del op  # its recorded passes: the series records its own
        return_freed_memory()
        stage("derivatives")
        norm = suffix.x0.norm(dim=-1)
        logp = torch.log_softmax(suffix.logits0, -1) if curve else None
        _, predicted, on_path = closed_forms_along(
            adapter,
            suffix,
            v,
            p,
            eps_list,
            rtol,
            logp=logp,
            origin=torch.arange(P, device=p.device),
        )
        if exact:
            stage("measuring")
            guess = on_path if curve else predicted
            measured = measure_from_suffix(
                suffix,
                rays(v, -1.0),
                eps_list,
                rows=torch.arange(P, device=p.device).repeat_interleave(2),
                guesses=guess,
                rtol=rtol,
                start=scan_start(guess),
            )
        else:
            measured = np.full_like(predicted, np.nan)
        top_p, top_i = p.max(-1)
        ent = entropy(p)
        # the cache goes now, not when the next block replaces it
        del suffix
        yield Block(
            positions=chunk,
            next_token_id=top_i,
            next_prob=top_p,
            entropy=ent,
            lambda_max=lam,
            effective_rank=rank,
            directions=v,
            pade=nearest(predicted),
            curve=nearest(on_path),
            exact=nearest(measured),
            linf_lower=linf[0],
            linf_upper=linf[1],
            activation_norm=norm,
        )


def _map_chunks(
    adapter: ModelAdapter,
    ids: Tensor,
    hook: str,
    pos: list[int],
    eps_list: list[float],
    tol: float,
    block: int,
    span: int,
    stage: Stage,
    shared_cache: SuffixBatch | None,
) -> Iterator[Block]:
    """``inner_blocks`` for stability maps (the trace estimated, no Taylor path, nothing
    measured) where the graph budget cuts a layer's positions into several recorded blocks:
    each block's Lanczos and trace as usual, then the series of ``span`` positions (several
    blocks) at once from the logits' derivatives (``logit_derivatives``), which record no
    graph and so are not cut: one pass of jets has a fixed cost (SmolLM2 from the embedding:
    0.14 s for one row, 0.43 s for 64), and without Taylor mode the three-level nest took
    3.3-3.7 s for 64 positions against 3 x 1.6-1.8 s for the series by blocks of 22."""
    E = len(eps_list)
    for start in range(0, len(pos), span):
        chunk = pos[start : start + span]
        whole = SuffixBatch(adapter, ids, hook, chunk, shared_cache=shared_cache)
        parts = []
        size = -(-len(chunk) // -(-len(chunk) // block))  # equal recorded blocks
        for first in range(0, len(chunk), size):
            stage("suffix")
            suffix = SuffixBatch(
                adapter, ids, hook, chunk[first : first + size], shared_cache=whole
            )
            op = PullbackOperator.from_suffix(suffix)
            stage("curvature and trace estimate")
            parts.append((*_top_and_rank_estimate(op, tol), op.p))
            del op, suffix  # their recorded passes
            return_freed_memory()
        lam, rank, v, p = (torch.cat(part) for part in zip(*parts, strict=True))
        del parts
        stage("derivatives")
        _, predicted, _ = closed_forms_along(adapter, whole, v, p, eps_list, 0.0, graph_free=True)
        top_p, top_i = p.max(-1)
        none = np.full((len(chunk), E), np.nan)
        norm = whole.x0.norm(dim=-1)
        del whole
        yield Block(
            positions=chunk,
            next_token_id=top_i,
            next_prob=top_p,
            entropy=entropy(p),
            lambda_max=lam,
            effective_rank=rank,
            directions=v,
            pade=nearest(predicted),
            curve=none,
            exact=none,
            linf_lower=none,
            linf_upper=none,
            activation_norm=norm,
        )


def _top_and_rank_estimate(op: PullbackOperator, tol: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(lambda_max (P,), effective rank (P,), top eigenvector (P, d))`` with ``tr G`` the
    Krylov space's trace plus 16 Hutchinson probes (what maps and ``analyze`` at blocks use)."""
    lam, vecs, trace_g = op.top_eigenpairs_and_trace(k=1, tol=tol, probes=16)
    return lam[:, 0], effective_rank(trace_g, lam[:, 0]), vecs[:, 0]
