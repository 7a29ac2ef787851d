"""``analyze``: the stable-region geometry of every position of a prompt, beside the measured truth."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .._support.inputs import as_adapter, check_eps, check_positions
from .._support.metrics import relative_error
from ..calibration import resolve_calibration
from ..engine import blocks_at, reliability
from ..errors import InvalidParameterError
from ..geometry import radius_quadratic
from ..models import is_final
from ..models.precision import full_float32_products
from ..plotting import axes_or_new
from ..results import Result
from ..vocabulary import describe

COLUMNS = [
    "position",
    "token",
    "next_token",
    "next_prob",
    "eps",
    "layer",
    "entropy",
    "lambda_max",
    "effective_rank",
    "radius_quadratic",
    "radius_pade",
    "radius_calibrated",
    "calibrated_form",
    "radius_curve",
    "radius_exact",
    "radius_linf_lower",
    "radius_linf_upper",
    "activation_norm",
    "radius_relative",
    "reliable",
    "unreliable_reason",
]


RADIUS_FORMS = ("radius_curve", "radius_exact", "radius_pade", "radius_quadratic")


@dataclass
class AnalysisResult(Result):
    """What ``analyze`` found: one row per (position, eps) (``to_frame``; ``vocabulary``
    defines every column), and the top eigenvector at each position (``directions``)."""

    study = "analyze"
    model: str
    prompt: str
    layer: str
    eps: list[float]
    rows: list[dict]
    directions: Tensor = field(repr=False)  # (positions, d)

    def to_frame(self) -> pd.DataFrame:
        return describe(pd.DataFrame(self.rows, columns=COLUMNS))

    def context(self) -> dict:
        return {"model": self.model, "prompt": self.prompt, "layer": self.layer, "eps": self.eps}

    def summary(self) -> pd.DataFrame:
        """Per eps: positions, the median and smallest radius of each form, the share of rows
        marked reliable, and where a measurement was made the median relative error of each
        closed form against it."""
        frame = self.to_frame()
        rows = []
        for e, g in frame.groupby("eps", sort=True):
            row = {"layer": self.layer, "eps": float(e), "n": int(len(g))}
            for col in RADIUS_FORMS:
                row[f"median_{col}"] = float(g[col].median())
                row[f"min_{col}"] = float(g[col].min())
            row["reliable"] = float(g["reliable"].mean())
            measured = g["radius_exact"].to_numpy(dtype=float)
            for col in ("radius_curve", "radius_pade", "radius_quadratic", "radius_calibrated"):
                err = relative_error(g[col].to_numpy(dtype=float), measured)
                finite = err[np.isfinite(err)]
                row[f"{col}_median_rel_err"] = float(np.median(finite)) if finite.size else math.nan
            rows.append(row)
        return pd.DataFrame(rows)

    def draw(self, ax=None, *, eps: float | None = None):
        """Each radius form along the prompt at ``eps`` (default the first), log scale;
        hollow markers where a row is not ``reliable``."""
        e = self.eps[0] if eps is None else check_eps(eps)[0]
        frame = self.to_frame()
        rows = frame[frame.eps == e]
        if rows.empty:
            raise InvalidParameterError(f"eps {e:g} is not one of this result's {self.eps}")
        fig, ax = axes_or_new(ax, figsize=(max(6.0, 0.3 * len(rows) + 3), 4.0))
        x = rows.position.to_numpy()
        styles = {
            "radius_curve": ("o-", "curve"),
            "radius_exact": ("k:", "measured"),
            "radius_pade": ("s--", "Pade"),
            "radius_quadratic": ("^-.", "quadratic"),
        }
        for col, (style, label) in styles.items():
            y = rows[col].to_numpy(dtype=float)
            if np.isfinite(y).any():
                ax.plot(x, np.where(y > 0, y, np.nan), style, ms=3, lw=1, label=label)
        shaky = ~rows.reliable.to_numpy(dtype=bool)
        if shaky.any():
            ax.plot(
                x[shaky],
                rows.radius_curve.to_numpy()[shaky],
                "o",
                mfc="none",
                mec="tab:red",
                ms=8,
                label="not reliable",
            )
        ax.set_yscale("log")
        labels = [f"{p}:{repr(t)[1:-1][:10]}" for p, t in zip(x, rows.token, strict=True)]
        ax.set_xticks(x, labels, rotation=90, fontsize=7)
        ax.set_ylabel("radius (L2, the layer's units)")
        ax.set_title(
            f"{self.model}, layer '{self.layer}', eps {e:g}: radius along the top direction",
            fontsize=9,
        )
        ax.legend(fontsize=7)
        return fig


@full_float32_products()
def analyze(
    model,
    prompt: str,
    *,
    eps: float | Sequence[float] = (0.01, 0.1, 1.0),
    positions: str | int | Sequence[int] = "all",
    layer: str | int = "final",
    exact: bool = True,
    rtol: float = 1e-6,
    eig_tol: float = 1e-8,
    trace: str | None = None,
    calibration=None,
    chat: bool = False,
    progress: Callable[[int, int], None] | None = None,
    stage: Callable[[str], None] | None = None,
) -> AnalysisResult:
    """Stable-region geometry of a prompt, each prediction beside the measured truth.

    For every position the top direction of the curvature is found, and along it the
    radius before the next-token KL reaches each ``eps``: in closed form (quadratic, Pade,
    the KL curve) and, with ``exact``, measured by running the model.

    Parameters
    ----------
    model : str, ModelAdapter or transformers model
        A bundled name, a local directory, a ``.gguf`` file, a Hub id (``org/name``) in the
        local Hugging Face cache, a ``ModelAdapter``, or a loaded ``transformers`` causal LM
        (``wrap(model, tokenizer)`` gives it a tokenizer).
    prompt : str
        The text; position ``i`` analyses the next-token distribution predicted at token ``i``.
    eps : float or list of float, default (0.01, 0.1, 1.0)
        KL thresholds in nats.
    positions : "all", "last", int or list of int, default "all"
        Token indices (negative from the end).
    layer : str or int, default "final"
        Where the perturbation is added: ``"final"`` (the pre-logit vector, the input of the
        unembedding), ``"embed"`` (the input of block 0), a block index ``i`` or a hook name
        (``blocks.{i}.hook_resid_post``). Inside the network the curvature is the pullback
        ``J^T F J``, computed in the model's own precision (float64 for probabilities, KL
        values and cumulants).
    exact : bool, default True
        Measure the true boundary by running the model (``radius_exact``; NaN if False).
    rtol : float, default 1e-6
        Relative tolerance of the measured boundary.
    eig_tol : float, default 1e-8
        Lanczos residual tolerance (relative to the top eigenvalue) inside the network, at
        least what the model's precision reaches (~1e-4 for a float32 model).
    trace : {"exact", "estimate"}, optional
        Inside the network, how ``tr G`` behind the effective rank is found: ``"exact"`` (d
        forward-mode products; the L-inf radii need it) or ``"estimate"`` (the Lanczos run's
        Krylov space plus 16 Hutchinson probes, within a few percent). Default: exact at
        ``embed``, estimate at blocks. At the pre-logit vector it is always exact.
    calibration : "bundled", path or Calibration, optional
        A calibration of this model and layer (``"bundled"``, or a
        ``calibration-LAYER.json`` from :func:`validate`): fills ``radius_calibrated``.
    chat : bool, default False
        Put the prompt in the tokenizer's chat template as a user message, the assistant's
        turn opened: what an instruct model expects (positions then count the template's
        tokens too).
    progress : callable, optional
        Called as ``progress(done, total)`` after each block of positions.
    stage : callable, optional
        Called with the name of each stage as it begins (``suffix``, ``curvature``,
        ``derivatives``, ``measuring``, ...): inner layers spend minutes in one block.

    Returns
    -------
    AnalysisResult
        ``to_frame()`` has one row per (position, eps); the Columns page defines them.

    Examples
    --------
    >>> import stable_regions as sr
    >>> result = sr.analyze("smollm2-135m", "The capital of France is", eps=0.1, positions="last")
    >>> result.to_frame()[["token", "radius_curve", "radius_exact"]]  # doctest: +SKIP
    """
    adapter = as_adapter(model)
    eps_list = check_eps(eps)
    if trace not in (None, "exact", "estimate"):
        raise InvalidParameterError(f"trace must be 'exact' or 'estimate', got {trace!r}")
    hook = adapter.hook_for_layer(layer)
    layer = adapter.layer_name(layer)
    cal = resolve_calibration(calibration, adapter, layer)
    if cal is not None:
        for e in eps_list:
            cal.band_for(e)  # an eps outside the calibrated bands fails before any work
    ids = adapter.tokenize(prompt, chat=chat)
    pos = check_positions(positions, ids.shape[1])
    tokens = adapter.token_strings(ids[0])
    blocks = blocks_at(
        adapter,
        ids,
        hook,
        pos,
        eps_list,
        exact=exact,
        rtol=rtol,
        eig_tol=eig_tol,
        trace=trace,
        stage=stage,
    )
    rows: list[dict] = []
    directions: list[Tensor] = []
    done = 0
    for b in blocks:
        next_tokens = adapter.token_strings(b.next_token_id)
        # to the host once per block: a float() per row would wait for the device each time
        norm, top_prob, entropy, lam, rank = (
            _host(x)
            for x in (b.activation_norm, b.next_prob, b.entropy, b.lambda_max, b.effective_rank)
        )
        # the best closed form of each row: the exact curve at the pre-logit vector, the
        # Taylor path inside the network (the Pade form where no curve was computed)
        best = np.where(np.isnan(b.curve), b.pade, b.curve)
        reliable, reason = reliability(best, norm[:, None], not is_final(hook), b.pade)
        quadratic = np.stack([radius_quadratic(lam, e) for e in eps_list], axis=1)
        calibrated = np.full_like(quadratic, math.nan)
        calibrated_form = np.full(quadratic.shape, "", dtype=object)
        if cal is not None:  # the nearer sign's forms: the maps are increasing
            calibrated, calibrated_form = cal.predict_grid(
                eps_list, quadratic, b.pade, entropy, b.curve, family="top"
            )
        for j, position in enumerate(b.positions):
            for e_idx, e in enumerate(eps_list):
                rows.append(
                    dict(
                        position=position,
                        token=tokens[position],
                        next_token=next_tokens[j],
                        next_prob=float(top_prob[j]),
                        eps=e,
                        layer=layer,
                        entropy=float(entropy[j]),
                        lambda_max=float(lam[j]),
                        effective_rank=float(rank[j]),
                        radius_quadratic=float(quadratic[j, e_idx]),
                        radius_pade=float(b.pade[j, e_idx]),
                        radius_calibrated=float(calibrated[j, e_idx]),
                        calibrated_form=str(calibrated_form[j, e_idx]),
                        radius_curve=float(b.curve[j, e_idx]),
                        radius_exact=float(b.exact[j, e_idx]),
                        radius_linf_lower=float(b.linf_lower[j, e_idx]),
                        radius_linf_upper=float(b.linf_upper[j, e_idx]),
                        activation_norm=float(norm[j]),
                        radius_relative=float(best[j, e_idx] / max(norm[j], 1e-300)),
                        reliable=bool(reliable[j, e_idx]),
                        unreliable_reason=str(reason[j, e_idx]),
                    )
                )
        directions.append(b.directions.cpu())
        done += len(b.positions)
        if progress is not None:
            progress(done, len(pos))
    return AnalysisResult(adapter.name, prompt, layer, eps_list, rows, torch.cat(directions))


def _host(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
