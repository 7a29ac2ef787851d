"""Input checks, devices and dtypes, run directories, the model store's integrity check, and
what a new user hit: each bad input is one line, exit 2, nothing written."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
import transformers as T
from conftest import CONFIGS, char_tokenizer, saved_tiny_model, tiny_model

import stable_regions as sr
from stable_regions._support.inputs import EPS_FLOOR, check_eps, check_positions
from stable_regions.cli import main
from stable_regions.errors import StableRegionsError, UnsupportedModelError
from stable_regions.models import store
from stable_regions.models.device import check_dtype, resolve_device, resolve_dtype
from stable_regions.studies.scan import scan_corpus
from stable_regions.studies.steering import SteeringResult


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return saved_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama", seed=4)


def one_line_exit_2(proc_or_code, err: str, message: str) -> None:
    code = proc_or_code if isinstance(proc_or_code, int) else proc_or_code.returncode
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err


# ----------------------------------------------------------------------------- devices, dtypes


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without CUDA")
@pytest.mark.parametrize(
    "option, message",
    [
        (["--device", "cuda"], "no CUDA GPU"),
        (["--device", "cuda:3"], "no CUDA GPU"),
        (["--device", "tpu"], "unknown device"),
        (["--device", "mps"], "not supported"),
        (["--dtype", "float8"], "unknown dtype"),
        (["--dtype", "int8"], "unknown dtype"),
    ],
)
def test_bad_device_or_dtype_is_one_line_before_loading(option, message, capsys, tmp_path):
    code = main(["analyze", "hi", "--model", str(tmp_path / "not-there"), *option])
    one_line_exit_2(code, capsys.readouterr().err, message)


def test_devices_and_dtypes_resolve_on_the_cpu():
    cpu = torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == cpu and resolve_device(None) == cpu
    assert resolve_device("CPU") == cpu
    assert resolve_dtype("auto", cpu) == torch.float32
    for name, dtype in [("float32", torch.float32), ("bfloat16", torch.bfloat16)]:
        assert resolve_dtype(name, cpu) == dtype
    with pytest.raises(StableRegionsError, match="not a floating-point dtype"):
        check_dtype(torch.int32, cpu)


def test_a_dtype_the_device_cannot_compute_in_is_one_clear_error(monkeypatch):
    """The probe product fails (here on the meta device, which computes nothing): one line
    naming the device, the dtype and what to use; a GPU without bfloat16 is refused before
    any allocation (simulated: this machine has no GPU)."""
    with pytest.raises(StableRegionsError) as info:
        check_dtype(torch.float16, torch.device("meta"))
    message = str(info.value)
    assert "meta cannot compute in float16" in message and "`dtype=float32`" in message
    assert "\n" not in message
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(
        StableRegionsError, match="cannot compute in bfloat16.*float16` or `dtype=float32"
    ):
        check_dtype(torch.bfloat16, torch.device("cuda:0"))


def test_load_in_bfloat16_halves_the_weights_and_analyzes(model_dir):
    adapter = sr.load(str(model_dir), device="cpu", dtype="bfloat16")
    assert {p.dtype for p in adapter.model.parameters()} == {torch.bfloat16}
    df = sr.analyze(adapter, "Hello world", eps=[0.1], positions="last").to_frame()
    reference = sr.analyze(sr.load(str(model_dir)), "Hello world", eps=[0.1], positions="last")
    ref = reference.to_frame()
    # bfloat16 weights are a different model: close to the float32 one, not equal
    assert math.isclose(df.lambda_max[0], ref.lambda_max[0], rel_tol=0.1)
    assert df.radius_exact[0] > 0 and math.isfinite(df.radius_exact[0])
    # inside the network too: the series (a 16-bit head mapped back in float32) and the
    # measured boundary
    inner = sr.analyze(adapter, "Hello world", eps=[0.1], positions="last", layer=0).to_frame()
    inner_ref = sr.analyze(
        sr.load(str(model_dir)), "Hello world", eps=[0.1], positions="last", layer=0
    ).to_frame()
    for column in ("lambda_max", "radius_pade", "radius_exact"):
        assert math.isclose(inner[column][0], inner_ref[column][0], rel_tol=0.1), column


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_recorded_pass_of_a_16_bit_model_keeps_no_wide_weight_copies(tokenizer, arch):
    """The rows compute in float32 on a bfloat16 model's weights, upcast one matrix at a time;
    a recorded pass (the replayed products) must not keep those float32 copies alive (they
    would cost twice the bfloat16 weights after the hook). F.linear (Llama) and addmm
    (GPT-2's Conv1D) both. The replayed products still equal the forward-mode ones."""
    import gc
    import warnings

    from stable_regions.models.suffix import SuffixBatch

    adapter = sr.wrap(tiny_model(arch, dtype=torch.bfloat16), tokenizer)
    shapes = {tuple(p.shape) for p in adapter.model.parameters() if p.ndim == 2}
    shapes |= {s[::-1] for s in shapes}
    ids = adapter.tokenize("The cat sat on it.")
    suffix = SuffixBatch(adapter, ids, "blocks.0.hook_resid_pre", [3, 9])
    gc.collect()
    jvp_one, vjp = suffix.linearization()
    gc.collect()
    with warnings.catch_warnings():  # isinstance on every live object touches deprecated names
        warnings.simplefilter("ignore")
        live = [t for t in gc.get_objects() if isinstance(t, torch.Tensor)]
    wide = [t for t in live if t.dtype == torch.float32 and tuple(t.shape) in shapes]
    assert not wide, [tuple(t.shape) for t in wide]
    v = torch.randn(2, 3, suffix.dim, dtype=torch.float64)
    forward = suffix.jvp(v)
    assert float((jvp_one(v[:, 0]) - forward[:, 0]).norm() / forward[:, 0].norm()) < 1e-5
    assert float((jvp_one(v) - forward).norm() / forward.norm()) < 1e-5  # vmapped replay


def test_wrap_refuses_a_model_on_the_meta_device(tokenizer):
    with torch.device("meta"):
        model = T.AutoModelForCausalLM.from_config(CONFIGS["llama"]())
    with pytest.raises(UnsupportedModelError, match="meta device") as info:
        sr.wrap(model, tokenizer)
    assert "\n" not in str(info.value)


def test_wrap_keeps_the_model_where_it_is(tokenizer):
    model = tiny_model("qwen2", dtype=torch.float32)
    before = {n: (p.data_ptr(), p.dtype, p.device) for n, p in model.named_parameters()}
    adapter = sr.wrap(model, tokenizer)
    sr.analyze(adapter, "abc", eps=[0.1], positions="last", layer=1)
    after = {n: (p.data_ptr(), p.dtype, p.device) for n, p in model.named_parameters()}
    assert before == after


# ----------------------------------------------------------------------------- inputs


def test_eps_below_the_floor_is_refused_with_the_floor():
    assert check_eps([EPS_FLOOR]) == [EPS_FLOOR]
    with pytest.raises(StableRegionsError, match=f"{EPS_FLOOR:g}"):
        check_eps([1e-12])


def test_positions_named_twice_are_analysed_once(model_dir, capsys):
    assert check_positions([1, 1, -1, 3], 4) == [1, 3]
    assert (
        main(
            [
                "analyze",
                "abcd",
                "--model",
                str(model_dir),
                "--positions",
                "1,1",
                "--json",
                "--no-exact",
                "--eps",
                "0.1",
            ]
        )
        == 0
    )
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["position"] for r in rows] == [1]


def test_all_infinite_coefficients_give_an_infinite_fifth_percentile():
    rows = [
        dict(
            prompt_id=i,
            position=0,
            token="x",
            eps=0.1,
            layer="1",
            vector_norm=1.0,
            coef_quadratic=math.inf,
            coef_pade=math.inf,
            coef_exact=math.inf,
        )
        for i in range(3)
    ] + [
        dict(
            prompt_id=i,
            position=0,
            token="x",
            eps=0.5,
            layer="1",
            vector_norm=1.0,
            coef_quadratic=1.0 + i,
            coef_pade=1.0 + i,
            coef_exact=1.0 + i,
        )
        for i in range(3)
    ]
    summary = SteeringResult("m", "1", [0.1, 0.5], rows).summary()
    at = summary.set_index("eps")
    assert math.isinf(at.loc[0.1, "coef_exact_p05"]) and at.loc[0.1, "coef_exact_p05"] > 0
    assert at.loc[0.5, "coef_exact_p05"] == pytest.approx(pd.Series([1.0, 2, 3]).quantile(0.05))


# ----------------------------------------------------------------------------- run directories


@pytest.fixture(scope="module")
def adapter():
    return sr.wrap(tiny_model("llama", seed=4, dtype=torch.float32), char_tokenizer(), name="tiny")


def test_scan_and_validate_take_plain_strings(adapter, tmp_path):
    run = scan_corpus(adapter, ["the quick fox", "hello"], out=tmp_path / "scan")
    assert list(run.frame.doc_id.unique()) == ["document-0", "document-1"]
    study = sr.validate(
        adapter,
        ["The cat sat.", "def f(x):"],
        out=tmp_path / "val",
        families=["top"],
        positions_per_prompt=1,
        calibration=None,
    )
    assert set(study.frame.prompt_id) == {"prompt-0", "prompt-1"}
    with pytest.raises(TypeError, match="strings or stable_regions.prompts.Prompt"):
        scan_corpus(adapter, ["ok", 3], out=tmp_path / "bad")
    with pytest.raises(TypeError, match="strings or stable_regions.prompts.Prompt"):
        sr.validate(adapter, [{"text": "x"}], out=tmp_path / "bad2")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad2").exists()


def test_a_window_longer_than_the_context_is_an_error(adapter, tmp_path):
    with pytest.raises(StableRegionsError, match="longer than the model's context of 64"):
        scan_corpus(adapter, ["hello"], out=tmp_path / "scan", window=99999)
    assert not (tmp_path / "scan").exists()
    run = scan_corpus(adapter, ["hello"], out=tmp_path / "ok")  # default: the context
    assert json.loads((tmp_path / "ok" / "manifest.json").read_text())["settings"]["window"] == 64
    assert len(run.frame) == len("hello")


def test_overwrite_replaces_a_finished_run(model_dir, tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text("hello there", encoding="utf-8")
    out = tmp_path / "out"
    args = ["scan", str(doc), "--model", str(model_dir), "--out", str(out), "--top", "0"]
    assert main(args) == 0
    (out / "stale.txt").write_text("from before")
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*args, "--eps", "0.5", "--overwrite"]) == 0  # other settings: a new run
    assert not (out / "stale.txt").exists()
    assert set(pd.read_parquet(out / "results.parquet").eps) == {0.5}
    # a directory that holds no run is never emptied
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    capsys.readouterr()
    code = main([*args[:-4], "--out", str(other), "--overwrite"])
    one_line_exit_2(code, capsys.readouterr().err, "holds no scan")
    assert (other / "keep.txt").read_text() == "mine"


def test_an_impossible_out_is_a_user_error(model_dir, tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text("hello", encoding="utf-8")
    under_a_file = doc / "out"
    for command in (["scan", str(doc)], ["validate", "--prompts", str(doc), "--families", "top"]):
        code = main([*command, "--model", str(model_dir), "--out", str(under_a_file)])
        one_line_exit_2(code, capsys.readouterr().err, "cannot write")
    if os.geteuid() != 0:  # root writes anywhere: a read-only folder only stops other users
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        code = main(["scan", str(doc), "--model", str(model_dir), "--out", str(locked / "x")])
        one_line_exit_2(code, capsys.readouterr().err, "cannot write")


def test_scan_of_a_folder_says_it_is_a_folder(tmp_path, capsys):
    code = main(["scan", str(tmp_path)])
    one_line_exit_2(code, capsys.readouterr().err, "is a folder")


# ----------------------------------------------------------------------------- model store


@pytest.mark.real_model
def test_a_cut_short_conversion_is_reported_and_repaired(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STABLE_REGIONS_CACHE", str(tmp_path))
    target = store.model_dir("smollm2-135m")
    tiny_model("llama", dtype=torch.float32).save_pretrained(target)
    char_tokenizer().save_pretrained(target)
    (target / store.MARKER).write_text("{}")
    assert store.conversion_state(target) == "converted"
    weights = next(target.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-100])  # a copy cut short
    assert store.conversion_state(target) == "damaged"
    row = next(r for r in store.list_models() if r["name"] == "smollm2-135m")
    assert not row["converted"] and row["state"].startswith("damaged")
    with pytest.raises(StableRegionsError, match="--force"):
        sr.load("smollm2-135m")
    code = main(["analyze", "hi"])
    one_line_exit_2(code, capsys.readouterr().err, "damaged")
    converted = []
    monkeypatch.setattr(store, "locate_gguf", lambda model, work: tmp_path / "x.gguf")
    monkeypatch.setattr(store, "sha256_file", lambda path: "0" * 64)
    monkeypatch.setattr(
        store, "convert_gguf", lambda gguf, out, source, log: converted.append(out) or out
    )
    monkeypatch.setattr(store.BundledModel, "package_dir", lambda self: tmp_path)
    store.install("smollm2-135m", log=lambda m: None)  # no --force needed: damaged is repaired
    assert converted == [target]


def test_piped_tables_are_never_cut(tmp_path):
    deep = tmp_path / ("a-very-long-folder-name-" * 6)
    proc = subprocess.run(
        [sys.executable, "-m", "stable_regions", "models", "list"],
        capture_output=True,
        text=True,
        env={**os.environ, "STABLE_REGIONS_CACHE": str(deep)},
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    assert proc.returncode == 0
    assert str(deep / "models" / "smollm2-135m") in proc.stdout  # whole, on one line
    assert "…" not in proc.stdout


def test_a_bfloat16_model_computes_in_float32_after_the_hook(tokenizer):
    """Inside a bfloat16 model the rows widen to float32 at the hook and the blocks after it
    multiply their bfloat16 weights upcast: the pullback curvature then matches a float32
    model with the same (bfloat16-rounded) weights to float32 accuracy at the perturbed row;
    only the cached prefix keeps the model's own bfloat16 (a few 1e-3 here)."""
    from stable_regions.geometry import PullbackOperator
    from stable_regions.models.suffix import SuffixBatch

    low = tiny_model("llama", seed=6, dtype=torch.bfloat16)
    wide = copy_to(low, torch.float32)
    a16, a32 = sr.wrap(low, tokenizer), sr.wrap(wide, tokenizer)
    assert a16.compute_dtype == torch.float32
    ids = a16.tokenize("The cat sat on it.")
    hook = "blocks.0.hook_resid_pre"  # the embedding: bfloat16 values, exact in float32
    s16 = SuffixBatch(a16, ids, hook, [0, 9])
    s32 = SuffixBatch(a32, ids, hook, [0, 9])
    assert s16.logits0.dtype == torch.float64
    # position 0 has no prefix, and its activation at the embedding is the same in both:
    # everything after the hook is float32 arithmetic on the same weight values, so the two
    # agree to float32 roundoff
    lam16 = PullbackOperator.from_suffix(s16).top_eigenpairs(k=1, tol=1e-6)[0][:, 0]
    lam32 = PullbackOperator.from_suffix(s32).top_eigenpairs(k=1, tol=1e-6)[0][:, 0]
    assert abs(float(lam16[0] / lam32[0]) - 1) < 1e-4
    assert abs(float(lam16[1] / lam32[1]) - 1) < 0.05
    df = sr.analyze(a16, "The cat sat on it.", eps=[0.1], positions=[9], layer=1).to_frame()
    assert df.lambda_max[0] > 0
    assert math.isfinite(df.radius_exact[0]) and df.radius_exact[0] > 0
    assert {p.dtype for p in low.parameters()} == {torch.bfloat16}  # nothing converted in place


def copy_to(model, dtype):
    import copy

    return copy.deepcopy(model).to(dtype)


def test_wrap_refuses_a_model_dispatched_over_several_devices(tokenizer):
    """A device_map over several devices (here recorded as accelerate records it) is one
    line that says what is supported."""
    model = tiny_model("llama", dtype=torch.float32)
    model.hf_device_map = {"model.embed_tokens": "cpu", "model.layers": 0, "lm_head": 0}
    with pytest.raises(UnsupportedModelError, match="several devices.*one device") as info:
        sr.wrap(model, tokenizer)
    assert "\n" not in str(info.value)
    model.hf_device_map = {"": "cpu"}  # one device: fine
    assert sr.wrap(model, tokenizer).device == torch.device("cpu")
