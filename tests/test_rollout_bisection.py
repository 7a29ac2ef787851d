"""scripts/rollout_bisection.py, the cost of the usual way of choosing a steering coefficient
(docs/validation.md, "Against bisection"): its bracket is a real one on the model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import stable_regions as sr
from stable_regions.prompts import sentiment_prompts

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "rollout_bisection.py"


@pytest.mark.real_model
def test_rollout_bisection_brackets_the_change_of_the_continuation():
    """At ``lo * vector`` the greedy continuation is the unsteered one, at ``hi * vector`` it
    is not, and the bracket shrank by the number of steps; each step was one generation."""
    spec = importlib.util.spec_from_file_location("rollout_bisection", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    adapter = sr.load("smollm2-135m")
    positive, negative = sentiment_prompts()
    vector = sr.mean_difference(adapter, positive, negative, layer=15).to(torch.float32)
    hook = adapter.hook_for_layer(15)
    ids = adapter.tokenize("The weather this morning was")
    lo, hi, generations = script.bisect_rollouts(adapter, ids, hook, vector, tokens=4, steps=4)
    plain = script.continuation(adapter, ids, 4)
    with adapter.added(hook, lo * vector):
        assert script.continuation(adapter, ids, 4) == plain
    with adapter.added(hook, hi * vector):
        assert script.continuation(adapter, ids, 4) != plain
    # four halvings of the first bracket: [0, 1], or [h / 2, h] after doubling, with h / 2 < hi
    assert 0 < hi - lo <= max(1.0, hi) / 2**4
    assert generations >= 1 + 1 + 4
