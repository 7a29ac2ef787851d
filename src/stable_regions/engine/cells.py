"""The cells of a stability map inside the network, every layer at once.

A map asks, at each of several hooks and positions, for ``lambda_max``, the effective rank
(estimated) and the Pade radius: the same pullback operator and series as ``inner_blocks``
with ``trace="estimate"``. A ``SuffixBatch`` row may be perturbed at its own hook (it runs
the network from the shallowest hook of its batch, and its activation is replaced at its own
hook), so the cells of all layers share every Lanczos pass instead of one pass per layer:
fewer passes through the network, each with more rows. The recorded passes are cut, in
order of depth, into chunks of rows that fit the graph budget of a suffix from each chunk's
shallowest hook; the series into chunks of ``positions_per_block`` rows (they record no
graph).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from .._support.heap import return_freed_memory
from ..geometry import PullbackOperator
from ..models import ModelAdapter
from ..models.suffix import SuffixBatch
from .common import (
    Block,
    Stage,
    closed_forms_along,
    eig_tolerance,
    entropy,
    nearest,
    positions_per_block,
    positions_per_recorded_block,
    quiet,
    top_and_rank_estimate,
)


def map_cells(
    adapter: ModelAdapter,
    ids: Tensor,
    hooks: list[str],
    pos: list[int],
    eps: float,
    eig_tol: float,
    *,
    stage: Stage | None = None,
    shared_cache: SuffixBatch | None = None,
    progress: Callable[[int], None] | None = None,
    probes: int = 16,
) -> dict[str, Block]:
    """One ``Block`` per hook inside the network (all of ``pos``): ``lambda_max``, the
    effective rank from the Krylov space's trace and ``probes`` Hutchinson probes (0: none,
    the rank NaN), the top direction, and the Pade radius at ``eps`` (the nearer of
    ``+-v``); nothing measured. ``progress(n)`` is called with the cells done after each
    recorded chunk."""
    stage = stage or quiet
    tol = eig_tolerance(eig_tol, adapter.compute_dtype)
    order = sorted(hooks, key=adapter.hook_points().index)  # shallowest first
    cells = [(hook, p) for hook in order for p in pos]
    span = positions_per_block(adapter.vocab_size, inner=True)
    found: list[tuple[Tensor, ...]] = []
    start = 0
    while start < len(cells):
        # a chunk runs from its shallowest hook: deeper chunks record less and hold more rows
        cap = positions_per_recorded_block(
            adapter, cells[start][0], len(cells) - start, ids.shape[1]
        )
        chunk = cells[start : start + cap]
        start += len(chunk)
        stage("suffix")
        suffix = SuffixBatch(
            adapter, ids, [h for h, _ in chunk], [p for _, p in chunk], shared_cache=shared_cache
        )
        op = PullbackOperator.from_suffix(suffix)
        stage("curvature and trace estimate" if probes else "curvature")
        found.append(top_and_rank_estimate(op, tol, probes))
        del op, suffix  # their recorded passes
        return_freed_memory()
        if progress is not None:
            progress(len(chunk))
    lam, rank, v = (torch.cat(part) for part in zip(*found, strict=True))
    del found
    stage("derivatives")
    pade = np.empty((2 * len(cells), 1))
    # per cell: |h|, the next token, its probability, the entropy (p itself is not kept: it
    # is (cells x V) float64, 0.3 GB for Gemma-3's default map)
    norm = torch.empty(len(cells), dtype=torch.float64)
    top_p = torch.empty(len(cells), dtype=torch.float64)
    ent = torch.empty(len(cells), dtype=torch.float64)
    top_i = torch.empty(len(cells), dtype=torch.long)
    for start in range(0, len(cells), span):
        part = slice(start, start + span)
        chunk = cells[part]
        whole = SuffixBatch(
            adapter, ids, [h for h, _ in chunk], [q for _, q in chunk], shared_cache=shared_cache
        )
        p = torch.softmax(whole.logits0, -1)
        _, radii, _ = closed_forms_along(adapter, whole, v[part], p, [eps], 0.0, graph_free=True)
        pade[2 * start : 2 * start + 2 * len(chunk)] = radii
        norm[part] = whole.x0.norm(dim=-1).to(norm.dtype).cpu()
        best, index = p.max(-1)
        top_p[part], top_i[part], ent[part] = best.cpu(), index.cpu(), entropy(p).cpu()
        del whole, p
    pade = nearest(pade)
    out = {}
    for i, hook in enumerate(order):
        rows = slice(i * len(pos), (i + 1) * len(pos))
        none = np.full((len(pos), 1), np.nan)
        out[hook] = Block(
            positions=list(pos),
            next_token_id=top_i[rows],
            next_prob=top_p[rows],
            entropy=ent[rows],
            lambda_max=lam[rows],
            effective_rank=rank[rows],
            directions=v[rows],
            pade=pade[rows],
            curve=none,
            exact=none,
            linf_lower=none,
            linf_upper=none,
            activation_norm=norm[rows],
        )
    return out
