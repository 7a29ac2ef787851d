"""``certify``: what can be guaranteed about a position, what a search finds, and the closed form.

For every position and eps, one row brackets the radius of the largest safe ball (L2) or box
(L-inf) about the activation at the layer: no perturbation inside it moves the next-token
distribution by KL > eps.

- ``radius_certified`` (from below): a proof from ``p`` and ``W`` alone at the pre-logit
  vector (``geometry.certificate``), and through the final norm's Lipschitz bound at the
  last block's output. NaN elsewhere, with the reason in ``certified_by``: no rigorous bound
  through the blocks is claimed.
- ``radius_attack`` (from above): the smallest measured exit that projected gradient ascent
  from the top curvature directions finds (``probes.attack``).
- ``radius_quadratic`` along the top eigenvector (``sqrt(2 eps / lambda_max)``, in the norm's
  units) and that direction's measured exit ``radius_exact``: the closed form between them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .._support.inputs import as_adapter, check_eps, check_positions
from ..budget import rows_within
from ..engine import Stage, entropy, positions_per_recorded_block, summing_head
from ..errors import InvalidParameterError
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
from ..models import PRELOGIT, ModelAdapter
from ..models.norms import NormSpec, describe_norm
from ..models.precision import full_float32_products
from ..models.suffix import SuffixBatch
from ..plotting import new_figure
from ..probes.attack import KLTarget, SubspaceKL, unit, worst_case_search
from ..results import Result, frame_records
from ..vocabulary import describe
from .substitutions import COLUMNS as SUBSTITUTION_COLUMNS
from .substitutions import token_substitutions

NORMS = ("l2", "linf")
SUBSPACE = 8  # the certificate's subspace: 6 Ritz vectors and 2 next-token directions

COLUMNS = [
    "position",
    "token",
    "next_token",
    "next_prob",
    "eps",
    "layer",
    "norm",
    "entropy",
    "lambda_max",
    "lambda_upper",
    "radius_certified",
    "certified_by",
    "radius_attack",
    "radius_quadratic",
    "radius_exact",
    "tightness",
]

BY_HEAD = "p and W at the pre-logit vector (tilted-variance and Hoeffding bounds)"
BY_NORM = "the final norm's Lipschitz bound on the ball, then p and W"
NONE_INSIDE = (
    "none: no rigorous bound through the blocks (certificates exist at 'final' and at the "
    "last block's output)"
)


@dataclass
class CertifyResult(Result):
    """One row per (position, eps) (``to_frame``; ``vocabulary`` defines every column), and
    with ``substitutions=K`` one row per (position, substitute, eps)
    (``substitutions_frame``)."""

    study = "certify"
    model: str
    prompt: str
    layer: str
    norm: str
    eps: list[float]
    rows: list[dict]
    substitutions: list[dict] = field(default_factory=list)

    def to_frame(self) -> pd.DataFrame:
        return describe(pd.DataFrame(self.rows, columns=COLUMNS))

    def substitutions_frame(self) -> pd.DataFrame:
        """One row per (position, substitute, eps) with ``substitutions=K``; see
        ``stable_regions.studies.substitutions``."""
        return describe(pd.DataFrame(self.substitutions, columns=SUBSTITUTION_COLUMNS))

    def summary(self) -> pd.DataFrame:
        """Per eps: positions, the median certified and attack radii and their ratio."""
        frame = self.to_frame()
        out = frame.groupby("eps").agg(
            n=("position", "size"),
            median_radius_certified=("radius_certified", "median"),
            median_radius_attack=("radius_attack", "median"),
            median_tightness=("tightness", "median"),
        )
        return describe(out.reset_index())

    def context(self) -> dict:
        return {
            "model": self.model,
            "prompt": self.prompt,
            "layer": self.layer,
            "norm": self.norm,
            "eps": self.eps,
        }

    def to_json(self) -> dict:
        """``{"model", "prompt", "layer", "norm", "eps", "rows"}`` (NaN as null, infinities
        as strings), and ``"substitutions"`` when they were asked for."""
        doc = super().to_json()
        if self.substitutions:
            doc["substitutions"] = frame_records(self.substitutions_frame())
        return doc

    def draw(self, ax=None, *, eps: float | None = None):
        """Along the prompt (log radius): the certified radius below, the worst case found
        above, the band between them where the true radius lies, and the top direction's
        exit and quadratic radius for comparison. Without ``ax``, one panel per eps; with
        it, the panel of ``eps`` (default the first)."""
        frame = self.to_frame()
        positions = sorted(frame.position.unique())
        if ax is None:
            width = min(40.0, max(7.0, 0.35 * len(positions) + 3.0))
            fig, axes = new_figure(
                len(self.eps), 1, figsize=(width, 2.6 * len(self.eps) + 1.0), sharex=True
            )
            panels = list(zip(axes[:, 0], self.eps, strict=True))
        else:
            fig = ax.figure
            panels = [(ax, self.eps[0] if eps is None else check_eps(eps)[0])]
        for panel, e in panels:
            self._panel(panel, frame, positions, e)
        panels[0][0].legend(fontsize=7, ncols=5, loc="lower left", bbox_to_anchor=(0.0, 1.12))
        tokens = frame.drop_duplicates("position").set_index("position").token
        labels = [f"{p}:{repr(tokens[p])[1:-1][:12]}" for p in positions]
        panels[-1][0].set_xticks(np.arange(len(positions)), labels, rotation=90, fontsize=7)
        if ax is None:
            fig.suptitle(
                f"{self.model}, layer '{self.layer}': how far before KL reaches eps", fontsize=10
            )
        return fig

    def _panel(self, ax, frame: pd.DataFrame, positions: list[int], eps: float) -> None:
        from matplotlib.ticker import FuncFormatter, LogLocator

        rows = frame[frame.eps == eps].set_index("position").reindex(positions)
        if rows["radius_certified"].isna().all() and rows["radius_attack"].isna().all():
            raise InvalidParameterError(f"eps {eps:g} is not one of this result's {self.eps}")

        def series(column: str) -> np.ndarray:
            values = rows[column].to_numpy(dtype=float)
            return np.where(np.isfinite(values) & (values > 0), values, np.nan)

        x = np.arange(len(positions))
        certified, attack = series("radius_certified"), series("radius_attack")
        ax.fill_between(
            x, certified, attack, color="tab:green", alpha=0.15, label="the true radius lies here"
        )
        ax.plot(x, attack, "v-", color="tab:red", ms=3, lw=1, label="worst case found")
        ax.plot(x, certified, "^-", color="tab:green", ms=3, lw=1, label="certified")
        ax.plot(x, series("radius_exact"), ":", color="0.35", lw=1, label="top direction's exit")
        ax.plot(x, series("radius_quadratic"), "--", color="0.6", lw=1, label="quadratic")
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_ylabel(f"{'L2' if self.norm == 'l2' else 'L-inf'} radius")
        ax.set_title(f"eps = {eps:g} nats", fontsize=9, loc="left")


def check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise InvalidParameterError(f"norm must be 'l2' or 'linf', got {norm!r}")
    return norm


@full_float32_products()
def certify(
    model,
    prompt: str,
    *,
    eps: float | Sequence[float] = (0.01, 0.1, 1.0),
    positions: str | int | Sequence[int] = "all",
    layer: str | int = "final",
    norm: str = "l2",
    substitutions: int = 0,
    restarts: int = 2,
    rounds: int = 1,
    steps: int = 4,
    rtol: float = 1e-6,
    chat: bool = False,
    progress: Callable[[int, int], None] | None = None,
    stage: Stage | None = None,
) -> CertifyResult:
    """Certified radius, worst case found by search, and the closed form, per position and eps.

    The true radius of the largest ball (or box) inside which no perturbation moves the
    next-token distribution by more than ``eps`` lies between ``radius_certified`` (proven)
    and ``radius_attack`` (the nearest exit a gradient search found).

    Parameters
    ----------
    model : str, ModelAdapter or transformers model
        As for :func:`analyze`.
    prompt : str
        The text.
    eps : float or list of float, default (0.01, 0.1, 1.0)
        KL thresholds (nats).
    positions : "all", "last", int or list of int, default "all"
        Token indices.
    layer : str or int, default "final"
        ``"final"`` (the pre-logit vector), ``"embed"``, a block index or a hook name. A
        certificate exists at ``final`` and at the last block's output (through the final
        norm); elsewhere ``radius_certified`` is NaN and ``certified_by`` says why.
    norm : {"l2", "linf"}, default "l2"
        A ball, or a box (radii in L-inf units).
    substitutions : int, default 0
        K > 0 also swaps each position's token for its K nearest tokens in the input
        embedding and reports the predicted and the measured effect
        (``substitutions_frame()``).
    restarts : int, default 2
        Top curvature directions the search starts from (each with both signs).
    rounds, steps : int
        Search rounds, and gradient steps per round.
    rtol : float, default 1e-6
        Relative tolerance of the measured exits.
    chat : bool, default False
        Put the prompt in the tokenizer's chat template as a user message, the assistant's
        turn opened: what an instruct model expects (positions then count the template's
        tokens too).
    progress, stage : callable, optional
        As for :func:`analyze`.

    Returns
    -------
    CertifyResult

    Examples
    --------
    >>> cert = sr.certify(model, "The capital of France is", eps=0.1, positions="last")
    >>> cert.to_frame()[["radius_certified", "radius_attack", "tightness"]]  # doctest: +SKIP
    """
    adapter = as_adapter(model)
    eps_list = check_eps(eps)
    norm = check_norm(norm)
    if restarts < 1 or rounds < 0 or steps < 0:
        raise InvalidParameterError("restarts must be >= 1, rounds and steps >= 0")
    if isinstance(substitutions, bool) or not isinstance(substitutions, int) or substitutions < 0:
        raise InvalidParameterError(
            f"substitutions must be a whole number K >= 1 of nearest tokens (0: none), got {substitutions!r}"
        )
    hook = adapter.hook_for_layer(layer)
    label = adapter.layer_name(layer)
    ids = adapter.tokenize(prompt, chat=chat)
    pos = check_positions(positions, ids.shape[1])
    tokens = adapter.token_strings(ids[0])
    stage = stage or (lambda _: None)
    last_block = adapter.hook_for_layer(adapter.n_layers - 1)
    search = Search(norm, restarts, rounds, steps, rtol)
    if hook == PRELOGIT:
        blocks = _prelogit(adapter, ids, pos, eps_list, search, stage)
    else:
        blocks = _inner(adapter, ids, hook, pos, eps_list, search, stage, hook == last_block)
    rows: list[dict] = []
    done = 0
    for b in blocks:
        next_tokens = adapter.token_strings(b["top"])
        for j, position in enumerate(b["positions"]):
            for e_idx, e in enumerate(eps_list):
                cert = float(b["certified"][j, e_idx])
                attack = float(b["attack"][j, e_idx])
                rows.append(
                    dict(
                        position=position,
                        token=tokens[position],
                        next_token=next_tokens[j],
                        next_prob=float(b["top_p"][j]),
                        eps=e,
                        layer=label,
                        norm=norm,
                        entropy=float(b["entropy"][j]),
                        lambda_max=float(b["lam"][j]),
                        lambda_upper=float(b["lam_upper"][j]),
                        radius_certified=cert,
                        certified_by=b["by"][j] if math.isfinite(cert) else b["why_not"],
                        radius_attack=attack,
                        radius_quadratic=float(b["quadratic"][j, e_idx]),
                        radius_exact=float(b["exact"][j, e_idx]),
                        tightness=cert / attack if attack > 0 else math.nan,
                    )
                )
        done += len(b["positions"])
        if progress is not None:
            progress(done, len(pos))
    swaps = []
    if substitutions:
        stage("substitutions")
        swaps = token_substitutions(adapter, ids, pos, eps_list, substitutions, rtol)
    return CertifyResult(adapter.name, prompt, label, norm, eps_list, rows, swaps)


def _quadratic(lam: Tensor, top: Tensor, eps_list: list[float], norm: str) -> np.ndarray:
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


def _series_guesses(target: SubspaceKL, starts: Tensor, eps_list) -> np.ndarray:
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


def _prelogit(
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
            guesses = _series_guesses(target, starts, eps_list)
        else:  # the box is not a box in a subspace: the full space, a pass over W per step
            target = KLTarget(lambda x, _rows: head.logits(x), h, head.logits_float64(h))
            starts = cert.vectors[:, :restarts]
            guesses = None
        attack, exact = search.run(target, starts, eps_list, guesses)
        top_p, top_i = cert.p.max(-1)
        yield dict(
            positions=pos[start : start + len(h)],
            top=top_i,
            top_p=top_p,
            entropy=entropy(cert.p),
            lam=cert.ritz,
            lam_upper=cert.upper,
            certified=cert.radius.cpu().numpy(),
            by=[BY_HEAD] * len(h),
            why_not="none",
            attack=attack,
            quadratic=_quadratic(cert.ritz, cert.vectors[:, 0], eps_list, norm),
            exact=exact,
        )


def _gained_head(head: LogitHead, spec: NormSpec) -> LogitHead:
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


def _inner(
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
                    gained = _gained_head(head, spec)
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
        yield dict(
            positions=chunk,
            top=top_i,
            top_p=top_p,
            entropy=entropy(p),
            lam=lam[:, 0],
            lam_upper=lam_upper,
            certified=certified,
            by=[BY_NORM] * P,
            why_not=why_not,
            attack=attack,
            quadratic=_quadratic(lam[:, 0], vecs[:, 0], eps_list, search.norm),
            exact=exact,
        )
        del target, suffix  # the cache goes now, not when the next block replaces it
