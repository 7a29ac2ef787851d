"""The bundled pretrained models: measured radii against an independent full-model brute force.

Needs `stable-regions models install --all` (the README's test command runs it).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import float64_reference

import stable_regions as sr
from stable_regions.models import PRELOGIT

pytestmark = pytest.mark.real_model

PROMPTS = [
    "The capital of France is Paris, and",
    "def add(a, b):\n    return",
    "1, 1, 2, 3, 5, 8,",
    "Le chat dort sur le canapé.",
]
EPS = [0.01, 0.1, 1.0]


@pytest.fixture(scope="module", params=["smollm2-135m", "gemma3-270m"])
def loaded(request):
    adapter = sr.load(request.param)
    # The brute force runs the whole float64 model (full prefix, hooked), not the analysis path.
    reference = float64_reference(adapter)
    frames = []
    results = []
    for i, prompt in enumerate(PROMPTS):
        res = sr.analyze(adapter, prompt, eps=EPS, positions="all")
        df = res.to_frame()
        df["prompt"] = i
        frames.append(df)
        results.append(res)
    yield request.param, adapter, reference, results, frames
    del reference


def test_measured_radius_matches_full_model_brute_force(loaded):
    """At every position: running the whole float64 model, the KL stays below eps for
    t < 0.999 r along both signs of the top direction, and reaches eps by 1.001 r along one."""
    name, adapter, reference, results, frames = loaded
    checked = 0
    for prompt, res, df in zip(PROMPTS, results, frames, strict=True):
        ids = reference.tokenize(prompt)
        with torch.no_grad():
            logp_all = torch.log_softmax(reference.forward(ids).logits[0].to(torch.float64), -1)
        for k, pos in enumerate(sorted(df.position.unique())):
            v = res.directions[k]
            fracs = np.array([0.1, 0.3, 0.5, 0.7, 0.85, 0.95, 0.999, 1.001])
            radii = [
                float(df[(df.position == pos) & (df.eps == e)].radius_exact.iloc[0]) for e in EPS
            ]
            assert all(np.isfinite(r) and r > 0 for r in radii), (name, prompt, pos, radii)
            # one whole-model pass per position: every eps, both signs, every fraction
            ts = torch.tensor(np.outer(radii, fracs), dtype=torch.float64).reshape(-1)
            deltas = torch.cat([ts[:, None] * v[None], -ts[:, None] * v[None]])
            logits = reference.perturbed_logits(ids, PRELOGIT, int(pos), deltas)
            logq = torch.log_softmax(logits, -1)
            kl = (logp_all[pos].exp() * (logp_all[pos] - logq)).sum(-1).numpy()
            kl = kl.reshape(2, len(EPS), len(fracs)).transpose(1, 0, 2)  # (eps, sign, fraction)
            for e, kl_e in zip(EPS, kl, strict=True):
                assert kl_e[:, :-1].max() < e, (name, prompt, pos, e, kl_e)
                assert kl_e[:, -1].max() >= e, (name, prompt, pos, e, kl_e)
                checked += 1
    assert checked >= 3 * 25


def test_corrected_form_beats_quadratic(loaded):
    """Relative error against the measured boundary, all positions of all prompts."""
    import pandas as pd

    name, *_, frames = loaded
    df = pd.concat(frames)
    err = lambda col, g: (g[col] / g.radius_exact - 1).abs()  # noqa: E731
    for e, g in df.groupby("eps"):
        quad, corr = err("radius_quadratic", g), err("radius_pade", g)
        print(
            f"{name} eps={e}: n={len(g)} quadratic median {quad.median():.4%} p90 {quad.quantile(0.9):.4%}; "
            f"corrected median {corr.median():.4%} p90 {corr.quantile(0.9):.4%}"
        )
        if e <= 0.1:
            assert corr.median() * 5 < quad.median()
            assert corr.quantile(0.9) * 5 < quad.quantile(0.9)
        assert corr.median() < quad.median()
    # the exact closed-form curve is the model's own curve at the pre-logit vector
    assert np.allclose(df.radius_curve, df.radius_exact, rtol=1e-5)


def test_one_position_json_round_trip(loaded):
    import json

    name, adapter, *_ = loaded
    res = sr.analyze(adapter, "Hello", eps=[0.5], positions="last")
    doc = json.loads(json.dumps(res.to_json()))
    assert doc["model"] == name and len(doc["rows"]) == 1
    row = doc["rows"][0]
    for col in [
        "position",
        "token",
        "eps",
        "entropy",
        "lambda_max",
        "effective_rank",
        "radius_quadratic",
        "radius_pade",
        "radius_exact",
    ]:
        assert col in row
    assert row["radius_pade"] > 0 and row["lambda_max"] > 0


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_inner_layers_measured_radius_matches_full_model(name):
    """Blocks near 1/4, 1/2 and 3/4 depth: the boundary measured through the cached suffix agrees
    with full-prefix float64 runs of the whole model to 1e-3 relative, and the Pade form beats
    the quadratic at small eps."""
    adapter = sr.load(name)
    reference = float64_reference(adapter)
    prompt = "The capital of France is Paris, and"
    ids = reference.tokenize(prompt)
    n_layers = adapter.n_layers
    positions = [ids.shape[1] - 1] if name == "gemma3-270m" else [3, ids.shape[1] - 1]
    quad_err, corr_err = [], []
    for layer in (n_layers // 4, n_layers // 2, (3 * n_layers) // 4):
        res = sr.analyze(adapter, prompt, eps=[0.01, 0.1], positions=positions, layer=layer)
        df = res.to_frame()
        hook = f"blocks.{layer}.hook_resid_post"
        for k, pos in enumerate(positions):
            v = res.directions[k]
            logp = torch.log_softmax(
                reference.perturbed_logits(ids, hook, pos, torch.zeros(1, v.shape[0]))[0], -1
            )
            for e in (0.01, 0.1):
                row = df[(df.position == pos) & (df.eps == e)].iloc[0]
                r = float(row.radius_exact)
                ts = torch.tensor([0.3, 0.7, 0.999, 1.001], dtype=torch.float64) * r
                deltas = torch.cat([ts[:, None] * v[None], -ts[:, None] * v[None]])
                logq = torch.log_softmax(reference.perturbed_logits(ids, hook, pos, deltas), -1)
                kl = (logp.exp() * (logp - logq)).sum(-1).numpy().reshape(2, -1)
                assert kl[:, :-1].max() < e, (name, layer, pos, e, kl)
                assert kl[:, -1].max() >= e, (name, layer, pos, e, kl)
                quad_err.append(abs(row.radius_quadratic / r - 1))
                corr_err.append(abs(row.radius_pade / r - 1))
    print(
        f"{name} inner layers: quadratic median {np.median(quad_err):.3%}, corrected median {np.median(corr_err):.3%}"
    )
    assert np.median(corr_err) < np.median(quad_err)
