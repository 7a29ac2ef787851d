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
    positions_per_recorded_block,
    quiet,
    rays,
    scan_start,
    top_and_rank_estimate,
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
) -> Iterator[Block]:
    """A hook inside the network: pullback curvature J^T F J by JVP/VJP through the suffix only.

    A block of positions at a time (``SuffixBatch``: each position's token against the cached
    keys/values of the prompt, one batch row each), so the Lanczos products, derivatives and
    boundary searches of the block are batched passes. ``trace="exact"``: d forward-mode
    products give the diagonal (the effective rank and the L-inf radii). ``trace="estimate"``
    (``analyze`` at blocks): the trace from the Krylov space of the Lanczos run (free) plus
    16 Hutchinson probes, and no L-inf radii. ``stage(name)`` is called as each stage
    begins. The radius along the logits' cubic Taylor path (``taylor_radii``) comes from the
    derivatives ``a1..a3``, which also give the Pade form. (Stability maps take every layer
    at once: ``engine.cells``.)
    """
    stage = stage or quiet
    E = len(eps_list)
    tol = eig_tolerance(eig_tol, adapter.compute_dtype)
    block = positions_per_recorded_block(adapter, hook, len(pos), ids.shape[1])
    for start in range(0, len(pos), block):
        chunk = pos[start : start + block]
        P = len(chunk)
        stage("suffix")
        suffix = SuffixBatch(adapter, ids, hook, chunk)
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
            lam, rank, v = top_and_rank_estimate(op, tol)
            linf = (np.full((P, E), np.nan), np.full((P, E), np.nan))
        p = op.p
        del op  # its recorded passes: the series records its own
        return_freed_memory()
        stage("derivatives")
        norm = suffix.x0.norm(dim=-1)
        logp = torch.log_softmax(suffix.logits0, -1)
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
            guess = on_path
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
