"""Adapters on small random models of every supported architecture.

References are independent of the geometry code: autograd Hessians and full forward
passes of the model with the perturbation hooked in.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import transformers as T
from conftest import CONFIGS, char_tokenizer, tiny_model

import stable_regions as sr
from stable_regions.errors import StableRegionsError, UnsupportedModelError
from stable_regions.geometry import FisherOperator, RayCurve
from stable_regions.models import PRELOGIT

pytestmark = pytest.mark.low_end  # CI runs these at both ends of the ranges

PROMPT = "The cat sat."


def kl_np(logp: torch.Tensor, logits: torch.Tensor) -> np.ndarray:
    logq = torch.log_softmax(logits, -1)
    return (logp.exp() * (logp - logq)).sum(-1).numpy()


def test_head_reproduces_model_logits(arch, tokenizer):
    adapter = sr.wrap(tiny_model(arch), tokenizer)
    ids = adapter.tokenize(PROMPT)
    with torch.no_grad():
        ref = adapter.forward(ids).logits[0]
    got = adapter.head.logits(adapter.prelogits(ids))
    assert torch.allclose(got, ref, rtol=0, atol=1e-10)
    assert (adapter.head.softcap is not None) == (arch == "gemma2")
    # the final norm is found, and the pre-logit vector is its output (OPT: then project_out)
    captured = {}
    handle = adapter.final_norm.register_forward_hook(
        lambda m, a, out: captured.setdefault("x", out)
    )
    try:
        adapter.prelogits(ids)
    finally:
        handle.remove()
    normed = captured["x"][0].to(torch.float64)
    if arch == "opt":
        normed = adapter.model.model.decoder.project_out(normed)
    assert torch.allclose(normed, adapter.prelogits(ids), atol=1e-12)


def test_curvature_matches_autograd_through_the_model(arch, tokenizer):
    """H from (p, W) == Hessian of the KL w.r.t. a perturbation hooked into the real model."""
    adapter = sr.wrap(tiny_model(arch), tokenizer)
    ids = adapter.tokenize(PROMPT)
    pos = 4
    with torch.no_grad():
        logp = torch.log_softmax(adapter.forward(ids).logits[0, pos], -1)

    def kl(x):
        with adapter.perturbation(PRELOGIT, pos, x[None]):
            logits = adapter.forward(ids).logits[0, pos]
        return (logp.exp() * (logp - torch.log_softmax(logits, -1))).sum()

    H_ref = torch.autograd.functional.hessian(kl, torch.zeros(adapter.d_model, dtype=torch.float64))
    op = FisherOperator.from_head(adapter.head, adapter.prelogits(ids)[pos : pos + 1])
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert rel(op.dense()[0], H_ref) < 1e-8
    v = torch.randn(5, adapter.d_model, dtype=torch.float64)
    assert rel(torch.stack([op.matvec(x) for x in v]), v @ H_ref) < 1e-8
    assert rel(op.quadratic_form(v[None])[0], torch.einsum("kd,de,ke->k", v, H_ref, v)) < 1e-8
    evals, evecs = op.top_eigenpairs(k=3)
    ref_vals, ref_vecs = torch.linalg.eigh(H_ref)
    assert rel(evals[0], ref_vals.flip(0)[:3]) < 1e-8
    overlap = (evecs[0] @ ref_vecs.flip(1)[:, :3]).abs().diagonal()
    assert torch.allclose(overlap, torch.ones(3, dtype=torch.float64), atol=1e-6)


def test_exact_curve_matches_model_runs(arch, tokenizer):
    adapter = sr.wrap(tiny_model(arch), tokenizer)
    ids = adapter.tokenize(PROMPT)
    pos = 6
    h = adapter.prelogits(ids)[pos]
    v = torch.randn(adapter.d_model, dtype=torch.float64)
    v /= v.norm()
    ts = torch.tensor([0.01, 0.3, 1.0, 4.0], dtype=torch.float64)
    curve = RayCurve.from_head(adapter.head, h, v[None])
    logits = adapter.perturbed_logits(ids, PRELOGIT, pos, ts[:, None] * v[None])
    with torch.no_grad():
        logp = torch.log_softmax(adapter.forward(ids).logits[0, pos], -1)
    ref = kl_np(logp, logits)
    assert np.allclose(curve.kl(ts)[:, 0].numpy(), ref, rtol=1e-8, atol=1e-14)


def test_hook_points_agree(arch, tokenizer):
    """resid_post of block i is resid_pre of block i+1; perturbing the last position only moves it."""
    adapter = sr.wrap(tiny_model(arch), tokenizer)
    ids = adapter.tokenize(PROMPT)
    delta = 0.5 * torch.randn(2, adapter.hook_dim("blocks.0.hook_resid_post"), dtype=torch.float64)
    assert adapter.hook_dim(PRELOGIT) == (16 if arch == "opt" else 32)
    a = adapter.perturbed_logits(ids, "blocks.0.hook_resid_post", 5, delta)
    b = adapter.perturbed_logits(ids, "blocks.1.hook_resid_pre", 5, delta)
    assert torch.allclose(a, b, atol=1e-12)
    base = adapter.perturbed_logits(ids, "blocks.1.hook_resid_pre", 5, 0 * delta)
    assert (a - base).abs().max() > 1e-3  # the perturbation does something
    assert adapter.hook_for_layer("embed") == "blocks.0.hook_resid_pre"
    assert adapter.hook_for_layer(2) == "blocks.2.hook_resid_post"
    assert adapter.hook_for_layer("final") == PRELOGIT
    with pytest.raises(StableRegionsError, match="out of range"):
        adapter.hook_for_layer(3)


@pytest.mark.parametrize("arch_name", ["llama", "gemma2", "opt"])
def test_analyze_radius_exact_brackets_the_model_boundary(arch_name, tokenizer):
    """radius_exact: KL below eps just inside, at/above eps just outside, by full forward passes."""
    adapter = sr.wrap(tiny_model(arch_name, seed=3), tokenizer)
    eps = [0.01, 0.1, 1.0]
    result = sr.analyze(adapter, "Hello world", eps=eps, positions=[0, 4, 10])
    df = result.to_frame()
    assert list(df.columns[:4]) == ["position", "token", "next_token", "next_prob"]
    ids = adapter.tokenize("Hello world")
    with torch.no_grad():
        all_logp = torch.log_softmax(adapter.forward(ids).logits[0], -1)
    for k, pos in enumerate([0, 4, 10]):
        v = result.directions[k]
        for e in eps:
            r = float(df[(df.position == pos) & (df.eps == e)].radius_exact.iloc[0])
            assert math.isfinite(r) and r > 0
            inside = np.linspace(0.05, 0.999, 12) * r
            ts = torch.tensor(np.concatenate([inside, [1.001 * r]]))
            kls = [
                kl_np(
                    all_logp[pos],
                    adapter.perturbed_logits(ids, PRELOGIT, pos, s * ts[:, None] * v[None]),
                )
                for s in (1, -1)
            ]
            assert max(k_[:-1].max() for k_ in kls) < e  # no exit before r along either sign
            assert max(k_[-1] for k_ in kls) >= e  # and one sign exits just after r
    # the closed forms are finite and the curve radius equals the measured one on a linear/softcapped head
    assert np.allclose(df.radius_curve, df.radius_exact, rtol=1e-5)
    assert (df.effective_rank >= 1 - 1e-9).all()
    assert np.allclose(df.radius_quadratic, np.sqrt(2 * df.eps / df.lambda_max))


def test_float64_head_is_a_copy_made_on_first_use(tokenizer):
    model = tiny_model("gpt2", dtype=torch.float32)  # gpt2: a head without bias; opt has none too
    adapter = sr.wrap(model, tokenizer)
    stored = adapter.stored_head
    assert stored.weight.data_ptr() == model.lm_head.weight.data_ptr()  # no copy
    head = adapter.head
    assert head.weight.dtype == torch.float64 and adapter.head is head  # made once
    assert torch.equal(head.weight, stored.weight.double())
    adapter.release_copies()
    assert adapter.head is not head and torch.equal(adapter.head.weight, head.weight)


def test_one_hot_distribution_gives_large_radius_not_nan(tokenizer):
    model = tiny_model("llama", seed=5)
    adapter = sr.wrap(model, tokenizer)
    ids = adapter.tokenize("ab")
    h = adapter.prelogits(ids)[-1]
    with torch.no_grad():
        # token 7's logit is 1000 above the others (|others| < ~20): p is one-hot in float64
        model.lm_head.weight[7] = 1000.0 * h / (h @ h)
    adapter = sr.wrap(model, tokenizer)
    df = sr.analyze(adapter, "ab", eps=[0.1], positions="last").to_frame()
    row = df.iloc[0]
    assert row.next_prob == 1.0
    for col in [
        "radius_quadratic",
        "radius_pade",
        "radius_curve",
        "radius_exact",
        "lambda_max",
        "effective_rank",
    ]:
        assert not math.isnan(row[col]), col
    assert row.radius_quadratic > 1e6 or math.isinf(row.radius_quadratic)
    assert row.radius_exact > 1.0  # a logit gap of ~1000 nats takes a large push to close


def test_positions_and_eps_validation(tokenizer):
    adapter = sr.wrap(tiny_model("llama"), tokenizer)
    df = sr.analyze(adapter, "abc", eps=0.1, positions="last", exact=False).to_frame()
    assert df.position.tolist() == [2] and df.radius_exact.isna().all()
    assert sr.analyze(adapter, "abc", eps=0.1, positions=[-1], exact=False).rows[0]["position"] == 2
    for bad in [0.0, -1.0, float("nan"), float("inf"), []]:
        with pytest.raises(StableRegionsError, match="eps"):
            sr.analyze(adapter, "abc", eps=bad)
    with pytest.raises(StableRegionsError, match="out of range"):
        sr.analyze(adapter, "abc", positions=[3])
    with pytest.raises(StableRegionsError, match="empty"):
        sr.analyze(adapter, "   ")
    with pytest.raises(StableRegionsError, match="context"):
        sr.analyze(adapter, "x" * 80)


def test_unsupported_models_are_refused(tokenizer):
    bert = T.BertForMaskedLM(
        T.BertConfig(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        )
    )
    with pytest.raises(UnsupportedModelError, match="supported: .*Llama"):
        sr.wrap(bert, tokenizer)
    t5 = T.T5ForConditionalGeneration(
        T.T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)
    )
    with pytest.raises(UnsupportedModelError, match="encoder-decoder|supported"):
        sr.wrap(t5, tokenizer)
    base = T.LlamaModel(CONFIGS["llama"]())  # no LM head
    with pytest.raises(UnsupportedModelError):
        sr.wrap(base, tokenizer)


def test_load_local_directory_and_bad_directories(tmp_path):
    model = tiny_model("qwen2", dtype=torch.float32)
    tok = char_tokenizer()
    good = tmp_path / "good"
    model.save_pretrained(good)
    tok.save_pretrained(good)
    adapter = sr.load(str(good))
    ids = adapter.tokenize(PROMPT)
    with torch.no_grad():
        assert torch.allclose(
            adapter.model(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6
        )

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((good / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(StableRegionsError, match="pickle"):
        sr.load(str(pickled))

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((good / "config.json").read_text())
    (corrupt / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes()[:500])
    with pytest.raises(StableRegionsError, match="could not load"):
        sr.load(str(corrupt))

    (tmp_path / "notjson").mkdir()
    (tmp_path / "notjson" / "config.json").write_text("{")
    with pytest.raises(StableRegionsError, match="not valid JSON"):
        sr.load(str(tmp_path / "notjson"))
    with pytest.raises(StableRegionsError, match="not found"):
        sr.load(str(tmp_path / "missing"))
    bad_gguf = tmp_path / "x.gguf"
    bad_gguf.write_bytes(b"nope")
    with pytest.raises(StableRegionsError, match="not a GGUF"):
        sr.load(str(bad_gguf))
