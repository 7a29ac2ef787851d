"""The blocks ``certify`` reads: per block of positions, the certificate from below, the
worst case a gradient search finds from above, and the closed form along the top direction.

``prelogit_blocks`` at the pre-logit vector (the certificate from ``p`` and ``W`` alone, the
search in the certificate's subspace for L2); ``inner_blocks`` inside the network (the search
through the suffix; a certificate only at the last block's output, through the final norm's
Lipschitz bound).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..budget import rows_within
from ..engine import Stage, entropy, positions_per_recorded_block, summing_head
from ..geometry import (
    LogitHead,
    PullbackOperator,
    WideRows,
    prelogit_certificate,
    radius_pade,
    radius_through_norm,
    ritz_subspace,
    series_coefficients,
)
from ..models import ModelAdapter
from ..models.norms import NormSpec, describe_norm
from ..models.suffix import SuffixBatch
from ..probes.attack import KLTarget, SubspaceKL, unit, worst_case_search

SUBSPACE = 8  # the certificate's subspace: 6 Ritz vectors and 2 next-token directions
BY_HEAD = "p and W at the pre-logit vector (tilted-variance and Hoeffding bounds)"
BY_NORM = "the final norm's Lipschitz bound on the ball, then p and W"
NONE_INSIDE = (
    "none: no rigorous bound through the blocks (certificates exist at 'final' and at the "
    "last block's output)"
)


@dataclass(frozen=True, kw_only=True)
class CertifiedBlock:
    """One block of positions: the certificate, the search and the closed form, per position
    (P,) or per position and eps (P, E)."""

    positions: list[int]
    next_token_id: Tensor  # (P,)
    next_prob: Tensor  # (P,)
    entropy: Tensor  # (P,) nats
    lambda_max: Tensor  # (P,) the top curvature found
    lambda_upper: Tensor  # (P,) its certified upper bound (NaN where none)
    certified: np.ndarray  # (P, E) radius_certified
    certified_by: list[str]  # (P,) what proves each certified radius
    why_not: str  # what certified_by says where no radius is certified
    attack: np.ndarray  # (P, E) radius_attack
    quadratic: np.ndarray  # (P, E) radius_quadratic
    exact: np.ndarray  # (P, E) radius_exact


def quadratic_radii(lam: Tensor, top: Tensor, eps_list: list[float], norm: str) -> np.ndarray:
    """(P, E) ``sqrt(2 eps / v^T G v)`` along the top eigenvector ``top`` (P, d) scaled to unit
    norm: ``lambda_max`` for L2, ``lambda_max / |v|_inf^2`` for L-inf."""
    curvature = lam if norm == "l2" else lam / top.abs().amax(-1) ** 2
    e = torch.tensor(eps_list, dtype=torch.float64)
    return torch.sqrt(2.0 * e[None, :] / curvature.clamp_min(1e-300)[:, None].cpu()).numpy()


@dataclass(frozen=True)
class Search:
    """How the worst case is searched for: the norm, start directions, rounds, steps."""

    norm: str
    restarts: int
    rounds: int
    steps: int
    rtol: float

    def run(
        self, target: KLTarget, starts: Tensor, eps_list, guesses=None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(radius_attack, radius_exact)`` (P, E): the search from ``starts`` (P, S, d), and
        the exits along the top start's two signs alone (in the norm's units)."""
        found = worst_case_search(
            target,
            starts,
            eps_list,
            self.norm,
            rounds=self.rounds,
            steps=self.steps,
            rtol=self.rtol,
            guesses=guesses,
        )
        S = found.start_radii.shape[1] // 2  # the search's starts (a box adds corners)
        exact = np.minimum(found.start_radii[:, 0], found.start_radii[:, S])
        return found.radius, exact


def series_guesses(target: SubspaceKL, starts: Tensor, eps_list) -> np.ndarray:
    """(P, 2S, E) the [2/2] Pade radius of the KL along each start and its negative (the
    same rays as ``worst_case_search``'s), the quadratic one where Pade gives none: where
    Newton's method for the exits starts (SmolLM2, 60 positions: 2.6 evaluations per exit
    of the top rays against 3.2 from the quadratic radius, the same for both signs; starting
    1-3% above the Pade radius, to skip the step up from below, took more)."""
    P, S, _ = starts.shape
    c2, c3, c4 = (torch.empty(P, S, dtype=torch.float64, device=starts.device) for _ in range(3))
    for i in range(P):  # a position at a time: its (S, V) arrays stay in cache
        b = starts[i] @ target.tangents[i]
        c2[i], c3[i], c4[i] = series_coefficients(target.p0[i], [b])
    quadratic = torch.sqrt(2.0 / c2.clamp_min(1e-300))
    out = []
    for sign in (1.0, -1.0):
        per_eps = []
        for e in eps_list:
            r = radius_pade(c2, sign * c3, e, c4)
            per_eps.append(torch.where(torch.isfinite(r) & (r > 0), r, quadratic * math.sqrt(e)))
        out.append(torch.stack(per_eps, -1))
    return torch.cat(out, dim=1).cpu().numpy()


def prelogit_blocks(
    adapter: ModelAdapter,
    ids: Tensor,
    pos: list[int],
    eps_list: list[float],
    search: Search,
    stage: Stage,
):
    norm, restarts = search.norm, search.restarts
    head = summing_head(adapter)
    h_all = adapter.prelogits(ids, dtype=None)[pos].to(torch.float64)
    # a block's (positions x subspace x V) float64 logit tangents within 4 array budgets: one
    # block reads W once per Lanczos product for all its positions (SmolLM2: 64, Gemma-3: 16)
    block = rows_within(SUBSPACE * head.vocab_size, 8, cap=64) * 4
    block = min(64, block)
    # the Lanczos runs of several blocks at once (their float32 probabilities within the
    # array budget): each product then reads W once for all of them (Gemma-3, 61 positions:
    # one run instead of four blocks of 16)
    group = max(block, rows_within(head.vocab_size, 4) // block * block)
    subspace = None
    for start in range(0, len(pos), block):
        h = h_all[start : start + block]
        stage("certificate")
        if start % group == 0:
            subspace = ritz_subspace(head, h_all[start : start + group])
        at = start % group
        cert = prelogit_certificate(head, h, eps_list, norm, subspace=subspace[at : at + len(h)])
        stage("search")
        if norm == "l2":
            # in the certificate's subspace (its Ritz vectors and the next tokens' directions):
            # O(V m) per step from the exact logit tangents, no pass over W
            target = SubspaceKL(
                head.squash, cert.logits, cert.tangents, h.norm(dim=-1), head.is_linear
            )
            starts = cert.coefficients[:, :, :restarts].transpose(1, 2)
            guesses = series_guesses(target, starts, eps_list)
        else:  # the box is not a box in a subspace: the full space, a pass over W per step
            target = KLTarget(lambda x, _rows: head.logits(x), h, head.logits_float64(h))
            starts = cert.vectors[:, :restarts]
            guesses = None
        attack, exact = search.run(target, starts, eps_list, guesses)
        top_p, top_i = cert.p.max(-1)
        yield CertifiedBlock(
            positions=pos[start : start + len(h)],
            next_token_id=top_i,
            next_prob=top_p,
            entropy=entropy(cert.p),
            lambda_max=cert.ritz,
            lambda_upper=cert.upper,
            certified=cert.radius.cpu().numpy(),
            certified_by=[BY_HEAD] * len(h),
            why_not="none",
            attack=attack,
            quadratic=quadratic_radii(cert.ritz, cert.vectors[:, 0], eps_list, norm),
            exact=exact,
        )


def gained_head(head: LogitHead, spec: NormSpec) -> LogitHead:
    """``z = scale (W (g * y_hat + beta) + b)`` as a head on ``y_hat``: ``W diag(g)`` read a
    chunk of rows at a time (``WideRows``, no copy of the head) and bias ``b + W beta``."""
    stored = head.weight.stored if isinstance(head.weight, WideRows) else head.weight
    weight = WideRows(stored, head.weight.dtype, column_scale=spec.gain)
    bias = None if head.bias is None else head.bias.to(torch.float64)
    if spec.bias is not None:
        folded = head.raw_float64(spec.bias[None], bias=False)[0] / head.scale
        bias = folded if bias is None else bias + folded
    bias = None if bias is None else bias.to(head.weight.dtype)
    return LogitHead(weight, bias, head.scale, head.softcap)


def inner_blocks(
    adapter: ModelAdapter,
    ids: Tensor,
    hook: str,
    pos: list[int],
    eps_list: list[float],
    search: Search,
    stage: Stage,
    through_norm: bool,
):
    head = summing_head(adapter)
    block = positions_per_recorded_block(adapter, hook, len(pos), ids.shape[1])
    E = len(eps_list)
    prelogits, gained = None, None  # made once, for every block
    for start in range(0, len(pos), block):
        chunk = pos[start : start + block]
        P = len(chunk)
        stage("suffix")
        suffix = SuffixBatch(adapter, ids, hook, chunk)
        stage("curvature")
        op = PullbackOperator.from_suffix(suffix)
        lam, vecs = op.top_eigenpairs(k=search.restarts, tol=1e-4)
        p = op.p
        del op
        certified = np.full((P, E), np.nan)
        lam_upper = torch.full((P,), math.nan, dtype=torch.float64)
        why_not = NONE_INSIDE
        if through_norm:
            stage("certificate")
            spec, reason = describe_norm(adapter.final_norm, suffix.x0)
            if prelogits is None:
                prelogits = adapter.prelogits(ids, dtype=None)
            h = prelogits[chunk].to(torch.float64)
            out = None if spec is None else spec(suffix.x0)
            if out is not None and not (
                out.shape == h.shape and torch.allclose(out, h, 1e-4, 1e-5)
            ):
                spec, reason = None, "the head does not read the final norm's output directly"
            if spec is None:
                why_not = f"none: {reason}"
            else:
                # the gain belongs to the head: the certificate is taken for the norm's output
                # before its gain (a copy of W with the gain folded in), and the map to it,
                # y / sqrt(|y|^2/d + eps), has Lipschitz constant 1/n on the ball
                if gained is None:  # the norm's gain folded into W (a view): made once
                    gained = gained_head(head, spec)
                cert = prelogit_certificate(gained, spec.unit_output(suffix.x0), eps_list, "l2")
                lam_upper = cert.upper
                d = suffix.x0.shape[-1]
                radius = radius_through_norm(
                    cert.radius, spec.centred_norm(suffix.x0), 1.0, spec.eps, d
                )
                if search.norm == "linf":  # |delta|_2 <= sqrt(d) |delta|_inf
                    radius = radius / math.sqrt(d)
                certified = radius.cpu().numpy()
        stage("search")
        target = KLTarget(
            lambda x, r, s=suffix: s.logits(x - s.x0[r], r), suffix.x0, suffix.logits0
        )
        # the search differentiates in the perturbation only: the weights frozen (no weight-side
        # graph, no wide copy of a 16-bit head for its gradient)
        with adapter.frozen():
            attack, exact = search.run(target, unit(vecs, "l2"), eps_list)
        top_p, top_i = p.max(-1)
        yield CertifiedBlock(
            positions=chunk,
            next_token_id=top_i,
            next_prob=top_p,
            entropy=entropy(p),
            lambda_max=lam[:, 0],
            lambda_upper=lam_upper,
            certified=certified,
            certified_by=[BY_NORM] * P,
            why_not=why_not,
            attack=attack,
            quadratic=quadratic_radii(lam[:, 0], vecs[:, 0], eps_list, search.norm),
            exact=exact,
        )
        del target, suffix  # the cache goes now, not when the next block replaces it
