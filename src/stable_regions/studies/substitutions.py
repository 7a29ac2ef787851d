"""Token substitutions at the embedding: does swapping a token for a near neighbour flip the output?

The familiar claim that "a tiny change to a prompt flips the answer" made concrete. For each
position and its K nearest tokens in the input-embedding space, the substitution is a move of
the activation entering block 0 by ``delta = x(substitute) - x(token)`` (captured from the
model itself, so embedding scales and projections are the model's own). Per eps:

- ``distance = |delta|``;
- ``radius_curve``: the best closed form along ``delta`` (the exact KL root along the
  logits' cubic Taylor path through the network, ``engine.closed_forms_along``), and
  ``flips_predicted = radius_curve < distance``;
- ``kl_substituted``: the KL of the next-token distribution at that position after actually
  substituting the token and running the model, and ``flips_measured = kl_substituted > eps``;
- ``radius_exact``: the measured first crossing of eps along ``delta`` (a check of the
  prediction; at ``t = distance`` the ray is the substitution itself).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..budget import rows_within
from ..engine import closed_forms_along, scan_start
from ..models import ModelAdapter
from ..models.suffix import SuffixBatch
from ..probes import measure_from_suffix

COLUMNS = [
    "position",
    "token",
    "substitute",
    "substitute_id",
    "distance",
    "eps",
    "radius_curve",
    "radius_exact",
    "kl_substituted",
    "flips_predicted",
    "flips_measured",
]


def nearest_tokens(
    embedding: Tensor, tokens: Tensor, k: int, *, chunk: int | None = None
) -> Tensor:
    """(P, k) the ``k`` rows of ``embedding`` (V, d) nearest (L2) to each of ``tokens`` (P,),
    the token itself excluded. The vocabulary goes a chunk at a time, upcast to float32 there,
    keeping the k best so far: no float32 copy of the embedding, no (P, V) array. ``chunk``:
    vocabulary rows at a time (default: 64 MiB of float32)."""
    V, d = embedding.shape
    k = min(k, V - 1)
    query = embedding[tokens].to(torch.float32)
    query_norms = (query * query).sum(-1)
    best = torch.empty(len(tokens), 0, dtype=torch.float32, device=embedding.device)
    best_ids = torch.empty(len(tokens), 0, dtype=torch.long, device=embedding.device)
    step = chunk or rows_within(d, 4)
    for s in range(0, V, step):
        e = embedding[s : s + step].to(torch.float32)
        d2 = (e * e).sum(-1)[None, :] - 2.0 * (query @ e.T) + query_norms[:, None]
        ids = torch.arange(s, s + len(e), device=embedding.device)
        d2 = d2.masked_fill(ids[None, :] == tokens[:, None], float("inf"))
        best, pick = torch.cat([best, d2], 1).topk(min(k, best.shape[1] + len(e)), largest=False)
        best_ids = torch.cat([best_ids, ids.expand(len(tokens), -1)], 1).gather(1, pick)
    return best_ids


def _substituted(
    adapter: ModelAdapter, ids: Tensor, hook: str, position: int, subs: Tensor
) -> tuple[Tensor, Tensor]:
    """The hook activation (k, d) and next-token log-probabilities (k, V) at ``position`` with
    the token there replaced by each of ``subs`` (k,): whole forward passes of the prefix."""
    prefix = ids[:, : position + 1].repeat(len(subs), 1)
    prefix[:, position] = subs
    seen: list[Tensor] = []
    with torch.no_grad(), adapter.capture(hook, seen):
        out = adapter.forward(prefix, use_cache=False, **adapter.last_logits_only())
        logits = out.logits[:, -1]
    return seen[0][:, position].to(torch.float64), torch.log_softmax(logits.double(), -1)


def token_substitutions(
    adapter: ModelAdapter,
    ids: Tensor,
    positions: list[int],
    eps_list: list[float],
    k: int,
    rtol: float = 1e-6,
) -> list[dict]:
    """One row per (position, substitute, eps); see ``COLUMNS`` and the module doc."""
    hook = adapter.hook_for_layer("embed")
    embedding = adapter.input_embedding
    tokens = ids[0, positions]
    subs = nearest_tokens(embedding, tokens, k)  # (P, k)
    seen: list[Tensor] = []
    with torch.no_grad(), adapter.capture(hook, seen):
        base = adapter.forward(ids[:, : max(positions) + 1], use_cache=False).logits[0]
    x0 = seen[0][0].to(torch.float64)
    logp0 = torch.log_softmax(base.double(), -1)
    deltas, kls, rows = [], [], []
    for j, position in enumerate(positions):
        x_sub, logq = _substituted(adapter, ids, hook, position, subs[j])
        deltas.append(x_sub - x0[position])
        lp = logp0[position]
        kls.append((lp.exp() * (lp - logq)).sum(-1))
        rows += [position] * subs.shape[1]
    delta = torch.cat(deltas)  # (R, d)
    kl = torch.cat(kls)
    distance = delta.norm(dim=-1)
    v = delta / distance.clamp_min(1e-300)[:, None]
    suffix = SuffixBatch(adapter, ids, hook, rows)
    logp = torch.log_softmax(suffix.logits0, -1)
    _, _, taylor = closed_forms_along(
        adapter, suffix, v, logp.exp(), eps_list, rtol, logp=logp, origin=torch.arange(len(rows))
    )
    predicted = taylor[0::2]  # a substitution has a sign: the +v ray only
    measured = measure_from_suffix(
        suffix,
        v,
        eps_list,
        rows=torch.arange(len(rows)),
        guesses=predicted,
        rtol=rtol,
        start=scan_start(predicted),
    )
    names = adapter.token_strings(ids[0])
    sub_names = adapter.token_strings(subs.reshape(-1))
    out = []
    for r, position in enumerate(rows):
        for e_idx, eps in enumerate(eps_list):
            dist = float(distance[r])
            pred = float(predicted[r, e_idx])
            out.append(
                dict(
                    position=position,
                    token=names[position],
                    substitute=sub_names[r],
                    substitute_id=int(subs.reshape(-1)[r]),
                    distance=dist,
                    eps=eps,
                    radius_curve=pred,
                    radius_exact=float(measured[r, e_idx]),
                    kl_substituted=float(kl[r]),
                    flips_predicted=bool(np.isfinite(pred) and pred < dist),
                    flips_measured=bool(kl[r] > eps),
                )
            )
    return out
