"""What a GPU run needs beyond device-correct indices (issue "Where users run it", part 3):
memory bounds, one float32 head, budgets from the device, full float32 products, scans from
the pre-logit vector. Each is checked against an independent reference or a bound, on the
CPU or on the simulated device (``simulated_device``)."""

from __future__ import annotations

import pytest
import torch
from conftest import char_tokenizer, tiny_model
from simulated_device import DEVICE, SimulatedDevice

import stable_regions as sr
from stable_regions.budget import GRAPH_BYTES, graph_bytes, rows_recordable
from stable_regions.geometry import lanczos
from stable_regions.studies.scan import Scanner

pytestmark = pytest.mark.low_end  # CI runs these at both ends of the ranges


def test_lanczos_grows_its_basis_instead_of_preallocating_d_columns():
    """A run that converges in a few steps holds a few columns, not the (P, d + 1, d) basis
    (4 GiB in float64 at d = 4096 and 32 positions); the answer matches the dense one."""
    P, d = 4, 1500
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(d, 6, generator=g, dtype=torch.float64))[0]
    values = torch.tensor([50.0, 10.0, 5.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    with SimulatedDevice() as sim:  # A = U diag(values) U^T, rank 6: exact after 6 steps
        U_dev, values_dev = U.to(DEVICE), values.to(DEVICE)
        start = torch.randn(P, d, dtype=torch.float64).to(DEVICE)
        run = lanczos(lambda q: ((q @ U_dev) * values_dev) @ U_dev.T, start, 1)
        assert run.values.device == DEVICE and run.vectors.device == DEVICE
        top = run.values.cpu()
    torch.testing.assert_close(top, torch.full((P, 1), 50.0, dtype=torch.float64))
    full_basis = P * (d + 1) * d * 8
    assert sim.largest < full_basis / 20, (sim.largest, full_basis)
    assert sim.largest >= P * 8 * d * 8  # the harness sees the basis: 8+ columns


def test_one_float32_view_of_a_16_bit_head_and_no_copy_of_its_search_weight():
    """A bfloat16 head is read in float32 through one ``WideRows`` per adapter (no copy),
    shared by the scanner and the monitor; their bfloat16 search reads the stored weight."""
    from stable_regions.geometry import WideRows

    model = tiny_model("llama", seed=1, dtype=torch.bfloat16)
    adapter = sr.wrap(model, char_tokenizer())
    head = adapter.float32_head
    assert isinstance(head.weight, WideRows) and adapter.float32_head is head
    assert head.weight.stored.data_ptr() == model.lm_head.weight.data_ptr()
    torch.testing.assert_close(head.weight[0:128], model.lm_head.weight.float(), rtol=0, atol=0)
    assert Scanner(adapter).weight is head.weight
    search = Scanner(adapter, search=torch.bfloat16).search
    assert search.data_ptr() == model.lm_head.weight.data_ptr()
    monitor = sr.StabilityMonitor(adapter, eps=[0.1], mode="exact", background=False)
    assert monitor.weight is head.weight
    stored = sr.wrap(tiny_model("llama", seed=1, dtype=torch.float32), char_tokenizer())
    assert stored.float32_head.weight.data_ptr() == stored.unembed.weight.data_ptr()


def test_a_16_bit_scan_reads_the_pre_logit_vector_not_the_model_s_rounded_logits():
    """``Scanner.scan`` of a bfloat16 model equals the scan of its float32 pre-logit logits
    (``scan_prelogits``), and differs from a scan of the model's own bfloat16 logits."""
    model = tiny_model("llama", seed=2, dtype=torch.bfloat16)
    adapter = sr.wrap(model, char_tokenizer())
    ids = adapter.tokenize("The cat sat on the mat, and then")
    scanner = Scanner(adapter, search=torch.float32, tol=1e-6)
    found = scanner.scan(adapter, ids, [0.1])
    reference = scanner.scan_prelogits(adapter.prelogits(ids, dtype=None), [0.1])
    torch.testing.assert_close(found["lambda_max"], reference["lambda_max"], rtol=1e-9, atol=0)
    with torch.no_grad():
        rounded = scanner.scan_logits(adapter.forward(ids).logits[0], [0.1])
    assert not torch.allclose(rounded["lambda_max"], found["lambda_max"], rtol=1e-4)


def test_budgets_follow_the_device_and_the_prompt_length(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 << 30, 80 << 30))
    assert graph_bytes(torch.device("cuda", 0)) == 2 << 30
    assert graph_bytes(torch.device("cpu")) == GRAPH_BYTES
    # Llama-3-8B's width after block 16: the cached keys' attention of a long prompt counts
    short = rows_recordable(16, 4096 + 14336, 4, cap=64, heads=32, keys=16)
    long = rows_recordable(16, 4096 + 14336, 4, cap=64, heads=32, keys=2048)
    assert long < short
    per_row = (28 * (4096 + 14336) + 3 * 32 * 2048) * 16 * 4
    assert long == GRAPH_BYTES // per_row


def test_full_float32_products_inside_every_study_and_the_user_setting_after():
    """A user's ``set_float32_matmul_precision("high")`` (TF32 on a GPU, bfloat16 passes in
    oneDNN) is pinned to full float32 while a study runs, and is theirs again after."""
    adapter = sr.wrap(tiny_model("llama", seed=1, dtype=torch.float32), char_tokenizer())
    seen = []

    def record(*_):
        seen.append(
            (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision)
        )

    handle = adapter.model.lm_head.register_forward_hook(record)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        sr.analyze(adapter, "Hello", eps=[0.1], positions="last", layer=1)
        sr.generate(adapter, "Hi", max_new_tokens=2, mode="fast")
        after = (
            torch.backends.cuda.matmul.fp32_precision,
            torch.backends.mkldnn.matmul.fp32_precision,
        )
    finally:
        torch.set_float32_matmul_precision(before)
        handle.remove()
    assert seen and all(s == ("ieee", "ieee") for s in seen), seen
    assert after == ("tf32", "tf32")


def test_next_token_alternatives_equal_a_full_softmax():
    adapter = sr.wrap(tiny_model("gemma2", seed=1), char_tokenizer())  # softcapped head
    ids = adapter.tokenize("The cat sat on")
    names, probs = adapter.next_token_alternatives(ids, k=3)
    with torch.no_grad():
        p = torch.softmax(adapter.forward(ids).logits[0].double(), -1)
    top, idx = p.topk(3)
    torch.testing.assert_close(probs, top, rtol=1e-12, atol=0)
    assert names == [adapter.token_strings(row) for row in idx]


def _wide_model():
    """A bfloat16 Llama with a head of 4096 x 96: several chunks when chunks are small."""
    import transformers as T
    from conftest import CONFIGS

    config = T.LlamaConfig(
        **{**CONFIGS["llama"]().to_dict(), "vocab_size": 4096, "hidden_size": 96}
    )
    torch.manual_seed(5)
    model = T.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.5)
    return model.to(torch.bfloat16).eval()


def _studies(adapter):
    prompt = "The cat sat on the mat"
    ids = adapter.tokenize(prompt + ", and then it slept.")
    found = Scanner(adapter).scan(adapter, ids, [0.1])
    return [
        sr.analyze(adapter, prompt, eps=[0.1, 1.0]).to_frame(),
        sr.certify(adapter, prompt, eps=[0.1], positions="last").to_frame(),
        # through the final norm: its gain folded into the head, still no copy
        sr.certify(adapter, prompt, eps=[0.1], positions="last", layer=2).to_frame(),
        {k: found[k].cpu().numpy() for k in ("lambda_max", "radius_pade")},
        sr.generate(adapter, ["Hi", "The"], max_new_tokens=3, mode="exact").frame,
        sr.generate(adapter, ["Hi", "The"], max_new_tokens=3, mode="fast").frame,
    ]


@pytest.mark.slow
def test_a_16_bit_head_is_read_in_float32_chunks_never_copied_whole(monkeypatch):
    """A bfloat16 head's float32 products read it a chunk at a time (``WideRows``): the
    studies equal those of a whole float32 copy, and on the simulated device no tensor as
    large as that copy is ever made (chunks of 64 KiB and (rows x V) arrays of 256 KiB here,
    the head's float32 copy 1.5 MiB)."""
    import numpy as np

    from stable_regions import budget
    from stable_regions.geometry import LogitHead, WideRows

    monkeypatch.setattr(budget, "DEVICE_CHUNK_BYTES", 64 << 10)
    monkeypatch.setattr(budget, "ARRAY_BYTES", 256 << 10)  # (rows x V) arrays: small too
    model = _wide_model()
    copied = sr.wrap(model, char_tokenizer())
    h = copied.stored_head
    copied._head32 = LogitHead(h.weight.float(), None, h.scale, h.softcap)  # the old way
    reference = _studies(copied)
    with SimulatedDevice() as sim:
        adapter = sr.wrap(model.to(DEVICE), char_tokenizer())
        assert isinstance(adapter.float32_head.weight, WideRows)
        found = _studies(adapter)
    whole_copy = 4096 * 96 * 4
    assert sim.largest < whole_copy, (sim.largest, whole_copy, sim.largest_made_by)
    columns = ["lambda_max", "radius_exact", "radius_curve", "radius_certified", "radius_pade"]
    for ours, theirs in zip(found, reference, strict=True):
        for col in columns:
            if col in theirs:
                a, b = np.asarray(ours[col], dtype=float), np.asarray(theirs[col], dtype=float)
                np.testing.assert_allclose(a, b, rtol=2e-5, err_msg=col)


def test_wide_rows_refuse_whole_copies():
    import pytest as _pytest

    from stable_regions.geometry import WideRows

    w = WideRows(torch.randn(100, 8).to(torch.bfloat16))
    x = torch.randn(3, 8)
    torch.testing.assert_close(x @ w.T, x @ w.stored.float().T, rtol=0, atol=0)
    y = torch.randn(3, 100)
    torch.testing.assert_close(y @ w, y @ w.stored.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.linalg.vector_norm(w, dim=-1), w.stored.float().norm(dim=-1))
    with _pytest.raises(TypeError, match="whole head"):
        torch.exp(w)
    with _pytest.raises(TypeError, match="whole head"):
        torch.einsum("vd,d->v", w, x[0])


def test_a_checkpoint_loads_as_stored_for_a_process_that_reads_little(tmp_path):
    """``dtype="stored"`` (the Ray driver's load) keeps the checkpoint's dtype: nothing is
    converted; the default converts to float32 on the CPU."""
    tiny_model("llama", seed=1, dtype=torch.bfloat16).save_pretrained(tmp_path)
    char_tokenizer().save_pretrained(tmp_path)
    assert sr.load(str(tmp_path), dtype="stored").unembed.weight.dtype == torch.bfloat16
    assert sr.load(str(tmp_path)).unembed.weight.dtype == torch.float32
