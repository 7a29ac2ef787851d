"""Stability maps: which layers and positions of a prompt are fragile.

A grid over (layer x position) of the top curvature eigenvalue ``lambda_max``, the closed-form
radius at one eps (``radius_corrected``, the 4th-order Pade form; ``radius_quadratic`` is kept
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
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .engine import inner_blocks, prelogit_blocks
from .errors import StableRegionsError
from .files import write_json
from .geometry import curvature_trace, effective_rank, radius_quadratic
from .heap import return_freed_memory
from .inputs import as_adapter, check_eps, check_positions, json_value
from .models import PRELOGIT, ModelAdapter
from .models.precision import full_float32_products
from .models.suffix import SuffixBatch
from .plotting import pyplot, save
from .scan import Scanner, position_block

QUANTITIES = ("radius", "lambda_max", "effective_rank")


def default_layers(n_layers: int, count: int = 8) -> list[str | int]:
    """``embed``, ``count`` evenly spaced blocks (first and last included), ``final``."""
    blocks = sorted({round(x) for x in np.linspace(0, n_layers - 1, min(count, n_layers))})
    return ["embed", *blocks, "final"]


def parse_layers(layers: Sequence[str | int] | str | None, n_layers: int) -> list[str | int]:
    """``None`` -> the default spread; ``"all"`` -> embed, every block, final; else as given."""
    if layers is None:
        return default_layers(n_layers)
    if isinstance(layers, str):
        layers = [layers]
    if list(layers) == ["all"]:
        return ["embed", *range(n_layers), "final"]
    out: list[str | int] = []
    for layer in layers:
        text = str(layer)
        out.append(int(text) if text.lstrip("-").isdigit() else text)
    if not out:
        raise StableRegionsError("no layers given: use e.g. --layers embed 5 10 final, or all")
    return out


@dataclass
class StabilityMap:
    """Rows follow ``layers``, columns ``positions``; JSON keys as in ``to_json``."""

    model: str
    prompt: str
    eps: float
    layers: list[str]
    positions: list[int]
    tokens: list[str]
    radius: np.ndarray
    radius_quadratic: np.ndarray
    lambda_max: np.ndarray
    effective_rank: np.ndarray
    norm: np.ndarray  # |h| of each cell: the activation's norm at that layer and position

    @property
    def radius_relative(self) -> np.ndarray:
        """``radius / |h|``: layers with different activation scales compare on it."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.radius / self.norm

    def to_json(self) -> dict:
        def grid(a: np.ndarray) -> list[list]:
            return [[json_value(x) for x in row] for row in a.tolist()]

        return {
            "model": self.model,
            "prompt": self.prompt,
            "eps": self.eps,
            "radius_kind": "corrected (4th-order Pade closed form), L2, in the layer's units",
            "layers": self.layers,
            "positions": self.positions,
            "tokens": self.tokens,
            "radius": grid(self.radius),
            "radius_quadratic": grid(self.radius_quadratic),
            "lambda_max": grid(self.lambda_max),
            "effective_rank": grid(self.effective_rank),
            "norm": grid(self.norm),
            "radius_relative": grid(self.radius_relative),
        }

    def save(self, out_dir: str | Path, relative: bool = False) -> tuple[Path, Path]:
        """Write ``map.json`` and ``map.png`` into ``out_dir`` (created if needed)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        json_path = write_json(out / "map.json", self.to_json())
        return json_path, self.plot(out / "map.png", relative=relative)

    def plot(self, path: str | Path, relative: bool = False) -> Path:
        """Three heatmaps (radius, lambda_max, effective rank): tokens across, layers down.
        ``relative``: the radius panel shows ``radius / |h|``."""
        plt = pyplot()
        from matplotlib.colors import LogNorm

        n_l, n_p = self.radius.shape
        width = min(40.0, max(7.0, 0.42 * n_p + 2.5))
        fig, axes = plt.subplots(3, 1, figsize=(width, 3 * (0.3 * n_l + 1.4)), squeeze=False)
        labels = [
            f"{p}:{_token_label(t)}" for p, t in zip(self.positions, self.tokens, strict=True)
        ]
        radius_panel = (
            (self.radius_relative, f"radius / |h| at eps={self.eps:g} (corrected, log)", "viridis")
            if relative
            else (
                self.radius,
                f"radius at eps={self.eps:g} (corrected closed form, log)",
                "viridis",
            )
        )
        panels = [
            radius_panel,
            (self.lambda_max, "lambda_max: top curvature eigenvalue (log)", "magma"),
            (self.effective_rank, "effective rank = tr G / lambda_max (log)", "cividis"),
        ]
        for ax, (data, title, cmap) in zip(axes[:, 0], panels, strict=True):
            shown = np.where(np.isfinite(data) & (data > 0), data, np.nan)
            finite = shown[np.isfinite(shown)]
            norm = LogNorm(finite.min(), finite.max()) if finite.size and finite.min() > 0 else None
            image = ax.imshow(shown, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
            ax.set_title(title, fontsize=9, loc="left")
            ax.set_yticks(range(n_l), [str(x) for x in self.layers], fontsize=7)
            ax.set_xticks(range(n_p), labels, rotation=90, fontsize=7)
            ax.set_ylabel("layer")
            fig.colorbar(image, ax=ax, fraction=0.025, pad=0.01)
        fig.suptitle(f"{self.model}: stability map", fontsize=10)
        return save(fig, path, dpi=110)


@full_float32_products()
def stability_map(
    model,
    prompt: str,
    eps: float = 0.1,
    layers: Sequence[str | int] | str | None = None,
    positions: str | int | Sequence[int] = "all",
    *,
    eig_tol: float = 1e-3,
    progress: Callable[[int, int], None] | None = None,
) -> StabilityMap:
    """The (layer x position) grid of radius at ``eps``, ``lambda_max`` and effective rank.

    Args:
        layers: ``None`` = embed, 8 evenly spaced blocks, final; ``"all"``; or a list of
            ``"embed"``, ``"final"`` and block indices.
        eig_tol: the Lanczos tolerance inside the network (relative residual).
        progress: called as ``progress(done, total)`` after each cell.
    """
    (e,) = check_eps([eps])
    adapter = as_adapter(model)
    layer_list = parse_layers(layers, adapter.n_layers)
    hooks = [adapter.hook_for_layer(layer) for layer in layer_list]  # validates before any work
    ids = adapter.tokenize(prompt)
    pos = check_positions(positions, ids.shape[1])
    shape = (len(layer_list), len(pos))
    grids = {name: np.full(shape, np.nan) for name in (*QUANTITIES, "radius_quadratic", "norm")}
    total, done = shape[0] * shape[1], 0
    cache = None  # the prompt's keys and values, computed once for every inner layer
    inner = [hook for hook in hooks if hook != PRELOGIT]
    if inner and max(pos) > 0:
        cache = SuffixBatch(adapter, ids, inner[0], [max(pos)])
    for i, hook in enumerate(hooks):
        if hook == PRELOGIT and adapter.logit_softcap is None:
            blocks = _final_layer_cells(adapter, ids, pos, e, min(eig_tol, 1e-4))
        elif hook == PRELOGIT:  # softcapped logits: the float64 head's exact operator
            blocks = prelogit_blocks(adapter, ids, pos, [e], exact=False, rtol=1e-6)
        else:
            blocks = inner_blocks(
                adapter,
                ids,
                hook,
                pos,
                [e],
                False,
                1e-6,
                eig_tol,
                trace="estimate",
                shared_cache=cache,
                curve=False,
            )
        for b in blocks:
            cols = [pos.index(p) for p in b.positions]
            grids["lambda_max"][i, cols] = b.lambda_max.cpu().numpy()
            grids["effective_rank"][i, cols] = b.effective_rank.cpu().numpy()
            grids["radius"][i, cols] = b.corrected[:, 0]
            grids["radius_quadratic"][i, cols] = radius_quadratic(b.lambda_max, e).cpu().numpy()
            grids["norm"][i, cols] = b.norm.cpu().numpy()
            done += len(cols)
            return_freed_memory()  # else the resident set creeps block after block
            if progress is not None:
                progress(done, total)
    tokens = adapter.token_strings(ids[0])
    return StabilityMap(
        adapter.name,
        prompt,
        e,
        [str(x) for x in layer_list],
        pos,
        [tokens[p] for p in pos],
        grids["radius"],
        grids["radius_quadratic"],
        grids["lambda_max"],
        grids["effective_rank"],
        grids["norm"],
    )


@dataclass
class _Cells:
    """A block of cells of one layer (the fields of ``engine.Block`` that a map reads)."""

    positions: list[int]
    lambda_max: Tensor
    effective_rank: Tensor
    corrected: np.ndarray  # (positions, 1): nearest exit over +-v
    norm: Tensor  # (positions,) |h|


def _final_layer_cells(
    adapter: ModelAdapter, ids: Tensor, pos: list[int], eps: float, eig_tol: float
):
    """The pre-logit vector with a linear head, in float32 from the logits as a document scan
    does (``scan.Scanner``, ``geometry.curvature_trace``): no float64 copy of the head. The
    search runs in float32 to ``eig_tol``, as the inner layers' Lanczos: a bfloat16 search
    (the scan's default) left 5e-4 in the radius of a flat position of a tiny model."""
    scanner = Scanner(adapter, tol=eig_tol, search=torch.float32)
    h = adapter.prelogits(ids, dtype=None)[pos]
    block = position_block(adapter.vocab_size)
    for s in range(0, len(pos), block):
        logits = scanner.logits(h[s : s + block])
        found = scanner.scan_logits(logits, [eps])
        trace = curvature_trace(scanner.weight, logits)
        yield _Cells(
            pos[s : s + block],
            found["lambda_max"],
            effective_rank(trace, found["lambda_max"]),
            found["radius"].cpu().numpy(),
            h[s : s + block].float().norm(dim=-1),
        )


def _token_label(token: str) -> str:
    text = repr(token)[1:-1]
    return text if len(text) <= 12 else text[:11] + "…"
