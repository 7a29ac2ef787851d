"""Inside the network: suffix recomputation and pullback geometry against full-forward references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import char_tokenizer, tiny_model

import stable_regions as sr
from stable_regions.geometry import PullbackOperator, series_coefficients
from stable_regions.models import PRELOGIT
from stable_regions.models.precision import exact_numerics
from stable_regions.models.suffix import PositionSuffix, SuffixBatch

pytestmark = pytest.mark.low_end  # CI runs these at both ends of the ranges

PROMPT = "The cat sat on it."  # 18 characters: longer than the tiny Gemma sliding windows (4)
HOOKS = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]


def rel(a, b) -> float:
    return float(((a - b).norm() / b.norm()).detach())


def full_forward_fn(adapter, ids, hook, pos):
    """delta -> logits at pos, running the whole prompt prefix with the perturbation hooked in."""

    def f(delta):
        with adapter.perturbation(hook, pos, delta[None]), exact_numerics():
            return adapter.model(input_ids=ids[:, : pos + 1]).logits[0, pos]

    return f


@pytest.mark.parametrize("hook", HOOKS)
def test_suffix_logits_equal_full_forward(arch, tokenizer, hook):
    adapter = sr.wrap(tiny_model(arch), tokenizer)
    ids = adapter.tokenize(PROMPT)
    for pos in (0, 7, ids.shape[1] - 1):
        suffix = PositionSuffix(adapter, ids, hook, pos)
        deltas = 0.7 * torch.randn(4, adapter.hook_dim(hook), dtype=torch.float64)
        deltas[0] = 0
        full = adapter.perturbed_logits(ids, hook, pos, deltas)
        with torch.no_grad():
            got = suffix.logits(deltas)
        assert torch.allclose(got, full, rtol=0, atol=1e-11), (pos, (got - full).abs().max())
        # the captured origin is the activation the full forward sees there
        store = []
        with adapter.capture(hook, store), torch.no_grad(), exact_numerics():
            adapter.model(input_ids=ids)
        assert torch.allclose(suffix.x0, store[0][0, pos], atol=1e-12)


def test_suffix_batch_rows_equal_full_forward(arch, tokenizer):
    """Rows at different (and repeated) positions in one pass, each against the whole prefix
    run with its own perturbation: no row may see another."""
    adapter = sr.wrap(tiny_model(arch), tokenizer)
    ids = adapter.tokenize(PROMPT)
    hook = "blocks.1.hook_resid_post"
    positions = [0, 5, 9, ids.shape[1] - 1]
    batch = SuffixBatch(adapter, ids, hook, positions)
    rows = torch.tensor([3, 0, 1, 3, 2, 1])
    deltas = 0.7 * torch.randn(len(rows), adapter.hook_dim(hook), dtype=torch.float64)
    with torch.no_grad():
        got = batch.logits(deltas, rows)
    for r, row in enumerate(rows.tolist()):
        full = adapter.perturbed_logits(ids, hook, positions[row], deltas[r : r + 1])[0]
        assert torch.allclose(got[r], full, rtol=0, atol=1e-11), (arch, r)


@pytest.mark.parametrize("hook", [*HOOKS, PRELOGIT])
def test_blocks_before_the_hook_run_once_per_position(arch, tokenizer, hook):
    """Many rows at few positions: the blocks before the hook see one row per position, the
    blocks after it every row (``models.widening``; GPT-2 reshapes its output by the input's
    shape and runs every row everywhere), and each row still equals the whole prefix run
    with its own perturbation, keys of the cache and masks of every layer kind included."""
    adapter = sr.wrap(tiny_model(arch), tokenizer)
    ids = adapter.tokenize(PROMPT)
    positions = [0, 6, ids.shape[1] - 1, 6]  # a position may be listed more than once
    batch = SuffixBatch(adapter, ids, hook, positions)
    rows = torch.tensor([2, 0, 2, 1, 2, 0, 3, 2])
    deltas = 0.7 * torch.randn(len(rows), adapter.hook_dim(hook), dtype=torch.float64)
    seen = {}

    def count(index):
        def hook_fn(_module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            seen[index] = x.shape[1]

        return hook_fn

    handles = [
        block.register_forward_pre_hook(count(i), with_kwargs=True)
        for i, block in enumerate(adapter.layers)
    ]
    try:
        with torch.no_grad():
            got = batch.logits(deltas, rows)
    finally:
        for handle in handles:
            handle.remove()
    after = {id(b) for b in adapter.blocks_after(hook)}
    for i, block in enumerate(adapter.layers):
        widened = id(block) in after or arch == "gpt2"
        assert seen[i] == (len(rows) if widened else 3), (arch, hook, i, seen)
    for r, row in enumerate(rows.tolist()):
        full = adapter.perturbed_logits(ids, hook, positions[row], deltas[r : r + 1])[0]
        assert torch.allclose(got[r], full, rtol=0, atol=1e-11), (arch, hook, r)


def test_a_block_argument_that_cannot_be_widened_runs_every_row_everywhere(tokenizer, monkeypatch):
    """A tensor a block receives that the widening does not know (here: every one) sends the
    pass back to all rows through all blocks, with the same answers; later passes of the
    batch go that way directly."""
    from stable_regions.models import widening

    adapter = sr.wrap(tiny_model("llama"), tokenizer)
    ids = adapter.tokenize(PROMPT)
    hook = "blocks.1.hook_resid_post"
    rows = torch.tensor([1, 0, 1, 1])
    deltas = 0.7 * torch.randn(len(rows), adapter.hook_dim(hook), dtype=torch.float64)
    with torch.no_grad():
        expected = SuffixBatch(adapter, ids, hook, [3, 9]).logits(deltas, rows)
    calls = []

    def refuse(self, value, name):
        calls.append(name)
        raise widening.NotWidenable(name)

    monkeypatch.setattr(widening._Widener, "value", refuse)
    batch = SuffixBatch(adapter, ids, hook, [3, 9])
    seen = []
    handle = adapter.layers[0].register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(
            (args[0] if args else kwargs["hidden_states"]).shape[1]
        ),
        with_kwargs=True,
    )
    try:
        with torch.no_grad():
            got = [batch.logits(deltas, rows) for _ in range(2)]
    finally:
        handle.remove()
    assert len(calls) == 1  # the first pass tried, the second did not
    assert seen == [2, 4, 4]  # the widened try (2 positions), then every row twice
    for g in got:
        assert torch.allclose(g, expected, rtol=0, atol=1e-11)


def test_pullback_matches_dense_autograd(arch, tokenizer):
    adapter = sr.wrap(tiny_model(arch), tokenizer)
    ids = adapter.tokenize(PROMPT)
    hook, pos = "blocks.1.hook_resid_post", 11
    f = full_forward_fn(adapter, ids, hook, pos)
    d = adapter.hook_dim(hook)
    zero = torch.zeros(d, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(f, zero)  # (V, d), independent of the suffix code
    with torch.no_grad():
        p = torch.softmax(f(zero), -1)
    G_ref = J.T @ (torch.diag(p) - torch.outer(p, p)) @ J

    # position `pos` batched with two others: each row must be its own position's operator
    suffix = SuffixBatch(adapter, ids, hook, [3, pos, 0])
    op = PullbackOperator.from_suffix(suffix)
    G_ref = G_ref.detach()
    assert rel(op.dense()[1], G_ref) < 1e-6
    v = torch.randn(3, d, dtype=torch.float64)
    assert rel(op.matvec(v)[1], v[1] @ G_ref) < 1e-6
    # many directions per position: forward mode at few positions, else one replay of the
    # recorded pass for all of them (vmap); both against the dense truth
    for min_positions in (PullbackOperator.replay_min_positions, 0):
        op.replay_min_positions = min_positions
        q = op.quadratic_form(v[None].expand(3, -1, -1))[1]
        assert rel(q, torch.einsum("kd,de,ke->k", v, G_ref, v)) < 1e-6, min_positions
        trace = float(op.trace()[1])
        assert math.isclose(trace, float(torch.trace(G_ref)), rel_tol=1e-6), min_positions
    evals, evecs = op.top_eigenpairs(k=2)
    ref_vals, ref_vecs = torch.linalg.eigh(G_ref)
    assert rel(evals[1], ref_vals.flip(0)[:2]) < 1e-6
    assert (evecs[1] @ ref_vecs.flip(1)[:, :2]).abs().diagonal().min() > 1 - 1e-6
    # the other rows: their own positions' dense operators, by the single-position suffix
    for row, other in ((0, 3), (2, 0)):
        single = PositionSuffix(adapter, ids, hook, other)
        J = single.jvp(torch.eye(d, dtype=torch.float64)).T  # (V, d)
        p = torch.softmax(single.logits0, -1)
        G_other = J.T @ (torch.diag(p) - torch.outer(p, p)) @ J
        assert rel(op.dense()[row], G_other) < 1e-8


def test_directional_derivatives_give_the_kl_series(arch, tokenizer):
    """c2, c3, c4 from nested forward-mode derivatives == d^k KL / dt^k by autograd on the full forward."""
    adapter = sr.wrap(tiny_model(arch, seed=2), tokenizer)
    ids = adapter.tokenize(PROMPT)
    hook, pos = "blocks.1.hook_resid_post", 9
    f = full_forward_fn(adapter, ids, hook, pos)
    v = torch.randn(adapter.hook_dim(hook), dtype=torch.float64)
    v /= v.norm()
    with torch.no_grad():
        logp = torch.log_softmax(f(torch.zeros_like(v)), -1)
    t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    y = (logp.exp() * (logp - torch.log_softmax(f(t * v), -1))).sum()
    ref = []
    for _ in range(4):
        (y,) = torch.autograd.grad(y, t, create_graph=True)
        ref.append(float(y.detach()))
    suffix = PositionSuffix(adapter, ids, hook, pos)
    derivs = suffix.directional_derivatives(v, order=3)
    c2, c3, c4 = series_coefficients(torch.softmax(suffix.logits0, -1), derivs)
    assert abs(ref[0]) < 1e-10
    assert math.isclose(float(c2), ref[1], rel_tol=1e-8)
    assert math.isclose(float(c3), ref[2], rel_tol=1e-7)
    assert math.isclose(float(c4), ref[3], rel_tol=1e-6)


def test_inner_corrected_radius_is_the_nearer_of_both_signs_by_autograd(tokenizer):
    """analyze's radius_pade inside the network == min over +-v of the Pade root of the
    KL series whose coefficients come from autograd on the full forward (c3 flips with v)."""
    adapter = sr.wrap(tiny_model("llama", seed=3), tokenizer)
    ids = adapter.tokenize(PROMPT)
    hook, positions, eps = "blocks.1.hook_resid_post", [3, 6, 9, 12, 15], 0.1
    res = sr.analyze(adapter, PROMPT, eps=[eps], positions=positions, layer=1, exact=False)
    nearer = set()
    for row, pos, v in zip(res.rows, positions, res.directions.to(torch.float64), strict=True):
        f = full_forward_fn(adapter, ids, hook, pos)
        with torch.no_grad():
            logp = torch.log_softmax(f(torch.zeros_like(v)), -1)
        radii = []
        for sign in (1.0, -1.0):
            t = torch.zeros((), dtype=torch.float64, requires_grad=True)
            y = (logp.exp() * (logp - torch.log_softmax(f(t * sign * v), -1))).sum()
            c = []
            for _ in range(4):
                (y,) = torch.autograd.grad(y, t, create_graph=True)
                c.append(y.detach())
            radii.append(float(sr.geometry.radius_pade(c[1], c[2], eps, c[3])))
        nearer.add(radii.index(min(radii)))
        assert math.isclose(row["radius_pade"], min(radii), rel_tol=1e-6)
    assert nearer == {0, 1}  # both signs are the nearer exit somewhere: each is checked


def test_derivatives_run_with_frozen_weights_and_leave_them_as_they_were(tokenizer):
    """The user's weights require grad (a model being trained); our passes freeze them while
    they run (no weight-side graph, the fast constant linear) and give them back unchanged."""
    model = tiny_model("llama")
    assert all(p.requires_grad for p in model.parameters())
    adapter = sr.wrap(model, tokenizer)
    seen: list[bool] = []
    handle = model.lm_head.register_forward_pre_hook(
        lambda module, args: seen.append(module.weight.requires_grad)
    )
    try:
        suffix = SuffixBatch(adapter, adapter.tokenize(PROMPT), "blocks.1.hook_resid_post", [3, 9])
        seen.clear()  # its own passes run without grad: nothing is recorded there
        op = PullbackOperator.from_suffix(suffix)
        lam, vecs, _ = op.top_eigenpairs_and_trace(k=1, probes=4)
        suffix.directional_derivatives(vecs[:, 0], order=3)
    finally:
        handle.remove()
    assert seen and not any(seen)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert bool((lam > 0).all())


def test_exact_numerics_fixes_nested_forward_mode_layer_norm():
    """torch's own second-order forward-mode layer_norm is off; inside exact_numerics it is exact."""
    import torch.nn.functional as F
    from torch.func import jvp

    g = torch.Generator().manual_seed(0)
    x0, v, w, b = (torch.randn(8, dtype=torch.float64, generator=g) for _ in range(4))

    def second(fn):
        return jvp(lambda x: jvp(fn, (x,), (v,))[1], (x0,), (v,))[1]

    t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    y = F.layer_norm(x0 + t * v, (8,), w, b, 1e-5)
    g1 = [torch.autograd.grad(y[k], t, create_graph=True)[0] for k in range(8)]
    ref = torch.stack([torch.autograd.grad(g1[k], t, retain_graph=True)[0] for k in range(8)])
    ln = lambda x: F.layer_norm(x, (8,), w, b, 1e-5)  # noqa: E731
    with exact_numerics():
        assert torch.allclose(second(ln), ref, atol=1e-12)
        assert torch.allclose(ln(x0), torch.nn.functional.layer_norm(x0, (8,), w, b, 1e-5))
    # outside the context: torch's formula (if this starts passing, torch fixed it and the patch can go)
    assert not torch.allclose(second(ln), ref, atol=1e-6)


@pytest.mark.parametrize(
    "arch_name, layer",
    [("llama", 1), ("gpt2", "embed"), ("gemma2", 0), ("opt", 2), ("gpt_neox", 1)],
)
def test_analyze_inner_layer_brackets_the_full_model_boundary(arch_name, layer, tokenizer):
    """radius_exact inside the network: KL < eps up to 0.999 r on both signs, >= eps at 1.001 r on one,
    by full forward passes of the whole prefix (not the cached suffix the analysis used)."""
    adapter = sr.wrap(tiny_model(arch_name, seed=3), tokenizer)
    eps = [0.01, 0.1, 1.0]
    prompt = "Hello world, again"
    positions = [0, 6, 17]
    result = sr.analyze(adapter, prompt, eps=eps, positions=positions, layer=layer)
    df = result.to_frame()
    hook = adapter.hook_for_layer(layer)
    ids = adapter.tokenize(prompt)
    # inside the network the curve is the logits' cubic Taylor path: at eps 0.01 it agrees with
    # the measured boundary to the series' fourth order
    small = df[df.eps == 0.01]
    assert ((small.radius_curve / small.radius_exact - 1).abs() < 1e-2).all()
    assert (df.radius_relative == df.radius_curve / df["activation_norm"]).all()
    for k, pos in enumerate(positions):
        v = result.directions[k]
        assert v.shape[0] == adapter.hook_dim(hook)
        logp = torch.log_softmax(
            adapter.perturbed_logits(ids, hook, pos, torch.zeros(1, v.shape[0]))[0], -1
        )
        for e in eps:
            r = float(df[(df.position == pos) & (df.eps == e)].radius_exact.iloc[0])
            assert r > 0
            if math.isinf(r):
                # a norm follows: the KL can saturate below eps along the whole ray; check that it does
                far = torch.logspace(-3, 5, 25, dtype=torch.float64) * float(ids.shape[1] + 1)
                for sign in (1, -1):
                    logq = torch.log_softmax(
                        adapter.perturbed_logits(ids, hook, pos, sign * far[:, None] * v[None]), -1
                    )
                    assert (logp.exp() * (logp - logq)).sum(-1).max() < e
                continue
            ts = torch.tensor(np.concatenate([np.linspace(0.05, 0.999, 12), [1.001]]) * r)
            kls = []
            for sign in (1, -1):
                logq = torch.log_softmax(
                    adapter.perturbed_logits(ids, hook, pos, sign * ts[:, None] * v[None]), -1
                )
                kls.append((logp.exp() * (logp - logq)).sum(-1))
            kls = torch.stack(kls)
            assert kls[:, :-1].max() < e, (pos, e)
            assert kls[:, -1].max() >= e, (pos, e)
        # lambda_max is the top eigenvalue of the dense pullback from autograd on the full forward
        f = full_forward_fn(adapter, ids, hook, pos)
        J = torch.autograd.functional.jacobian(f, torch.zeros(v.shape[0], dtype=torch.float64))
        p = logp.exp()
        G = J.T @ (torch.diag(p) - torch.outer(p, p)) @ J
        top = float(torch.linalg.eigvalsh(G)[-1])
        assert math.isclose(float(df[df.position == pos].lambda_max.iloc[0]), top, rel_tol=1e-7)
        assert math.isclose(float(v @ G @ v), top, rel_tol=1e-7)


def test_other_threads_see_torch_unchanged_during_an_inner_analysis(tokenizer):
    """The exact numerics are ours alone: while an inner-layer analysis of a float64 GPT-2
    (float32 casts, layer norms and linears all corrected) runs on this thread, another thread
    computing with torch sees torch's own behaviour: casts that cast, torch's own layer norm
    and linear."""
    import threading

    import torch.nn.functional as F

    adapter = sr.wrap(tiny_model("gpt2"), tokenizer)
    inside = threading.Event()  # set while our thread is inside a block's forward
    handles = [
        adapter.layers[2].register_forward_pre_hook(lambda *_: inside.set()),
        adapter.layers[2].register_forward_hook(lambda *_: inside.clear()),
    ]
    stop = threading.Event()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, dtype=torch.float64, generator=g)
    w = torch.randn(8, 8, dtype=torch.float64, generator=g)
    samples: list[tuple] = []

    def watch():
        while not stop.is_set():
            during = inside.is_set()
            xg = x.clone().requires_grad_(True)
            sample = (
                F.softmax(x, -1, dtype=torch.float32).dtype,
                x.to(torch.float32).dtype,
                x.float().dtype,
                type(F.layer_norm(xg, (8,)).grad_fn).__name__,
                type(F.linear(xg, w).grad_fn).__name__,
            )
            samples.append((during, sample))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        sr.analyze(adapter, PROMPT, eps=[0.1], positions=[4, 9], layer=0)
    finally:
        stop.set()
        watcher.join()
        for h in handles:
            h.remove()
    plain = (
        torch.float32,
        torch.float32,
        torch.float32,
        "NativeLayerNormBackward0",
        "MmBackward0",
    )
    assert any(during for during, _ in samples), "no sample was taken during our forward passes"
    assert all(sample == plain for _, sample in samples), {s for _, s in samples}
    # and on our thread, inside the context, the corrections do apply
    with exact_numerics():
        xg = x.clone().requires_grad_(True)
        assert F.softmax(x, -1, dtype=torch.float32).dtype == torch.float64
        assert x.float().dtype == torch.float64
        assert type(F.layer_norm(xg, (8,)).grad_fn).__name__ != "NativeLayerNormBackward0"


def test_series_along_matches_autograd_kl_derivatives(arch, tokenizer):
    """engine.series_along (two forward-mode levels, one reverse pass, the head applied once
    when it is linear; through the softcap when not) == d^k KL / dt^k by autograd on the
    full forward, at several positions in one batch."""
    from stable_regions.engine import series_along

    adapter = sr.wrap(tiny_model(arch, seed=4), tokenizer)
    ids = adapter.tokenize(PROMPT)
    hook, positions = "blocks.0.hook_resid_post", [3, 9, ids.shape[1] - 1]
    g = torch.Generator().manual_seed(5)
    v = torch.randn(len(positions), adapter.hook_dim(hook), dtype=torch.float64, generator=g)
    v /= v.norm(dim=-1, keepdim=True)
    suffix = SuffixBatch(adapter, ids, hook, positions)
    c2, c3, c4 = series_along(adapter, suffix, torch.softmax(suffix.logits0, -1), v)
    for i, pos in enumerate(positions):
        f = full_forward_fn(adapter, ids, hook, pos)
        with torch.no_grad():
            logp = torch.log_softmax(f(torch.zeros_like(v[i])), -1)
        t = torch.zeros((), dtype=torch.float64, requires_grad=True)
        y = (logp.exp() * (logp - torch.log_softmax(f(t * v[i]), -1))).sum()
        ref = []
        for _ in range(4):
            (y,) = torch.autograd.grad(y, t, create_graph=True)
            ref.append(float(y.detach()))
        assert math.isclose(float(c2[i]), ref[1], rel_tol=1e-8), (arch, pos)
        assert math.isclose(float(c3[i]), ref[2], rel_tol=1e-7, abs_tol=1e-12), (arch, pos)
        assert math.isclose(float(c4[i]), ref[3], rel_tol=1e-6, abs_tol=1e-12), (arch, pos)


def test_linearized_products_match_forward_and_reverse_mode(tokenizer):
    """SuffixBatch.linearization: J v (replayed backward of u -> J^T u) == the forward-mode
    jvp, and J^T u == torch.func.vjp of the full forward, to a target hook and to the logits."""
    adapter = sr.wrap(tiny_model("llama", seed=6), tokenizer)
    ids = adapter.tokenize(PROMPT)
    hook, positions = "blocks.0.hook_resid_pre", [2, 8, ids.shape[1] - 1]
    suffix = SuffixBatch(adapter, ids, hook, positions)
    g = torch.Generator().manual_seed(7)
    for target in (None, "blocks.1.hook_resid_post", "ln_final.hook_normalized"):
        jvp_one, vjp = suffix.linearization(target)
        v = torch.randn(len(positions), suffix.dim, dtype=torch.float64, generator=g)
        forward = suffix.jvp(v[:, None], target)[:, 0]
        assert rel(jvp_one(v), forward) < 1e-12, target
        # k directions per position in one replay (vmap over the recorded pass)
        many = torch.randn(len(positions), 4, suffix.dim, dtype=torch.float64, generator=g)
        assert rel(jvp_one(many), suffix.jvp(many, target)) < 1e-12, target
        u = torch.randn_like(forward)
        for i, pos in enumerate(positions):
            seen = []

            def f(delta, pos=pos, seen=seen, target=target):  # the full prefix, read at target
                if target is None:
                    return full_forward_fn(adapter, ids, hook, pos)(delta)
                seen.clear()
                with (
                    adapter.perturbation(hook, pos, delta[None]),
                    adapter._on_activation(target, seen.append),
                    exact_numerics(),
                ):
                    adapter.model(input_ids=ids[:, : pos + 1])
                return seen[0][0, pos]

            _, pull = torch.func.vjp(f, torch.zeros(suffix.dim, dtype=torch.float64))
            assert rel(vjp(u)[i], pull(u[i])[0]) < 1e-10, (target, pos)


def test_rows_perturbed_at_different_hooks_equal_one_hook_each(arch, tokenizer):
    """A SuffixBatch with a hook per row (every layer at one token) gives each row what a
    suffix of that hook alone gives: logits for the same perturbation, and x0."""
    adapter = sr.wrap(tiny_model(arch, seed=8), tokenizer)
    ids = adapter.tokenize(PROMPT)
    pos = ids.shape[1] - 2
    together = SuffixBatch(adapter, ids, HOOKS, [pos] * len(HOOKS))
    g = torch.Generator().manual_seed(9)
    deltas = 0.5 * torch.randn(len(HOOKS), together.dim, dtype=torch.float64, generator=g)
    with torch.no_grad():
        both = together.logits(deltas)
    for i, hook in enumerate(HOOKS):
        alone = SuffixBatch(adapter, ids, hook, [pos])
        with torch.no_grad():
            expected = alone.logits(deltas[i : i + 1])[0]
        assert rel(both[i], expected) < 1e-12, (arch, hook)
        assert rel(together.x0[i], alone.x0[0]) < 1e-14, (arch, hook)
    with pytest.raises(ValueError, match="does not come after"):
        together.check_target("blocks.1.hook_resid_pre")


def test_inner_analysis_inside_a_callers_no_grad(tokenizer):
    """A user's ``torch.no_grad()`` around the call changes nothing: the third forward-mode
    level of silu needs grad mode, which the derivative passes turn on themselves."""
    adapter = sr.wrap(tiny_model("llama", seed=3), tokenizer)
    want = sr.analyze(adapter, "Hello world", eps=[0.1], positions="last", layer=1).rows[0]
    with torch.no_grad():
        got = sr.analyze(adapter, "Hello world", eps=[0.1], positions="last", layer=1).rows[0]
    assert np.isfinite(got["radius_curve"])
    for key in ("lambda_max", "radius_pade", "radius_curve"):
        assert got[key] == pytest.approx(want[key], rel=1e-9)


def test_blocks_of_positions_are_equal_and_within_their_caps():
    """``equal_parts``: the fewest parts within the cap, of one size (no lone part of one
    position, which would take the one-position search); the search batch of a linear head
    holds its float32 probabilities within the array budget, at most 64."""
    from stable_regions import memory_budget
    from stable_regions.budget import equal_parts
    from stable_regions.engine.common import positions_per_search

    assert equal_parts(64, 40) == 32 and equal_parts(65, 64) == 33 and equal_parts(64, 13) == 13
    assert equal_parts(1, 64) == 1 and equal_parts(10, 64) == 10 and equal_parts(5, 0) == 1
    for n in range(1, 200):
        for cap in (1, 7, 13, 32, 64):
            size = equal_parts(n, cap)
            parts = -(-n // size)
            assert size <= cap and parts == -(-n // cap) and n - (parts - 1) * size >= 1
    assert positions_per_search(49152) == 64 and positions_per_search(262144) == 64
    with memory_budget(96):  # arrays get 16 MiB: 16 rows of 262144 float32
        assert positions_per_search(262144) == 16


def test_final_blocks_within_search_batches_cover_every_position_once(monkeypatch):
    """With a budget that makes a search batch several blocks (20 positions: two batches of
    10, each in blocks of 4, 4, 2), every block's arrays have one row per position it names,
    and the blocks name each position once, in order."""
    from stable_regions import budget
    from stable_regions.engine import blocks_at

    adapter = sr.wrap(tiny_model("llama", seed=1), char_tokenizer())
    V = adapter.vocab_size
    monkeypatch.setattr(budget, "ARRAY_BYTES", 2 * V * 8 * 4)  # blocks of 4; batches of 16
    ids = adapter.tokenize("abcdefghijklmnopqrst")
    pos = list(range(ids.shape[1]))
    assert len(pos) == 20
    seen = []
    for b in blocks_at(
        adapter,
        ids,
        adapter.hook_for_layer("final"),
        pos,
        [0.1],
        exact=False,
        rtol=1e-6,
        eig_tol=1e-8,
        trace=None,
        stage=None,
    ):
        n = len(b.positions)
        assert n <= 4
        for x in (b.next_token_id, b.lambda_max, b.directions, b.pade, b.activation_norm):
            assert len(x) == n
        seen += b.positions
    assert seen == pos
