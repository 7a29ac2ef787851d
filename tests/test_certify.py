"""Certified radii: never violated by brute force, and a weakened bound is caught.

The references are independent of the library's bound and search: the KL of the perturbed
softmax computed directly (float64, whole model where a model is involved), over many random
directions, the dense Hessian's top eigenvectors, and a projected-gradient ascent written
here with autograd.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import ARCH_NAMES, tiny_model

from stable_regions import certify
from stable_regions.cli import main
from stable_regions.geometry import FisherOperator, LogitHead
from stable_regions.geometry.certificate import (
    phi,
    prelogit_certificate,
    radius_through_norm,
    ritz_upper_bound,
)
from stable_regions.models import wrap
from stable_regions.models.norms import describe_norm

EPS = [0.01, 0.1, 1.0]


def head_kl(head: LogitHead, h: Tensor, delta: Tensor) -> Tensor:  # noqa: F821
    """KL(p || p_delta) at one pre-logit vector ``h`` (d,) for perturbations (n, d), float64."""
    logp = torch.log_softmax(head.logits_float64(h[None]), -1)
    logq = torch.log_softmax(head.logits_float64(h[None] + delta), -1)
    return (logp.exp() * (logp - logq)).sum(-1)


def worst_kl(
    kl_fn,
    d: int,
    radius: float,
    norm: str,
    starts: torch.Tensor,
    seed: int = 0,
    n_random: int = 2000,
    steps: int = 60,
):
    """The largest KL found on the sphere / box of ``radius``: ``n_random`` random directions,
    the given starts (both signs), and ``steps`` of projected gradient ascent from the best 8."""
    g = torch.Generator().manual_seed(seed)
    rand = torch.randn(n_random, d, generator=g, dtype=torch.float64)
    cand = torch.cat([rand, starts, -starts])
    if norm == "l2":
        cand = radius * cand / cand.norm(dim=-1, keepdim=True)
    else:
        cand = radius * torch.sign(cand)  # the box's corners: a convex KL peaks at corners
    values = kl_fn(cand)
    best = cand[values.argsort(descending=True)[:8]].clone()
    step = 0.3 * radius
    for _ in range(steps):
        x = best.clone().requires_grad_(True)
        grad = torch.autograd.grad(kl_fn(x).sum(), x)[0]
        if norm == "l2":
            x = best + step * grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-300)
            x = radius * x / x.norm(dim=-1, keepdim=True)
        else:
            x = (best + step * torch.sign(grad)).clamp(-radius, radius)
        with torch.no_grad():
            keep = kl_fn(x) > kl_fn(best)
        best = torch.where(keep[:, None], x.detach(), best)
        step *= 0.95
    with torch.no_grad():
        return float(torch.cat([values, kl_fn(best)]).max())


def random_head(seed: int, V: int = 300, d: int = 12, softcap: float | None = None) -> LogitHead:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(V, d, generator=g, dtype=torch.float64)
    b = 0.5 * torch.randn(V, generator=g, dtype=torch.float64)
    return LogitHead(w, b, scale=1.0, softcap=softcap)


def test_phi_is_the_integral_and_never_below_it():
    x = torch.tensor([0.0, 1e-8, 1e-4, 9.9e-4, 1e-3, 0.1, 1.0, 7.0, 40.0], dtype=torch.float64)
    s = torch.linspace(0, 1, 200001, dtype=torch.float64)
    integrand = (1 - s)[None, :] * torch.exp(s[None, :] * x[:, None])
    exact = torch.trapezoid(integrand, s, dim=-1)
    assert torch.allclose(phi(x), exact, rtol=1e-8)
    # near the series/expm1 switch the closed form in extended terms
    xs = torch.tensor([1e-5, 5e-4, 9.99e-4], dtype=torch.float64)
    series = sum(xs**k / math.factorial(k + 2) for k in range(12))
    assert torch.all(phi(xs) >= series * (1 - 1e-15))


@pytest.mark.parametrize("seed", range(4))
def test_ritz_bound_is_above_lambda_max_and_close(seed):
    head = random_head(seed)
    g = torch.Generator().manual_seed(seed + 10)
    h = 1.5 * torch.randn(5, head.d_model, generator=g, dtype=torch.float64)
    p = torch.softmax(head.logits_float64(h), -1)
    op = FisherOperator(head.weight, p)
    dense = op.dense()
    lam = torch.linalg.eigvalsh(dense)[:, -1]
    cert = prelogit_certificate(head, h, EPS, ritz=4)
    assert torch.all(cert.upper >= lam * (1 - 1e-12))
    assert torch.all(cert.ritz <= lam * (1 + 1e-9))
    assert torch.all(cert.upper <= 1.05 * lam)
    # with a subspace that misses the top eigenvector the bound still holds (it is loose)
    vecs = torch.linalg.eigh(dense)[1]
    y = vecs[:, :, :2].transpose(1, 2).contiguous()  # the two smallest
    gy = torch.einsum("pij,pkj->pki", dense, y)
    upper, _ = ritz_upper_bound(gy, y, torch.diagonal(dense, dim1=1, dim2=2).sum(-1))
    assert torch.all(upper >= lam * (1 - 1e-12))


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("seed", range(3))
def test_certificate_is_never_violated_and_a_weakened_one_is(norm, softcap, seed):
    head = random_head(seed, softcap=softcap)
    g = torch.Generator().manual_seed(seed + 100)
    # from near-uniform to confident positions
    h = torch.randn(3, head.d_model, generator=g, dtype=torch.float64)
    h = h * torch.tensor([0.3, 1.0, 3.0], dtype=torch.float64)[:, None]
    cert = prelogit_certificate(head, h, EPS, norm=norm)
    caught = 0
    for j in range(len(h)):
        fisher = FisherOperator.from_head(head.to(torch.float64), h[j : j + 1]).dense()[0]
        top = torch.linalg.eigh(fisher)[1][:, -3:].T
        # a bound that ignores the higher orders: 1.5 x the quadratic radius of the top
        # direction (of its corner for a box)
        v = top[-1] if norm == "l2" else torch.sign(top[-1])
        curvature = float(v @ fisher @ v)

        def kl(delta, j=j):
            return head_kl(head, h[j], delta)

        for e_idx, eps in enumerate(EPS):
            r = float(cert.radius[j, e_idx])
            assert r > 0
            assert worst_kl(kl, head.d_model, r, norm, top) <= eps
            weakened = 1.5 * math.sqrt(2 * eps / curvature)
            if worst_kl(kl, head.d_model, weakened, norm, top) > eps:
                caught += 1
    assert caught == 9  # the same search does catch an over-claim


@pytest.mark.real_model
@pytest.mark.parametrize(
    "name, positions, n_random, steps",
    [("smollm2-135m", [3, 8, 12], 200, 15), ("gemma3-270m", [12], 100, 8)],
)
def test_certificate_on_the_bundled_models_holds_and_is_near_the_top_exit(
    name, positions, n_random, steps
):
    from stable_regions import load

    adapter = load(name)
    ids = adapter.tokenize("The capital of France is Paris, and the capital of Italy is")
    h = adapter.prelogits(ids)[positions]
    head = adapter.stored_head
    cert = prelogit_certificate(head, h, EPS)
    for j in range(len(positions)):
        starts = cert.vectors[j, :3]
        # the model's own head arithmetic (float32 products), the softmax and KL in float64
        logp = torch.log_softmax(head.logits(h[j : j + 1]).double(), -1)

        def kl(delta, j=j, logp=logp):
            logq = torch.log_softmax(head.logits(h[j][None] + delta).double(), -1)
            return (logp.exp() * (logp - logq)).sum(-1)

        for e_idx, eps in enumerate(EPS):
            r = float(cert.radius[j, e_idx])
            assert worst_kl(kl, head.d_model, r, "l2", starts, 0, n_random, steps) <= eps
    # at small eps the certificate is close to the quadratic radius of the top direction
    quad = torch.sqrt(2 * 0.01 / cert.ritz)
    assert torch.all(cert.radius[:, 0] > 0.7 * quad)


@pytest.mark.parametrize("name", ["llama", "gemma3", "gpt2", "gpt_neox"])
def test_norm_spec_matches_the_module_and_its_lipschitz_bound_holds(name, tokenizer):
    model = tiny_model(name)
    adapter = wrap(model, tokenizer)
    g = torch.Generator().manual_seed(0)
    x = 2.0 * torch.randn(4, adapter.d_model, generator=g, dtype=torch.float64)
    spec, reason = describe_norm(adapter.final_norm, x)
    assert spec is not None, reason
    with torch.no_grad():
        assert torch.allclose(spec(x), adapter.final_norm(x).double(), rtol=1e-6, atol=1e-8)
    # brute force: random and radial perturbations at radius r never stretch beyond r L(r)
    for r_after in [0.05, 0.5, 2.0]:
        r = radius_through_norm(
            torch.tensor([r_after]), spec.centred_norm(x[:1]), spec.max_gain, spec.eps, x.shape[1]
        )
        delta = torch.randn(3000, x.shape[1], generator=g, dtype=torch.float64)
        delta = torch.cat([delta, -x[:1], x[:1]])  # toward and away from the origin
        delta = float(r) * delta / delta.norm(dim=-1, keepdim=True)
        moved = (spec(x[:1] + delta) - spec(x[:1])).norm(dim=-1)
        assert float(moved.max()) <= r_after * (1 + 1e-9)


def _whole_model_kl(adapter, ids, hook, position, deltas):
    """KL at ``position`` with ``deltas`` (n, d) added at ``hook``: whole float64 forward passes
    of the prompt prefix, differentiable (one batch row per delta)."""
    prefix = ids[:, : position + 1]
    with torch.no_grad():
        logp = torch.log_softmax(adapter.forward(prefix).logits[0, -1].double(), -1)
    with adapter.perturbation(hook, position, deltas, seq_len=position + 1):
        out = adapter.forward(prefix.expand(deltas.shape[0], -1), use_cache=False)
    logq = torch.log_softmax(out.logits[:, -1].double(), -1)
    return (logp.exp() * (logp - logq)).sum(-1)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "gemma3", "gpt2"])
def test_last_block_certificate_holds_on_the_whole_model(name, tokenizer):
    adapter = wrap(tiny_model(name), tokenizer)
    prompt = "the cat sat on"
    ids = adapter.tokenize(prompt)
    last = adapter.n_layers - 1
    hook = adapter.hook_for_layer(last)
    result = certify(adapter, prompt, eps=EPS, layer=last, positions=[2, 5], rounds=1, steps=3)
    frame = result.to_frame()
    assert frame["radius_certified"].notna().all(), frame["certified_by"].iloc[0]
    assert (frame["radius_certified"] <= frame["radius_attack"]).all()
    for position in [2, 5]:

        def kl(delta, position=position):
            return _whole_model_kl(adapter, ids, hook, position, delta)

        rows = frame[frame.position == position]
        for _, row in rows.iterrows():
            got = worst_kl(
                kl, adapter.d_model, row.radius_certified, "l2", torch.zeros(0, 32), 300, 20
            )
            assert got <= row.eps


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_certify_at_final_brackets_the_radius_on_every_architecture(name, tokenizer):
    adapter = wrap(tiny_model(name), tokenizer)
    prompt = "a bird in the hand"
    ids = adapter.tokenize(prompt)
    frame = certify(adapter, prompt, eps=EPS, positions=[1, 4, 7], rounds=1, steps=3).to_frame()
    assert frame["radius_certified"].gt(0).all()
    # certified <= attack <= the top direction's own exit; and the attack is a real exit of
    # the whole model: past it (0.1% further) the KL is at least eps
    assert (frame["radius_certified"] <= frame["radius_attack"] * (1 + 1e-9)).all()
    assert (frame["radius_attack"] <= frame["radius_exact"] * (1 + 1e-9)).all()
    found = certify(adapter, prompt, eps=[0.1], positions=[4], rounds=1, steps=3)
    hook = adapter.hook_for_layer("final")
    row = found.rows[0]
    assert math.isfinite(row["radius_attack"])
    # the L-inf box of the certificate also holds on the whole model
    box = certify(adapter, prompt, eps=[0.1], norm="linf", positions=[4], rounds=0).rows[0]

    def kl(delta):
        return _whole_model_kl(adapter, ids, hook, 4, delta)

    radius, dim = box["radius_certified"], adapter.hook_dim(hook)
    assert worst_kl(kl, dim, radius, "linf", torch.zeros(0, dim), 300, 20) <= 0.1


def test_inner_layer_has_no_certificate_but_a_search(tokenizer):
    adapter = wrap(tiny_model("llama"), tokenizer)
    frame = certify(adapter, "the cat sat", eps=[0.1], layer=0, positions=[2], steps=2).to_frame()
    assert frame["radius_certified"].isna().all()
    assert frame["certified_by"].str.startswith("none:").all()
    assert np.isfinite(frame["radius_attack"]).all()
    # OPT projects the final norm's output before the head: no Lipschitz chain is claimed
    opt = wrap(tiny_model("opt"), tokenizer)
    last = certify(opt, "the cat sat", eps=[0.1], layer=opt.n_layers - 1, positions=[2], steps=2)
    row = last.rows[0]
    assert math.isnan(row["radius_certified"])
    assert "does not read the final norm" in row["certified_by"]


def test_cli_certify_json_and_bad_input(capsys, tokenizer, monkeypatch):
    for argv, needle in [
        (["certify", "x", "--norm", "l1"], "norm must be 'l2' or 'linf'"),
        (["certify", "x", "--eps", "0"], "eps must be"),
        (["certify", "x", "--eps", "-1"], "eps must be"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1
    assert main(["certify", "The cat", "--positions", "last", "--layer", "99"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["certify", "The cat", "--positions", "last", "--eps", "0.1", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {"model", "prompt", "layer", "norm", "eps", "rows"}
    assert doc["norm"] == "l2" and doc["eps"] == [0.1]
    row = doc["rows"][0]
    assert {"position", "eps", "radius_certified", "radius_attack", "tightness"} <= set(row)
    assert 0 < row["radius_certified"] <= row["radius_attack"]


def test_nearest_tokens_a_chunk_at_a_time_equal_the_dense_distances():
    from stable_regions.studies.substitutions import nearest_tokens

    g = torch.Generator().manual_seed(0)
    embedding = torch.randn(103, 16, generator=g).to(torch.bfloat16)
    tokens = torch.tensor([0, 50, 102, 50])
    dense = torch.cdist(embedding.double()[tokens], embedding.double())
    dense[torch.arange(4), tokens] = math.inf
    expected = dense.argsort(-1)[:, :5]
    for chunk in (None, 7, 1):
        found = nearest_tokens(embedding, tokens, 5, chunk=chunk)
        assert torch.equal(found, expected), chunk


@pytest.mark.parametrize("name", ["llama", "gemma3", "gpt2"])
def test_substitutions_are_the_nearest_tokens_and_their_kl_is_the_model_s(name, tokenizer):
    adapter = wrap(tiny_model(name), tokenizer)
    prompt = "the cat sat"
    ids = adapter.tokenize(prompt)
    result = certify(adapter, prompt, eps=[0.01, 0.5], positions=[1, 4], rounds=0, substitutions=3)
    frame = result.substitutions_frame()
    assert len(frame) == 2 * 3 * 2
    embedding = adapter.model.get_input_embeddings().weight.detach().double()
    hook = adapter.hook_for_layer("embed")
    for position in [1, 4]:
        rows = frame[(frame.position == position) & (frame.eps == 0.01)]
        token = int(ids[0, position])
        dist = (embedding - embedding[token]).norm(dim=-1)
        dist[token] = math.inf
        assert sorted(rows.substitute_id) == sorted(dist.argsort()[:3].tolist())
        for _, row in rows.iterrows():
            # the substitution is the move delta at the embedding hook: the whole model with
            # the token swapped and with delta added agree, and delta has the reported length
            swapped = ids.clone()
            swapped[0, position] = row.substitute_id
            seen = []
            with torch.no_grad(), adapter.capture(hook, seen):
                adapter.forward(swapped[:, : position + 1])
                adapter.forward(ids[:, : position + 1])
            delta = (seen[0][0, position] - seen[1][0, position]).double()
            assert float(delta.norm()) == pytest.approx(row.distance, rel=1e-9)
            kl = _whole_model_kl(adapter, ids, hook, position, delta[None]).item()
            assert kl == pytest.approx(row.kl_substituted, rel=1e-6, abs=1e-12)
    assert (frame.flips_measured == (frame.kl_substituted > frame.eps)).all()
    finite = np.isfinite(frame.radius_curve)
    assert (frame.flips_predicted[finite] == (frame.radius_curve < frame.distance)[finite]).all()
    doc = result.to_json()
    assert len(doc["substitutions"]) == len(frame)


def test_cli_substitutions_bad_count(capsys):
    for bad in ["0", "-1", "two"]:
        assert main(["certify", "x", "--substitutions", bad]) == 2
        err = capsys.readouterr().err
        assert "--substitutions must be" in err and err.count("\n") == 1


def test_ball_radius_is_certified_and_as_large_as_bisection_finds():
    """The certified radius has bound <= eps and lies within 1e-9 of the largest such
    radius found by 200 bisection steps on the same bound (a start of zero, no regula falsi,
    no logarithms)."""
    from stable_regions.geometry import BallBound

    g = torch.Generator().manual_seed(5)
    P, V = 7, 5000
    p = torch.softmax(5.0 * torch.randn(P, V, generator=g, dtype=torch.float64), -1)
    dual = torch.rand(P, V, generator=g, dtype=torch.float64) * 6.0
    lam = (p * dual * dual).sum(-1) * torch.linspace(0.05, 1.0, P, dtype=torch.float64)
    bound = BallBound(lam, p, dual)
    got = bound.radius(EPS)
    for e, eps in enumerate(EPS):
        lo = torch.zeros(P, dtype=torch.float64)
        hi = torch.full((P,), 1.0, dtype=torch.float64)
        while bool((bound(hi[:, None])[:, 0] <= eps).any()):
            hi = torch.where(bound(hi[:, None])[:, 0] <= eps, 2 * hi, hi)
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            ok = bound(mid[:, None])[:, 0] <= eps
            lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
        assert bool((bound(got[:, e : e + 1])[:, 0] <= eps).all())
        assert torch.allclose(got[:, e], lo, rtol=1e-9, atol=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_screened_start_exits_give_the_full_search(seed):
    """Measuring the other starts' rays only up to the first start's exits (convex rays)
    leaves the search's answer as measuring every ray fully: the same nearest exits, so the
    same ascents and the same radius."""
    from stable_regions.probes.attack import SubspaceKL, worst_case_search

    g = torch.Generator().manual_seed(seed)
    P, m, V = 5, 6, 700
    logits = 3.0 * torch.randn(P, V, generator=g, dtype=torch.float64)
    tangents = torch.randn(P, m, V, generator=g, dtype=torch.float64)
    tangents = tangents * torch.linspace(2.0, 0.5, m, dtype=torch.float64)[None, :, None]
    starts = torch.linalg.qr(torch.randn(P, m, 3, generator=g, dtype=torch.float64))[0]
    starts = starts.transpose(1, 2)  # (P, 3, m) orthonormal starts
    runs = []
    for screened in (True, False):
        target = SubspaceKL(lambda u: u, logits, tangents, torch.ones(P, dtype=torch.float64))
        target.convex_rays = screened
        runs.append(worst_case_search(target, starts, EPS, "l2"))
    screened, full = runs
    assert np.allclose(screened.radius, full.radius, rtol=1e-5, atol=0)
    top = [0, 3]  # the first start and its negative: measured in full either way
    assert np.allclose(screened.start_radii[:, top], full.start_radii[:, top], rtol=1e-9)
    others = np.isfinite(screened.start_radii)
    assert np.allclose(screened.start_radii[others], full.start_radii[others], rtol=1e-5)


def test_crossings_take_a_cap_per_ray_and_level():
    """``t_max`` and ``start`` (R, E): each (ray, level) starts and gives up at its own, the
    same on the generic scan (``KLTarget``) and on the CGF's Newton path (``SubspaceKL``):
    the uncapped crossing wherever that lies below the cap, ``inf`` elsewhere."""
    from stable_regions.probes.attack import KLTarget, SubspaceKL

    g = torch.Generator().manual_seed(3)
    P, m, V = 3, 4, 300
    logits = 2.0 * torch.randn(P, V, generator=g, dtype=torch.float64)
    tangents = torch.randn(P, m, V, generator=g, dtype=torch.float64)
    subspace = SubspaceKL(lambda u: u, logits, tangents, torch.ones(P, dtype=torch.float64))
    generic = KLTarget(
        lambda y, rows: logits[rows] + torch.einsum("rm,rmv->rv", y, tangents[rows]),
        torch.zeros(P, m, dtype=torch.float64),
        logits,
    )
    rows = torch.arange(P).repeat_interleave(2)
    dirs = torch.randn(2 * P, m, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    levels = np.tile(np.asarray(EPS, dtype=np.float64), (2 * P, 1))
    free = subspace.crossings(dirs, rows, levels, np.full(2 * P, 1e6), 1e-9)
    assert np.isfinite(free).all()
    cap = free * np.where(np.arange(free.size).reshape(free.shape) % 2 == 0, 1.1, 0.9)
    for target in (subspace, generic):
        # (the scan doubles from its start: from cap / 4 a point lands on the cap)
        got = target.crossings(dirs, rows, levels, cap, 1e-9, start=0.25 * cap)
        below = cap > free
        assert np.allclose(got[below], free[below], rtol=1e-6)
        assert np.isinf(got[~below]).all()


def test_cli_certify_plot_draws_the_rows_and_refuses_bad_paths(capsys, tmp_path, monkeypatch):
    """``--plot``: one panel per eps whose lines are the table's certified, attack, exit
    and quadratic radii; a path in a missing folder or without .png is refused before any
    work (one line, exit 2, nothing written)."""
    import importlib

    plotting = importlib.import_module("stable_regions.plotting")
    for path, needle in [
        (tmp_path / "missing" / "c.png", "does not exist"),
        (tmp_path / "c.jpg", "ending in .png"),
        (tmp_path, "ending in .png"),
    ]:
        assert main(["certify", "x", "--plot", str(path)]) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1
    assert not (tmp_path / "missing").exists() and not (tmp_path / "c.jpg").exists()
    assert main(["jacobian", "x", "--plot", str(tmp_path / "missing" / "j.png")]) == 2
    assert "does not exist" in capsys.readouterr().err

    figures = []
    original = plotting.save

    def keep(fig, path, dpi=120):
        figures.append([[line.get_ydata() for line in ax.get_lines()] for ax in fig.axes])
        return original(fig, path, dpi)

    monkeypatch.setattr(plotting, "save", keep)
    out = tmp_path / "c.png"
    argv = ["certify", "The cat sat", "--eps", "0.01", "0.5", "--plot", str(out), "--json"]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (panels,) = figures
    assert len(panels) == 2
    columns = ["radius_attack", "radius_certified", "radius_exact", "radius_quadratic"]
    for eps, lines in zip([0.01, 0.5], panels, strict=True):
        rows = [r for r in doc["rows"] if r["eps"] == eps]
        for column, drawn in zip(columns, lines, strict=True):
            assert np.allclose(drawn, [r[column] for r in rows], rtol=1e-12)
