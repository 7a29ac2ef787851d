"""Geometry against independent references: autograd Hessians, dense eigh, known roots."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stable_regions.geometry import (
    FisherOperator,
    LogitHead,
    RayCurve,
    effective_rank,
    first_crossings,
    lanczos,
    lanczos_topk,
    radius_pade,
    radius_quadratic,
    radius_series,
)


@pytest.fixture(autouse=True, scope="module")
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


HEADS = {
    "linear": dict(bias=False, scale=1.0, softcap=None),
    "bias": dict(bias=True, scale=1.0, softcap=None),
    "scaled": dict(bias=True, scale=0.37, softcap=None),
    "softcap": dict(bias=False, scale=1.0, softcap=4.0),
    "softcap_bias_scale": dict(bias=True, scale=1.9, softcap=3.0),
}


def make_head(kind: str, V: int = 60, d: int = 10, seed: int = 0) -> tuple[LogitHead, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    spec = HEADS[kind]
    W = torch.randn(V, d, generator=g)
    b = torch.randn(V, generator=g) if spec["bias"] else None
    head = LogitHead(W, b, spec["scale"], spec["softcap"])
    h = torch.randn(d, generator=g)
    return head, h


def kl_reference(head: LogitHead, h: torch.Tensor):
    """KL(p || softmax(z(h + x))) written out by hand, for autograd."""
    logp = torch.log_softmax(head.logits(h), -1).detach()

    def f(x):
        return (logp.exp() * (logp - torch.log_softmax(head.logits(h + x), -1))).sum()

    return f


def rel(a, b):
    return (a - b).norm() / b.norm()


@pytest.mark.parametrize("kind", list(HEADS))
def test_fisher_matches_autograd_hessian(kind):
    head, h = make_head(kind)
    H_ref = torch.autograd.functional.hessian(kl_reference(head, h), torch.zeros_like(h))
    op = FisherOperator.from_head(head, h[None])
    assert rel(op.dense()[0], H_ref) < 1e-10
    v = torch.randn(3, h.numel())
    Hv = torch.stack([op.matvec(vi) for vi in v])
    assert rel(Hv, v @ H_ref) < 1e-10
    q = op.quadratic_form(v[None])[0]
    q_ref = torch.einsum("kd,de,ke->k", v, H_ref, v)
    assert torch.allclose(q, q_ref, rtol=1e-10, atol=0)
    assert torch.isclose(op.trace()[0], torch.trace(H_ref), rtol=1e-10)
    # Symmetric, PSD and (linear head without bias) the all-equal logit shift is in the null space.
    evals_ref, evecs_ref = torch.linalg.eigh(H_ref)
    assert evals_ref.min() > -1e-12 * evals_ref.max()
    evals, evecs = op.top_eigenpairs(k=3)
    assert torch.allclose(evals[0], evals_ref.flip(0)[:3], rtol=1e-9, atol=0)
    overlap = (evecs[0] @ evecs_ref.flip(1)[:, :3]).abs().diagonal()
    assert torch.allclose(overlap, torch.ones(3), atol=1e-8)


def test_fisher_batch_rows_are_independent():
    head, _ = make_head("softcap")
    hs = torch.randn(4, head.d_model)
    op = FisherOperator.from_head(head, hs)
    v = torch.randn(4, head.d_model)
    out = op.matvec(v)
    for i in range(4):
        single = FisherOperator.from_head(head, hs[i : i + 1])
        assert rel(out[i], single.matvec(v[i])) < 1e-13


def test_constant_logit_shift_is_null():
    """H 1_logits = 0: a direction whose logit change is the same for every token."""
    d, V = 8, 30
    W = torch.randn(V, d)
    W[:, 0] = 1.0  # coordinate 0 shifts every logit by the same amount
    op = FisherOperator(W, torch.softmax(torch.randn(V), -1))
    e0 = torch.zeros(d)
    e0[0] = 1.0
    assert op.matvec(e0).abs().max() < 1e-12


def test_lanczos_matches_eigh_on_batch():
    g = torch.Generator().manual_seed(3)
    P, d = 5, 40
    A = torch.randn(P, d, d, generator=g)
    A = A @ A.transpose(1, 2) / d
    evals, evecs, resid = lanczos_topk(
        lambda x: torch.einsum("pij,pj->pi", A, x), torch.randn(P, d, generator=g), k=4
    )
    ref_vals, ref_vecs = torch.linalg.eigh(A)
    assert torch.allclose(evals, ref_vals.flip(-1)[:, :4], rtol=1e-10, atol=0)
    overlap = torch.einsum("pkd,pdk->pk", evecs, ref_vecs.flip(-1)[:, :, :4]).abs()
    assert torch.allclose(overlap, torch.ones_like(overlap), atol=1e-8)


def test_lanczos_krylov_basis_and_its_trace():
    """The run's basis is orthonormal and its trace is tr(Q^T A Q), computed here densely."""
    g = torch.Generator().manual_seed(4)
    P, d = 3, 60
    A = torch.randn(P, d, d, generator=g, dtype=torch.float64)
    A = A @ A.transpose(1, 2) / d
    run = lanczos(
        lambda x: torch.einsum("pij,pj->pi", A, x),
        torch.randn(P, d, generator=g, dtype=torch.float64),
        k=1,
        tol=1e-3,
    )
    Q = run.basis
    m = Q.shape[1]
    assert 1 <= m < d  # stopped early: a proper subspace
    eye = torch.eye(m, dtype=torch.float64).expand(P, -1, -1)
    assert torch.allclose(Q @ Q.transpose(1, 2), eye, atol=1e-12)
    dense = torch.einsum("pmd,pde,pne->pmn", Q, A, Q).diagonal(dim1=1, dim2=2).sum(-1)
    assert torch.allclose(run.basis_trace, dense, rtol=1e-12)


def test_lanczos_low_rank_and_zero_operator():
    d = 30
    u = torch.randn(d)
    A = torch.outer(u, u)  # rank one: Lanczos breaks down after one step
    evals, evecs, _ = lanczos_topk(lambda x: x @ A, torch.randn(1, d), k=2)
    assert torch.isclose(evals[0, 0], u @ u, rtol=1e-12)
    assert abs(evals[0, 1]) < 1e-10 * (u @ u)
    assert torch.isclose((evecs[0, 0] @ u).abs(), u.norm(), rtol=1e-12)
    evals, evecs, _ = lanczos_topk(lambda x: 0 * x, torch.randn(1, d), k=1)
    assert evals.abs().max() == 0 and torch.isclose(evecs.norm(), torch.tensor(1.0))


def test_effective_rank_is_trace_over_top():
    head, h = make_head("linear", V=80, d=12)
    op = FisherOperator.from_head(head, h[None])
    H = op.dense()[0]
    ev = torch.linalg.eigvalsh(H)
    r = effective_rank(op.trace(), op.top_eigenpairs(1)[0][:, 0])
    assert torch.isclose(r[0], ev.sum() / ev.max(), rtol=1e-10)
    assert 1.0 <= r[0] <= 12.0


@pytest.mark.parametrize("kind", list(HEADS))
def test_exact_curve_matches_direct_kl(kind):
    head, h = make_head(kind, seed=1)
    v = torch.randn(2, head.d_model)
    v = v / v.norm(dim=-1, keepdim=True)
    curve = RayCurve.from_head(head, h, v)
    ts = torch.tensor([1e-3, 0.1, 0.7, 3.0, -0.5])
    got = curve.kl(ts)
    f = kl_reference(head, h)
    ref = torch.tensor([[float(f(t * vi)) for vi in v] for t in ts])
    assert torch.allclose(got, ref, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("kind", list(HEADS))
def test_series_coefficients_match_autograd_derivatives(kind):
    head, h = make_head(kind, seed=2)
    v = torch.randn(head.d_model)
    v = v / v.norm()
    f = kl_reference(head, h)
    t = torch.zeros((), requires_grad=True)
    y = f(t * v)
    derivs = []
    for _ in range(4):
        (y,) = torch.autograd.grad(y, t, create_graph=True)
        derivs.append(y)
    c2, c3, c4 = RayCurve.from_head(head, h, v[None]).coefficients()
    assert abs(float(derivs[0].detach())) < 1e-12  # the KL is stationary at t = 0
    derivs = [d.detach() for d in derivs]
    assert math.isclose(float(c2[0]), float(derivs[1]), rel_tol=1e-10)
    assert math.isclose(float(c3[0]), float(derivs[2]), rel_tol=1e-9)
    assert math.isclose(float(c4[0]), float(derivs[3]), rel_tol=1e-9)
    # and c2 is the quadratic form of H
    op = FisherOperator.from_head(head, h[None])
    assert math.isclose(float(c2[0]), float(op.quadratic_form(v[None, None])[0, 0]), rel_tol=1e-10)


def test_radius_closed_forms():
    c2, c3 = torch.tensor([2.0, 2.0, 2.0]), torch.tensor([0.0, 3.0, -3.0])
    eps = 0.05
    q = radius_quadratic(c2, eps)
    assert torch.allclose(q, torch.sqrt(torch.tensor(2 * eps / 2.0)).expand(3))
    t = radius_pade(c2, c3, eps)
    beta = -c3 / (3 * c2)
    assert torch.allclose(c2 * t**2 / 2, eps * (1 + beta * t), rtol=1e-12)
    assert t[1] < q[1] < t[2]  # positive skew: KL rises faster, so the boundary is nearer
    # [2/2]: c2 t^2/2 = eps (1 + beta t + gamma t^2), and it reduces to [2/1] when gamma = 0
    c4 = torch.tensor([0.5, -1.0, 4.0])
    t22 = radius_pade(c2, c3, eps, c4)
    gamma = beta**2 - c4 / (12 * c2)
    assert torch.allclose(c2 * t22**2 / 2, eps * (1 + beta * t22 + gamma * t22**2), rtol=1e-12)
    assert torch.allclose(radius_pade(c2, c3, eps, 12 * c2 * beta**2), t, rtol=1e-12)
    # a [2/2] form that saturates below eps (large positive gamma) falls back to [2/1]
    sat = radius_pade(torch.tensor(1.0), torch.tensor(0.0), 1.0, torch.tensor(-100.0))
    assert torch.isclose(sat, radius_pade(torch.tensor(1.0), torch.tensor(0.0), 1.0))
    assert math.isinf(float(radius_quadratic(torch.tensor(0.0), eps)))
    assert math.isinf(float(radius_pade(torch.tensor(0.0), torch.tensor(1.0), eps)))
    # series root of t^2 + t^3 = 2 (c2=2, c3=6): t = 1
    assert math.isclose(radius_series([2.0, 6.0], 2.0), 1.0, rel_tol=1e-12)
    # c2 t^2/2 - t^3/6 tops out at 2/3 for c2 = 1, c3 = -1: no root above that
    assert math.isinf(radius_series([1.0, -1.0], 1.0))


KNOWN = [
    # (f, level, first crossing)
    (lambda t: t**2, 2.0, math.sqrt(2.0)),
    (lambda t: np.expm1(np.minimum(t, 50.0)), 0.3, math.log1p(0.3)),
    (lambda t: 1e6 * t**3, 1e-9, 1e-5),
    # not monotone: the first crossing is at 1.0 although it dips below afterwards
    (lambda t: np.where(t < 1.5, t, 3.0 - t), 1.0, 1.0),
]


def _rows(fns):
    def f(rays, ts):
        return np.array([fns[r](t) for r, t in zip(rays, ts, strict=True)], dtype=float)

    return f


@pytest.mark.parametrize("start", ["small", "past_root"])  # past the root: the search walks down
def test_first_crossings_known_roots(start):
    fns = [k[0] for k in KNOWN]
    levels = np.array([[k[1]] for k in KNOWN])
    t_start = 1e-3 if start == "small" else 1.3 * np.array([k[2] for k in KNOWN])
    got = first_crossings(_rows(fns), levels, t_start=t_start, t_max=1e6, rtol=1e-10)[:, 0]
    assert np.allclose(got, [k[2] for k in KNOWN], rtol=1e-8, atol=0)


def test_first_crossings_many_levels_and_misleading_guesses():
    """Levels share one scan per ray; guesses only speed things up, even when wrong."""
    f = _rows([lambda t: t**2, lambda t: np.where(t < 1.5, t, 3.0 - t)])
    levels = np.array([[0.01, 1.0, 4.0], [0.2, 0.5, 1.0]])
    truth = np.array([[0.1, 1.0, 2.0], [0.2, 0.5, 1.0]])
    plain = first_crossings(f, levels, t_start=1e-3, t_max=1e3, rtol=1e-10)
    assert np.allclose(plain, truth, rtol=1e-8)
    for guesses in (truth * 1.0004, truth * 3.0, truth * 0.01, np.full_like(truth, np.nan)):
        got = first_crossings(f, levels, t_start=1e-3, t_max=1e3, rtol=1e-10, guesses=guesses)
        assert np.allclose(got, truth, rtol=1e-8)
    # the non-monotone ray: a guess past the dip (at 2.9 the function is back below 0.2) must not win
    bump = _rows([lambda t: np.where(t < 1.5, t, 3.0 - t)])
    got = first_crossings(
        bump, np.array([[0.2]]), t_start=1e-3, t_max=1e3, guesses=np.array([[2.8]])
    )
    assert math.isclose(got[0, 0], 0.2, rel_tol=1e-6)


def _first_crossing_on_a_grid(fn, level: float) -> float:
    """The first grid point of 1e6 in (0, 10] at or above ``level``, then bisection between it
    and the point before to 1e-15: the reference, independent of ``first_crossings``."""
    t = np.linspace(1e-5, 10.0, 1_000_000)
    j = int(np.argmax(fn(t) >= level))
    lo, hi = t[j - 1], t[j]
    while hi - lo > 1e-15 * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if fn(mid) < level else (lo, mid)
    return hi


def _counted(fns):
    calls: list[int] = []
    rows = _rows(fns)

    def f(rays, ts):
        calls.append(len(rays))
        return rows(rays, ts)

    return f, calls


@pytest.mark.parametrize("rtol", [1e-4, 1e-6, 1e-10])
@pytest.mark.parametrize("rows_per_call", [0, 64])
@pytest.mark.parametrize("off", [1.0004, 1.02, None])  # guesses 0.04% / 2% off, or none
def test_first_crossings_close_narrow_brackets_in_few_calls(rtol, rows_per_call, off):
    """A pass through a network costs mostly per call: the refinement closes a bracket whose
    secant is already good with a pair around it, instead of regula falsi moving one end a
    step at a time (21 calls at rtol 1e-6 with guesses 2% off, 35 at 1e-10), and fills calls
    that have room with evenly spaced points."""
    fns = [
        lambda t: t**2,
        lambda t: np.expm1(np.minimum(t, 50.0)),
        lambda t: 1e6 * t**3,
        lambda t: t**2 * (1 + 0.3 * np.sin(5 * t)),
    ]
    levels = np.array([[0.01, 1.0, 4.0]] * len(fns))
    truth = np.array(
        [
            [_first_crossing_on_a_grid(fn, level) for level in row]
            for fn, row in zip(fns, levels, strict=True)
        ]
    )
    f, calls = _counted(fns)
    got = first_crossings(
        f,
        levels,
        t_start=1e-3,
        t_max=1e3,
        rtol=rtol,
        guesses=None if off is None else truth * off,
        rows_per_call=rows_per_call,
    )
    assert np.abs(got / truth - 1).max() <= rtol
    limit = {1.0004: 8, 1.02: 10, None: 14 if rows_per_call == 0 else 10}[off]
    assert len(calls) <= limit


def test_first_scan_call_reaches_past_the_guesses():
    """With guesses, the scan's first call holds each ray's start and as many grid points as
    pass its largest guess (from a quarter of the smallest one, as the measurements inside
    the network start), so the next call already refines; a start past a crossing still
    walks down, and every answer is the true first crossing."""
    from stable_regions.geometry.roots import first_points

    t0 = np.array([1.0, 1.0, 1.0, 2.0, 1.0])
    guesses = np.array([[3.0, 7.9], [1.5, np.nan], [np.inf, np.nan], [0.5, 1.0], [1e9, 1e9]])
    # 2^3 = 8 passes 7.9; 2^1 passes 1.5; no finite guess: chunk; guesses below the start:
    # chunk; far guesses: at most 3 chunks
    assert first_points(t0, guesses, 2.0, 6).tolist() == [4, 2, 6, 6, 18]
    assert first_points(t0, None, 2.0, 6).tolist() == [6] * 5

    fns = [lambda t: t**2, lambda t: t**3, lambda t: np.where(t < 1.5, t, 3.0 - t)]
    levels = np.array([[0.01, 1.0], [0.001, 1.0], [0.2, 1.0]])
    truth = np.array([[0.1, 1.0], [0.1, 1.0], [0.2, 1.0]])
    f, calls = _counted(fns)
    got = first_crossings(
        f, levels, t_start=0.25 * truth[:, 0], t_max=1e3, rtol=1e-8, guesses=truth * 1.02
    )
    np.testing.assert_allclose(got, truth, rtol=1e-7)
    expected = first_points(0.25 * truth[:, 0], truth * 1.02, 2.0, 6)
    assert calls[0] == len(fns) + expected.sum()  # the starts and their grids, one call
    assert all(c <= 2 * levels.size for c in calls[1:])  # then pairs about each crossing
    f, calls = _counted(fns)  # starts past the first crossings: walk down, then scan
    got = first_crossings(f, levels, t_start=1.2, t_max=1e3, rtol=1e-8, guesses=truth * 1.02)
    np.testing.assert_allclose(got, truth, rtol=1e-7)


def test_first_crossings_never_reached():
    got = first_crossings(
        _rows([np.tanh, lambda t: t]), np.array([[2.0], [3.0]]), t_start=1e-3, t_max=1e4
    )
    assert math.isinf(got[0, 0]) and math.isclose(got[1, 0], 3.0, rel_tol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_head_transpose_matches_the_dense_product(dtype):
    """``LogitHead.transpose_wide``: ``scale W^T r`` against the dense float64 product of the
    same (rounded) weights; a 16-bit W in float32 chunks (chunks of 7 rows here)."""
    g = torch.Generator().manual_seed(3)
    W = torch.randn(50, 6, dtype=torch.float64, generator=g).to(dtype)
    head = LogitHead(W, None, 1.7, None)
    r = torch.randn(4, 50, dtype=torch.float64, generator=g)
    got = head.transpose_wide(r, chunk=7 * 4 * 6)
    want = 1.7 * r @ W.to(torch.float64)
    assert got.dtype == torch.promote_types(dtype, torch.float32)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert float((got.double() - want).norm() / want.norm()) < tol


def test_every_closed_form_radius_rises_with_eps():
    """Property: over random series coefficients (both skews, saturating and pole-bound [2/2]
    forms) and a fine eps grid, no radius shrinks as eps grows; on the approximant's rising
    branch the [2/2] root still solves it."""
    from stable_regions.geometry.curve import pade_branch

    g = torch.Generator().manual_seed(0)
    n = 20000
    c2 = torch.rand(n, generator=g, dtype=torch.float64) * 2 + 1e-3
    c3 = torch.randn(n, generator=g, dtype=torch.float64) * 3
    c4 = torch.randn(n, generator=g, dtype=torch.float64) * 10
    eps_grid = np.geomspace(1e-5, 1e2, 300)
    for form in (
        lambda e: radius_quadratic(c2, e),
        lambda e: radius_pade(c2, c3, e),
        lambda e: radius_pade(c2, c3, e, c4),
    ):
        radii = torch.stack([form(e) for e in eps_grid], 1)
        assert not torch.isnan(radii).any()
        assert (torch.diff(radii, dim=1) >= -1e-12 * radii[:, :-1]).all()
    t_end, eps_end = pade_branch(c2, c3, c4)
    beta = -c3 / (3 * c2)
    gamma = beta**2 - c4 / (12 * c2)
    for e in (1e-3, 0.1, 1.0):
        t = radius_pade(c2, c3, e, c4)
        on = e < eps_end
        lhs = c2[on] * t[on] ** 2 / 2
        rhs = e * (1 + beta[on] * t[on] + gamma[on] * t[on] ** 2)
        assert torch.allclose(lhs, rhs, rtol=1e-9)
        assert (t[on] <= t_end[on] * (1 + 1e-9)).all()


def test_lanczos_per_position_stop_matches_dense_eigh():
    """``lanczos(independent=True)`` (each position stops when converged, the products see
    only the rest) gives the dense top eigenpairs, as the lockstep run does, on a float32
    strided basis too (the product then reshapes, not broadcasts, its rows)."""
    g = torch.Generator().manual_seed(7)
    P, V, d = 5, 300, 12
    W = torch.randn(V, d, generator=g)
    logits = 3.0 * torch.randn(P, V, generator=g) * torch.linspace(0.2, 2.0, P)[:, None]
    p = torch.softmax(logits, -1)
    op = FisherOperator(W, p)
    ref = torch.linalg.eigvalsh(op.dense()).flip(-1)[:, :3]
    for independent in (False, True):
        run = op.lanczos(3, tol=1e-10, independent=independent)
        assert torch.allclose(run.values, ref, rtol=1e-8, atol=0)
    single = FisherOperator(W.float(), p.float())
    run = single.lanczos(3, tol=1e-4, independent=True)
    assert torch.allclose(run.values, ref, rtol=1e-4, atol=0)
    kept = op.subset(torch.tensor([True, False, True, False, True]))
    assert torch.allclose(torch.linalg.eigvalsh(kept.dense()).flip(-1)[:, :3], ref[::2])


def _kl_along(logp: torch.Tensor, b: torch.Tensor, t: float) -> float:
    """KL(p || softmax(logp + t b)) for one ray, written out in float64."""
    logq = torch.log_softmax(logp + t * b, -1)
    return float((logp.exp() * (logp - logq)).sum())


@pytest.mark.parametrize("cache_bytes", [None, 1])
def test_cgf_crossings_are_exits_and_match_bisection(cache_bytes, monkeypatch):
    """Newton from above (its last step taken on convexity) against 200 bisection steps of
    the KL written out here: every root reaches the level, and lies within 1e-6 of the
    bisection's; the same a row at a time (the cache-sized blocks), and with rays that use
    a few of many origins."""
    from stable_regions import budget
    from stable_regions.geometry import cgf_crossings

    if cache_bytes is not None:
        monkeypatch.setattr(budget, "CACHE_BYTES", cache_bytes)
    g = torch.Generator().manual_seed(11)
    P, R, V = 6, 9, 400
    logp = torch.log_softmax(4.0 * torch.randn(P, V, generator=g), -1)
    b = torch.randn(R, V, generator=g) * torch.linspace(0.3, 3.0, R)[:, None]
    origin = torch.tensor([4, 1, 4, 5, 1, 4, 1, 5, 4])
    levels = torch.tensor([0.001, 0.01, 0.1, 1.0]).expand(R, -1)
    got = cgf_crossings(logp, b, levels.clone(), origin=origin)
    for r in range(R):
        for e, level in enumerate(levels[0].tolist()):
            lo, hi = 0.0, 1.0
            while _kl_along(logp[origin[r]], b[r], hi) < level:
                hi *= 2
            for _ in range(200):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if _kl_along(logp[origin[r]], b[r], mid) < level else (lo, mid)
            root = float(got[r, e])
            assert _kl_along(logp[origin[r]], b[r], root) >= level * (1 - 1e-12)
            assert abs(root / hi - 1) < 1e-6
