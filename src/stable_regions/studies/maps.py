"""Stability maps: which layers and positions of a prompt are fragile.

A grid over (layer x position) of the top curvature eigenvalue ``lambda_max``, the closed-form
radius at one eps (``radius_pade``, the [2/2] Pade form of the KL's series; ``radius_quadratic`` is kept
beside it) and the effective rank ``tr G / lambda_max``. Nothing is measured on the model: a map
is the cheap overview, ``analyze`` checks any cell against the truth.

The cells trade a little accuracy for speed. At the final layer they come in float32 from
the logits, as a document scan's do (``scan.Scanner`` and ``geometry.curvature_trace``, no
float64 copy of the head; within ~1e-6 of float64 on a tiny model). Inside the network all
positions of a layer go
through the network together (``models.suffix.SuffixBatch``) in the model's own precision
(float32 for the bundled models: lambda_max within 1e-5 of float64 on SmolLM2), all layers
share one pass over the prompt for the cached keys and values, Lanczos stops at a looser
tolerance (``eig_tol``, default 1e-3 relative residual: lambda_max within 1e-6 of a run to
the float32 floor of 1.2e-4 at SmolLM2's embedding and blocks 4, 15 and 25, 64 positions
each, for one product fewer out of 8-12) and the trace behind the effective rank is the
Krylov space's trace (free from Lanczos) plus 16 Hutchinson probes for the rest (over 32
positions x 3 seeds of a 64-token prompt, against d products: median error 1.0% at
SmolLM2's embedding and 1.6% at block 15, at most 5.2% and 6.9%; 8 probes left up to 11%,
and a looser 3e-3 tolerance, a smaller Krylov space, up to 8.8%). The final layer's search
stops at 1e-4: it costs little there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .._support.heap import return_freed_memory
from .._support.inputs import as_adapter, check_eps, check_positions, json_value
from ..engine import map_cells, prelogit_blocks
from ..errors import InvalidParameterError
from ..geometry import curvature_trace, effective_rank, radius_quadratic
from ..models import ModelAdapter, is_final
from ..models.layers import check_layers
from ..models.precision import full_float32_products
from ..models.suffix import SuffixBatch
from ..plotting import new_figure
from ..results import Result
from ..vocabulary import describe
from .scan import Scanner, position_block

QUANTITIES = ("radius_pade", "lambda_max", "effective_rank")


def default_layers(n_layers: int, count: int = 8) -> list[str | int]:
    """``embed``, ``count`` evenly spaced blocks (first and last included), ``final``."""
    blocks = sorted({round(x) for x in np.linspace(0, n_layers - 1, min(count, n_layers))})
    return ["embed", *blocks, "final"]


GRIDS = ("radius_pade", "radius_quadratic", "lambda_max", "effective_rank", "activation_norm")


@dataclass
class StabilityMap(Result):
    """Grids over (layer x position): rows follow ``layers``, columns ``positions``.
    ``to_frame`` has one row per cell; ``to_json`` keeps the grids (``[layer][position]``)."""

    study = "map"
    model: str
    prompt: str
    eps: float
    layers: list[str]
    positions: list[int]
    tokens: list[str]
    radius_pade: np.ndarray
    radius_quadratic: np.ndarray
    lambda_max: np.ndarray
    effective_rank: np.ndarray
    activation_norm: np.ndarray  # |h| of each cell: the activation's norm there

    @property
    def radius_relative(self) -> np.ndarray:
        """``radius_pade / |h|``: layers with different activation scales compare on it."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.radius_pade / self.activation_norm

    def to_frame(self) -> pd.DataFrame:
        """One row per (layer, position) cell."""
        n_l, n_p = self.radius_pade.shape
        columns = {
            "layer": np.repeat(self.layers, n_p),
            "position": np.tile(self.positions, n_l),
            "token": np.tile(np.asarray(self.tokens, dtype=object), n_l),
            "eps": self.eps,
            **{name: getattr(self, name).ravel() for name in GRIDS},
            "radius_relative": self.radius_relative.ravel(),
        }
        return describe(pd.DataFrame(columns))

    def summary(self) -> pd.DataFrame:
        """Per layer: the median and smallest Pade radius (absolute and relative to |h|), the
        median ``lambda_max`` and effective rank, and the position of the smallest radius."""
        frame = self.to_frame()
        rows = []
        for layer in self.layers:
            g = frame[frame.layer == layer]
            low = g.loc[g.radius_pade.idxmin()] if g.radius_pade.notna().any() else None
            rows.append(
                {
                    "layer": layer,
                    "eps": self.eps,
                    "median_radius_pade": float(g.radius_pade.median()),
                    "min_radius_pade": float(g.radius_pade.min()),
                    "median_radius_relative": float(g.radius_relative.median()),
                    "median_lambda_max": float(g.lambda_max.median()),
                    "median_effective_rank": float(g.effective_rank.median()),
                    "min_position": None if low is None else int(low.position),
                }
            )
        return describe(pd.DataFrame(rows))

    def to_json(self) -> dict:
        def grid(a: np.ndarray) -> list[list]:
            return [[json_value(x) for x in row] for row in a.tolist()]

        return {
            "model": self.model,
            "prompt": self.prompt,
            "eps": self.eps,
            "layers": self.layers,
            "positions": self.positions,
            "tokens": self.tokens,
            **{name: grid(getattr(self, name)) for name in GRIDS},
            "radius_relative": grid(self.radius_relative),
        }

    def draw(self, ax=None, *, quantity: str | None = None, relative: bool = False):
        """Heatmaps, tokens across and layers down: without ``ax`` three panels (the Pade
        radius, ``lambda_max``, the effective rank where the map has it); with it, the panel
        of ``quantity`` (``radius_pade``, ``radius_relative``, ``lambda_max`` or
        ``effective_rank``).
        ``relative``: the radius panel shows ``radius_pade / |h|``."""
        radius = "radius_relative" if relative else "radius_pade"
        names = [radius, "lambda_max", "effective_rank"]
        if quantity is not None:
            if quantity not in (*names, "radius_pade", "radius_relative"):
                raise InvalidParameterError(
                    f"quantity must be radius_pade, radius_relative, lambda_max or "
                    f"effective_rank, got {quantity!r}"
                )
            names = [quantity]
        elif ax is not None:
            names = [radius]
        elif not np.isfinite(self.effective_rank).any():  # a map made without it
            names.remove("effective_rank")
        n_l, n_p = self.radius_pade.shape
        if ax is None:
            width = min(40.0, max(7.0, 0.42 * n_p + 2.5))
            fig, axes = new_figure(len(names), 1, figsize=(width, len(names) * (0.3 * n_l + 1.4)))
            axes = list(axes[:, 0])
        else:
            fig, axes = ax.figure, [ax]
        for panel, name in zip(axes, names, strict=True):
            self._heatmap(fig, panel, name)
        if ax is None:
            fig.suptitle(f"{self.model}: stability map", fontsize=10)
        return fig

    def _heatmap(self, fig, ax, name: str) -> None:
        from matplotlib.colors import LogNorm

        titles = {
            "radius_pade": (f"radius_pade at eps={self.eps:g} (log)", "viridis"),
            "radius_relative": (f"radius_pade / |h| at eps={self.eps:g} (log)", "viridis"),
            "lambda_max": ("lambda_max: top curvature eigenvalue (log)", "magma"),
            "effective_rank": ("effective rank = tr G / lambda_max (log)", "cividis"),
        }
        title, cmap = titles[name]
        data = getattr(self, name)
        n_l, n_p = data.shape
        labels = [
            f"{p}:{_token_label(t)}" for p, t in zip(self.positions, self.tokens, strict=True)
        ]
        shown = np.where(np.isfinite(data) & (data > 0), data, np.nan)
        finite = shown[np.isfinite(shown)]
        norm = LogNorm(finite.min(), finite.max()) if finite.size and finite.min() > 0 else None
        image = ax.imshow(shown, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
        ax.set_title(title, fontsize=9, loc="left")
        ax.set_yticks(range(n_l), [str(x) for x in self.layers], fontsize=7)
        ax.set_xticks(range(n_p), labels, rotation=90, fontsize=7)
        ax.set_ylabel("layer")
        fig.colorbar(image, ax=ax, fraction=0.025, pad=0.01)


@full_float32_products()
def stability_map(
    model,
    prompt: str,
    *,
    eps: float | Sequence[float] = 0.1,
    positions: str | int | Sequence[int] = "all",
    layers: Sequence[str | int] | str | None = None,
    eig_tol: float = 1e-3,
    rank_probes: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> StabilityMap:
    """The (layer x position) grid of the Pade radius at ``eps``, ``lambda_max`` and the
    effective rank: where a prompt is fragile, at which depth.

    Parameters
    ----------
    model : str, ModelAdapter or transformers model
        As for :func:`analyze`.
    prompt : str
        The text.
    eps : float or list of one float, default 0.1
        The KL threshold (nats) of the radius grid. A map is drawn at one eps.
    positions : "all", "last", int or list of int, default "all"
        The token positions (columns).
    layers : None, "all" or list, optional
        ``None``: ``embed``, 8 evenly spaced blocks and ``final``; ``"all"``: every layer;
        or a list of ``"embed"``, ``"final"``, block indices and hook names
        (``blocks.{i}.hook_resid_post``).
    eig_tol : float, default 1e-3
        The Lanczos tolerance inside the network (relative residual).
    rank_probes : int, default 16
        Hutchinson probes behind the effective rank inside the network (beside the Krylov
        space's exact part; the final layer's trace is exact). ``0``: no effective rank (the
        grid is NaN), for a map of the radii about 30% sooner.
    progress : callable, optional
        Called as ``progress(done, total)`` after each block of cells.

    Returns
    -------
    StabilityMap
        ``to_frame()`` one row per cell; ``plot()`` three heatmaps; ``save(directory)``.

    Examples
    --------
    >>> smap = sr.stability_map(model, "The capital of France is", layers=["embed", 15, "final"])
    >>> smap.summary()  # doctest: +SKIP
    """
    eps_list = check_eps(eps)
    if len(eps_list) != 1:
        raise InvalidParameterError(
            f"a map is drawn at one eps, got {len(eps_list)} ({eps_list}): make one map per eps"
        )
    (e,) = eps_list
    if isinstance(rank_probes, bool) or not isinstance(rank_probes, int) or rank_probes < 0:
        raise InvalidParameterError(
            f"rank_probes must be a whole number >= 0 (0: no effective rank), got {rank_probes!r}"
        )
    adapter = as_adapter(model)
    layer_list = check_layers(layers, adapter.n_layers, default=default_layers(adapter.n_layers))
    hooks = [adapter.hook_for_layer(layer) for layer in layer_list]  # validates before any work
    ids = adapter.tokenize(prompt)
    pos = check_positions(positions, ids.shape[1])
    shape = (len(layer_list), len(pos))
    grids = {
        name: np.full(shape, np.nan)
        for name in (*QUANTITIES, "radius_quadratic", "activation_norm")
    }
    total, done = shape[0] * shape[1], 0
    cache = None  # the prompt's keys and values, computed once for every inner layer
    inner = [hook for hook in hooks if not is_final(hook)]
    if inner and max(pos) > 0:
        cache = SuffixBatch(adapter, ids, inner[0], [max(pos)])

    def cells_done(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    # every layer inside the network at once: the cells share each pass (engine.cells)
    inside = {}
    if inner:
        inside = map_cells(
            adapter,
            ids,
            inner,
            pos,
            e,
            eig_tol,
            shared_cache=cache,
            progress=cells_done,
            probes=rank_probes,
        )
    for i, hook in enumerate(hooks):
        if is_final(hook) and adapter.logit_softcap is None:
            blocks = _final_layer_cells(adapter, ids, pos, e, min(eig_tol, 1e-4), rank_probes > 0)
        elif is_final(hook):  # softcapped logits: the float64 head's exact operator
            blocks = prelogit_blocks(adapter, ids, pos, [e], exact=False, rtol=1e-6)
        else:
            blocks = [inside[hook]]
        for b in blocks:
            cols = [pos.index(p) for p in b.positions]
            grids["lambda_max"][i, cols] = b.lambda_max.cpu().numpy()
            if rank_probes:
                grids["effective_rank"][i, cols] = b.effective_rank.cpu().numpy()
            grids["radius_pade"][i, cols] = b.pade[:, 0]
            grids["radius_quadratic"][i, cols] = radius_quadratic(b.lambda_max, e).cpu().numpy()
            grids["activation_norm"][i, cols] = b.activation_norm.cpu().numpy()
            return_freed_memory()  # else the resident set creeps block after block
            if is_final(hook):
                cells_done(len(cols))
    tokens = adapter.token_strings(ids[0])
    return StabilityMap(
        adapter.name,
        prompt,
        e,
        [str(x) for x in layer_list],
        pos,
        [tokens[p] for p in pos],
        grids["radius_pade"],
        grids["radius_quadratic"],
        grids["lambda_max"],
        grids["effective_rank"],
        grids["activation_norm"],
    )


@dataclass(kw_only=True)
class _Cells:
    """A block of cells of one layer (the fields of ``engine.Block`` that a map reads)."""

    positions: list[int]
    lambda_max: Tensor
    effective_rank: Tensor
    pade: np.ndarray  # (positions, 1): nearest exit over +-v
    activation_norm: Tensor  # (positions,) |h|


def _final_layer_cells(
    adapter: ModelAdapter, ids: Tensor, pos: list[int], eps: float, eig_tol: float, rank: bool
):
    """The pre-logit vector with a linear head, in float32 from the logits as a document scan
    does (``scan.Scanner``, ``geometry.curvature_trace``): no float64 copy of the head. The
    search runs in float32 to ``eig_tol``, as the inner layers' Lanczos: a bfloat16 search
    (the scan's default) left 5e-4 in the radius of a flat position of a tiny model.
    ``rank=False``: no trace (a pass over W), the rank NaN."""
    scanner = Scanner(adapter, tol=eig_tol, search=torch.float32)
    h = adapter.prelogits(ids, dtype=None)[pos]
    block = position_block(adapter.vocab_size)
    for s in range(0, len(pos), block):
        logits = scanner.logits(h[s : s + block])
        found = scanner.scan_logits(logits, [eps])
        lam = found["lambda_max"]
        rank = (
            effective_rank(curvature_trace(scanner.weight, logits), lam)
            if rank
            else torch.full_like(lam, torch.nan)
        )
        yield _Cells(
            positions=pos[s : s + block],
            lambda_max=lam,
            effective_rank=rank,
            pade=found["radius_pade"].cpu().numpy(),
            activation_norm=h[s : s + block].float().norm(dim=-1),
        )


def _token_label(token: str) -> str:
    text = repr(token)[1:-1]
    return text if len(text) <= 12 else text[:11] + "…"
