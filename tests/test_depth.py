"""Through depth: Jacobian spectra, stability maps, L-inf radii, trace estimates.

References are independent of the code under test: SVDs of dense Jacobians from
torch.autograd.functional.jacobian of the full forward, dense matrices, brute force over corners.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_model

import stable_regions as sr
from stable_regions.cli import main
from stable_regions.errors import InvalidParameterError
from stable_regions.geometry import (
    FisherOperator,
    JacobianGram,
    LogitHead,
    PullbackOperator,
    linf_radius_bounds,
)
from stable_regions.models import PRELOGIT
from stable_regions.models.precision import exact_numerics
from stable_regions.models.suffix import SuffixBatch

PROMPT = "The cat sat on it."


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_jacobian_gram_gives_the_singular_values():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(40, 12, dtype=torch.float64, generator=g)
    B = torch.randn(40, 12, dtype=torch.float64, generator=g)
    B[:, 0] *= 5.0
    maps = torch.stack([A, B])  # two maps at once, row i through map i
    gram = JacobianGram(
        lambda v: torch.einsum("pkd,pod->pko", v, maps),
        lambda u: torch.einsum("po,pod->pd", u, maps),
        12,
        batch=2,
    )
    assert rel(gram.dense(), maps.transpose(1, 2) @ maps) < 1e-12
    sigma, vecs = gram.top_singular_values(3, tol=1e-10)
    for i, M in enumerate((A, B)):
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        assert rel(sigma[i], S[:3]) < 1e-10
        assert (vecs[i] @ Vh[:3].T).abs().diagonal().min() > 1 - 1e-8


def test_linf_bounds_bracket_the_brute_force_radius():
    g = torch.Generator().manual_seed(1)
    for trial in range(5):
        d = 10
        A = torch.randn(d + 3 * trial, d, dtype=torch.float64, generator=g)
        A[:, 0] *= 1 + 3 * trial  # from isotropic to one dominant direction
        G = A.T @ A
        corners = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=d)), dtype=torch.float64)
        kappa = torch.einsum("nd,de,ne->n", corners, G, corners).max()
        eps = 0.1
        true_r = math.sqrt(2 * eps / float(kappa))
        lam, vecs = torch.linalg.eigh(G)
        corner = torch.sign(vecs[:, -1])
        lower, upper = linf_radius_bounds(
            eps, lam[-1:], torch.diagonal(G)[None], (corner @ G @ corner)[None]
        )
        assert float(lower) <= true_r * (1 + 1e-12) <= float(upper) * (1 + 1e-12)
        # the upper radius is attained at its corner
        assert math.isclose(
            0.5 * float(upper) ** 2 * float(corner @ G @ corner), eps, rel_tol=1e-12
        )
    zero = linf_radius_bounds(0.1, torch.zeros(1), torch.zeros(1, 3), torch.zeros(1))
    assert all(math.isinf(float(x)) for x in zero)


def test_fisher_diagonal_matches_dense():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(300, 16, dtype=torch.float64, generator=g)
    for softcap in (None, 2.0):
        head = LogitHead(W, bias=None, scale=1.0, softcap=softcap)
        h = torch.randn(3, 16, dtype=torch.float64, generator=g)
        op = FisherOperator.from_head(head, h)
        dense = op.dense()
        assert rel(op.diagonal(chunk=64), torch.diagonal(dense, dim1=1, dim2=2)) < 1e-12


def _dense_pullback(adapter, ids, hook, pos):
    def f(delta):
        with adapter.perturbation(hook, pos, delta[None]), exact_numerics():
            return adapter.model(input_ids=ids[:, : pos + 1]).logits[0, pos]

    zero = torch.zeros(adapter.hook_dim(hook), dtype=torch.float64)
    J = torch.autograd.functional.jacobian(f, zero)
    with torch.no_grad():
        p = torch.softmax(f(zero), -1)
    return (J.T @ (torch.diag(p) - torch.outer(p, p)) @ J).detach()


def test_pullback_diagonal_and_trace_estimate(tokenizer):
    adapter = sr.wrap(tiny_model("llama"), tokenizer)
    ids = adapter.tokenize(PROMPT)
    hook, pos = "blocks.0.hook_resid_post", 10
    G = _dense_pullback(adapter, ids, hook, pos)
    op = PullbackOperator.from_suffix(SuffixBatch(adapter, ids, hook, [pos]))
    assert rel(op.diagonal(chunk=5)[0], torch.diagonal(G)) < 1e-8
    exact = float(torch.trace(G))
    # a complete basis leaves nothing to estimate
    full = torch.linalg.eigh(G)[1].T
    assert math.isclose(float(op.trace_estimate(full[None], probes=4)[0]), exact, rel_tol=1e-8)
    # with the top 2 eigenvectors: unbiased (mean over seeds) and each estimate near
    basis = full.flip(0)[None, :2]
    estimates = np.array([float(op.trace_estimate(basis, 32, seed=s)[0]) for s in range(40)])
    assert abs(estimates.mean() / exact - 1) < 0.03
    assert np.abs(estimates / exact - 1).max() < 0.3
    # not deflating would be wrong only in variance; dropping the basis term would be biased
    assert float(op.quadratic_form(basis).sum()) > 0.2 * exact
    # deflated by the Krylov space of the Lanczos run (its trace is free): unbiased, and the
    # top eigenvalue is the dense one
    runs = [op.top_eigenpairs_and_trace(k=1, tol=1e-4, probes=16, seed=s) for s in range(40)]
    estimates = np.array([float(r[2][0]) for r in runs])
    assert abs(estimates.mean() / exact - 1) < 0.03
    assert np.abs(estimates / exact - 1).max() < 0.3
    top = float(torch.linalg.eigvalsh(G)[-1])
    assert abs(float(runs[0][0][0, 0]) / top - 1) < 1e-6


def _dense_map(adapter, ids, source, target, pos):
    """Jacobian (d_target, d_source) of the full-prefix forward, hook to hook, at one position."""

    def f(delta):
        seen = []
        with (
            adapter.perturbation(source, pos, delta[None]),
            adapter._on_activation(target, seen.append),
            exact_numerics(),
        ):
            adapter.model(input_ids=ids[:, : pos + 1])
        return seen[0][0, pos]

    zero = torch.zeros(adapter.hook_dim(source), dtype=torch.float64)
    return torch.autograd.functional.jacobian(f, zero).detach()


def test_jacobian_profile_matches_dense_svd(arch, tokenizer):
    adapter = sr.wrap(tiny_model(arch, seed=3), tokenizer)
    ids = adapter.tokenize(PROMPT)
    pos = 9
    profile = sr.jacobian_profile(adapter, PROMPT, position=pos, k=2, eig_tol=1e-10)
    frame = profile.to_frame()
    assert list(frame["layer"]) == ["embed", "0", "1", "2"]
    assert math.isnan(frame.loc[0, "block_s1"])
    for i, row in frame.iterrows():
        source = row["hook"]
        s_out = torch.linalg.svdvals(_dense_map(adapter, ids, source, PRELOGIT, pos))
        assert rel(torch.tensor([row["output_s1"], row["output_s2"]]), s_out[:2]) < 1e-6, (arch, i)
        if i > 0:
            block_in = f"blocks.{i - 1}.hook_resid_pre"
            s_blk = torch.linalg.svdvals(_dense_map(adapter, ids, block_in, source, pos))
            assert rel(torch.tensor([row["block_s1"], row["block_s2"]]), s_blk[:2]) < 1e-6
    # the stored norm is the activation's
    store = []
    with adapter.capture("blocks.1.hook_resid_post", store), torch.no_grad(), exact_numerics():
        adapter.model(input_ids=ids)
    assert math.isclose(
        frame.loc[2, "activation_norm"], float(store[0][0, pos].norm()), rel_tol=1e-12
    )


def test_analyze_embed_linf_radii(tokenizer):
    adapter = sr.wrap(tiny_model("qwen2", seed=4), tokenizer)
    ids = adapter.tokenize(PROMPT)
    pos = 6
    res = sr.analyze(adapter, PROMPT, eps=[0.01, 0.1], positions=[pos], layer="embed", exact=False)
    G = _dense_pullback(adapter, ids, "blocks.0.hook_resid_pre", pos)
    v = res.directions[0]
    corner = torch.sign(v)
    g = torch.Generator().manual_seed(0)
    random_corners = torch.randint(0, 2, (4000, 32), generator=g).to(torch.float64) * 2 - 1
    kappa_sampled = torch.einsum("nd,de,ne->n", random_corners, G, random_corners).max()
    for r in res.rows:
        lower, upper = r["radius_linf_lower"], r["radius_linf_upper"]
        assert 0 < lower <= upper
        # attained: the corner upper * sign(v) reaches eps in the quadratic model
        assert math.isclose(0.5 * upper**2 * float(corner @ G @ corner), r["eps"], rel_tol=1e-6)
        # guaranteed: no corner of the lower box gets there
        assert 0.5 * lower**2 * float(kappa_sampled) <= r["eps"]
    # at the final layer too, against the dense head curvature
    fin = sr.analyze(adapter, PROMPT, eps=0.1, positions=[pos], exact=False).rows[0]
    assert 0 < fin["radius_linf_lower"] <= fin["radius_linf_upper"]


@pytest.mark.parametrize("graph_bytes", [None, 1])
def test_stability_map_agrees_with_analyze(tokenizer, tmp_path, monkeypatch, graph_bytes):
    """The cells of every inner layer share the passes (``engine.cells.map_cells``).
    ``graph_bytes=1``: a recorded chunk holds one cell, and the series still comes from one
    pass of derivatives over all of them."""
    import stable_regions.engine.cells as engine

    nests = []
    if graph_bytes is not None:
        monkeypatch.setattr("stable_regions.budget.GRAPH_BYTES", graph_bytes)
        closed_forms = engine.closed_forms_along

        def spy(*args, **kwargs):
            nests.append((kwargs.get("graph_free", False), args[2].shape[0]))
            return closed_forms(*args, **kwargs)

        monkeypatch.setattr(engine, "closed_forms_along", spy)
    adapter = sr.wrap(tiny_model("gemma3", seed=5), tokenizer)
    layers = ["embed", 1, "final"]
    # blocks of one position stop their Lanczos each at its own tolerance (in lockstep the
    # block runs until all have converged): a tighter one keeps the directions comparable
    tol = {} if graph_bytes is None else {"eig_tol": 1e-9}
    m = sr.stability_map(adapter, PROMPT, eps=0.1, layers=layers, positions=[0, 5, 17], **tol)
    if graph_bytes is not None:  # one nest of the 3 positions of both inner layers
        assert nests == [(True, 6)]
        monkeypatch.undo()
    assert m.radius_pade.shape == (3, 3)
    for i, layer in enumerate(layers):
        ref = sr.analyze(adapter, PROMPT, eps=0.1, positions=[0, 5, 17], layer=layer, exact=False)
        frame = ref.to_frame()
        # the map: the model's precision (float32 at the final layer); analyze: float64
        assert np.allclose(m.lambda_max[i], frame["lambda_max"], rtol=1e-5)
        assert np.allclose(m.radius_pade[i], frame["radius_pade"], rtol=1e-5)
        assert np.allclose(m.radius_quadratic[i], frame["radius_quadratic"], rtol=1e-5)
        tol = 1e-5 if layer == "final" else 0.3  # inside: a trace estimate
        assert np.allclose(m.effective_rank[i], frame["effective_rank"], rtol=tol)
    out = m.save(tmp_path / "out")
    json_path, png_path = out / "map.json", out / "map.png"
    doc = json.loads(json_path.read_text())
    assert {"layers", "positions", "tokens", "radius_pade", "lambda_max", "effective_rank"} <= set(
        doc
    )
    assert doc["layers"] == ["embed", "1", "final"] and doc["positions"] == [0, 5, 17]
    assert len(doc["radius_pade"]) == 3 and len(doc["radius_pade"][0]) == 3
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_map_without_the_effective_rank_keeps_the_rest(tokenizer, monkeypatch, tmp_path):
    """``rank_probes=0``: the same ``lambda_max`` and radii as the default map, the rank NaN,
    no trace computed (no Hutchinson probe, no trace at the final layer), and two panels;
    another probe count changes only the rank."""
    import stable_regions.geometry.curvature as curvature
    import stable_regions.studies.maps as maps

    adapter = sr.wrap(tiny_model("llama", seed=2), tokenizer)
    layers = ["embed", 1, "final"]
    full = sr.stability_map(adapter, PROMPT, eps=0.1, layers=layers, positions=[0, 5, 17])
    traces = []
    for module, name in (
        (curvature.CurvatureOperator, "trace_estimate"),
        (maps, "curvature_trace"),
    ):
        real = getattr(module, name)
        monkeypatch.setattr(
            module, name, lambda *a, real=real, **k: traces.append(1) or real(*a, **k)
        )
    bare = sr.stability_map(
        adapter, PROMPT, eps=0.1, layers=layers, positions=[0, 5, 17], rank_probes=0
    )
    assert traces == []
    for grid in ("lambda_max", "radius_pade", "radius_quadratic", "activation_norm"):
        np.testing.assert_array_equal(getattr(bare, grid), getattr(full, grid), err_msg=grid)
    assert np.isnan(bare.effective_rank).all() and np.isfinite(full.effective_rank).all()
    assert len(bare.draw().axes) == 4 and len(full.draw().axes) == 6  # panels and colorbars
    eight = sr.stability_map(
        adapter, PROMPT, eps=0.1, layers=layers, positions=[0, 5, 17], rank_probes=8
    )
    assert traces and np.array_equal(eight.lambda_max, full.lambda_max)
    assert not np.array_equal(eight.effective_rank[:2], full.effective_rank[:2])
    np.testing.assert_array_equal(eight.effective_rank[2], full.effective_rank[2])  # exact
    with pytest.raises(InvalidParameterError, match="rank_probes must be a whole number"):
        sr.stability_map(adapter, PROMPT, layers=["final"], rank_probes=-1)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["map", "Hi there", "--layers", "99"], "out of range"),
        (["map", "Hi there", "--eps", "0"], "eps must be"),
        (["map", "Hi there", "--rank-probes", "-2"], "--rank-probes must be a whole number"),
        (["map", "", "--layers", "final"], "prompt is empty"),
        (["jacobian", "Hi there", "--position", "40"], "out of range"),
        (["jacobian", "Hi there", "--plot", "out.pdf"], ".png"),
        (["jacobian", "Hi there", "-k", "0"], "positive integer"),
    ],
)
def test_depth_commands_bad_input(argv, message, capsys, monkeypatch, tmp_path, tokenizer):
    monkeypatch.chdir(tmp_path)
    adapter = sr.wrap(tiny_model("llama"), tokenizer)
    monkeypatch.setattr("stable_regions.models.load", lambda spec, **options: adapter)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "stability-map").exists()


def test_depth_commands_write_outputs(capsys, monkeypatch, tmp_path, tokenizer):
    adapter = sr.wrap(tiny_model("llama"), tokenizer)
    monkeypatch.setattr("stable_regions.models.load", lambda spec, **options: adapter)
    assert main(["map", "Hi there", "--layers", "all", "--out", str(tmp_path / "m")]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "m" / f"map.{s}") for s in ("json", "parquet", "png")]
    doc = json.loads((tmp_path / "m" / "map.json").read_text())
    assert doc["layers"] == ["embed", "0", "1", "2", "final"]
    assert main(["map", "Hi there", "--rank-probes", "0", "--out", str(tmp_path / "r")]) == 0
    capsys.readouterr()
    bare = json.loads((tmp_path / "r" / "map.json").read_text())
    assert all(x is None for row in bare["effective_rank"] for x in row), bare["effective_rank"]
    assert all(x > 0 for row in bare["lambda_max"] for x in row)
    png = tmp_path / "j.png"
    assert main(["jacobian", "Hi there", "--json", "--plot", str(png), "-k", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["layer"] for r in out["rows"]] == ["embed", "0", "1", "2"]
    assert png.read_bytes()[:4] == b"\x89PNG"
