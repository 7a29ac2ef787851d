"""Jacobian spectra through depth: how much each block, and the rest of the network, stretches
a small perturbation of the residual stream at one position.

For block ``i`` the Jacobian is ``d resid_post[i] / d resid_pre[i]`` (``resid_pre[0]`` is the
embedding); the map "to the output" goes from ``resid_post[i]`` (or the embedding) to the
pre-logit vector ``ln_final.hook_normalized``, the input of the unembedding. As everywhere in
stable-regions the perturbation sits at one position and is read at the same position (causal
attention: nothing else changes there). Singular values come from Lanczos on ``J^T J`` with one
JVP and one VJP per step through the single-token suffix of the network, in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .._support.inputs import as_adapter, check_positions
from ..engine import eig_tolerance
from ..errors import InvalidParameterError
from ..geometry import JacobianGram
from ..models import PRELOGIT
from ..models.precision import full_float32_products
from ..models.suffix import SuffixBatch
from ..plotting import axes_or_new
from ..results import Result
from ..vocabulary import describe


@dataclass
class JacobianProfile(Result):
    """Top singular values per layer at one position: ``block_s{j}`` of the block's own
    Jacobian, ``output_s{j}`` of the map from the layer's output to the pre-logit vector, and
    ``activation_norm`` there (``vocabulary`` defines every column)."""

    study = "jacobian"
    model: str
    prompt: str
    position: int
    token: str
    k: int
    rows: list[dict]

    @property
    def columns(self) -> list[str]:
        return (
            ["layer", "hook", "activation_norm"]
            + [f"block_s{j + 1}" for j in range(self.k)]
            + [f"output_s{j + 1}" for j in range(self.k)]
        )

    def to_frame(self) -> pd.DataFrame:
        return describe(pd.DataFrame(self.rows, columns=self.columns))

    def summary(self) -> pd.DataFrame:
        """One row: the layer whose block stretches most, the layer most amplified on its
        way to the output, and their top singular values."""
        frame = self.to_frame()
        block = frame.loc[frame["block_s1"].idxmax()] if frame["block_s1"].notna().any() else None
        output = frame.loc[frame["output_s1"].idxmax()]
        return pd.DataFrame(
            [
                {
                    "position": self.position,
                    "token": self.token,
                    "block_s1_max": None if block is None else float(block["block_s1"]),
                    "block_s1_max_layer": None if block is None else str(block["layer"]),
                    "output_s1_max": float(output["output_s1"]),
                    "output_s1_max_layer": str(output["layer"]),
                }
            ]
        )

    def context(self) -> dict:
        return {
            "model": self.model,
            "prompt": self.prompt,
            "position": self.position,
            "token": self.token,
        }

    def draw(self, ax=None):
        """Block gain and gain to the output across depth (log scale)."""
        frame = self.to_frame()
        x = list(range(len(frame)))
        fig, ax = axes_or_new(ax, figsize=(max(6.0, 0.25 * len(x) + 3), 4.2))
        ax.plot(
            x,
            frame["block_s1"],
            "o-",
            label="block i alone: sigma_1(d resid_post[i] / d resid_pre[i])",
        )
        ax.plot(x, frame["output_s1"], "s-", label="layer -> pre-logit vector: sigma_1")
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_xticks(x, [str(v) for v in frame["layer"]], rotation=90 if len(x) > 20 else 0)
        ax.set_xlabel("layer (embed = input of block 0)")
        ax.set_ylabel("top singular value")
        ax.set_title(f"{self.model}: amplification at position {self.position} ({self.token!r})")
        ax.legend(fontsize=8)
        return fig


@full_float32_products()
def jacobian_profile(
    model,
    prompt: str,
    *,
    position: int = -1,
    k: int = 3,
    eig_tol: float = 1e-6,
    progress: Callable[[int, int], None] | None = None,
) -> JacobianProfile:
    """Top ``k`` singular values of each block's Jacobian and of the map to the output.

    Parameters
    ----------
    model : str, ModelAdapter or transformers model
        As for :func:`analyze`.
    prompt : str
        The text.
    position : int, default -1
        The token whose residual stream is perturbed (default: the last).
    k : int, default 3
        How many singular values per map.
    eig_tol : float, default 1e-6
        Lanczos residual tolerance relative to the top eigenvalue of ``J^T J``.
    progress : callable, optional
        Called as ``progress(done, total)`` after each map.

    Returns
    -------
    JacobianProfile
        One row per layer (``to_frame()``); ``plot()`` draws the gains across depth.

    Examples
    --------
    >>> profile = sr.jacobian_profile(model, "The capital of France is", k=2)
    >>> profile.to_frame()[["layer", "block_s1", "output_s1"]]  # doctest: +SKIP
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise InvalidParameterError(f"k must be a positive integer, got {k!r}")
    if not (isinstance(eig_tol, float) and 0 < eig_tol < 1):
        raise InvalidParameterError(f"eig_tol must be a number in (0, 1), got {eig_tol!r}")
    tol = eig_tol
    adapter = as_adapter(model)
    ids = adapter.tokenize(prompt)
    (pos,) = check_positions([position], ids.shape[1])
    n = adapter.n_layers
    sources = ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(n)]
    total = 2 * n + 1
    # Every layer's map to the output at once: one row per layer, each perturbed at its own
    # hook (a row runs the whole network anyway), so each Lanczos step is one pass for all
    # of them instead of one per layer (SmolLM2: 61 maps in 8.5 s against 29 s).
    everywhere = SuffixBatch(adapter, ids, sources, [pos] * len(sources))
    output = _top_singular_values(everywhere, PRELOGIT, k, tol)
    done = len(sources)
    if progress is not None:
        progress(done, total)
    rows = []
    for index, source in enumerate(sources):
        row = {
            "layer": "embed" if index == 0 else str(index - 1),
            "hook": source,
            "activation_norm": float(everywhere.x0[index].norm()),
        }
        row.update({f"output_s{j + 1}": float(output[index, j]) for j in range(k)})
        if index == 0:
            row.update({f"block_s{j + 1}": math.nan for j in range(k)})
        else:  # the block between the previous hook and this one: one block deep, cheap
            origin = SuffixBatch(adapter, ids, sources[index - 1], [pos], shared_cache=everywhere)
            block = _top_singular_values(origin, source, k, tol)[0]
            row.update({f"block_s{j + 1}": float(block[j]) for j in range(k)})
            done += 1
            if progress is not None:
                progress(done, total)
        rows.append(row)
    token = adapter.token_strings(ids[0, pos : pos + 1])[0]
    return JacobianProfile(adapter.name, prompt, pos, token, k, rows)


def _top_singular_values(suffix: SuffixBatch, target: str, k: int, tol: float) -> np.ndarray:
    """Top ``k`` singular values (P, k) of the map from each row's hook to ``target`` (NaN
    where the Krylov space held fewer)."""
    suffix.check_target(target)
    jvp_single, vjp = suffix.linearization(target)
    gram = JacobianGram(
        lambda v: suffix.jvp(v, target),
        vjp,
        suffix.dim,
        suffix.x0.device,
        jvp_single,
        batch=suffix.n_positions,
    )
    sigma, _ = gram.top_singular_values(k, tol=eig_tolerance(tol, suffix.dtype))
    out = np.full((suffix.n_positions, k), math.nan)
    out[:, : sigma.shape[1]] = sigma.cpu().numpy()
    return out
