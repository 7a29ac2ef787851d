"""``RayKL`` (the measured boundary's KL) against the direct float64 formula."""

from __future__ import annotations

import math

import numpy as np
import torch

from stable_regions.probes.boundary import RayKL


def _direct(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(p_logits.double(), -1)
    logq = torch.log_softmax(q_logits.double(), -1)
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), 0.0).sum(-1)


def test_ray_kl_matches_the_direct_formula_with_large_and_masked_logits():
    """``sum p log p - p . z + logsumexp z`` keeps the KL to ~1e-13 absolute with logits of
    size 40 (small KL included), and a token masked at the origin (logit -inf, p = 0) or along
    the ray (where p > 0: KL inf) takes the fallback."""
    g = torch.Generator().manual_seed(0)
    V, d, R = 300, 8, 4
    W = torch.randn(V, d, dtype=torch.float64, generator=g)
    mask = torch.zeros(V, dtype=torch.float64)
    mask[7] = -math.inf  # masked at every point: p = 0 there

    def logits(x: torch.Tensor) -> torch.Tensor:
        z = 10 * x @ W.T + mask
        z[:, 11] = torch.where(x[:, 0] > 4.0, -math.inf, z[:, 11])  # masked far out only
        return z

    h = torch.randn(R, d, dtype=torch.float64, generator=g)
    h[:, 0] = 0.5
    v = torch.nn.functional.normalize(torch.randn(R, d, dtype=torch.float64, generator=g), dim=-1)
    v[:, 0] = 1.0
    kl = RayKL(logits, h, v)
    rays = np.repeat(np.arange(R), 4)
    ts = np.tile([1e-4, 1e-2, 0.3, 6.0], R)
    got = torch.as_tensor(kl(rays, ts))
    x = h[rays] + torch.as_tensor(ts)[:, None] * v[rays]
    want = _direct(logits(h)[rays], logits(x))
    far = torch.as_tensor(ts) == 6.0
    assert torch.isinf(got[far]).all() and torch.isinf(want[far]).all()
    assert float((got[~far] - want[~far]).abs().max()) < 1e-12
    small = torch.as_tensor(ts) == 1e-4
    assert float(((got[small] - want[small]) / want[small]).abs().max()) < 1e-6


def test_measure_near_confirms_good_roots_in_one_call_and_measures_the_rest():
    """Along rays of a linear head (logits u0 + t b) the curve's roots are confirmed by one
    call and agree with the full search; a wrong root, or an 'inf' that is reached, is
    measured from scratch; the answers match a brute-force scan of the KL either way."""
    from stable_regions.probes.boundary import LinearRayKL, measure_boundaries, measure_near

    g = torch.Generator().manual_seed(3)
    u0 = 3.0 * torch.randn(6, 500, generator=g, dtype=torch.float64)
    b = torch.randn(6, 500, generator=g, dtype=torch.float64)
    b[5] = 0.0  # a ray along which nothing changes: never reaches eps
    kl = LinearRayKL(u0, b)
    eps = [0.01, 0.5]
    search = dict(t_start=np.full(6, 1e-3), t_max=np.full(6, 1e3), rtol=1e-8)
    full = measure_boundaries(kl, eps, **search)
    assert np.isinf(full[5]).all() and np.isfinite(full[:5]).all()
    calls = kl.calls
    near = measure_near(kl, eps, full, **search)
    assert kl.calls == calls + 1  # one call confirmed every root
    np.testing.assert_allclose(near, full, rtol=1e-8)
    wrong = full.copy()
    wrong[1, 0] *= 1.01  # off by 1%: not confirmed
    wrong[2, 1] = np.inf  # claimed never reached: it is
    again = measure_near(kl, eps, wrong, **search)
    np.testing.assert_allclose(again, full, rtol=1e-8)
    # an independent check: the KL just below and above each answer
    for r in range(5):
        for e, level in enumerate(eps):
            t = again[r, e]
            below, above = kl(np.array([r, r]), np.array([t * (1 - 1e-7), t * (1 + 1e-7)]))
            assert below < level <= above


def test_linear_ray_kl_rays_sharing_an_origin():
    """Rays 2j and 2j + 1 at origin j (``origin``) give the KL of rays whose origin rows are
    repeated, and the direct softmax KL of the logits u0[j] + t b[r]; in chunks of a few rows
    (from cache) as in one."""
    from stable_regions.probes.boundary import LinearRayKL

    g = torch.Generator().manual_seed(5)
    u0 = 2.0 * torch.randn(3, 40_000, generator=g, dtype=torch.float64)
    b = torch.randn(6, 40_000, generator=g, dtype=torch.float64)
    origin = torch.arange(3).repeat_interleave(2)
    shared, repeated = LinearRayKL(u0, b, origin), LinearRayKL(u0[origin], b)
    rays = np.repeat(np.arange(6), 3)
    ts = np.tile([1e-3, 0.05, 0.4], 6)
    got = shared(rays, ts)
    np.testing.assert_array_equal(got, repeated(rays, ts))
    r = torch.as_tensor(rays)
    want = _direct(u0[origin[r]], u0[origin[r]] + torch.as_tensor(ts)[:, None] * b[r])
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-9, atol=1e-12)  # KL keeps ~1e-13
