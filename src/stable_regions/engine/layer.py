"""Which engine a layer runs: the one place that decides final against inside the network."""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor

from ..models import ModelAdapter, is_final
from .common import Block, Stage
from .final import prelogit_blocks
from .inner import inner_blocks


def blocks_at(
    adapter: ModelAdapter,
    ids: Tensor,
    hook: str,
    positions: list[int],
    eps_list: list[float],
    *,
    exact: bool,
    rtol: float,
    eig_tol: float,
    trace: str | None = None,
    stage: Stage | None = None,
) -> Iterator[Block]:
    """The blocks of ``positions`` at ``hook``: ``prelogit_blocks`` at the pre-logit vector
    (the head's curvature is exact there: ``eig_tol`` and ``trace`` do not apply),
    ``inner_blocks`` inside the network, with the curvature's trace ``"exact"`` at the
    embedding and ``"estimate"`` elsewhere unless ``trace`` says otherwise."""
    if is_final(hook):
        return prelogit_blocks(adapter, ids, positions, eps_list, exact, rtol, stage)
    if trace is None:
        trace = "exact" if hook == adapter.hook_for_layer("embed") else "estimate"
    return inner_blocks(adapter, ids, hook, positions, eps_list, exact, rtol, eig_tol, trace, stage)
