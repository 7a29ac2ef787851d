"""The validation study inside the network: families against dense autograd references,
measured boundaries against the whole model, the Taylor-path root, several layers in one run."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import STUDY_PROMPTS, char_tokenizer, tiny_model

import stable_regions as sr
from stable_regions.errors import StableRegionsError
from stable_regions.geometry import TaylorPathKL, first_crossings, series_coefficients
from stable_regions.models.precision import exact_numerics
from stable_regions.studies.validation import (
    FAMILIES,
    InnerLayerStudy,
    StudySettings,
    calibration_file,
    validate,
)

PROMPTS = STUDY_PROMPTS


@pytest.fixture(scope="module")
def adapter():
    return sr.wrap(tiny_model("llama", seed=5), char_tokenizer(), name="tiny-llama")


def _logits_of_delta(adapter, ids, hook, position):
    """delta -> logits at ``position``: the whole prompt prefix with the perturbation hooked
    in, differentiable (independent of the suffix code)."""

    def f(delta: torch.Tensor) -> torch.Tensor:
        with adapter.perturbation(hook, position, delta[None]), exact_numerics():
            return adapter.model(input_ids=ids[:, : position + 1]).logits[0, position]

    return f


def _kl_full(adapter, ids, hook, position, deltas):
    """KL(p || p_delta) of the whole model with each delta added at the hook (float64 model)."""
    base = adapter.perturbed_logits(ids, hook, position, torch.zeros_like(deltas[:1]))
    logp = torch.log_softmax(base, -1)
    logq = torch.log_softmax(adapter.perturbed_logits(ids, hook, position, deltas), -1)
    return (logp.exp() * (logp - logq)).sum(-1)


@pytest.mark.parametrize("layer", ["embed", "1"])
def test_inner_families_against_dense_references(adapter, layer):
    """Top and eigenspace directions against the dense pullback of the autograd Jacobian of the
    whole model; token directions against autograd gradients of logit differences; the
    interpolation target and steering vector from their own definitions."""
    # at the embedding every sentiment prompt ends in the same token: no steering vector there
    families = [f for f in FAMILIES if layer != "embed" or f != "steering"]
    study = InnerLayerStudy(adapter, StudySettings(families=families), layer)
    prompt, partner = PROMPTS[0], PROMPTS[1]
    rays = study.rays(prompt, partner)
    ids = adapter.tokenize(prompt.text)
    hook = adapter.hook_for_layer(layer)
    store: list[torch.Tensor] = []
    with adapter.capture(hook, store), torch.no_grad():
        adapter.forward(adapter.tokenize(partner.text), use_cache=False)
    partner_x = store[0][0, -1].to(torch.float64)
    steer = sr.mean_difference(adapter, *sr.prompts.sentiment_prompts(), layer=layer)
    assert len(rays) == 3 and rays[-1].position == ids.shape[1] - 1
    for pr in rays:
        counts = pd.Series([f for f, _, _ in pr.labels]).value_counts().to_dict()
        assert counts == {f: (2 if f in ("interpolation", "steering") else 6) for f in families}
        assert torch.allclose(pr.v[0::2], -pr.v[1::2])
        f = _logits_of_delta(adapter, ids, hook, pr.position)
        zero = torch.zeros(pr.h.shape[-1], dtype=torch.float64)
        J = torch.autograd.functional.jacobian(f, zero).detach()  # (V, d)
        p = torch.softmax(f(zero), -1).detach()
        G = J.T @ (torch.diag(p) - torch.outer(p, p)) @ J
        evals, evecs = torch.linalg.eigh(G)
        eig8 = evecs[:, -8:]
        top = torch.topk(p, 4).indices
        for i, (family, index, sign) in enumerate(pr.labels):
            v = pr.v[i]
            if sign != 1:
                continue
            if family == "top":
                assert abs(float(v @ evecs[:, -1 - index])) > 1 - 1e-6
            if family == "eigenspace":
                assert float((eig8.T @ v).norm()) > 1 - 1e-6
            if family == "token":
                grad = J[top[0]] - J[top[index + 1]]
                assert torch.allclose(v, torch.nn.functional.normalize(grad, dim=0), atol=1e-9)
            if family == "interpolation":
                want = torch.nn.functional.normalize(partner_x - pr.h, dim=0)
                assert torch.allclose(v, want, atol=1e-12)
            if family == "steering":
                assert torch.allclose(v, torch.nn.functional.normalize(steer, dim=0), atol=1e-12)


@pytest.mark.parametrize("layer", ["embed", "1"])
def test_inner_measured_boundaries_against_the_full_model(adapter, layer):
    """Every measured radius, re-checked by running the whole model with the perturbation
    hooked in at the layer; and the series behind the Pade radius against autograd."""
    families = [f for f in FAMILIES if f != "steering"]
    study = InnerLayerStudy(adapter, StudySettings(eps=[0.01, 0.1, 1.0], families=families), layer)
    prompt, partner = PROMPTS[3], PROMPTS[4]
    frame = study.measure(prompt, partner)
    rays = study.rays(prompt, partner)
    ids = adapter.tokenize(prompt.text)
    hook = adapter.hook_for_layer(layer)
    assert set(frame["layer"]) == {layer}
    checked = 0
    for pr in rays:
        rows = frame[frame["position"] == pr.position]
        for r, (family, index, sign) in enumerate(pr.labels):
            sel = rows[
                (rows["family"] == family)
                & (rows["direction_index"] == index)
                & (rows["sign"] == sign)
            ]
            radii = torch.tensor(sel["radius_exact"].to_numpy())
            assert torch.isfinite(radii).all()
            ts = torch.cat([0.999 * radii, 1.001 * radii])
            kl = _kl_full(adapter, ids, hook, pr.position, ts[:, None] * pr.v[r])
            eps = torch.tensor(sel["eps"].to_numpy())
            assert torch.all(kl[: len(eps)] < eps) and torch.all(kl[len(eps) :] >= eps)
            # the KL's second derivative along the ray: the curvature column
            f = _logits_of_delta(adapter, ids, hook, pr.position)
            z0 = f(torch.zeros_like(pr.v[r]))
            logp = torch.log_softmax(z0, -1)

            def kl_of_t(t, v=pr.v[r], f=f, logp=logp):
                logq = torch.log_softmax(f(t * v), -1)
                return (logp.exp() * (logp - logq)).sum()

            t0 = torch.zeros((), dtype=torch.float64)
            c2 = torch.autograd.functional.hessian(kl_of_t, t0)
            assert float(sel["curvature"].iloc[0]) == pytest.approx(float(c2), rel=1e-6)
            checked += len(eps)
    assert checked == len(frame)
    err = (frame["radius_curve"] / frame["radius_exact"] - 1).abs()
    assert err[frame["eps"] == 0.01].median() < 1e-3  # agrees with the KL to 4th order


def test_taylor_path_kl_against_direct_softmax_and_series():
    """The Taylor path's KL is the KL of the softmax of the polynomial logits, its small-t
    series is (c2, c3, c4) of ``series_coefficients``, -v is +v at -t, and its first
    crossings never shrink as eps grows."""
    g = torch.Generator().manual_seed(3)
    V, N = 50, 4
    z0 = 3 * torch.randn(2, V, generator=g, dtype=torch.float64)
    logp = torch.log_softmax(z0, -1)
    a = [torch.randn(N, V, generator=g, dtype=torch.float64) / k for k in (1, 2, 3)]
    origin = torch.tensor([0, 1, 1, 0])
    path = TaylorPathKL(logp, a, origin=origin, both_signs=True)
    for i in range(N):
        for sign in (1.0, -1.0):
            t = torch.tensor([0.05, 0.3, 2.0], dtype=torch.float64)
            st = sign * t[:, None]
            z = z0[origin[i]] + st * a[0][i] + st**2 / 2 * a[1][i] + st**3 / 6 * a[2][i]
            logq = torch.log_softmax(z, -1)
            lp = logp[origin[i]]
            direct = (lp.exp() * (lp - logq)).sum(-1)
            ray = 2 * i + (sign < 0)
            got = path.kl_at(torch.full((3,), ray), t)
            assert torch.allclose(got, direct, rtol=1e-10, atol=1e-14)
        # the series at small t
        p = logp[origin[i]].exp()
        c2, c3, c4 = series_coefficients(p, [x[i] for x in a])
        t = torch.tensor(1e-2, dtype=torch.float64)
        series = c2 * t**2 / 2 + c3 * t**3 / 6 + c4 * t**4 / 24
        got = path.kl_at(torch.tensor([2 * i]), t[None])[0]
        assert float(got) == pytest.approx(float(series), rel=1e-5)
    eps_grid = np.geomspace(1e-3, 20, 40)
    roots = first_crossings(
        path, np.tile(eps_grid, (2 * N, 1)), t_start=np.full(2 * N, 1e-3), t_max=np.full(2 * N, 1e4)
    )
    finite = np.where(np.isfinite(roots), roots, np.inf)
    assert (np.diff(finite, axis=1) >= 0).all()


@pytest.mark.slow
def test_validate_several_layers_in_one_run(adapter, tmp_path):
    out = tmp_path / "run"
    families = [f for f in FAMILIES if f != "steering"]
    kw = dict(
        eps=[0.1, 1.0], positions_per_prompt=1, layers=["embed", 1, "final"], families=families
    )
    run = validate(adapter, PROMPTS, out=out, **kw)
    frame = pd.read_parquet(out / "results.parquet")
    assert list(dict.fromkeys(frame["layer"])) == ["embed", "1", "final"]
    key = ["prompt_id", "layer", "position", "family", "direction_index", "sign", "eps"]
    assert not frame.duplicated(key).any()
    for layer in ("embed", "1", "final"):
        rows = frame[frame["layer"] == layer]
        assert set(rows["family"]) == set(families)
        assert (rows["activation_norm"] > 0).all()
        assert np.allclose(rows["radius_relative"], rows["radius_curve"] / rows["activation_norm"])
        cal = sr.calibration.load_calibration(out / calibration_file(layer))
        assert cal.layer == layer
        assert run.calibrations[layer].layer == layer
        assert rows["radius_calibrated"].notna().all()
    summary = json.loads((out / "summary.json").read_text())
    assert {r["layer"] for r in summary} == {"embed", "1", "final"}
    html = (out / "report.html").read_text()
    for layer in ("embed", "1", "final"):
        assert f"id='layer-{layer}'" in html
    assert html.count("data:image/png;base64,") == 9

    # a layer's calibration turns a steering budget's closed forms into coef_calibrated
    cal = run.calibrations["1"]
    vec = torch.randn(adapter.hook_dim(adapter.hook_for_layer(1)), dtype=torch.float64)
    budget = sr.steering_budget(
        adapter,
        ["The cat sat"],
        vector=vec,
        layer=1,
        eps=[0.1],
        calibration=out / calibration_file("1"),
    )
    (row,) = budget.rows
    n = float(vec.norm())
    ids = adapter.tokenize("The cat sat")
    logp = torch.log_softmax(
        adapter.perturbed_logits(
            ids, "blocks.1.hook_resid_post", ids.shape[1] - 1, torch.zeros(1, vec.shape[0])
        )[0],
        -1,
    )
    entropy = float(-(logp.exp() * logp).sum())
    want = cal.predict(
        0.1,
        np.array([row["coef_quadratic"] * n]),
        np.array([row["coef_pade"] * n]),
        np.array([entropy]),
        np.array([row["coef_curve"] * n]),
    )
    assert row["coef_calibrated"] == pytest.approx(float(want[0]) / n, rel=1e-9)

    # a finished run's folder calibrates every layer of a new run of the same layers
    again = validate(adapter, PROMPTS[:3], out=tmp_path / "again", calibration=out, **kw)
    assert set(again.calibrations) == {"embed", "1", "final"}
    with pytest.raises(StableRegionsError, match="holds no calibration of layer 2"):
        validate(adapter, PROMPTS[:3], out=tmp_path / "x", calibration=out, layers=[2])
    assert not (tmp_path / "x").exists()
    # the steering family at a layer where it is undefined
    with pytest.raises(StableRegionsError, match="steering family is undefined at layer embed"):
        validate(adapter, PROMPTS[:3], out=tmp_path / "x", layers=["embed"])
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "layers, message",
    [
        (["embed", "embed"], "given twice"),
        ([7], "out of range"),
        (["middle"], "unknown layer"),
        ([], "no layers"),
    ],
)
def test_validate_bad_layers_write_nothing(adapter, tmp_path, layers, message):
    with pytest.raises(StableRegionsError, match=message):
        validate(adapter, PROMPTS[:2], out=tmp_path / "x", layers=layers)
    assert not (tmp_path / "x").exists()


@pytest.mark.real_model
def test_inner_study_boundaries_on_the_real_model():
    """SmolLM2, block 15, one corpus prompt: the measured radius of one ray per family (both
    signs), re-checked by running the whole float64 model with the perturbation hooked in."""
    from conftest import float64_reference

    from stable_regions.prompts import corpus

    model = sr.load("smollm2-135m")
    twin = float64_reference(model)
    prompts = corpus()
    prompt, partner = prompts[40], prompts[41]
    study = InnerLayerStudy(model, StudySettings(positions_per_prompt=1), "15")
    frame = study.measure(prompt, partner)
    (pr,) = study.rays(prompt, partner)
    ids = model.tokenize(prompt.text)
    hook = model.hook_for_layer(15)
    seen = set()
    for r, (family, index, sign) in enumerate(pr.labels):
        if (family, sign) in seen:
            continue
        seen.add((family, sign))
        sel = frame[
            (frame["family"] == family)
            & (frame["direction_index"] == index)
            & (frame["sign"] == sign)
        ]
        radii = torch.tensor(sel["radius_exact"].to_numpy())
        ts = torch.cat([0.999 * radii, 1.001 * radii])
        kl = _kl_full(twin, ids, hook, pr.position, ts[:, None] * pr.v[r])
        eps = torch.tensor(sel["eps"].to_numpy())
        assert torch.all(kl[: len(eps)] < eps) and torch.all(kl[len(eps) :] >= eps), family
    assert {f for f, _ in seen} == set(FAMILIES)
    # the closed forms are the study's, not the measurement's: the top ray at eps 0.01
    top = frame[(frame["family"] == "top") & (frame["eps"] == 0.01)]
    assert ((top["radius_curve"] / top["radius_exact"] - 1).abs() < 0.01).mean() >= 0.5


def test_bundled_calibration_of_the_nearest_shipped_layer(tmp_path, monkeypatch):
    """``--calibration bundled`` at a block uses the shipped block nearest to it (within an
    eighth of the depth), never the final layer's, and says when none fits."""
    from stable_regions import calibration as calib
    from stable_regions import prompts

    shipped = prompts.package_path("calibrators") / "smollm2-135m-final.json"
    doc = json.loads(shipped.read_text())
    (tmp_path / "m-4.json").write_text(json.dumps({**doc, "model": "m", "layer": "4"}))
    (tmp_path / "m-final.json").write_text(json.dumps({**doc, "model": "m"}))
    real = prompts.package_path
    monkeypatch.setattr(
        prompts, "package_path", lambda name: tmp_path if name == "calibrators" else real(name)
    )
    near = calib.bundled_calibration("m", "6", n_layers=16)  # 2 blocks away: within 16 // 8
    assert near.layer == "6" and near.bands[0].feature == doc["bands"][0]["feature"]
    assert calib.bundled_calibration("m", "final", n_layers=16).layer == "final"
    for far in ("7", "embed", "15"):
        with pytest.raises(
            StableRegionsError, match=f"no bundled calibration fits model 'm' at layer '{far}'"
        ):
            calib.bundled_calibration("m", far, n_layers=16)


def test_reliability_flag_rules():
    """Inside the network a radius is reliable only near the activation (<= 0.1 |h|) and where
    the Pade form agrees with the Taylor path (<= 2%); at the pre-logit vector always."""
    from stable_regions.engine import reliability

    radius = np.array([0.05, 0.5, 0.05, np.inf])
    series = np.array([0.0505, 0.5, 0.06, np.inf])
    ok, why = reliability(radius, 1.0, True, series)
    assert ok.tolist() == [True, False, False, False]
    assert why[0] == "" and "0.1 |h|" in why[1] and "differ by more than 2%" in why[2]
    assert "no crossing" in why[3]
    ok, why = reliability(radius, 1.0, False, series)
    assert ok.all() and (why == "").all()
