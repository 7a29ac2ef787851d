"""What the validation study measures, shared by every layer: settings, layers, direction
families, positions, and the table rows a ray becomes.

Direction families (``FAMILIES``), each defined at any layer:

* ``top``: the top eigenvectors of the curvature there (``H`` at the pre-logit vector, the
  pullback ``G = J^T F J`` inside the network);
* ``random``: isotropic unit vectors;
* ``eigenspace``: random unit mixtures of the top ``eigenspace_k`` eigenvectors;
* ``token``: the gradient at the layer of the logit difference between the top token and the
  j-th, normalized (at the pre-logit vector of a linear head: ``W[i0] - W[ij]``);
* ``interpolation``: toward the next prompt's activation at the same layer (its last
  position; the partner of prompt ``i`` is prompt ``i + 1``), as in Janiak et al. 2024;
* ``steering``: the normalized mean difference, at the same layer, of the last-token
  activations of the shipped positive and negative sentiment prompts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ...errors import InvalidParameterError, StableRegionsError
from ...geometry import radius_quadratic
from ...prompts import Prompt
from ...vocabulary import describe

FAMILIES = ("top", "random", "eigenspace", "token", "interpolation", "steering")
#: The radius forms a validation judges (``vocabulary.FORMS``; ``curve``: the exact KL root
#: along the logits' cubic Taylor path, see ``geometry.TaylorPathKL``), each in the column
#: ``radius_<form>``, against ``radius_exact``.
PREDICTORS = ("quadratic", "pade", "curve", "calibrated")
RESULT_COLUMNS = [
    "prompt_id",
    "prompt_digest",
    "kind",
    "position",
    "layer",
    "family",
    "direction_index",
    "sign",
    "eps",
    "entropy",
    "next_prob",
    "activation_norm",
    "curvature",
    "radius_exact",
    "radius_quadratic",
    "radius_pade",
    "radius_curve",
    "radius_relative",
    "radius_calibrated",
    "split",
]


@dataclass
class StudySettings:
    """What a run measures; a resumed run must have the same settings."""

    eps: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])
    layers: list[str] = field(default_factory=lambda: ["final"])
    families: list[str] = field(default_factory=lambda: list(FAMILIES))
    positions_per_prompt: int = 3
    n_top: int = 3
    n_random: int = 3
    n_eigenspace: int = 3
    eigenspace_k: int = 8
    n_token: int = 3
    seed: int = 0
    rtol: float = 1e-6
    # Inside the network the KL along a ray comes from the model's own (float32) passes, whose
    # roundoff (~1e-5 of the KL near eps 0.01 on SmolLM2, and as much from the batch's make-up)
    # puts the boundary's floor near 1e-5 relative: the search stops at 1e-4.
    inner_rtol: float = 1e-4
    train_fraction: float = 0.5

    @property
    def n_eigenvectors(self) -> int:
        """How many top eigenvectors the families need (0: no eigen-solve)."""
        k = self.n_top if "top" in self.families else 0
        return max(k, self.eigenspace_k if "eigenspace" in self.families else 0)


def check_families(families: Sequence[str] | None) -> list[str]:
    if families is None:
        return list(FAMILIES)
    out = [str(f) for f in families]
    for f in out:
        if f not in FAMILIES:
            raise InvalidParameterError(
                f"unknown direction family {f!r}: choose from {', '.join(FAMILIES)}"
            )
    if not out:
        raise StableRegionsError(f"no families given: choose from {', '.join(FAMILIES)}")
    return list(dict.fromkeys(out))


def study_positions(n_tokens: int, count: int) -> list[int]:
    """``count`` evenly spread positions ending at the last token (all if the prompt is short)."""
    if n_tokens <= count:
        return list(range(n_tokens))
    return sorted({int(round(x)) for x in np.linspace(n_tokens - 1, 0, count + 1)[:-1]})


def unit(v: Tensor) -> Tensor | None:
    """``v / |v|``, or None for a zero or non-finite vector (the direction is skipped)."""
    n = float(v.norm())
    return v / n if n > 0 and np.isfinite(n) else None


def seed_of(*parts) -> int:
    """A stable 63-bit seed from any reprs (the same on every machine and run)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


@dataclass
class PositionRays:
    """Rays at one position: origin ``h``, directions ``v`` (R, d), (family, index, sign) labels."""

    position: int
    h: Tensor
    labels: list[tuple[str, int, int]]
    v: Tensor
    entropy: float
    next_prob: float


def family_directions(
    settings: StudySettings,
    prompt: Prompt,
    position: int,
    h: Tensor,
    eigenvectors: Tensor | None,
    token: list[Tensor],
    partner: Tensor | None,
    steering: Tensor | None,
) -> list[tuple[str, int, Tensor]]:
    """The unit directions ``(family, index, v)`` at one position with origin ``h`` (d,).

    ``eigenvectors`` (k, d): the top eigenvectors there, largest first; ``token``: the
    (unnormalized) gradients of the logit differences ``z_top - z_j``; ``partner``: the next
    prompt's activation at this layer; ``steering``: the layer's steering vector. Random
    directions come from a generator seeded by the study's seed, the prompt and the position,
    so a resumed run draws the same ones."""
    s = settings
    d = h.shape[-1]
    fams = set(s.families)
    g = torch.Generator().manual_seed(seed_of(s.seed, prompt.digest, position))
    out: list[tuple[str, int, Tensor | None]] = []
    if "top" in fams:
        out += [("top", i, eigenvectors[i]) for i in range(s.n_top)]
    if "random" in fams:
        out += [
            ("random", i, unit(torch.randn(d, generator=g, dtype=h.dtype)))
            for i in range(s.n_random)
        ]
    if "eigenspace" in fams:
        for i in range(s.n_eigenspace):
            c = torch.randn(s.eigenspace_k, generator=g, dtype=h.dtype).to(h.device)
            out.append(("eigenspace", i, unit(c @ eigenvectors[: s.eigenspace_k].to(h.dtype))))
    if "token" in fams:
        out += [("token", i, unit(t.to(h.dtype))) for i, t in enumerate(token[: s.n_token])]
    if "interpolation" in fams and partner is not None:
        out.append(("interpolation", 0, unit(partner.to(h.dtype) - h)))
    if "steering" in fams and steering is not None:
        out.append(("steering", 0, unit(steering.to(h.dtype))))
    # drawn on the CPU (the same directions on every device), used where h is
    return [(f, i, v.to(device=h.device, dtype=h.dtype)) for f, i, v in out if v is not None]


def both_signs(
    position: int,
    h: Tensor,
    directions: list[tuple[str, int, Tensor]],
    entropy: float,
    next_prob: float,
) -> PositionRays:
    """Every direction as two rays, ``+v`` then ``-v``."""
    return PositionRays(
        position,
        h,
        [(f, i, sign) for f, i, _ in directions for sign in (1, -1)],
        torch.stack([sign * v for _, _, v in directions for sign in (1.0, -1.0)]),
        entropy,
        next_prob,
    )


def ray_rows(
    prompt: Prompt,
    layer: str,
    rays: PositionRays,
    eps: list[float],
    curvature: np.ndarray,
    predicted: dict[str, np.ndarray],
    measured: np.ndarray,
) -> list[dict]:
    """Table rows of one position's rays: one per (ray, eps). ``curvature`` (R,) is ``v^T G v``;
    ``predicted`` maps ``pade`` and ``curve`` to (R, E) radii; ``measured`` is (R, E)."""
    quadratic = np.stack(
        [radius_quadratic(torch.as_tensor(curvature), e).cpu().numpy() for e in eps], 1
    )
    norm = float(rays.h.norm())
    rows = []
    for r, (family, index, sign) in enumerate(rays.labels):
        for e_idx, e in enumerate(eps):
            rows.append(
                dict(
                    prompt_id=prompt.id,
                    prompt_digest=prompt.digest,
                    kind=prompt.kind,
                    position=rays.position,
                    layer=layer,
                    family=family,
                    direction_index=index,
                    sign=sign,
                    eps=e,
                    entropy=rays.entropy,
                    next_prob=rays.next_prob,
                    activation_norm=norm,
                    curvature=float(curvature[r]),
                    radius_exact=float(measured[r, e_idx]),
                    radius_quadratic=float(quadratic[r, e_idx]),
                    radius_pade=float(predicted["pade"][r, e_idx]),
                    radius_curve=float(predicted["curve"][r, e_idx]),
                    # the best closed form's move relative to the activation (comparable
                    # across layers of different activation scales)
                    radius_relative=float(predicted["curve"][r, e_idx]) / max(norm, 1e-300),
                    radius_calibrated=np.nan,
                    split="",
                )
            )
    return rows


def rows_frame(rows: list[dict]) -> pd.DataFrame:
    return describe(pd.DataFrame(rows, columns=RESULT_COLUMNS))
