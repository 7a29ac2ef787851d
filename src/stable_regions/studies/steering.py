"""Steering budgets: the largest coefficient of a steering vector before the output drifts.

Adding ``c * s`` to the residual stream at a layer (``s`` the steering vector) moves the
activation by ``t = c ||s||`` along the unit direction ``u = s / ||s||``. The budget at a
position is the smallest ``c > 0`` with ``KL(p || p_c) >= eps``: predicted in closed form
from the logits' derivatives along ``u`` (quadratic and Pade [2/2] from their KL series, and
the exact KL root along their cubic Taylor path, ``coef_curve``: the exact curve at
``final``, where the head is linear in ``h``; no eigen-analysis needed) and measured by
running the model. Steering has a sign, so only ``+s`` is considered: one-sided, so a form
that overshoots on one side is not hidden by the nearer sign (the ``reliable`` flag says where
``coef_curve`` left the validated regime).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .._support.inputs import as_adapter, check_eps, check_positions, json_value
from ..calibration import resolve_calibration
from ..engine import entropy, logit_derivatives, reliability, taylor_radii
from ..errors import InvalidParameterError, StableRegionsError
from ..geometry import radius_pade, radius_quadratic, series_coefficients
from ..models import ModelAdapter, is_final
from ..models.precision import full_float32_products
from ..models.suffix import PositionSuffix
from ..plotting import axes_or_new
from ..probes import measure_from_suffix
from ..prompts import read_prompt_file
from ..results import Result
from ..vocabulary import describe
from .vectors import as_vector, read_vector_file

STEER_COLUMNS = [
    "prompt_id",
    "position",
    "token",
    "eps",
    "layer",
    "vector_norm",
    "coef_quadratic",
    "coef_pade",
    "coef_curve",
    "coef_calibrated",
    "calibrated_form",
    "coef_exact",
    "radius_relative",
    "reliable",
    "unreliable_reason",
]


@dataclass
class SteeringResult(Result):
    """Per (prompt, position, eps): the largest steering coefficient of each form
    (``to_frame``; ``vocabulary`` defines every column)."""

    study = "steer"
    model: str
    layer: str
    eps: list[float]
    rows: list[dict]
    vector_norm: float = math.nan

    def to_frame(self) -> pd.DataFrame:
        return describe(pd.DataFrame(self.rows, columns=STEER_COLUMNS))

    def context(self) -> dict:
        return {
            "model": self.model,
            "layer": self.layer,
            "eps": self.eps,
            "vector_norm": json_value(self.vector_norm),
        }

    def summary(self) -> pd.DataFrame:
        """Per eps: median and 5th percentile of each coefficient over prompts and positions."""
        df = self.to_frame()
        cols = ["coef_quadratic", "coef_pade", "coef_curve", "coef_exact"]
        out = df.groupby("eps")[cols].agg(["median", _fifth_percentile])
        out.columns = [f"{c}_{'median' if s == 'median' else 'p05'}" for c, s in out.columns]
        return describe(out.reset_index().assign(n=df.groupby("eps").size().values))

    def draw(self, ax=None):
        """Each coefficient form against eps (log-log): the median over prompts and positions
        as a line, every row as a dot; the measured one in black."""
        frame = self.to_frame()
        fig, ax = axes_or_new(ax, figsize=(6.0, 4.0))
        styles = {
            "coef_exact": ("k", "measured"),
            "coef_curve": ("tab:blue", "curve"),
            "coef_pade": ("tab:orange", "Pade"),
            "coef_quadratic": ("tab:gray", "quadratic"),
        }
        for col, (color, label) in styles.items():
            values = frame[col].where(frame[col] > 0)
            if values.notna().any():
                ax.plot(frame.eps, values, ".", color=color, alpha=0.4)
                median = values.groupby(frame.eps).median()
                ax.plot(median.index, median.values, "-", color=color, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("eps (nats)")
        ax.set_ylabel("largest coefficient c of c * vector")
        ax.set_title(f"{self.model}, layer '{self.layer}': steering budget", fontsize=9)
        ax.legend(fontsize=7)
        return fig


def _fifth_percentile(x: pd.Series) -> float:
    """The 5th percentile; where it falls between two infinite values (every coefficient
    infinite: the KL never reaches eps), infinity, not the NaN of inf - inf."""
    with np.errstate(invalid="ignore"):  # inf - inf, answered below
        q = x.quantile(0.05)
    return x.quantile(0.05, interpolation="lower") if np.isnan(q) and x.notna().any() else q


def load_vector(path: str | Path, dim: int, layer=None) -> Tensor:
    """A steering vector (dim,) from a file (``vectors.read_vector_file``: ``.npy``,
    ``.safetensors`` with one tensor or one per layer, repeng's ``.gguf``)."""
    array = read_vector_file(path, layer)
    return check_vector(torch.as_tensor(np.asarray(array, dtype=np.float64)), dim, str(path))


def check_vector(vector: Tensor, dim: int, name: str = "steering vector") -> Tensor:
    vector = torch.as_tensor(vector, dtype=torch.float64)
    if vector.numel() == dim:
        vector = vector.reshape(-1)  # accept (1, d) and the like
    if vector.ndim != 1 or vector.shape[0] != dim:
        raise StableRegionsError(
            f"{name} has shape {tuple(vector.shape)}, but the residual stream at this layer has dimension {dim}"
        )
    if not torch.isfinite(vector).all():
        raise StableRegionsError(f"{name} contains NaN or infinite values")
    if float(vector.norm()) == 0.0:
        raise StableRegionsError(f"{name} is all zeros")
    return vector


def read_prompts(path: str | Path) -> list[str]:
    """The texts of a prompt file (``.txt``, one per line with ``\\n`` for a newline, or ``.jsonl``)."""
    return [p.text for p in read_prompt_file(path)]


@full_float32_products()
def mean_difference(
    model,
    positive: Sequence[str],
    negative: Sequence[str],
    *,
    layer: str | int | Sequence[str | int],
) -> Tensor | dict:
    """A steering vector: the mean activation at ``layer`` (at each prompt's last token) over
    ``positive`` minus the mean over ``negative``.

    ``layer`` may be a list: then ``{layer: vector}`` (a per-layer source for ``iso_kl``),
    every layer's activation from the same pass over each prompt.

    Examples
    --------
    >>> vector = sr.mean_difference(model, ["I love this"], ["I hate this"], layer=12)  # doctest: +SKIP
    >>> by_layer = sr.mean_difference(model, positive, negative, layer=[5, 15])  # doctest: +SKIP
    """
    adapter = as_adapter(model)
    if not positive or not negative:
        raise InvalidParameterError(
            "both prompt sets must be non-empty to build a mean-difference vector"
        )
    several = isinstance(layer, (list, tuple))
    layers = list(dict.fromkeys(layer)) if several else [layer]
    if not layers:
        raise InvalidParameterError("give one or more layers")
    hooks = [adapter.hook_for_layer(each) for each in layers]

    def mean_activation(prompts: Sequence[str]) -> list[Tensor]:
        total = [None] * len(hooks)
        for prompt in prompts:
            stores: list[list[Tensor]] = [[] for _ in hooks]
            with ExitStack() as stack, torch.no_grad():
                for hook, store in zip(hooks, stores, strict=True):
                    stack.enter_context(adapter.capture(hook, store))
                adapter.forward(adapter.tokenize(prompt), use_cache=False)
            for i, store in enumerate(stores):
                last = store[0][0, -1].to(torch.float64)
                total[i] = last if total[i] is None else total[i] + last
        return [t / len(prompts) for t in total]

    diffs = [
        a - b for a, b in zip(mean_activation(positive), mean_activation(negative), strict=True)
    ]
    return dict(zip(layers, diffs, strict=True)) if several else diffs[0]


@full_float32_products()
def steering_budget(
    model,
    prompts: str | Sequence[str],
    *,
    vector,
    layer: str | int,
    eps: float | Sequence[float] = 0.1,
    positions: str | int | Sequence[int] = "last",
    exact: bool = True,
    rtol: float = 1e-6,
    calibration=None,
    chat: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> SteeringResult:
    """Largest steering coefficient before the next-token KL reaches ``eps``, per prompt
    and position.

    The coefficients ``c`` are those of ``c * vector`` added at ``layer`` at one position
    (so they scale with ``1 / |vector|``: repeng's ``coeff``). Only the ``+vector`` side
    counts: steering has a sign.

    Parameters
    ----------
    model : str, ModelAdapter or transformers model
        As for :func:`analyze`.
    prompts : str or list of str
        One prompt or several.
    vector : array, tensor, mapping or repeng ControlVector
        The steering vector: ``(d,)``, a ``{layer: vector}`` mapping or a repeng
        ``ControlVector`` (its ``directions[layer]`` is used).
    layer : str or int
        Where the vector is added: ``"embed"``, a block index or a hook name.
    eps : float or list of float, default 0.1
        KL thresholds in nats.
    positions : "all", "last", int or list of int, default "last"
        The positions of each prompt.
    exact : bool, default True
        Measure ``coef_exact`` on the model (NaN if False).
    rtol : float, default 1e-6
        Relative tolerance of the measured coefficient.
    calibration : "bundled", path or Calibration, optional
        Fills ``coef_calibrated``.
    chat : bool, default False
        Put the prompt in the tokenizer's chat template as a user message, the assistant's
        turn opened: what an instruct model expects (positions then count the template's
        tokens too).
    progress : callable, optional
        Called as ``progress(done, total)`` after each position.

    Returns
    -------
    SteeringResult
        ``coef_quadratic``, ``coef_pade``, ``coef_curve`` (exact at ``final``, the
        logits' Taylor path inside, with ``reliable``), ``coef_calibrated``,
        ``coef_exact``.

    Examples
    --------
    >>> vec = sr.mean_difference(model, ["I love this"], ["I hate this"], layer=12)
    >>> sr.steering_budget(model, "The weather is", vector=vec, layer=12).summary()  # doctest: +SKIP
    """
    adapter: ModelAdapter = as_adapter(model)
    eps_list = check_eps(eps)
    hook = adapter.hook_for_layer(layer)
    label = adapter.layer_name(layer)
    cal = resolve_calibration(calibration, adapter, label)
    if cal is not None:
        for e in eps_list:
            cal.band_for(e)  # an eps outside the calibrated bands fails before any work
    vector = check_vector(as_vector(vector, layer), adapter.hook_dim(hook))
    vector = vector.to(adapter.device)  # a vector from a file or numpy comes on the CPU
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise StableRegionsError("no prompts given")
    norm = float(vector.norm())
    u = vector / norm
    jobs = []
    for prompt_id, prompt in enumerate(prompts):
        ids = adapter.tokenize(prompt, chat=chat)
        jobs += [(prompt_id, ids, p) for p in check_positions(positions, ids.shape[1])]
    rows = []
    for done, (prompt_id, ids, position) in enumerate(jobs, start=1):
        suffix = PositionSuffix(adapter, ids, hook, position)
        logp = torch.log_softmax(suffix.logits0, -1)[None]
        derivs = logit_derivatives(adapter, suffix.batch, u[None].to(logp.dtype))
        c2, c3, c4 = series_coefficients(logp.exp(), derivs)
        pade = np.array([[float(radius_pade(c2, c3, e, c4)[0]) for e in eps_list]])
        norm_h = float(suffix.batch.x0[0].norm())
        # the Taylor-path search runs both signs; steering keeps +u (ray 0)
        scale = np.full(2, max(norm_h, 1e-6))
        curve = taylor_radii(logp, derivs, torch.zeros(1, dtype=torch.long), eps_list, scale)
        curve = curve[:1]
        reliable, reason = reliability(curve[0], norm_h, not is_final(hook), pade[0])
        if exact:
            measured = measure_from_suffix(suffix, u[None], eps_list, guesses=curve, rtol=rtol)[0]
        else:
            measured = np.full(len(eps_list), math.nan)
        token = adapter.token_strings(ids[0, position : position + 1])[0]
        h_p = float(entropy(logp.exp())[0])
        quadratic_all = np.array([[float(radius_quadratic(c2[0], e)) for e in eps_list]])
        calibrated_all = np.full_like(quadratic_all, math.nan)
        calibrated_form = np.full(quadratic_all.shape, "", dtype=object)
        if cal is not None:
            calibrated_all, calibrated_form = cal.predict_grid(
                eps_list, quadratic_all, pade, np.array([h_p]), curve, family="steering"
            )
        for e_idx, e in enumerate(eps_list):
            quadratic = float(quadratic_all[0, e_idx])
            calibrated = float(calibrated_all[0, e_idx])
            rows.append(
                dict(
                    prompt_id=prompt_id,
                    position=position,
                    token=token,
                    eps=e,
                    layer=label,
                    vector_norm=norm,
                    coef_quadratic=quadratic / norm,
                    coef_pade=float(pade[0, e_idx]) / norm,
                    coef_curve=float(curve[0, e_idx]) / norm,
                    coef_calibrated=calibrated / norm,
                    calibrated_form=str(calibrated_form[0, e_idx]),
                    coef_exact=float(measured[e_idx]) / norm,
                    radius_relative=float(curve[0, e_idx]) / max(norm_h, 1e-300),
                    reliable=bool(reliable[e_idx]),
                    unreliable_reason=str(reason[e_idx]),
                )
            )
        if progress is not None:
            progress(done, len(jobs))
    return SteeringResult(adapter.name, label, eps_list, rows, norm)
