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

from .._support.inputs import as_adapter, check_eps, check_positions
from ..engine import Stage
from ..errors import InvalidParameterError
from ..models import is_final
from ..models.precision import full_float32_products
from ..plotting import new_figure
from ..results import Result, frame_records
from ..vocabulary import describe
from .certified_blocks import Search, inner_blocks, prelogit_blocks
from .substitutions import COLUMNS as SUBSTITUTION_COLUMNS
from .substitutions import token_substitutions

NORMS = ("l2", "linf")

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
    if is_final(hook):
        blocks = prelogit_blocks(adapter, ids, pos, eps_list, search, stage)
    else:
        blocks = inner_blocks(adapter, ids, hook, pos, eps_list, search, stage, hook == last_block)
    rows: list[dict] = []
    done = 0
    for b in blocks:
        next_tokens = adapter.token_strings(b.next_token_id)
        for j, position in enumerate(b.positions):
            for e_idx, e in enumerate(eps_list):
                cert = float(b.certified[j, e_idx])
                attack = float(b.attack[j, e_idx])
                rows.append(
                    dict(
                        position=position,
                        token=tokens[position],
                        next_token=next_tokens[j],
                        next_prob=float(b.next_prob[j]),
                        eps=e,
                        layer=label,
                        norm=norm,
                        entropy=float(b.entropy[j]),
                        lambda_max=float(b.lambda_max[j]),
                        lambda_upper=float(b.lambda_upper[j]),
                        radius_certified=cert,
                        certified_by=b.certified_by[j] if math.isfinite(cert) else b.why_not,
                        radius_attack=attack,
                        radius_quadratic=float(b.quadratic[j, e_idx]),
                        radius_exact=float(b.exact[j, e_idx]),
                        tightness=cert / attack if attack > 0 else math.nan,
                    )
                )
        done += len(b.positions)
        if progress is not None:
            progress(done, len(pos))
    swaps = []
    if substitutions:
        stage("substitutions")
        swaps = token_substitutions(adapter, ids, pos, eps_list, substitutions, rtol)
    return CertifyResult(adapter.name, prompt, label, norm, eps_list, rows, swaps)
