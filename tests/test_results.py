"""One result protocol: every study's result has ``to_frame``, ``summary``, ``to_json``,
``plot(ax=None)`` and ``save(directory)``; plotting leaves matplotlib's global state alone;
everything after the model and the prompt(s) is keyword-only."""

from __future__ import annotations

import inspect
import json

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import char_tokenizer, tiny_model

import stable_regions as sr
from stable_regions.errors import StableRegionsError
from stable_regions.results import Result

PROMPT = "The cat sat on the mat"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    adapter = sr.wrap(tiny_model("llama", seed=5), char_tokenizer(), name="tiny")
    vector = torch.randn(adapter.d_resid, generator=torch.Generator().manual_seed(1))
    prompts = ["The cat sat.", "A dog ran far.", "Hi there you.", "One two three."]
    return {
        "analyze": sr.analyze(adapter, PROMPT, eps=[0.1, 1.0], positions=[3, 7, -1]),
        "certify": sr.certify(adapter, PROMPT, eps=0.1, positions="last"),
        "steer": sr.steering_budget(adapter, PROMPT, vector=vector, layer=1, eps=[0.1, 0.5]),
        "map": sr.stability_map(adapter, PROMPT, layers=["embed", 1, "final"], positions=[2, 5]),
        "jacobian": sr.jacobian_profile(adapter, PROMPT, k=1),
        "generate": sr.generate(adapter, ["Hi", "The"], max_new_tokens=3),
        "scan": sr.scan_corpus(adapter, [PROMPT, "hello world"]),
        "validate": sr.validate(adapter, prompts, eps=[0.1], positions_per_prompt=1),
        "iso_kl": sr.iso_kl(
            adapter, prompts[:2], vector=vector, layer=1, target=0.01, stat="mean", tokens=3
        ),
    }


STUDIES = ["analyze", "certify", "steer", "map", "jacobian", "generate", "scan", "validate"]
STUDIES += ["iso_kl"]


@pytest.mark.parametrize("study", STUDIES)
def test_every_result_follows_the_protocol(results, study, tmp_path):
    from matplotlib.figure import Figure

    result = results[study]
    assert isinstance(result, Result) and result.study == study
    frame = result.to_frame()
    assert isinstance(frame, pd.DataFrame) and len(frame) > 0
    summary = result.summary()
    assert isinstance(summary, pd.DataFrame) and len(summary) > 0
    doc = result.to_json()
    json.dumps(doc, allow_nan=False)  # strict JSON: NaN and infinities are encoded
    if "rows" in doc:
        assert len(doc["rows"]) == len(frame)
    # into the user's axes: that figure comes back, and it now has something drawn
    figure = Figure()
    ax = figure.add_subplot()
    assert result.plot(ax) is figure
    assert ax.lines or ax.images or ax.collections
    assert isinstance(result.plot(), Figure)
    out = result.save(tmp_path / study)
    for suffix in ("json", "parquet", "png"):
        assert (out / f"{study}.{suffix}").stat().st_size > 0
    back = pd.read_parquet(out / f"{study}.parquet")
    assert list(back.columns) == list(frame.columns) and len(back) == len(frame)
    with pytest.raises(StableRegionsError, match="savefig"):
        result.plot(str(tmp_path / "x.png"))


def test_plotting_leaves_matplotlib_alone(results):
    """No backend switch, no pyplot figures: a notebook's state is what it was."""
    import matplotlib.pyplot as plt

    backend = matplotlib.get_backend()
    before = plt.get_fignums()
    for study in STUDIES:
        results[study].plot()
    assert matplotlib.get_backend() == backend
    assert plt.get_fignums() == before


def test_the_json_holds_the_frame_and_its_context(results):
    doc = results["analyze"].to_json()
    assert {"model", "prompt", "layer", "eps", "rows"} <= set(doc)
    frame = results["analyze"].to_frame()
    first = doc["rows"][0]
    assert set(first) == set(frame.columns)
    assert first["radius_curve"] == pytest.approx(frame.radius_curve.iloc[0], rel=1e-15)


def test_generate_returns_text_and_frame_and_still_unpacks(results):
    result = results["generate"]
    assert isinstance(result.text, list) and len(result.text) == 2
    text, frame = result
    assert text == result.text and frame is result.frame
    summary = result.summary()
    assert set(summary.sequence) == {0, 1}
    assert (summary.n == frame.groupby(["sequence", "eps"]).size().values).all()


def test_summaries_are_computed_from_the_frame(results):
    analysis = results["analyze"]
    frame, summary = analysis.to_frame(), analysis.summary()
    for e, row in summary.set_index("eps").iterrows():
        g = frame[frame.eps == e]
        assert row.n == len(g)
        assert row.median_radius_curve == pytest.approx(g.radius_curve.median())
        err = (g.radius_pade / g.radius_exact - 1).abs().median()
        assert row.radius_pade_median_rel_err == pytest.approx(err)
    smap = results["map"]
    cells = smap.to_frame()
    assert len(cells) == 3 * 2
    np.testing.assert_array_equal(cells.radius_pade.to_numpy(), smap.radius_pade.ravel())
    assert smap.summary().median_radius_pade.tolist() == pytest.approx(
        [np.median(row) for row in smap.radius_pade]
    )


def test_results_in_memory_need_no_directory(results):
    assert results["scan"].out is None and results["validate"].out is None
    assert results["validate"].calibrations  # fitted, kept in memory


@pytest.mark.parametrize(
    "study",
    [
        sr.analyze,
        sr.certify,
        sr.steering_budget,
        sr.stability_map,
        sr.jacobian_profile,
        sr.generate,
        sr.validate,
        sr.scan_corpus,
    ],
)
def test_everything_after_the_model_and_prompts_is_keyword_only(study):
    params = list(inspect.signature(study).parameters.values())
    positional = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional[0] == "model" and len(positional) == 2, positional
    names = {p.name for p in params}
    assert "tol" not in names  # an eigen-search tolerance is eig_tol everywhere
    if "eps" in names:
        assert "positions" in names or study in (sr.generate, sr.scan_corpus, sr.validate)


def test_memory_budget_is_scoped_to_the_block():
    from stable_regions import budget

    default = budget.graph_bytes()
    with sr.memory_budget(96):
        assert budget.graph_bytes() == 96 << 20
        assert budget.array_bytes() == 16 << 20
    assert budget.graph_bytes() == default
    with pytest.raises(sr.InvalidParameterError):
        with sr.memory_budget(1):
            pass


def test_the_monitor_is_a_context_manager_that_stops_its_thread():
    import threading

    adapter = sr.wrap(tiny_model("llama", seed=5), char_tokenizer(), name="tiny")
    ids = adapter.tokenize("Hi")
    with sr.StabilityMonitor(adapter, eps=0.1) as monitor:
        out = adapter.model.generate(
            ids, max_new_tokens=3, do_sample=False, logits_processor=[monitor], pad_token_id=0
        )
        monitor.finish(out)
        assert any(t.name.startswith("stable-regions-monitor") for t in threading.enumerate())
    assert not any(t.name.startswith("stable-regions-monitor") for t in threading.enumerate())
    assert len(monitor.to_frame()) == 3
