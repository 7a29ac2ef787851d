"""The fast top-curvature search against dense eigh in float64, and the scan on a model."""

from __future__ import annotations

import pytest
import torch
from conftest import char_tokenizer, tiny_model

import stable_regions as sr
from stable_regions.geometry import (
    FisherOperator,
    cumulants,
    curvature_trace,
    direction_cumulants,
    radius_pade,
    top_curvature,
    top_eigenpair_float64,
)
from stable_regions.studies.scan import Scanner


def _problem(V=400, d=24, P=6, seed=0):
    """Random unembedding and logits, two of the rows confident (p_top > 0.999)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, d, generator=g, dtype=torch.float64)
    h = torch.randn(P, d, generator=g, dtype=torch.float64)
    h[:2] = 3.0 * W[[5, 17]] / W[[5, 17]].norm(dim=-1, keepdim=True) * 4.0
    return W, h @ W.T


def _dense_top(W, logits):
    p = torch.softmax(logits, -1)
    H = FisherOperator(W, p).dense()
    evals, evecs = torch.linalg.eigh(H)
    return evals[:, -1], evecs[:, :, -1], p


def test_the_problem_has_confident_rows():
    _, logits = _problem()
    assert (torch.softmax(logits, -1).amax(-1)[:2] > 0.999).all()


def test_top_curvature_matches_dense_eigh_in_float64():
    W, logits = _problem()
    lam_ref, vec_ref, p = _dense_top(W, logits)
    found = top_curvature(W, logits, tol=1e-12, max_iter=24)
    torch.testing.assert_close(found.lambda_max, lam_ref, rtol=1e-9, atol=0)
    cos = (found.vector * vec_ref).sum(-1).abs()
    assert (cos > 1 - 1e-9).all()
    # c3, c4: the cumulants of W v under p, computed directly
    _, k2, k3, k4 = cumulants(p, found.vector @ W.T)
    torch.testing.assert_close(found.lambda_max, k2, rtol=1e-10, atol=0)
    torch.testing.assert_close(found.c3, k3, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(found.c4, k4, rtol=1e-8, atol=1e-12)


def test_vocabulary_chunks_and_finished_positions_give_the_dense_answer(monkeypatch):
    """Chunks of 37 of the 400 tokens: the product's reused buffers, positions leaving the
    loop at different steps (dropped by index) and the moments merged chunk by chunk
    (Pebay's pairwise update) must give what one dense float64 computation gives."""
    import stable_regions.geometry.topcurv as topcurv

    monkeypatch.setattr(topcurv, "_chunk", lambda P, V: 37)
    W, logits = _problem()
    lam_ref, vec_ref, p = _dense_top(W, logits)
    found = top_curvature(W, logits, tol=1e-12, max_iter=24)
    assert len(set(found.iterations.tolist())) > 1  # positions finished at different steps
    torch.testing.assert_close(found.lambda_max, lam_ref, rtol=1e-9, atol=0)
    _, k2, k3, k4 = cumulants(p, found.vector @ W.T)
    torch.testing.assert_close(found.c3, k3, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(found.c4, k4, rtol=1e-8, atol=1e-12)


def test_merged_moments_stay_exact_far_from_zero():
    """Values 1e4 away from 0 with a spread of 1e-2: raw moments would lose everything in
    float64 (1e4^4 against 1e-8); merged central sums keep the 3rd and 4th moments."""
    from stable_regions.geometry.topcurv import _Moments

    g = torch.Generator().manual_seed(1)
    x = 1e4 + 1e-2 * torch.randn(6, 500, generator=g, dtype=torch.float64).exp()  # skewed
    w = torch.rand(6, 500, generator=g, dtype=torch.float64)
    n = w.sum(-1)
    mean = (w * x).sum(-1) / n
    c = x - mean[:, None]
    ref = [(w * c**k).sum(-1) / n for k in (2, 3, 4)]
    total = None
    for s in range(0, 500, 77):  # chunks of unequal sizes, each about a slightly-off center
        ws, xs = w[:, s : s + 77], x[:, s : s + 77]
        ns = ws.sum(-1)
        center = (ws * xs).sum(-1) / ns + 3e-4 * (s % 3 - 1)  # up to 3% of the spread off
        cs = xs - center[:, None]
        part = _Moments.about(center, ns, *((ws * cs**k).sum(-1) for k in (1, 2, 3, 4)))
        total = part if total is None else total.merge(part)
    merged = (total.m2 / total.n, total.m3 / total.n, total.m4 / total.n)
    for got, want in zip(merged, ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=0)


def test_float32_search_keeps_confident_positions_accurate():
    """Pivoting at the top token: in float32 the textbook product W^T (p * (a - p.a)) is off by
    ~1e-7 ||W^T p||^2, as large as lambda where p_top ~ 1; the pivoted one is not."""
    W, logits = _problem()
    lam_ref, _, p = _dense_top(W, logits)
    found = top_curvature(W.float(), logits.float(), tol=1e-6, max_iter=24)
    rel = (found.lambda_max / lam_ref - 1.0).abs()
    assert float(rel.max()) < 1e-4, rel
    # the same eigenvector through the textbook operator in float32, for contrast
    v = found.vector
    textbook = (v * FisherOperator(W.float(), torch.softmax(logits.float(), -1)).matvec(v)).sum(-1)
    assert float((textbook[:2] / lam_ref[:2] - 1.0).abs().max()) > 10 * float(rel[:2].max())


@pytest.mark.parametrize("rtol", [1e-6, 1e-9])
@pytest.mark.parametrize("with_bias", [False, True])
def test_one_position_eigenpair_reaches_the_requested_accuracy(rtol, with_bias):
    """float32 passes over W, float64 where it decides the answer: the error stays within the
    requested rtol (a Kato-Temple estimate), from a start restricted to 64 of 3000 tokens."""
    g = torch.Generator().manual_seed(3)
    W32 = torch.randn(3000, 48, generator=g)
    W = W32.double()  # the stored float32 values are the exact weights
    bias = 0.5 * torch.randn(3000, generator=g).double() if with_bias else None
    h = torch.randn(4, 48, generator=g, dtype=torch.float64)
    h[0] = 6.0 * W[11] / W[11].norm()  # a confident row
    h = h.float().double()  # a model's activations are float32 too
    logits = h @ W.T + (0.0 if bias is None else bias)
    lam_ref, vec_ref, p = _dense_top(W, logits)
    assert float(p[0].max()) > 0.99
    lam, v = top_eigenpair_float64(W32, h, bias=bias, rtol=rtol, tokens=64)
    assert lam.dtype == v.dtype == torch.float64
    assert float((lam / lam_ref - 1.0).abs().max()) < rtol
    assert float((v * vec_ref).sum(-1).abs().min()) > 1.0 - 10 * rtol**0.5


def test_bfloat16_search_then_float32_answer():
    W, logits = _problem()
    lam_ref, _, _ = _dense_top(W, logits)
    W32 = W.float()
    found = top_curvature(W32, logits.float(), tol=1e-2, search_weight=W32.bfloat16())
    assert float((found.lambda_max / lam_ref - 1.0).abs().max()) < 1e-2
    assert (found.iterations >= 1).all()


@pytest.mark.parametrize("search, rtol", [(torch.float32, 1e-4), (None, 3e-3)])
def test_scan_on_a_model_against_float64_lanczos_and_the_pade_radius(search, rtol):
    """float32 search: limited by the float32 logits; default (bfloat16 where native): by the
    search's roundoff, second order in the direction's error."""
    model = tiny_model("llama", seed=4, dtype=torch.float32)
    adapter = sr.wrap(model, char_tokenizer(), name="tiny")
    ids = adapter.tokenize("the quick brown fox jumps over the lazy dog")
    out = Scanner(adapter, tol=1e-6, search=search).scan(adapter, ids, [0.01, 0.1])
    h = adapter.prelogits(ids)
    op = FisherOperator.from_head(adapter.head, h)
    lam, vecs = op.top_eigenpairs(k=1, tol=1e-12)
    torch.testing.assert_close(out["lambda_max"], lam[:, 0], rtol=rtol, atol=0)
    # the radius: the Pade root along the nearer of +-v, from float64 cumulants
    from stable_regions.geometry import RayCurve

    v = vecs[:, 0]
    for i, eps in enumerate([0.01, 0.1]):
        both = []
        for sign in (1.0, -1.0):
            c2, c3, c4 = RayCurve.from_head(adapter.head, h, sign * v).coefficients()
            both.append(radius_pade(c2, c3, eps, c4))
        ref = torch.minimum(*both)
        torch.testing.assert_close(out["radius_pade"][:, i], ref, rtol=10 * rtol, atol=0)


def test_scan_refuses_a_softcapped_head():
    model = tiny_model("gemma2", seed=1, dtype=torch.float32)
    adapter = sr.wrap(model, char_tokenizer(), name="tiny")
    if adapter.head.is_linear:
        pytest.skip("this tiny config has no softcap")
    with pytest.raises(sr.StableRegionsError, match="linear head"):
        Scanner(adapter)


def test_direction_cumulants_match_float64_cumulants_at_flat_and_confident_origins():
    W, logits = _problem()
    g = torch.Generator().manual_seed(5)
    v = torch.nn.functional.normalize(torch.randn(300, W.shape[1], generator=g), dim=-1)
    W32 = W.float()
    for row in (0, 3):  # p_top > 0.999, and a flat row
        p = torch.softmax(logits[row].float().double(), -1)
        _, k2, k3, k4 = cumulants(p, v.double() @ W32.double().T)
        c2, c3, c4 = direction_cumulants(W32, logits[row].float(), v)
        assert c2.dtype == torch.float64 and c2.shape == (300,)
        for got, ref in ((c2, k2), (c3, k3), (c4, k4)):
            scale = ref.abs().max()  # c3 crosses zero across directions
            assert float(((got - ref).abs() / scale).max()) < 1e-5


def test_curvature_trace_matches_the_dense_trace_at_confident_and_flat_rows():
    W, logits = _problem()
    p = torch.softmax(logits, -1)
    ref = torch.diagonal(FisherOperator(W, p).dense(), dim1=-2, dim2=-1).sum(-1)
    torch.testing.assert_close(curvature_trace(W, logits), ref, rtol=1e-10, atol=0)
    # float32 products: still ~1e-6 at the confident rows (p_top > 0.999)
    W32 = W.float()
    p32 = torch.softmax(logits.float().double(), -1)
    ref32 = torch.diagonal(FisherOperator(W32.double(), p32).dense(), dim1=-2, dim2=-1).sum(-1)
    torch.testing.assert_close(curvature_trace(W32, logits.float()), ref32, rtol=1e-5, atol=0)


def test_curvature_diagonal_and_cumulants_along_match_dense_float64():
    """At confident and flat rows: diag H against the dense float64 H, and the series along
    one direction per position against the cumulants of W v under p, computed directly."""
    from stable_regions.geometry import cumulants_along, curvature_diagonal

    W, logits = _problem()
    p = torch.softmax(logits, -1)
    dense = FisherOperator(W, p).dense()
    torch.testing.assert_close(
        curvature_diagonal(W, logits), torch.diagonal(dense, dim1=-2, dim2=-1), rtol=1e-10, atol=0
    )
    g = torch.Generator().manual_seed(7)
    v = torch.nn.functional.normalize(
        torch.randn(len(logits), W.shape[1], generator=g, dtype=torch.float64), dim=-1
    )
    got = cumulants_along(W, logits, v)
    _, k2, k3, k4 = cumulants(p, torch.einsum("pd,vd->pv", v, W))
    for a, b in zip(got, (k2, k3, k4), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got[0], torch.einsum("pd,pde,pe->p", v, dense, v), rtol=1e-9, atol=0)
    # float32 weights: float32 products, float64 p and sums. A float32 product's roundoff
    # scales with its largest terms, not with an entry that cancels: atol at that scale
    # (1.3e-5 relative at one entry of 144 on one machine's BLAS, within this atol)
    W32 = W.float()
    ref32 = FisherOperator(W32.double(), p).dense()
    diagonal32 = torch.diagonal(ref32, dim1=-2, dim2=-1)
    torch.testing.assert_close(
        curvature_diagonal(W32, logits),
        diagonal32,
        rtol=1e-5,
        atol=1e-5 * float(diagonal32.abs().max()),
    )
    c2 = cumulants_along(W32, logits, v)[0]
    torch.testing.assert_close(c2, torch.einsum("pd,pde,pe->p", v, ref32, v), rtol=1e-5, atol=0)


def test_float64_head_products_from_float32_weights_are_exact():
    """raw_float64 / direction_float64: the float32 weights' exact values in float64 products,
    a vocabulary chunk at a time, equal to the product with a float64 copy."""
    from stable_regions.geometry import LogitHead

    g = torch.Generator().manual_seed(8)
    W32 = torch.randn(1000, 24, generator=g)
    bias = torch.randn(1000, generator=g)
    h = torch.randn(3, 24, generator=g, dtype=torch.float64)
    head = LogitHead(W32, bias, scale=0.7)
    exact = LogitHead(W32.double(), bias.double(), scale=0.7)
    torch.testing.assert_close(
        head.raw_float64(h, chunk=24 * 8 * 37), exact.raw(h), rtol=1e-15, atol=1e-13
    )
    torch.testing.assert_close(
        head.direction_float64(h), exact.direction(h), rtol=1e-15, atol=1e-13
    )
    # the plain products run in the weight's dtype: float32 roundoff, returned in float64
    plain = head.raw(h)
    assert plain.dtype == torch.float64
    assert 0 < float((plain - exact.raw(h)).abs().max()) < 1e-4


def test_the_diagonal_s_sum_is_the_trace_of_the_dense_operator():
    """The final layer takes ``tr H`` as the sum of ``curvature_diagonal`` (one pass): that
    sum is the dense float64 trace at confident and flat rows, and in float32 products as
    close as ``curvature_trace``'s own pass."""
    from stable_regions.geometry import curvature_diagonal

    W, logits = _problem()
    dense = FisherOperator(W, torch.softmax(logits, -1)).dense()
    diagonal = curvature_diagonal(W, logits)
    trace = diagonal.sum(-1)
    torch.testing.assert_close(
        trace, torch.diagonal(dense, dim1=-2, dim2=-1).sum(-1), rtol=1e-10, atol=0
    )
    torch.testing.assert_close(
        diagonal, torch.diagonal(dense, dim1=-2, dim2=-1), rtol=1e-10, atol=0
    )
    W32, z32 = W.float(), logits.float()
    p32 = torch.softmax(z32.double(), -1)
    ref32 = torch.diagonal(FisherOperator(W32.double(), p32).dense(), dim1=-2, dim2=-1).sum(-1)
    trace32 = curvature_diagonal(W32, z32).sum(-1)
    torch.testing.assert_close(trace32, ref32, rtol=1e-5, atol=0)  # as curvature_trace's
