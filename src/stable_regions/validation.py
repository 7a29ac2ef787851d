"""The validation study: closed-form radii against measured boundaries over a prompt corpus.

For each prompt, a few positions (evenly spread, the last included), and each direction
family, both signs ``+v`` and ``-v`` of every direction are rays; along each ray and for each
eps we record the published closed form (``quadratic``), the [2/2] Pade form of the cumulant
series (``corrected``), the boundary measured on the model (``empirical``) and, once the run is
calibrated, the isotonic calibration of the better closed form (``calibrated``).

Direction families (``FAMILIES``):

* ``top``: the top eigenvectors of the curvature;
* ``random``: isotropic unit vectors;
* ``eigenspace``: random unit mixtures of the top ``eigenspace_k`` eigenvectors;
* ``token``: ``W[i0] - W[ij]``, unembedding rows of the top token and the next ones, normalized;
* ``interpolation``: toward another prompt's vector at the same layer (its last position;
  the partner of prompt ``i`` is prompt ``i + 1``), as in Janiak et al. 2024;
* ``steering``: the normalized mean difference, at the same layer, of the last-token vectors of
  the shipped positive and negative sentiment prompts.

Measuring at the pre-logit vector: the rest of the model is its head, ``z = W h (+ b)`` and a
softcap where the architecture has one, so the logits along a ray are exactly
``W h + t W v``: the measurement evaluates the model's head there (one O(V d) product per ray,
then O(V) per step) and finds the first crossing to relative tolerance ``rtol``. A test checks
these boundaries against the full model run with the perturbation hooked in.

The run is written as it goes: ``DIR/parts/NNNNN.parquet`` per prompt (atomic), so
``resume=True`` continues after an interruption without losing or duplicating rows; the
finished files (``results.parquet``, ``summary.json``, ``report.html``, ``calibration.json``)
appear only at the end, and ``manifest.json`` says ``"complete": true`` last of all.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .calibration import (
    FEATURES,
    Band,
    Calibration,
    band_edges,
    model_fingerprint,
    resolve_calibration,
)
from .engine import entropy, pade_radii
from .errors import StableRegionsError
from .files import RunDirectory, write_json, write_parquet
from .geometry import FisherOperator, RayCurve, direction_cumulants, radius_quadratic
from .inputs import as_adapter, check_eps
from .metrics import THRESHOLDS, relative_error
from .models import PRELOGIT, ModelAdapter
from .probes import measure_boundaries
from .prompts import Prompt, as_prompts, corpus, corpus_digest, sentiment_prompts
from .report import write_report

FAMILIES = ("top", "random", "eigenspace", "token", "interpolation", "steering")
PREDICTORS = ("quadratic", "corrected", "calibrated")
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
    "curvature",
    "empirical",
    "quadratic",
    "corrected",
    "calibrated",
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
    train_fraction: float = 0.5


def check_families(families: Sequence[str] | None) -> list[str]:
    if families is None:
        return list(FAMILIES)
    out = [str(f) for f in families]
    for f in out:
        if f not in FAMILIES:
            raise StableRegionsError(
                f"unknown direction family {f!r}: choose from {', '.join(FAMILIES)}"
            )
    if not out:
        raise StableRegionsError(f"no families given: choose from {', '.join(FAMILIES)}")
    return list(dict.fromkeys(out))


def check_layers(layers: Sequence[str | int] | None) -> list[str]:
    out = ["final"] if layers is None else [str(x) for x in layers]
    for layer in out:
        if layer not in ("final", PRELOGIT):
            raise StableRegionsError(
                f"validate measures at layer 'final' (the pre-logit vector) only, got {layer!r}: "
                "check inner layers with 'stable-regions analyze --layer L' or scripts/accuracy.py"
            )
    return ["final"]


def study_positions(n_tokens: int, count: int) -> list[int]:
    """``count`` evenly spread positions ending at the last token (all if the prompt is short)."""
    if n_tokens <= count:
        return list(range(n_tokens))
    return sorted({int(round(x)) for x in np.linspace(n_tokens - 1, 0, count + 1)[:-1]})


def _unit(v: Tensor) -> Tensor | None:
    n = float(v.norm())
    return v / n if n > 0 and np.isfinite(n) else None


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


@dataclass
class _PositionRays:
    """Rays at one position: origin ``h``, directions ``v`` (R, d), (family, index, sign) labels."""

    position: int
    h: Tensor
    labels: list[tuple[str, int, int]]
    v: Tensor
    entropy: float
    next_prob: float


class _FinalLayer:
    """Directions and measurements at the pre-logit vector of one model."""

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
            from .steering import mean_difference

            positive, negative = sentiment_prompts()
            self._steering = mean_difference(self.adapter, positive, negative, "final")
        return self._steering

    def directions(
        self, prompt: Prompt, h: Tensor, vecs: Tensor, p: Tensor, partner: Tensor | None, position
    ) -> list[tuple[str, int, Tensor]]:
        s = self.settings
        d = h.shape[-1]
        fams = set(s.families)
        g = torch.Generator().manual_seed(_seed(s.seed, prompt.digest, position))
        out: list[tuple[str, int, Tensor]] = []
        if "top" in fams:
            out += [("top", i, vecs[i]) for i in range(s.n_top)]
        if "random" in fams:
            for i in range(s.n_random):
                out.append(("random", i, _unit(torch.randn(d, generator=g, dtype=h.dtype))))
        if "eigenspace" in fams:
            for i in range(s.n_eigenspace):
                c = torch.randn(s.eigenspace_k, generator=g, dtype=h.dtype)
                out.append(("eigenspace", i, _unit(c @ vecs[: s.eigenspace_k])))
        if "token" in fams:
            top = torch.topk(p, s.n_token + 1).indices
            w = self.head.weight
            out += [
                ("token", i, _unit((w[top[0]] - w[top[i + 1]]).to(h.dtype)))
                for i in range(s.n_token)
            ]
        if "interpolation" in fams and partner is not None:
            out.append(("interpolation", 0, _unit(partner - h)))
        if "steering" in fams:
            out.append(("steering", 0, _unit(self.steering_vector().to(h))))
        return [(f, i, v) for f, i, v in out if v is not None]

    def rays(self, prompt: Prompt, partner: Prompt | None) -> list[_PositionRays]:
        """The study's rays at each chosen position: every direction with both signs."""
        s = self.settings
        prelogits = self._prelogits(prompt.text)
        pos = study_positions(len(prelogits), s.positions_per_prompt)
        h_all = prelogits[pos]
        partner_h = None
        if partner is not None and "interpolation" in s.families:
            partner_h = self._prelogits(partner.text)[-1]
        k = max(s.n_top if "top" in s.families else 1, s.eigenspace_k)
        op = FisherOperator.from_head(self.head, h_all)
        _, vecs = op.top_eigenpairs(k=k, tol=1e-4)
        vecs = torch.nn.functional.normalize(vecs.to(torch.float64), dim=-1)
        del op
        p = torch.softmax(self.head.logits(h_all), -1)
        ent = entropy(p)
        top_prob = p.max(-1).values
        out = []
        for j, position in enumerate(pos):
            dirs = self.directions(prompt, h_all[j], vecs[j], p[j], partner_h, position)
            out.append(
                _PositionRays(
                    position,
                    h_all[j],
                    [(f, i, sign) for f, i, _ in dirs for sign in (1, -1)],
                    torch.stack([sign * v for _, _, v in dirs for sign in (1.0, -1.0)]),
                    float(ent[j]),
                    float(top_prob[j]),
                )
            )
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
            quadratic = np.stack([radius_quadratic(c2, e).cpu().numpy() for e in s.eps], 1)
            corrected = pade_radii(c2, c3, c4, s.eps)
            scale = np.full(len(v), max(float(h.norm()), 1e-6))
            t_start = 1e-3 * scale
            if self.head.is_linear:
                # With a linear head the KL along a ray, K(t) - t K'(0), is increasing for t > 0
                # (K is convex), so its only crossing is the first: the scan may start near the
                # prediction instead of far below it (the search walks down if it starts above).
                first = np.where(np.isfinite(corrected), corrected, np.inf).min(1)
                t_start = np.where(np.isfinite(first), 0.5 * first, t_start)
            measured = measure_boundaries(
                curve, s.eps, guesses=corrected, t_start=t_start, t_max=1e6 * scale, rtol=s.rtol
            )
            for r, (family, index, sign) in enumerate(pr.labels):
                for e_idx, e in enumerate(s.eps):
                    rows.append(
                        dict(
                            prompt_id=prompt.id,
                            prompt_digest=prompt.digest,
                            kind=prompt.kind,
                            position=pr.position,
                            layer="final",
                            family=family,
                            direction_index=index,
                            sign=sign,
                            eps=e,
                            entropy=pr.entropy,
                            next_prob=pr.next_prob,
                            curvature=float(c2[r]),
                            empirical=float(measured[r, e_idx]),
                            quadratic=float(quadratic[r, e_idx]),
                            corrected=float(corrected[r, e_idx]),
                            calibrated=np.nan,
                            split="",
                        )
                    )
        return pd.DataFrame(rows, columns=RESULT_COLUMNS)


# ----------------------------------------------------------------------------- calibration


def split_prompts(digests: Sequence[str], train_fraction: float, seed: int) -> set[str]:
    """The digests of the training prompts: a seeded random subset (split by prompt, never by row)."""
    unique = sorted(set(digests))
    rng = np.random.default_rng(_seed("split", seed))
    n_train = int(round(train_fraction * len(unique)))
    return {unique[i] for i in rng.permutation(len(unique))[:n_train]}


def _score(predicted: np.ndarray, empirical: np.ndarray) -> float:
    """Median |log(predicted / empirical)| over finite pairs: the feature-selection criterion."""
    ok = np.isfinite(predicted) & np.isfinite(empirical) & (predicted > 0) & (empirical > 0)
    return float(np.median(np.abs(np.log(predicted[ok] / empirical[ok])))) if ok.any() else np.inf


def _calibration_columns(rows: pd.DataFrame) -> tuple[np.ndarray, ...]:
    return tuple(rows[c].to_numpy() for c in ("quadratic", "corrected", "entropy", "empirical"))


def fit_calibration(
    frame: pd.DataFrame, adapter: ModelAdapter, layer: str, train: set[str]
) -> Calibration:
    """One isotonic map per eps, on the training prompts; the feature that wins on the others."""
    rows = frame[frame["layer"] == layer]
    eps_values = sorted(rows["eps"].unique())
    is_train = rows["prompt_digest"].isin(train)
    # The feature is chosen inside the training prompts (fit on one half, score on the other),
    # so the held-out prompts judge the final calibrator and nothing else.
    inner = split_prompts(sorted(train), 0.5, seed=len(train))
    is_inner = rows["prompt_digest"].isin(inner)
    bands = []
    for e, (lo, hi) in zip(eps_values, band_edges(eps_values), strict=True):
        at = rows["eps"] == e
        scores = {}
        for feature in FEATURES:
            a, b = rows[at & is_train & is_inner], rows[at & is_train & ~is_inner]
            if a.empty or b.empty:  # too few training prompts to choose: the corrected form
                scores[feature] = 0.0 if feature == "corrected" else np.inf
                continue
            band = Band.fit(e, lo, hi, feature, *_calibration_columns(a))
            predicted = band.predict(b["quadratic"], b["corrected"], b["entropy"])
            scores[feature] = _score(predicted, b["empirical"].to_numpy())
        feature = min(FEATURES, key=lambda f: scores[f])
        fit_rows, test_rows = rows[at & is_train], rows[at & ~is_train]
        band = Band.fit(e, lo, hi, feature, *_calibration_columns(fit_rows))
        predicted = band.predict(
            test_rows["quadratic"], test_rows["corrected"], test_rows["entropy"]
        )
        err = relative_error(predicted, test_rows["empirical"])
        band.heldout = {
            "n": int(len(test_rows)),
            "selection_median_abs_log_error": {
                f: (float(v) if np.isfinite(v) else None) for f, v in scores.items()
            },
            **{k: float(np.mean(err <= t)) if len(err) else None for k, t in THRESHOLDS.items()},
        }
        bands.append(band)
    return Calibration(adapter.name, model_fingerprint(adapter), layer, bands, sorted(train), None)


def apply_calibration(frame: pd.DataFrame, cal: Calibration) -> pd.DataFrame:
    """Fill ``calibrated``; rows of prompts the calibration was fitted on become ``split=train``."""
    frame = frame.copy()
    rows = frame["layer"] == cal.layer
    for e in frame.loc[rows, "eps"].unique():
        at = rows & (frame["eps"] == e)
        frame.loc[at, "calibrated"] = cal.predict(
            float(e),
            frame.loc[at, "quadratic"].to_numpy(),
            frame.loc[at, "corrected"].to_numpy(),
            frame.loc[at, "entropy"].to_numpy(),
        )
    trained = set(cal.train_prompts)
    frame.loc[rows, "split"] = np.where(
        frame.loc[rows, "prompt_digest"].isin(trained), "train", "test"
    )
    return frame


def summarize(frame: pd.DataFrame, model: str) -> list[dict]:
    """Summary rows per (layer, family, eps, predictor) over held-out rows (``split == test``)."""
    test = frame[frame["split"] == "test"]
    out = []
    for (layer, e), group in test.groupby(["layer", "eps"], sort=True):
        families = ["all"] + [f for f in FAMILIES if f in set(group["family"])]
        for family in families:
            g = group if family == "all" else group[group["family"] == family]
            for predictor in PREDICTORS:
                pred = g[predictor].to_numpy()
                if predictor == "calibrated" and np.isnan(pred).all():
                    continue
                err = relative_error(pred, g["empirical"].to_numpy())
                out.append(
                    dict(
                        model=model,
                        layer=layer,
                        family=family,
                        eps=float(e),
                        predictor=predictor,
                        n=int(len(err)),
                        median_rel_err=float(np.median(err)),
                        p90_rel_err=float(np.quantile(err, 0.9)),
                        **{k: float(np.mean(err <= t)) for k, t in THRESHOLDS.items()},
                    )
                )
    return out


# ----------------------------------------------------------------------------- the run


@dataclass
class ValidationRun:
    """A finished run: the rows, the summary, where the files are."""

    out: Path
    frame: pd.DataFrame
    summary: list[dict]
    calibration: Calibration | None

    def summary_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.summary)


def validate(
    model,
    prompts: Sequence[Prompt] | None = None,
    *,
    out: str | Path,
    eps: Sequence[float] = (0.01, 0.1, 1.0),
    layers: Sequence[str | int] | None = None,
    families: Sequence[str] | None = None,
    calibration: str | Path | Calibration | None = "fit",
    resume: bool = False,
    overwrite: bool = False,
    positions_per_prompt: int = 3,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> ValidationRun:
    """Run the validation study and write ``out/{results.parquet, summary.json, report.html}``.

    Args:
        model: a bundled name / path / ``ModelAdapter`` / transformers model.
        prompts: the corpus (default: the shipped one, ``prompts.corpus()``): strings or
            ``Prompt`` objects.
        eps: KL thresholds (nats).
        layers: ``["final"]`` (the only layer measured by the study so far).
        families: a subset of ``FAMILIES`` (default all).
        calibration: ``"fit"`` (fit on a seeded half of the prompts, evaluate on the other
            half, write ``calibration.json``), ``"bundled"``, a calibration file, or ``None``.
        resume: continue the unfinished run in ``out`` (same settings required).
        overwrite: replace the validation run already in ``out``.
        progress: ``progress(done, total)`` after each prompt.
    """
    settings = StudySettings(
        eps=check_eps(eps),
        layers=check_layers(layers),
        families=check_families(families),
        positions_per_prompt=int(positions_per_prompt),
        seed=int(seed),
    )
    if settings.positions_per_prompt < 1:
        raise StableRegionsError("positions_per_prompt must be at least 1")
    prompts = corpus() if prompts is None else as_prompts(prompts)
    if not prompts:
        raise StableRegionsError("no prompts given")
    adapter = as_adapter(model)
    fitting = calibration == "fit"
    fixed: Calibration | None = None
    if not fitting and calibration not in (None, "none"):
        fixed = resolve_calibration(calibration, adapter, settings.layers[0])
        for e in settings.eps:
            fixed.band_for(e)  # fail before measuring, not after

    record = {
        "tool": "stable-regions validate",
        "model": adapter.name,
        "fingerprint": model_fingerprint(adapter),
        "settings": asdict(settings),
        "prompts": corpus_digest(prompts),
        "n_prompts": len(prompts),
        "calibration": "fit" if fitting else None if fixed is None else str(fixed.path or "given"),
    }
    run = RunDirectory(out, record, "validation run", resume=resume, overwrite=overwrite)
    out = run.out
    layer = _FinalLayer(adapter, settings)
    total = len(prompts)
    done = sum(run.done(i) for i in range(total))
    if progress is not None:
        progress(done, total)
    for i, prompt in enumerate(prompts):
        if run.done(i):
            continue
        partner = prompts[(i + 1) % total] if total > 1 else None
        run.write_part(i, layer.measure(prompt, partner))
        done += 1
        if progress is not None:
            progress(done, total)

    frame = run.frame(total)
    used = fixed
    if fitting:
        train = split_prompts(frame["prompt_digest"], settings.train_fraction, settings.seed)
        used = fit_calibration(frame, adapter, "final", train)
        used.save(out / "calibration.json")
    if used is not None:
        frame = apply_calibration(frame, used)
    else:
        frame["split"] = "test"
    summary = summarize(frame, adapter.name)
    write_parquet(frame, out / "results.parquet")
    write_json(out / "summary.json", summary)
    write_report(out / "report.html", frame, summary, record, used)
    run.finish()
    return ValidationRun(out, frame, summary, used)
