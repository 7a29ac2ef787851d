"""The benchmark harness: every row runs, answers agree with the baselines, the JSON is complete."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import char_tokenizer, tiny_model

import stable_regions as sr
from stable_regions.bench import BenchSettings, compare, run_bench, write_bench
from stable_regions.cli import main


def test_compare_alternates_and_takes_the_median():
    calls = []
    got = compare(
        {"a": lambda: calls.append("a") or 1, "b": lambda: calls.append("b") or 2}, 3, min_s=0.0
    )
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-up each, then alternating rounds
    assert got["a"][1] == 1 and got["b"][1] == 2 and got["a"][0] >= 0


def test_compare_times_a_short_call_back_to_back(monkeypatch):
    """A call shorter than min_s is repeated within its round and the round's time is the
    mean of the repeats, so a slow first call after the other contender does not count.
    The contenders advance a fake clock: no real time passes, and the answer is exact."""
    from stable_regions.bench import timing

    now = [0.0]
    monkeypatch.setattr(timing, "clock", lambda: now[0])
    calls = []

    def ramping():  # slow right after the other contender, fast when called back to back
        slow = not calls or calls[-1] != "fast"
        calls.append("fast")
        now[0] += 0.04 if slow else 0.005
        return 1

    def other():  # longer than min_s: one call per round
        calls.append("other")
        now[0] += 0.06
        return 2

    got = compare({"fast": ramping, "other": other}, 2, min_s=0.05)
    assert got["fast"][0] == pytest.approx(0.005)  # the 0.04 s first calls are not timed
    assert got["other"][0] == pytest.approx(0.06)
    rounds = "".join("f" if c == "fast" else "o" for c in calls)
    assert rounds.startswith("fo")  # the warm-ups
    assert rounds[2:].count("o") == 2 and rounds.count("f") >= 1 + 2 * 10


@pytest.mark.slow
def test_bench_rows_on_a_tiny_model(tmp_path):
    adapter = sr.wrap(tiny_model("llama", seed=2), char_tokenizer(), name="tiny")
    settings = BenchSettings(
        quick=True,
        repeats=1,
        directions=20,
        document_tokens=40,
        hvp_tokens=30,
        map_positions=6,
        map_layers="sample",
    )
    rows = ["top_eig_final", "scan_document_final", "predict_vs_measure", "pullback_hvp_mid"]
    doc = run_bench(adapter, settings=settings, rows=[*rows, "map_prompt"])
    assert set(doc) == {"machine", "model", "quick", "settings", "rows"}
    names = {r["name"] for r in doc["rows"]}
    assert names == {
        "top_eig_final",
        "scan_document_final",
        "predict_vs_measure",
        "pullback_hvp_mid",
        "map_prompt",
    }
    for r in doc["rows"]:
        assert set(r) == {
            "name",
            "ours_s",
            "baseline",
            "baseline_s",
            "ratio",
            "max_rel_err",
            "peak_rss_mb",
        }
        assert not r["baseline"].startswith("failed"), r["baseline"]
        if r["baseline_s"] is None:  # an optional library that is not installed
            assert "not installed" in r["baseline"]
            continue
        assert r["ratio"] == pytest.approx(r["baseline_s"] / r["ours_s"])
        assert r["peak_rss_mb"] > 0
        if r["name"] == "predict_vs_measure":
            assert r["max_rel_err"] < 0.5  # a closed form against the measured truth
        elif r["name"] == "scan_document_final":
            assert r["max_rel_err"] < 1e-2  # a scan: bfloat16 search, tolerance 1e-2
        else:
            assert r["max_rel_err"] < 1e-6, r  # the same quantity computed two ways
    path = write_bench(doc, tmp_path / "b.json")
    assert json.loads(path.read_text())["model"] == "tiny"


def test_cli_bench_refuses_a_directory(tmp_path, capsys):
    assert main(["bench", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "is a directory" in err and "\n" not in err


def test_scale_rows_on_a_small_shape(monkeypatch):
    """The scale rows build their model, run the three commands' paths on it and time a
    forward pass beside each (here a small Llama shape instead of the 1B one)."""
    from stable_regions.bench import scale as bench_scale

    small = bench_scale.ScaleShape(
        name="small",
        hidden_size=64,
        intermediate_size=128,
        layers=2,
        heads=4,
        kv_heads=2,
        vocab_size=3000,
        final_positions=6,
        scan_tokens=20,
    )
    monkeypatch.setattr(bench_scale.ScaleShape, "make", classmethod(lambda cls, quick: small))
    adapter = sr.wrap(tiny_model("llama", seed=2), char_tokenizer(), name="tiny")
    doc = run_bench(adapter, settings=BenchSettings(quick=True), rows=["scale_llama3_1b"])
    rows = {r["name"]: r for r in doc["rows"]}
    assert set(rows) == {
        "scale_final_analysis",
        "scale_final_analysis_no_exact",
        "scale_inner_position",
        "scale_scan",
    }
    for r in rows.values():
        assert not r["baseline"].startswith("failed"), r["baseline"]
        assert r["ours_s"] > 0 and r["baseline_s"] > 0 and r["peak_rss_mb"] > 0
        assert "small" in r["baseline"] and "weights" in r["baseline"]


def test_monitor_rows_on_a_tiny_model():
    """Both modes at batch 1 and 8, the same tokens with and without the monitor."""
    adapter = sr.wrap(tiny_model("llama", seed=2), char_tokenizer(), name="tiny")
    settings = BenchSettings(quick=True, repeats=1, monitor_tokens=4)
    doc = run_bench(adapter, settings=settings, rows=["monitor_generate"])
    rows = doc["rows"]
    assert [r["name"] for r in rows] == ["monitor_generate_fast"] * 2 + [
        "monitor_generate_exact"
    ] * 2
    assert ["batch 1" in r["baseline"] for r in rows] == [True, False, True, False]
    for r in rows:
        assert not r["baseline"].startswith("failed"), r["baseline"]
        assert r["ratio"] == pytest.approx(r["baseline_s"] / r["ours_s"])
        assert r["max_rel_err"] == 0.0  # the monitor never changes the tokens


def test_forward_multiples_on_a_tiny_model():
    """The issue's cost targets as rows: final-layer analyze with and without the measured
    boundary, jacobian on a one-word and a long prompt, each against a forward pass."""
    adapter = sr.wrap(tiny_model("llama", seed=2), char_tokenizer(), name="tiny")
    doc = run_bench(
        adapter, settings=BenchSettings(quick=True, repeats=1), rows=["forward_multiples"]
    )
    rows = doc["rows"]
    assert [r["name"] for r in rows] == [
        "final_analysis",
        "final_analysis_no_exact",
        "jacobian_per_layer",
        "jacobian_per_layer",
    ]
    for r in rows:
        assert not r["baseline"].startswith("failed"), r["baseline"]
        assert r["ours_s"] > 0 and r["baseline_s"] > 0
        assert r["ratio"] == pytest.approx(r["baseline_s"] / r["ours_s"])
    assert '"hello"' in rows[2]["baseline"] and "token prompt" in rows[3]["baseline"]
    assert (
        "all logits" in rows[0]["baseline"] and "measured boundary included" in rows[0]["baseline"]
    )


def test_vllm_row_says_where_vllm_is_missing(monkeypatch):
    """Without vLLM here and without $STABLE_REGIONS_VLLM_PYTHON, the row says how to run it
    instead of failing; with a Python that cannot run it, the row says that it failed."""
    from stable_regions.bench import vllm_overhead

    adapter = sr.wrap(tiny_model("llama", seed=2), char_tokenizer(), name="tiny")
    settings = BenchSettings(quick=True, repeats=1, monitor_tokens=2)
    monkeypatch.delenv(vllm_overhead.PYTHON_VARIABLE, raising=False)
    monkeypatch.setattr(vllm_overhead.importlib.util, "find_spec", lambda name: None)
    (row,) = run_bench(adapter, settings=settings, rows=["monitor_vllm"])["rows"]
    assert row["name"] == "monitor_vllm_fast" and row["ours_s"] is None
    assert row["baseline"].startswith("not run: no Python with vLLM here")
    monkeypatch.setenv(vllm_overhead.PYTHON_VARIABLE, sys.executable)  # has no vLLM
    (row,) = run_bench(adapter, settings=settings, rows=["monitor_vllm"])["rows"]
    assert row["baseline"].startswith("failed: ") and "vllm" in row["baseline"].lower()


def test_iso_kl_rows_on_a_tiny_model():
    """The teacher-forced measurement and the prediction against the rollout definition in
    one call: each row's error is its coefficient against coef_rollout, its ratio the
    rollout's seconds over its own."""
    adapter = sr.wrap(tiny_model("llama", seed=2), char_tokenizer())
    doc = run_bench(adapter, settings=BenchSettings(quick=True, repeats=1), rows=["iso_kl"])
    rows = doc["rows"]
    assert [r["name"] for r in rows] == ["iso_kl_measured", "iso_kl_predicted"]
    for r in rows:
        assert not r["baseline"].startswith("failed"), r["baseline"]
        assert r["ours_s"] > 0 and r["baseline_s"] > 0 and r["max_rel_err"] >= 0
        assert "forward-pass tokens" in r["baseline"]
