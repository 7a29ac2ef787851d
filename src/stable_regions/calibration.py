"""Isotonic calibration of predicted radii against measured boundaries, saved as JSON.

``IsotonicRadius`` is one monotone map from a predicted radius to the measured one, fitted by
isotonic regression (scikit-learn) on ``log`` predicted vs ``log`` measured, so that the
least-squares fit weighs relative errors alike at every scale. Applying it is piecewise-linear
interpolation between the fitted thresholds (in log space), clipped at both ends: no
scikit-learn object is stored and nothing is unpickled.

``Calibration`` holds, per eps band of one (model, layer), the feature the band uses and its
maps: ``quadratic``, ``pade`` or ``curve`` (one map of that closed form, ``vocabulary.FORMS``),
or ``pade_by_entropy`` / ``curve_by_entropy`` (one map per entropy band of the next-token
distribution: the closed forms err most where ``p`` is nearly one-hot, so the correction they
need depends on the entropy). It also
keeps the digests of the prompts it was fitted on (so a later evaluation can keep them out)
and a fingerprint of the model it belongs to.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._support.files import write_json
from .errors import StableRegionsError
from .vocabulary import OldNamesWarning, upgrade_name

FORMAT = "stable-regions-calibration"
FEATURES = ("quadratic", "pade", "pade_by_entropy", "curve", "curve_by_entropy")
ENTROPY_EDGES = (0.0, 0.5, 2.0, 4.0, math.inf)  # nats; bands of pade_by_entropy
MIN_BAND_ROWS = 50  # fewer training rows in an entropy band: it uses the unbanded map


def simplify(x: np.ndarray, y: np.ndarray, tol: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Drop knots of a piecewise-linear function that the line between their neighbours
    reproduces to ``tol`` (in log radius: 1e-6 = 0.0001%), keeping the first and last.
    Isotonic fits on thousands of rows keep thousands of knots; most lie on straight runs."""
    if len(x) <= 2:
        return x, y
    keep = [0]
    anchor = 0
    for i in range(2, len(x)):
        # would a segment from the anchor to knot i still pass all knots in between?
        seg_x, seg_y = x[anchor : i + 1], y[anchor : i + 1]
        span = x[i] - x[anchor]
        line = seg_y[0] + (seg_y[-1] - seg_y[0]) * ((seg_x - seg_x[0]) / span if span > 0 else 0.0)
        if np.max(np.abs(line - seg_y)) > tol:
            keep.append(i - 1)
            anchor = i - 1
    keep.append(len(x) - 1)
    return x[keep], y[keep]


@dataclass
class IsotonicRadius:
    """Monotone map ``predicted radius -> measured radius`` (fit on logs, increasing, clipped)."""

    x: np.ndarray = field(default_factory=lambda: np.zeros(0))  # log predicted thresholds
    y: np.ndarray = field(default_factory=lambda: np.zeros(0))  # log measured at the thresholds

    def fit(
        self, predicted: np.ndarray, measured: np.ndarray, bins: int | None = 300
    ) -> IsotonicRadius:
        """Fit on finite pairs. ``bins``: first average ``log`` pairs over that many quantile
        bins of the prediction (weighted by their counts): a raw fit on thousands of rows
        keeps thousands of noise-sized steps; 300 bins gave the same held-out errors on
        SmolLM2 with a tenth of the knots. ``None`` fits the rows themselves."""
        from sklearn.isotonic import IsotonicRegression

        predicted, measured = np.asarray(predicted, float), np.asarray(measured, float)
        ok = np.isfinite(predicted) & np.isfinite(measured) & (predicted > 0) & (measured > 0)
        if ok.sum() < 2:
            raise StableRegionsError(
                "too few finite measurements to fit a calibration (need at least 2)"
            )
        lx, ly = np.log(predicted[ok]), np.log(measured[ok])
        weight = None
        if bins is not None and len(lx) > bins:
            order = np.argsort(lx, kind="stable")
            groups = np.array_split(order, bins)
            weight = np.array([len(g) for g in groups], dtype=float)
            lx = np.array([lx[g].mean() for g in groups])
            ly = np.array([ly[g].mean() for g in groups])
        iso = IsotonicRegression(increasing=True, out_of_bounds="clip")
        iso.fit(lx, ly, sample_weight=weight)
        self.x, self.y = simplify(np.asarray(iso.X_thresholds_), np.asarray(iso.y_thresholds_))
        return self

    @classmethod
    def identity(cls) -> IsotonicRadius:
        """The map that leaves a radius as it is (over exp(-700)..exp(700), every finite
        float64 radius): what a band uses where no fitted map beat the raw closed form."""
        ends = np.array([-700.0, 700.0])
        return cls(ends, ends.copy())

    @property
    def is_identity(self) -> bool:
        return len(self.x) == 2 and bool(np.array_equal(self.x, self.y))

    def predict(self, predicted: np.ndarray) -> np.ndarray:
        """Calibrated radii; ``inf`` stays ``inf`` (the KL never reaches eps), NaN stays NaN."""
        predicted = np.asarray(predicted, dtype=float)
        out = np.full(predicted.shape, np.nan)
        finite = np.isfinite(predicted) & (predicted > 0)
        if self.is_identity:  # exactly as is, not exp(log(x)) with its last-bit roundoff
            out[finite] = predicted[finite]
        else:
            out[finite] = np.exp(np.interp(np.log(predicted[finite]), self.x, self.y))
        out[np.isposinf(predicted)] = np.inf
        return out

    def to_json(self) -> dict:
        return {"log_x": self.x.tolist(), "log_y": self.y.tolist()}

    @classmethod
    def from_json(cls, obj: dict) -> IsotonicRadius:
        x, y = np.asarray(obj["log_x"], float), np.asarray(obj["log_y"], float)
        if x.ndim != 1 or x.shape != y.shape or len(x) < 1 or np.any(np.diff(x) < 0):
            raise ValueError("thresholds must be two equally long lists, x increasing")
        if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
            raise ValueError("thresholds must be finite")
        return cls(x, y)


def _feature_input(feature: str, quadratic, pade, curve) -> np.ndarray:
    """The closed-form radius a feature maps: its name without ``_by_entropy``."""
    base = feature.removesuffix("_by_entropy")
    if base == "curve" and curve is None:
        raise StableRegionsError(
            f"this calibration maps the curve radius ({feature}), which was not computed: "
            "pass it, or use a calibration of another feature"
        )
    chosen = {"quadratic": quadratic, "pade": pade, "curve": curve}[base]
    return np.asarray(chosen, dtype=float)


@dataclass
class Band:
    """The calibrator for ``eps`` in ``[eps_min, eps_max)``: ``maps[i]`` applies to
    ``feature`` where the entropy is in ``[entropy_edges[i], entropy_edges[i + 1])``."""

    eps: float
    eps_min: float
    eps_max: float
    feature: str
    maps: list[IsotonicRadius]
    entropy_edges: list[float] = field(default_factory=lambda: [0.0, math.inf])
    heldout: dict = field(default_factory=dict)  # what the fit achieved on held-out prompts

    def map_is_worse(self, form: str, family: str) -> bool:
        """Whether this band's map was further from the measured radii than the closed form
        ``form`` as it is, on the held-out prompts of the validation run that produced it,
        along directions of ``family`` (``"top"``: the top eigenvector, as ``analyze``;
        ``"steering"``: a steering vector), by the median relative error. False where the run
        recorded no such comparison (a calibration fitted before it was recorded)."""
        table = self.heldout.get("median_rel_err", {}).get(family, {})
        mapped, plain = table.get("calibrated"), table.get(form)
        return mapped is not None and plain is not None and mapped > plain

    @classmethod
    def fit(
        cls,
        eps: float,
        eps_min: float,
        eps_max: float,
        feature: str,
        quadratic: np.ndarray,
        pade: np.ndarray,
        entropy: np.ndarray,
        measured: np.ndarray,
        curve: np.ndarray | None = None,
    ) -> Band:
        x = _feature_input(feature, quadratic, pade, curve)
        measured = np.asarray(measured, dtype=float)
        whole = IsotonicRadius().fit(x, measured)
        if not feature.endswith("_by_entropy"):
            return cls(eps, eps_min, eps_max, feature, [whole])
        entropy = np.asarray(entropy, dtype=float)
        maps = []
        for lo, hi in zip(ENTROPY_EDGES, ENTROPY_EDGES[1:], strict=False):
            at = (entropy >= lo) & (entropy < hi) & np.isfinite(x) & np.isfinite(measured)
            maps.append(
                IsotonicRadius().fit(x[at], measured[at]) if at.sum() >= MIN_BAND_ROWS else whole
            )
        return cls(eps, eps_min, eps_max, feature, maps, list(ENTROPY_EDGES))

    def predict(
        self,
        quadratic: np.ndarray,
        pade: np.ndarray,
        entropy: np.ndarray | None,
        curve: np.ndarray | None = None,
    ) -> np.ndarray:
        x = _feature_input(self.feature, quadratic, pade, curve)
        if len(self.maps) == 1:
            return self.maps[0].predict(x)
        if entropy is None:
            raise StableRegionsError(f"the eps {self.eps:g} calibration needs the entropy of p")
        entropy = np.broadcast_to(np.asarray(entropy, dtype=float), x.shape)
        index = np.clip(
            np.searchsorted(self.entropy_edges, entropy, side="right") - 1, 0, len(self.maps) - 1
        )
        out = np.full(x.shape, np.nan)
        for i, m in enumerate(self.maps):
            at = index == i
            out[at] = m.predict(x[at])
        return out


def json_number(x: float) -> float | str:
    """Strict JSON has no infinity: ``inf`` is written as the string "inf" (``float`` reads it)."""
    return "inf" if math.isinf(x) and x > 0 else float(x)


def model_fingerprint(adapter) -> dict:
    """Sizes and a few unembedding row norms: enough to tell models apart, dtype-tolerant."""
    w = adapter.stored_head.weight  # no float64 copy: the norms are taken in float64
    idx = np.linspace(0, w.shape[0] - 1, 16).round().astype(int).tolist()
    norms = w[idx].double().norm(dim=-1).tolist()
    return {
        "vocab_size": int(w.shape[0]),
        "d_model": int(w.shape[1]),
        "n_layers": int(adapter.n_layers),
        "head_row_norms": [float(f"{n:.6g}") for n in norms],
    }


def _same_model(a: dict, b: dict) -> bool:
    if any(a.get(k) != b.get(k) for k in ("vocab_size", "d_model", "n_layers")):
        return False
    na, nb = np.asarray(a["head_row_norms"]), np.asarray(b["head_row_norms"])
    # 1%: the same weights in bfloat16 or float32 agree far closer; different models do not.
    return na.shape == nb.shape and bool(np.all(np.abs(na - nb) <= 1e-2 * np.maximum(nb, 1e-12)))


def band_edges(eps_values: Sequence[float]) -> list[tuple[float, float]]:
    """Bands around sorted eps values: geometric midpoints between them, x/sqrt(10) at the ends."""
    e = sorted(eps_values)
    mids = [math.sqrt(a * b) for a, b in zip(e, e[1:], strict=False)]
    lows = [e[0] / math.sqrt(10)] + mids
    highs = mids + [e[-1] * math.sqrt(10)]
    return list(zip(lows, highs, strict=True))


@dataclass
class Calibration:
    """Calibrators of one (model, layer), one per eps band."""

    model: str
    fingerprint: dict
    layer: str
    bands: list[Band]
    train_prompts: list[str] = field(default_factory=list)  # digests of the training prompts
    path: str | None = None

    def band_for(self, eps: float) -> Band:
        for band in self.bands:
            if band.eps_min <= eps < band.eps_max:
                return band
        covered = ", ".join(f"[{b.eps_min:.3g}, {b.eps_max:.3g})" for b in self.bands)
        raise StableRegionsError(
            f"calibration {self.path or ''} has no band for eps {eps:g} (it covers {covered}): "
            "fit one with validate(..., `eps=...`, `calibration='fit'`)"
        )

    def predict(
        self,
        eps: float,
        quadratic: np.ndarray,
        pade: np.ndarray,
        entropy: np.ndarray | None = None,
        curve: np.ndarray | None = None,
    ) -> np.ndarray:
        """Calibrated radii at ``eps`` from the closed-form radii (``radius_quadratic``,
        ``radius_pade``, ``radius_curve``) and the entropy of ``p`` in nats, which the
        ``*_by_entropy`` bands need."""
        return self.band_for(eps).predict(quadratic, pade, entropy, curve)

    def predict_grid(
        self,
        eps: list[float],
        quadratic: np.ndarray,
        pade: np.ndarray,
        entropy: np.ndarray,
        curve: np.ndarray,
        *,
        family: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated radii (R, E) of R rays at each of ``eps`` from their closed forms (R, E)
        and entropies (R,), and what each one is (``calibrated_form``).

        Where ``family`` is given and the band's map was worse on held-out prompts along such
        directions than the closed form the row shows (``radius_curve`` where it has one,
        else ``radius_pade``: ``Band.map_is_worse``), the radius is that form as it is
        (``"curve as is"``); elsewhere the map's (``"pade mapped"``). The result never
        shrinks as eps grows: each eps band has its own map and two maps can cross where a
        ray's forms are unusual, but the true radius grows with eps, so a ray keeps the
        largest radius of every eps up to its own."""
        quadratic, pade, curve = (np.asarray(x, dtype=float) for x in (quadratic, pade, curve))
        out = np.empty(quadratic.shape)
        forms = np.empty(quadratic.shape, dtype=object)
        shown = np.where(np.isfinite(curve), "curve", "pade")
        for k, e in enumerate(eps):
            band = self.band_for(e)
            out[:, k] = band.predict(quadratic[:, k], pade[:, k], entropy, curve[:, k])
            forms[:, k] = f"{band.feature} mapped"
            for form, values in (("curve", curve[:, k]), ("pade", pade[:, k])):
                if family is not None and band.map_is_worse(form, family):
                    as_is = shown[:, k] == form
                    out[as_is, k] = values[as_is]
                    forms[as_is, k] = f"{form} as is"
        order = np.argsort(eps, kind="stable")
        rising = np.fmax.accumulate(out[:, order], axis=1)  # NaN (no radius) passes through
        out[:, order] = np.where(np.isnan(out[:, order]), np.nan, rising)
        return out, forms

    def check(self, adapter, layer: str) -> None:
        """Refuse a calibration that belongs to another model or layer."""
        where = self.path or "the calibration"
        if str(layer) != self.layer:
            raise StableRegionsError(
                f"{where} was fitted at layer {self.layer!r}, not {str(layer)!r}: "
                "use a calibration of this layer or fit one with validate(..., `calibration='fit'`)"
            )
        if not _same_model(model_fingerprint(adapter), self.fingerprint):
            raise StableRegionsError(
                f"{where} was fitted on model {self.model!r}, which is not {adapter.name!r} "
                "(sizes or unembedding differ): use a calibration of this model"
            )

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "version": 1,
            "model": self.model,
            "fingerprint": self.fingerprint,
            "layer": self.layer,
            "bands": [
                {
                    "eps": b.eps,
                    "eps_min": b.eps_min,
                    "eps_max": b.eps_max,
                    "feature": b.feature,
                    "heldout": b.heldout,
                    "entropy_edges": [json_number(x) for x in b.entropy_edges],
                    "maps": [m.to_json() for m in b.maps],
                }
                for b in self.bands
            ],
            "train_prompts": self.train_prompts,
        }

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_json())

    @classmethod
    def from_json(cls, obj: dict, path: str | None = None) -> Calibration:
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file")
        bands = []
        for b in obj["bands"]:
            feature = _today(b["feature"], path)
            if feature not in FEATURES:
                raise ValueError(f"unknown feature {b['feature']!r}")
            maps = [IsotonicRadius.from_json(m) for m in b["maps"]]
            edges = [float(x) for x in b["entropy_edges"]]
            if not maps or len(edges) != len(maps) + 1 or any(np.diff(edges) <= 0):
                raise ValueError("entropy_edges must bound the maps, increasing")
            bands.append(
                Band(
                    float(b["eps"]),
                    float(b["eps_min"]),
                    float(b["eps_max"]),
                    feature,
                    maps,
                    edges,
                    dict(b.get("heldout", {})),
                )
            )
        if not bands:
            raise ValueError("no bands")
        return cls(
            str(obj["model"]),
            dict(obj["fingerprint"]),
            str(obj["layer"]),
            bands,
            [str(d) for d in obj.get("train_prompts", [])],
            path,
        )


def _today(feature: str, path: str | None) -> str:
    """A feature's name today; an earlier version's name (``corrected``, ``taylor``, see
    ``vocabulary.RENAMED``) is read with a warning."""
    base = feature.removesuffix("_by_entropy")
    new = upgrade_name(base, "forms")
    if new == base:
        return feature
    warnings.warn(
        f"{path or 'a calibration'} was written by an earlier version of stable-regions; "
        f"read its feature {feature!r} as {feature.replace(base, new)!r}",
        OldNamesWarning,
        stacklevel=3,
    )
    return feature.replace(base, new)


def load_calibration(path: str | Path) -> Calibration:
    """Read a calibration JSON file; a missing or corrupt file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise StableRegionsError(f"calibration file {path} not found")
    try:
        return Calibration.from_json(json.loads(path.read_text(encoding="utf-8")), str(path))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise StableRegionsError(
            f"calibration file {path} is corrupt or not a stable-regions calibration "
            f"({type(exc).__name__}: {exc}); refit it with validate(..., `calibration='fit'`)"
        ) from None


def _layer_index(layer: str, n_layers: int) -> int:
    """Where a layer name sits in the network: embed -1, block i at i, final at n_layers."""
    return -1 if layer == "embed" else n_layers if layer == "final" else int(layer)


def bundled_calibration(model_name: str, layer: str = "final", n_layers: int | None = None):
    """The calibration shipped for a bundled model (fitted on the shipped corpus) at ``layer``,
    or, given the model's ``n_layers``, at the shipped block nearest to it: within
    ``max(1, n_layers // 8)`` blocks (``final`` only for ``final``, ``embed`` counts as block
    -1), the deeper of two equally near. Returns it with ``layer`` set to the one asked for
    when a neighbour stands in."""
    from .prompts import package_path

    base = package_path("calibrators")
    shipped = sorted(p.name for p in base.glob("*.json") if p.name.startswith(f"{model_name}-"))
    path = base / f"{model_name}-{layer}.json"
    if not path.is_file() and n_layers is not None and layer != "final":
        target = _layer_index(layer, n_layers)
        near = []
        for name in shipped:
            if not name.endswith("-final.json"):
                index = _layer_index(name[len(model_name) + 1 : -5], n_layers)
                if abs(index - target) <= max(1, n_layers // 8):
                    near.append((abs(index - target), -index, name))
        if near:
            cal = load_calibration(base / min(near)[2])
            cal.layer = str(layer)
            return cal
    if not path.is_file():
        raise StableRegionsError(
            f"no bundled calibration fits model {model_name!r} at layer {layer!r} "
            f"(shipped: {', '.join(shipped) or 'none'}): fit one with validate(..., "
            f"`layers=[{layer!r}]`, `calibration='fit'`) and pass its calibration-{layer}.json"
        )
    return load_calibration(path)


def resolve_calibration(spec, adapter, layer: str) -> Calibration | None:
    """``None``, a ``Calibration``, ``"bundled"`` or a path -> a checked ``Calibration``."""
    if spec is None:
        return None
    if isinstance(spec, Calibration):
        cal = spec
    elif str(spec) == "bundled":
        cal = bundled_calibration(adapter.name, str(layer), adapter.n_layers)
    else:
        cal = load_calibration(spec)
    cal.check(adapter, str(layer))
    return cal
