"""The study at the pre-logit vector (``final``): the rest of the model is its head.

``z = W h (+ b)`` and a softcap where the architecture has one, so the logits along a ray are
exactly ``W h + t W v``: the measurement evaluates the model's head there (one O(V d)
product per ray, then O(V) per step) and finds the first crossing to relative tolerance
``rtol``. A test checks these boundaries against the full model run with the perturbation
hooked in. Here the Taylor path of the logits is the exact path, so the ``taylor`` column is
the exact root from ``p`` and ``W`` alone: the closed form needs no model run at this layer.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ...engine import entropy, pade_radii
from ...geometry import FisherOperator, RayCurve, direction_cumulants
from ...models import ModelAdapter
from ...probes import measure_boundaries
from ...prompts import Prompt, sentiment_prompts
from .study import (
    PositionRays,
    StudySettings,
    both_signs,
    family_directions,
    ray_rows,
    rows_frame,
    study_positions,
)


class FinalLayerStudy:
    """Directions and measurements at the pre-logit vector of one model."""

    layer = "final"

    def __init__(self, adapter: ModelAdapter, settings: StudySettings) -> None:
        self.adapter = adapter
        self.settings = settings
        # The model's own head: products with W in its dtype, everything else in float64
        # (no float64 copy of W). Eigenvectors only choose directions (the curvature along
        # each ray is recomputed), so their Lanczos stops at 1e-4.
        self.head = adapter.stored_head
        self._steering: Tensor | None = None
        self._last: tuple[str, Tensor] | None = None

    def _prelogits(self, text: str) -> Tensor:
        """Pre-logit vectors of every position of ``text``. The last text is kept: the partner
        of prompt i (its interpolation target) is prompt i + 1, measured next."""
        if self._last is None or self._last[0] != text:
            self._last = (text, self.adapter.prelogits(self.adapter.tokenize(text)))
        return self._last[1]

    def steering_vector(self) -> Tensor:
        if self._steering is None:
            from ..steering import mean_difference

            positive, negative = sentiment_prompts()
            self._steering = mean_difference(self.adapter, positive, negative, layer="final")
        return self._steering

    def rays(self, prompt: Prompt, partner: Prompt | None) -> list[PositionRays]:
        """The study's rays at each chosen position: every direction with both signs."""
        s = self.settings
        prelogits = self._prelogits(prompt.text)
        pos = study_positions(len(prelogits), s.positions_per_prompt)
        h_all = prelogits[pos]
        partner_h = None
        if partner is not None and "interpolation" in s.families:
            partner_h = self._prelogits(partner.text)[-1]
        vecs = None
        if s.n_eigenvectors:
            op = FisherOperator.from_head(self.head, h_all)
            _, vecs = op.top_eigenpairs(k=s.n_eigenvectors, tol=1e-4)
            vecs = torch.nn.functional.normalize(vecs.to(torch.float64), dim=-1)
            del op
        u0 = self.head.raw_float64(h_all)
        p = torch.softmax(self.head.squash(u0), -1)
        # dz_i/dh = g_i W_i (g: the softcap's slope at u0_i, 1 for a linear head)
        slope = self.head.jacobian_row_scale(u0)
        ent = entropy(p)
        top_prob = p.max(-1).values
        steering = self.steering_vector() if "steering" in s.families else None
        w = self.head.weight
        out = []
        for j, position in enumerate(pos):
            top = torch.topk(p[j], s.n_token + 1).indices
            g = (
                torch.ones(len(top), dtype=u0.dtype, device=u0.device)
                if slope is None
                else slope[j, top]
            )
            # the gradient of z_top - z_j at the pre-logit vector
            token = [
                g[0] * w[top[0]].to(u0.dtype) - g[i] * w[top[i]].to(u0.dtype)
                for i in range(1, s.n_token + 1)
            ]
            dirs = family_directions(
                s,
                prompt,
                position,
                h_all[j],
                None if vecs is None else vecs[j],
                token,
                partner_h,
                steering,
            )
            out.append(both_signs(position, h_all[j], dirs, float(ent[j]), float(top_prob[j])))
        return out

    def measure(self, prompt: Prompt, partner: Prompt | None) -> pd.DataFrame:
        """Predicted and measured radii of every ray of ``prompt``: one row per (ray, eps)."""
        s = self.settings
        rows = []
        for pr in self.rays(prompt, partner):
            h, v = pr.h, pr.v
            u0 = self.head.raw_float64(h[None])
            curve = RayCurve(self.head, u0, self.head.direction_float64(v))
            if self.head.is_linear:  # the closed forms from the weight's own products
                c2, c3, c4 = direction_cumulants(self.head.weight, u0[0], v)
            else:  # through the softcap's real nonlinearity
                c2, c3, c4 = curve.coefficients()
            pade = pade_radii(c2, c3, c4, s.eps)
            scale = np.full(len(v), max(float(h.norm()), 1e-6))
            t_start = 1e-3 * scale
            if self.head.is_linear:
                # With a linear head the KL along a ray, K(t) - t K'(0), is increasing for t > 0
                # (K is convex), so its only crossing is the first: the scan may start near the
                # prediction instead of far below it (the search walks down if it starts above).
                first = np.where(np.isfinite(pade), pade, np.inf).min(1)
                t_start = np.where(np.isfinite(first), 0.5 * first, t_start)
            measured = measure_boundaries(
                curve, s.eps, guesses=pade, t_start=t_start, t_max=1e6 * scale, rtol=s.rtol
            )
            predicted = {"pade": pade, "curve": measured}
            rows += ray_rows(prompt, "final", pr, s.eps, c2.cpu().numpy(), predicted, measured)
        return rows_frame(rows)
