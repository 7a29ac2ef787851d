"""TransformerLens bridges and nnsight models, wrapped: the same geometry as a dense
reference built from the wrapper's own unembedding and hook values, and every study gives
what it gives on the plain transformers model with the same weights."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import transformers as T
from conftest import char_tokenizer, requires, tiny_model

nnsight = requires("nnsight", "wrappers")
requires("transformer_lens", "wrappers")
from transformer_lens import TransformerBridgeConfig  # noqa: E402
from transformer_lens.model_bridge import TransformerBridge  # noqa: E402

import stable_regions as sr  # noqa: E402
from stable_regions.errors import UnsupportedModelError  # noqa: E402

pytestmark = pytest.mark.wrappers

PROMPT = "The cat sat on"


@pytest.fixture(scope="module")
def saved_tokenizer(tmp_path_factory):
    """TransformerLens re-loads the tokenizer from its ``name_or_path`` (to add a BOS): a
    saved one, offline."""
    path = tmp_path_factory.mktemp("chartok")
    char_tokenizer().save_pretrained(path)
    return T.AutoTokenizer.from_pretrained(path)


def boot(arch: str, tokenizer, *, compat: bool = False, seed: int = 0):
    """A bridge around a tiny random model, and an untouched twin with the same weights (the
    bridge swaps its modules into the model it wraps)."""
    model = tiny_model(arch, seed=seed)
    twin = copy.deepcopy(model)
    bridge = TransformerBridge.boot_transformers("tiny", hf_model=model, tokenizer=tokenizer)
    if compat:
        bridge.enable_compatibility_mode()
    return bridge, twin


def dense_top(W: torch.Tensor, b: torch.Tensor | None, h: torch.Tensor):
    """λ_max and its unit eigenvector of ``W^T (diag p - p p^T) W`` for logits ``W h + b``,
    from the dense d x d matrix (W: (V, d))."""
    z = W @ h + (0 if b is None else b)
    p = torch.softmax(z, -1)
    H = W.T @ (p[:, None] * W) - torch.outer(W.T @ p, W.T @ p)
    vals, vecs = torch.linalg.eigh(H)
    return float(vals[-1]), vecs[:, -1]


def kl_exit(logits_at, eps: float) -> float:
    """Bisection for the t where ``KL(p || p(t))`` reaches eps, ``logits_at(t)`` the logits."""
    logp = torch.log_softmax(logits_at(0.0), -1)

    def kl(t):
        return float((logp.exp() * (logp - torch.log_softmax(logits_at(t), -1))).sum())

    hi = 1e-3
    while kl(hi) < eps:
        hi *= 2
    lo = 0.0
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if kl(mid) < eps else (lo, mid)
    return (lo + hi) / 2


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("compat", [False, True])
def test_bridge_final_layer_matches_dense_reference(arch, compat, saved_tokenizer):
    """``lambda_max`` and the exact exit along ±v from the bridge's own ``W_U``, ``b_U`` and
    ``ln_final.hook_normalized`` (compatibility mode folds and centres the weights: the
    reference follows the bridge, not the original model)."""
    bridge, _ = boot(arch, saved_tokenizer, compat=compat)
    adapter = sr.wrap(bridge)
    ids = bridge.to_tokens(PROMPT)
    assert torch.equal(ids, adapter.tokenize(PROMPT))  # the bridge's tokenizer, BOS and all
    with torch.no_grad():
        _, cache = bridge.run_with_cache(ids)
    hs = cache["ln_final.hook_normalized"][0].to(torch.float64)
    W = bridge.W_U.detach().T.to(torch.float64)
    b = None if bridge.b_U is None else bridge.b_U.detach().to(torch.float64)
    frame = sr.analyze(adapter, PROMPT, eps=[0.1, 1.0], positions="all").to_frame()
    for position in range(ids.shape[1]):
        lam, v = dense_top(W, b, hs[position])
        rows = frame[frame.position == position]
        assert rows.lambda_max.iloc[0] == pytest.approx(lam, rel=1e-6)
        h, bias = hs[position], (0 if b is None else b)
        for eps, row in zip([0.1, 1.0], rows.itertuples(), strict=True):
            assert row.radius_quadratic == pytest.approx(math.sqrt(2 * eps / lam), rel=1e-6)
            exits = [
                kl_exit(lambda t, s=s, h=h, v=v, c=bias: W @ (h + s * t * v) + c, eps)
                for s in (1.0, -1.0)
            ]
            assert row.radius_exact == pytest.approx(min(exits), rel=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bridge_inner_layer_matches_autograd_through_its_hooks(arch, saved_tokenizer):
    """The pullback ``J^T F J`` at ``blocks.1.hook_resid_post`` from a dense Jacobian taken by
    autograd through the bridge's own hook (``run_with_hooks``), not through our suffix."""
    bridge, _ = boot(arch, saved_tokenizer, seed=1)
    adapter = sr.wrap(bridge)
    ids = bridge.to_tokens(PROMPT)
    position = 5
    d = adapter.d_resid

    def logits_after(delta: torch.Tensor) -> torch.Tensor:
        def add(x, hook):
            return torch.cat(
                [x[:, :position], x[:, position : position + 1] + delta, x[:, position + 1 :]], 1
            )

        out = bridge.run_with_hooks(ids, fwd_hooks=[("blocks.1.hook_resid_post", add)])
        return out[0, position].to(torch.float64)

    zero = torch.zeros(d, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(logits_after, zero)  # (V, d)
    p = torch.softmax(logits_after(zero).detach(), -1)
    G = J.T @ (p[:, None] * J) - torch.outer(J.T @ p, J.T @ p)
    lam = float(torch.linalg.eigvalsh(G)[-1])
    frame = sr.analyze(adapter, PROMPT, eps=[0.1], positions=[position], layer=1).to_frame()
    assert frame.lambda_max.iloc[0] == pytest.approx(lam, rel=1e-6)


def _frames_equal(a, b, atol: float = 1e-8) -> None:
    assert list(a.columns) == list(b.columns)
    for column in a.columns:
        x, y = a[column].to_numpy(), b[column].to_numpy()
        if x.dtype.kind in "fc":
            np.testing.assert_allclose(x, y, rtol=1e-7, atol=atol, equal_nan=True, err_msg=column)
        elif x.dtype == object and len(x) and isinstance(x[0], (list, tuple, np.ndarray)):
            for xi, yi in zip(x, y, strict=True):
                if all(isinstance(e, str) for e in xi):
                    assert list(xi) == list(yi), column
                else:
                    np.testing.assert_allclose(
                        np.asarray(xi, float), np.asarray(yi, float), rtol=1e-7, atol=atol
                    )
        else:
            assert list(x) == list(y), column


def every_study(model, tokenizer=None) -> dict:
    """Each study the issue names, on one small prompt."""
    adapter = sr.wrap(model, tokenizer)
    vector = torch.linspace(-1, 1, adapter.d_resid, dtype=torch.float64)
    frames = {
        "analyze": sr.analyze(adapter, PROMPT, eps=[0.1], layer=1, positions=[3, 7]).to_frame(),
        "steer": sr.steering_budget(
            adapter, [PROMPT, "a dog ran"], vector=vector, layer=1, eps=[0.1]
        ).to_frame(),
        "jacobian": sr.jacobian_profile(adapter, PROMPT, k=2).to_frame(),
        "certify": sr.certify(adapter, PROMPT, eps=[0.1], positions=[3, 7]).to_frame(),
    }
    stability = sr.stability_map(
        adapter, PROMPT, eps=0.1, layers=["embed", 1, "final"], positions=[2, 6]
    )
    frames["map"] = stability.radius_pade
    # the confirming rollout resumes from kept keys and values: the bridge's cache as well
    iso = sr.iso_kl(
        adapter, [PROMPT, "a dog ran"], vector=vector.float(), layer=1, target=0.5,
        stat="mean", tokens=4,
    ).to_frame()  # fmt: skip
    frames["iso_kl"] = iso.drop(columns=[c for c in iso.columns if c.startswith("seconds_")])
    # with a steering vector: the base model's pass per step runs on a cache of its own
    steering = {"vector": vector, "layer": 1, "coefficient": 0.2}
    text, frames["monitor"] = sr.generate(
        adapter, PROMPT, max_new_tokens=4, eps=[0.1], mode="exact", steering=steering
    )
    frames["text"] = text
    return frames


def _assert_same_studies(wrapped: dict, plain: dict) -> None:
    for name, value in wrapped.items():
        if name == "map":
            np.testing.assert_allclose(value, plain[name], rtol=1e-7, equal_nan=True)
        elif name == "text":
            assert value == plain[name]
        else:
            _frames_equal(value, plain[name])


def test_every_study_on_a_bridge_equals_the_plain_model(saved_tokenizer):
    """analyze, steer, map, jacobian, certify and the monitor (through ``generate``, whose
    key/value cache the bridge's attention reads under another name) on a bridge give what
    they give on an identical model that was never bridged."""
    bridge, twin = boot("llama", saved_tokenizer)
    wrapped = every_study(bridge)
    plain = every_study(twin, bridge.tokenizer)
    _assert_same_studies(wrapped, plain)
    assert len(wrapped["monitor"]) == 4 and (wrapped["monitor"].kl_steer > 0).all()


def _nnsight_model(kind: str, model, tokenizer):
    """nnsight 0.8's ``TransformersModel`` and the ``LanguageModel`` it deprecates."""
    if kind == "TransformersModel":
        return nnsight.TransformersModel(model, task="text-generation", tokenizer=tokenizer)
    with pytest.warns(Warning, match="deprecated"):
        return nnsight.LanguageModel(model, tokenizer=tokenizer)


@pytest.mark.parametrize("kind", ["LanguageModel", "TransformersModel"])
def test_every_study_on_nnsight_equals_the_plain_model(kind):
    tokenizer = char_tokenizer()
    model = tiny_model("llama", seed=3)
    twin = copy.deepcopy(model)
    lm = _nnsight_model(kind, model, tokenizer)
    _assert_same_studies(every_study(lm), every_study(twin, tokenizer))


def test_nnsight_final_layer_matches_its_traced_activations():
    """The dense reference from what nnsight itself records: the head's input and weight."""
    tokenizer = char_tokenizer()
    lm = _nnsight_model("TransformersModel", tiny_model("gpt2", seed=4), tokenizer)
    with torch.no_grad(), lm.trace(PROMPT):
        hs = lm.lm_head.input.save()
    hs = hs[0].to(torch.float64)
    W = lm.lm_head.weight.detach().to(torch.float64)
    frame = sr.analyze(sr.wrap(lm), PROMPT, eps=[0.1], positions="all").to_frame()
    for position in range(hs.shape[0]):
        lam, _ = dense_top(W, None, hs[position])
        assert frame.lambda_max.iloc[position] == pytest.approx(lam, rel=1e-6)


def test_wrap_refuses_what_it_cannot_run(saved_tokenizer):
    with pytest.raises(
        UnsupportedModelError, match="TransformerBridge.*nnsight TransformersModel or LanguageModel"
    ):
        sr.wrap(object())
    with pytest.raises(UnsupportedModelError, match="TransformerBridge"):
        sr.analyze(torch.nn.Linear(3, 3), PROMPT)
    native = TransformerBridge.boot_native(
        TransformerBridgeConfig(
            d_model=16, d_head=4, n_layers=1, n_ctx=16, n_heads=4, d_vocab=20, seed=0
        )
    )
    with pytest.raises(UnsupportedModelError, match="boot_transformers"):
        sr.wrap(native)
    lm = nnsight.NNsight(torch.nn.Linear(3, 3))
    with pytest.raises(UnsupportedModelError, match="not a transformers causal LM"):
        sr.wrap(lm)


def test_bridge_hooks_are_gone_after_each_call(saved_tokenizer):
    """Our hooks, the cache hand-off included, are context managers: none is left behind."""
    bridge, _ = boot("llama", saved_tokenizer)

    def counts() -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in bridge.modules())

    with torch.no_grad():
        bridge(bridge.to_tokens(PROMPT))  # TransformerLens wires its own capture hooks on first use
    before = counts()
    every_study(bridge)
    assert counts() == before
