"""Every study on a second device, simulated on the CPU (``simulated_device``): what CUDA
would refuse (a CPU index into a device tensor's operation, a CPU vector added to device
activations, a CPU generator for device noise) fails here, and each study's answers equal
the same study's on the CPU.

The harness itself is checked first against PyTorch's documented rules, so that a pass
below means something.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import transformers as T
from conftest import CONFIGS, char_tokenizer, tiny_model
from simulated_device import DEVICE, DeviceMixingError, OnDevice, SimulatedDevice

import stable_regions as sr
from stable_regions.prompts import Prompt
from stable_regions.studies.scan import scan_corpus
from stable_regions.studies.steering import load_vector

pytestmark = pytest.mark.low_end  # CI runs these at both ends of the ranges

PROMPT = "The cat sat on"


# ------------------------------------------------------------------------------ the harness


def test_the_harness_refuses_what_cuda_refuses():
    with SimulatedDevice():
        x = torch.randn(4, 3).to(DEVICE)
        assert isinstance(x, OnDevice) and x.device == DEVICE
        cpu = torch.randn(4, 3)
        for mixed in (
            lambda: x + cpu,
            lambda: x @ cpu.T,
            lambda: torch.cat([x, cpu]),
            lambda: torch.where(cpu > 0, x, x),
            lambda: cpu[torch.arange(2).to(DEVICE)],  # a device index into a CPU tensor
            lambda: x.index_select(0, torch.arange(2)),  # index_select wants one device
            lambda: torch.gather(x, 0, torch.zeros(1, 3, dtype=torch.long)),
            lambda: cpu * x.sum(),  # a device scalar in a CPU operation
            lambda: torch.randn(3, generator=torch.Generator(), device=DEVICE),
        ):
            with pytest.raises((DeviceMixingError, RuntimeError)):
                mixed()
        with pytest.raises(TypeError, match="numpy"):
            x.numpy()
        # what PyTorch allows: CPU scalars, CPU indices for x[idx] and x[idx] = v, copies
        y = x * torch.tensor(2.0) + 1.0
        assert isinstance(y, OnDevice)
        assert isinstance(x[torch.tensor([0, 2])], OnDevice)
        assert isinstance(x[[0, 2]], OnDevice) and isinstance(x[np.array([1])], OnDevice)
        x[torch.tensor([1])] = torch.zeros(1, 3).to(DEVICE)
        assert float(x[1].abs().sum()) == 0.0
        assert type(x.cpu()) is torch.Tensor and x.tolist()[1] == [0.0, 0.0, 0.0]
        assert isinstance(torch.zeros(2, device=x.device), OnDevice)
        assert isinstance(torch.tensor([1.0], device=x.device), OnDevice)


def test_autograd_and_forward_mode_run_on_the_simulated_device():
    with SimulatedDevice():
        w = torch.randn(3, 3, dtype=torch.float64).to(DEVICE).requires_grad_()
        v = torch.randn(3, dtype=torch.float64).to(DEVICE)
        (w @ v).square().sum().backward()
        expected = 2 * torch.outer(w.detach().cpu() @ v.cpu(), v.cpu())
        torch.testing.assert_close(w.grad.cpu(), expected)
        _, tangent = torch.func.jvp(lambda x: (x**3).sum(), (v,), (torch.ones_like(v),))
        torch.testing.assert_close(tangent.cpu(), 3 * v.cpu().square().sum())


# --------------------------------------------------------------------------- every study


def _model(arch="llama", dtype=torch.float64, **kw):
    model = tiny_model(arch, seed=3, dtype=dtype)
    return model


def on_both(study, *, arch="llama", dtype=torch.float64):
    """``study(adapter)`` -> a DataFrame (or a tuple of them), on the CPU and on the simulated
    device; both answers, and the synchronisations counted on the device."""
    tokenizer = char_tokenizer()
    on_cpu = study(sr.wrap(_model(arch, dtype), tokenizer))
    with SimulatedDevice() as sim:
        model = _model(arch, dtype).to(DEVICE)
        assert next(model.parameters()).device == DEVICE
        on_device = study(sr.wrap(model, tokenizer))
    return on_cpu, on_device, sim.syncs


def assert_same(a, b, rtol=1e-9):
    if isinstance(a, tuple):
        for x, y in zip(a, b, strict=True):
            assert_same(x, y, rtol)
        return
    assert list(a.columns) == list(b.columns)
    for col in a.columns:
        if pd.api.types.is_float_dtype(a[col]):
            np.testing.assert_allclose(b[col], a[col], rtol=rtol, atol=1e-12, err_msg=col)
        else:
            assert a[col].astype(str).tolist() == b[col].astype(str).tolist(), col


@pytest.mark.parametrize("layer", ["final", "embed", 1])
@pytest.mark.parametrize("exact", [True, False])
def test_analyze(layer, exact):
    a, b, _ = on_both(
        lambda m: sr.analyze(m, PROMPT, eps=[0.1, 1.0], layer=layer, exact=exact).to_frame()
    )
    assert_same(a, b)


def test_analyze_a_16_bit_model_inside():
    a, b, _ = on_both(
        lambda m: sr.analyze(m, PROMPT, eps=[0.1], layer=1, positions="last").to_frame(),
        dtype=torch.bfloat16,
    )
    assert_same(a, b, rtol=1e-6)


@pytest.mark.parametrize(
    "layer, norm, substitutions", [("final", "l2", 0), (1, "linf", 0), ("final", "l2", 2)]
)
def test_certify(layer, norm, substitutions):
    def study(m):
        r = sr.certify(
            m, PROMPT, eps=[0.1, 1.0], layer=layer, norm=norm, substitutions=substitutions
        )
        frames = (r.to_frame(),)
        return frames + ((r.substitutions_frame(),) if substitutions else ())

    a, b, _ = on_both(study)
    assert_same(a, b, rtol=1e-7)


def test_steer_with_a_vector_from_a_file(tmp_path):
    path = tmp_path / "vector.npy"
    np.save(path, np.random.default_rng(0).normal(size=32))

    def study(m):
        vector = load_vector(path, m.d_model)
        return sr.steering_budget(
            m, [PROMPT, "Hello"], vector=vector, layer=1, eps=[0.1]
        ).to_frame()

    a, b, _ = on_both(study)
    assert_same(a, b)


@pytest.mark.slow
def test_map_and_jacobian():
    def study(m):
        smap = sr.stability_map(m, PROMPT, eps=0.1, layers=["embed", 1, "final"])
        profile = sr.jacobian_profile(m, PROMPT, k=2)
        grid = pd.DataFrame(
            {"radius": np.ravel(smap.radius_pade), "lam": np.ravel(smap.lambda_max)}
        )
        return grid, profile.to_frame()

    a, b, _ = on_both(study)
    assert_same(a, b, rtol=1e-7)


def test_scan(tmp_path):
    docs = [Prompt("a", "The cat sat on the mat. " * 3), Prompt("b", "1, 2, 3, 4")]
    counter = iter(range(2))

    def study(m):
        out = tmp_path / f"scan{next(counter)}"
        return scan_corpus(m, docs, out=out, eps=[0.1], window=16, overlap=4).frame

    a, b, _ = on_both(study)
    assert_same(a, b, rtol=1e-7)


def test_validate_inside(tmp_path):
    prompts = [Prompt("a", "The cat sat on the mat."), Prompt("b", "1, 2, 3, 4,")]
    counter = iter(range(2))

    def study(m):
        out = tmp_path / f"validate{next(counter)}"
        run = sr.validate(
            m,
            prompts,
            out=out,
            eps=[0.1],
            layers=[1],
            positions_per_prompt=1,
            calibration=None,
            families=["top", "random"],
        )
        return run.frame.drop(columns=[c for c in run.frame if "seconds" in c])

    a, b, _ = on_both(study)
    assert_same(a, b, rtol=1e-7)


@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_generate_with_the_monitor(mode):
    def study(m):
        texts, frame = sr.generate(m, [PROMPT, "Hi"], max_new_tokens=4, eps=[0.1], mode=mode)
        return frame.assign(text=frame["sequence"].map(dict(enumerate(texts))))

    a, b, _ = on_both(study)
    assert_same(a, b, rtol=1e-7)


def test_a_wrapped_sdpa_model_inside():
    """A model loaded with the transformers default (SDPA attention) gives derivatives at an
    inner layer: our own passes run eager attention, and the model is left as it was."""

    def study(m):
        return sr.analyze(m, PROMPT, eps=[0.1], layer=1, positions="last").to_frame()

    tokenizer = char_tokenizer()
    torch.manual_seed(3)
    model = T.AutoModelForCausalLM.from_config(CONFIGS["llama"](), attn_implementation="sdpa")
    eager = tiny_model("llama", seed=3, dtype=torch.float32)
    model.load_state_dict(eager.state_dict())
    model = model.eval()
    frame = study(sr.wrap(model, tokenizer))
    assert model.config._attn_implementation == "sdpa"
    assert_same(study(sr.wrap(eager, tokenizer)), frame, rtol=1e-5)
    with SimulatedDevice():
        model.to(DEVICE)
        assert_same(frame, study(sr.wrap(model, tokenizer)), rtol=1e-5)


def test_a_model_whose_attention_gives_no_derivatives_is_one_line():
    """Attention that ignores the switch to eager (here a config pinned to SDPA) fails in one
    line that says what to do, not deep inside autograd."""

    class PinnedToSdpa(T.LlamaConfig):
        _attn_implementation = property(lambda self: "sdpa", lambda self, value: None)

    config = PinnedToSdpa(**CONFIGS["llama"]().to_dict())
    model = T.LlamaForCausalLM(config).eval()
    with pytest.raises(sr.StableRegionsError, match="attn_implementation='eager'") as info:
        sr.analyze(sr.wrap(model, char_tokenizer()), PROMPT, eps=[0.1], layer=1)
    assert "\n" not in str(info.value)


def test_the_accelerator_path_of_the_kl_along_rays_equals_the_cpu_path():
    """On an accelerator ``RayCurve`` and ``TaylorPathKL`` gather the rays' rows instead of
    looping over rays (``geometry.curve.by_ray``): the same numbers as the CPU's loop."""
    from stable_regions.geometry import LogitHead
    from stable_regions.geometry.curve import RayCurve, TaylorPathKL

    g = torch.Generator().manual_seed(0)
    f64 = torch.float64
    W, h, v = (torch.randn(n, 8, generator=g, dtype=f64) for n in (50, 3, 3))
    rays, t = torch.tensor([0, 2, 1, 0, 2, 2]), torch.linspace(0.1, 0.6, 6, dtype=f64)
    logp = torch.log_softmax(torch.randn(2, 50, generator=g, dtype=f64), -1)
    derivs = [torch.randn(3, 50, generator=g, dtype=f64) for _ in range(3)]
    origin = torch.tensor([0, 1, 1])
    for softcap in (None, 2.0):
        on_cpu = RayCurve.from_head(LogitHead(W, softcap=softcap), h, v).kl_at(rays, t)
        with SimulatedDevice():
            curve = RayCurve.from_head(
                LogitHead(W.to(DEVICE), softcap=softcap), h.to(DEVICE), v.to(DEVICE)
            )
            torch.testing.assert_close(curve.kl_at(rays, t).cpu(), on_cpu, rtol=1e-14, atol=0)
    on_cpu = TaylorPathKL(logp, derivs, origin, both_signs=True).kl_at(rays, t)
    with SimulatedDevice():
        path = TaylorPathKL(logp.to(DEVICE), [d.to(DEVICE) for d in derivs], origin, True)
        torch.testing.assert_close(path.kl_at(rays, t).cpu(), on_cpu, rtol=1e-14, atol=0)
