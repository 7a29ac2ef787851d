"""The study inside the network (``embed`` or a block): the rest of the model is the suffix.

Per prompt, one ``SuffixBatch`` at the study's positions gives the pullback curvature
``G = J^T F J`` (its top eigenvectors: the ``top`` and ``eigenspace`` families) and the
token directions (``J^T (e_top - e_j)``: one reverse pass each). Then every direction is a
row of a second suffix on the same cached keys and values, so each stage is one batched
pass for all of a prompt's directions:

- one pass of jets (``models.taylor``) gives the logits' derivatives ``a1, a2, a3`` along
  each direction (with a linear head it stops at the pre-logit vector and the head maps
  ``h1, h2, h3`` once), hence the KL series (``c2, c3, c4``: the Pade radius) and the
  Taylor path ``z + t a1 + t^2/2 a2 + t^3/6 a3`` (its exact KL root: the ``taylor`` radius);
  ``-v`` flips ``a1`` and ``a3``;
- the boundary is measured through the suffix along ``+v`` and ``-v``, all rays of the
  prompt in lockstep (each step one pass).

A test re-checks the measured radii by running the whole model with the perturbation hooked
in at the layer.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ...budget import rows_within
from ...engine import (
    closed_forms_along,
    eig_tolerance,
    entropy,
    positions_per_recorded_block,
    rays,
    scan_start,
)
from ...geometry import PullbackOperator
from ...models import ModelAdapter
from ...models.suffix import SuffixBatch
from ...probes import measure_from_suffix
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


class InnerLayerStudy:
    """Directions and measurements at one hook inside the network."""

    def __init__(self, adapter: ModelAdapter, settings: StudySettings, layer: str) -> None:
        self.adapter = adapter
        self.settings = settings
        self.layer = layer
        self.hook = adapter.hook_for_layer(layer)
        self.head = adapter.stored_head
        self._steering: Tensor | None = None

    def steering_vector(self) -> Tensor:
        if self._steering is None:
            from ..steering import mean_difference

            positive, negative = sentiment_prompts()
            self._steering = mean_difference(self.adapter, positive, negative, layer=self.layer)
        return self._steering

    def last_activation(self, text: str) -> Tensor:
        """The activation (d,) at the hook of the last token of ``text`` (float64)."""
        store: list[Tensor] = []
        with self.adapter.capture(self.hook, store), torch.no_grad():
            self.adapter.forward(self.adapter.tokenize(text), use_cache=False)
        return store[0][0, -1].to(torch.float64)

    def _rays(
        self, prompt: Prompt, partner: Prompt | None
    ) -> tuple[list[PositionRays], Tensor, SuffixBatch, Tensor, Tensor]:
        """``(rays per position, p (P, V), the suffix at the positions, the position index of
        each direction, token ids)``."""
        s = self.settings
        ids = self.adapter.tokenize(prompt.text)
        pos = study_positions(ids.shape[1], s.positions_per_prompt)
        suffix = SuffixBatch(self.adapter, ids, self.hook, pos)
        op = PullbackOperator.from_suffix(suffix)
        p = op.p
        vecs = None
        if s.n_eigenvectors:
            # the eigenvectors only choose directions (each ray's curvature is recomputed)
            tol = eig_tolerance(1e-4, self.adapter.compute_dtype)
            _, vecs = op.top_eigenpairs(k=min(s.n_eigenvectors, suffix.dim), tol=tol)
            vecs = torch.nn.functional.normalize(vecs.to(torch.float64), dim=-1)
        top = torch.topk(p, s.n_token + 1, dim=-1).indices  # (P, n_token + 1)
        token = []
        if "token" in s.families:
            for j in range(1, s.n_token + 1):  # grad of z_top - z_j: J^T (e_top - e_j)
                u = torch.zeros_like(p)
                u.scatter_(1, top[:, :1], 1.0)
                u.scatter_(1, top[:, j : j + 1], -1.0)
                token.append(op.vjp(u))
        del op
        partner_x = None
        if partner is not None and "interpolation" in s.families:
            partner_x = self.last_activation(partner.text)
        steering = self.steering_vector() if "steering" in s.families else None
        ent, top_prob = entropy(p), p.max(-1).values
        x0 = suffix.x0
        out, owner = [], []
        for j, position in enumerate(pos):
            dirs = family_directions(
                s,
                prompt,
                position,
                x0[j],
                None if vecs is None else vecs[j],
                [t[j] for t in token],
                partner_x,
                steering,
            )
            out.append(both_signs(position, x0[j], dirs, float(ent[j]), float(top_prob[j])))
            owner += [j] * len(dirs)
        return out, p, suffix, torch.tensor(owner, dtype=torch.long), ids

    def rays(self, prompt: Prompt, partner: Prompt | None) -> list[PositionRays]:
        """The study's rays at each chosen position: every direction with both signs."""
        return self._rays(prompt, partner)[0]

    def measure(self, prompt: Prompt, partner: Prompt | None) -> pd.DataFrame:
        """Predicted and measured radii of every ray of ``prompt``: one row per (ray, eps)."""
        s = self.settings
        position_rays, p, suffix, owner, ids = self._rays(prompt, partner)
        logp = torch.log_softmax(suffix.logits0, -1)
        v = torch.cat([pr.v[0::2] for pr in position_rays])  # (N, d): the +v of each direction
        N = len(v)
        c2 = np.empty(N)
        pade_all = np.empty((2 * N, len(s.eps)))
        taylor = np.empty_like(pade_all)
        measured = np.empty_like(pade_all)
        # rows of one chunk: the recorded budget, and the derivatives' (rows, V) arrays
        block = min(
            positions_per_recorded_block(self.adapter, self.hook, N, ids.shape[1]),
            rows_within(p.shape[-1]),
        )
        for start in range(0, N, block):
            rows = slice(start, min(N, start + block))
            ray_rows_ = slice(2 * rows.start, 2 * rows.stop)
            chunk = owner[rows]
            batch = SuffixBatch(
                self.adapter,
                ids,
                self.hook,
                [suffix.positions[j] for j in chunk.tolist()],
                shared_cache=suffix,
            )
            k2, pade, path = closed_forms_along(
                self.adapter, batch, v[rows], p[chunk], s.eps, s.rtol, logp=logp, origin=chunk
            )
            c2[rows] = k2.cpu().numpy()
            pade_all[ray_rows_], taylor[ray_rows_] = pade, path
            guess = taylor[ray_rows_]
            measured[ray_rows_] = measure_from_suffix(
                batch,
                rays(v[rows], -1.0),
                s.eps,
                rows=torch.arange(len(chunk), device=v.device).repeat_interleave(2),
                guesses=guess,
                rtol=max(s.rtol, s.inner_rtol),
                start=scan_start(guess),
            )
            del batch
        out, r0 = [], 0
        for pr in position_rays:
            R = len(pr.labels)
            sl = slice(r0, r0 + R)
            predicted = {"pade": pade_all[sl], "curve": taylor[sl]}
            curvature = np.repeat(c2[r0 // 2 : (r0 + R) // 2], 2)
            out += ray_rows(prompt, self.layer, pr, s.eps, curvature, predicted, measured[sl])
            r0 += R
        return rows_frame(out)
