"""Taylor mode (``models.taylor``): every rule against nested forward mode (``torch.func.jvp``),
the whole suffix of every architecture against the nest, and the fallback where a model uses
an operation without a rule."""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from torch.func import jvp

import stable_regions as sr
from stable_regions.errors import StableRegionsWarning
from stable_regions.models import PRELOGIT
from stable_regions.models.suffix import SuffixBatch
from stable_regions.models.taylor import Jet, NotJettable, taylor_derivatives

pytestmark = pytest.mark.low_end  # CI runs these at both ends of the ranges

PROMPT = "The quick brown fox jumps over the lazy dog."


def nested(fn, x, v, order):
    """``[d^k fn(x + t v) / dt^k]`` for k = 1..order by nested forward mode."""
    g = lambda t: fn(x + t * v)  # noqa: E731
    out = []
    for k in range(1, order + 1):
        f = g
        for _ in range(k):
            f = (lambda h: lambda t: jvp(h, (t,), (torch.ones_like(t),))[1])(f)
        out.append(f(torch.zeros((), dtype=x.dtype)))
    return out


def layer_norm_by_hand(x, weight, bias, eps=1e-5):
    """The reference: torch's own forward-mode rule for ``F.layer_norm`` is wrong at second
    order (``models.precision``)."""
    centered = x - x.mean(-1, keepdim=True)
    return centered / torch.sqrt((centered**2).mean(-1, keepdim=True) + eps) * weight + bias


def jets(fn, x, v, order):
    return taylor_derivatives(lambda d: fn(x + d), v, order)


torch.manual_seed(0)
X = torch.randn(3, 5, dtype=torch.float64)
POS = X.abs() + 0.5
M = torch.randn(5, 4, dtype=torch.float64)
W = torch.randn(4, 5, dtype=torch.float64)
B = torch.randn(4, dtype=torch.float64)
MASK = torch.rand(3, 5) > 0.6
FUNCTIONS = {
    "exp": (torch.exp, X),
    "tanh": (torch.tanh, X),
    "sigmoid": (torch.sigmoid, X),
    "erf": (torch.erf, X),
    "log": (torch.log, POS),
    "rsqrt": (torch.rsqrt, POS),
    "sqrt": (lambda x: x.sqrt(), POS),
    "reciprocal": (torch.reciprocal, POS),
    "pow 2": (lambda x: x.pow(2), X),
    "pow 3.0": (lambda x: torch.pow(x, 3.0), X),
    "pow -1.5": (lambda x: x**-1.5, POS),
    "softmax": (lambda x: F.softmax(x, dim=-1), X),
    "softmax masked": (lambda x: torch.softmax(x.masked_fill(MASK, -math.inf), -1), X),
    "log_softmax free": (lambda x: x - x.exp().sum(-1, keepdim=True).log(), X),
    "layer_norm": (
        lambda x: F.layer_norm(x, (5,), W[0], W[1]),
        X,
        lambda x: layer_norm_by_hand(x, W[0], W[1]),
    ),
    "silu": (F.silu, X),
    "gelu": (F.gelu, X),
    "gelu tanh": (lambda x: F.gelu(x, approximate="tanh"), X),
    "relu": (F.relu, X),
    "linear": (lambda x: F.linear(x, W, B), X),
    "addmm": (lambda x: torch.addmm(B, x, W.T), X),
    "products": (lambda x: (x * x.tanh()) @ (x.T / (1 + x.T**2)), X),
    "scalars": (lambda x: 2.0 / (1.0 - x.sigmoid()) - 3 * x + 1, X),
    "structure": (
        lambda x: torch.cat([x.view(5, 3).transpose(0, 1), x[:, :2]], dim=1).unsqueeze(0).sum(-1),
        X,
    ),
    "where": (lambda x: torch.where(MASK, x.exp(), x * 2) + torch.where(MASK, 1.0, x), X),
    "chunks": (lambda x: torch.stack(x.chunk(5, dim=-1)).prod(0), X),
}
if hasattr(F, "rms_norm"):
    FUNCTIONS["rms_norm"] = (lambda x: F.rms_norm(x, (5,), W[0], 1e-6), X)


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_each_rule_matches_nested_forward_mode(name):
    fn, x, *by_hand = FUNCTIONS[name]
    v = torch.randn_like(x)
    try:
        got = jets(fn, x, v, 3)
    except NotJettable as missing:  # "prod" has no rule: the chunks case checks exactly that
        assert name == "chunks" and "prod" in str(missing)
        return
    ref = nested(by_hand[0] if by_hand else fn, x, v, 3)
    for k, (a, b) in enumerate(zip(got, ref, strict=True), start=1):
        assert torch.allclose(a, b, rtol=1e-11, atol=1e-11 * b.abs().max()), (name, k)


def test_jets_pass_metadata_and_comparisons_but_never_lose_the_series():
    jet = Jet([X, torch.ones_like(X), None, None])
    assert jet.shape == X.shape and jet.dtype == X.dtype and jet.size(-1) == 5
    assert torch.equal(jet > 0, X > 0)  # piecewise constant: no series to lose
    with pytest.raises(NotJettable, match="cumsum"):
        torch.cumsum(jet, 0)
    with pytest.raises(NotJettable, match="in-place"):
        jet.add_(1.0)
    with pytest.raises(NotJettable, match="in-place"):
        jet[0] = 1.0


def test_the_suffix_in_taylor_mode_matches_the_nest(arch, tokenizer):
    """One pass of jets through every architecture's blocks (rotary, GQA, q/k norms, sliding
    windows, softcaps, Conv1D, layer norms, learned positions) == three nested jvp levels, to
    the logits and to the pre-logit vector, from three hooks, a position listed twice."""
    adapter = sr.wrap(tiny_model(arch, seed=2), tokenizer)
    ids = adapter.tokenize(PROMPT)
    for hook in ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_post", PRELOGIT]:
        suffix = SuffixBatch(adapter, ids, hook, [3, 9, 12, 9])
        v = torch.randn(4, suffix.dim, dtype=torch.float64)
        for target in (None, PRELOGIT) if hook != PRELOGIT else (None,):
            got = suffix.directional_derivatives(v, 3, target=target)
            ref = suffix.nested_derivatives(v, 3, target=target)
            for a, b in zip(got, ref, strict=True):
                scale = b.abs().max().clamp_min(1e-300)
                assert float((a - b).abs().max() / scale) < 1e-11 or float(b.abs().max()) == 0
            one = suffix.jvp(v[:, None])[:, 0]  # first-order jets, as rows
            assert torch.allclose(one, ref[0] if target is None else suffix.jvp(v), rtol=1e-11)
    assert adapter.taylor_mode, adapter.taylor_mode_off


def test_an_operation_without_a_rule_falls_back_to_the_nest(tokenizer):
    """A block that uses an operation Taylor mode has no rule for (``expm1``, adding zero):
    the pass stops, the adapter says why (one warning) and stays in nested forward mode, and the answers
    are the ones Taylor mode gave before the change (the function is the same)."""
    adapter = sr.wrap(tiny_model("llama", seed=2), tokenizer)
    ids = adapter.tokenize(PROMPT)
    suffix = SuffixBatch(adapter, ids, "blocks.0.hook_resid_post", [4, 11])
    v = torch.randn(2, suffix.dim, dtype=torch.float64)
    before = suffix.directional_derivatives(v, 3)
    tangents_before = suffix.jvp(v)
    map_before = sr.stability_map(adapter, PROMPT, eps=0.1, layers=[0, 1], positions=[4, 11])
    mlp = adapter.model.model.layers[1].mlp
    handle = mlp.register_forward_hook(lambda m, a, out: out + torch.expm1(out) - torch.expm1(out))
    try:
        with warnings.catch_warnings(record=True) as seen:  # not pytest.warns: it re-emits
            warnings.simplefilter("always", StableRegionsWarning)  # torch's own deprecations
            after = suffix.directional_derivatives(v, 3)
        ours = [w for w in seen if issubclass(w.category, StableRegionsWarning)]
        assert len(ours) == 1 and "no Taylor rule for expm1" in str(ours[0].message)
        assert not adapter.taylor_mode and "expm1" in adapter.taylor_mode_off
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said once, not at every pass
            tangents_after = suffix.jvp(v)
        # the map's series then comes from two forward-mode levels and a reverse pass
        map_after = sr.stability_map(adapter, PROMPT, eps=0.1, layers=[0, 1], positions=[4, 11])
    finally:
        handle.remove()
    for a, b in zip(after, before, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12 * float(b.abs().max()))
    assert torch.allclose(tangents_after, tangents_before, rtol=1e-10)
    assert np.allclose(map_after.radius_pade, map_before.radius_pade, rtol=1e-9)
    assert np.allclose(map_after.lambda_max, map_before.lambda_max, rtol=1e-9)
