"""The fast top-curvature search against dense eigh in float64, and the scan on a model."""

from __future__ import annotations

import pytest
import torch
from conftest import char_tokenizer, tiny_model

import stable_regions as sr
from stable_regions.geometry import (
    FisherOperator,
    cumulants,
    radius_pade,
    top_curvature,
    top_eigenpair_float64,
)
from stable_regions.scan import Scanner


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


def test_float64_refinement_reaches_float64_accuracy_from_a_float32_search():
    W, _ = _problem()
    g = torch.Generator().manual_seed(3)
    h = torch.randn(4, W.shape[1], generator=g, dtype=torch.float64)
    lam_ref, _, _ = _dense_top(W, h @ W.T)
    lam, v = top_eigenpair_float64(W, h, weight=W.float(), tol=1e-4)
    torch.testing.assert_close(lam, lam_ref, rtol=1e-7, atol=0)  # the bench asks 1e-6
    assert v.dtype == torch.float64


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
        torch.testing.assert_close(out["radius"][:, i], ref, rtol=10 * rtol, atol=0)


def test_scan_refuses_a_softcapped_head():
    model = tiny_model("gemma2", seed=1, dtype=torch.float32)
    adapter = sr.wrap(model, char_tokenizer(), name="tiny")
    if adapter.head.is_linear:
        pytest.skip("this tiny config has no softcap")
    with pytest.raises(sr.StableRegionsError, match="linear head"):
        Scanner(adapter)
