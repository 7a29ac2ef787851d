"""The iso-KL coefficient (``sr.iso_kl``) on a tiny model, against statistics computed here
from plain forward passes: the rollout coefficient is a crossing of the rollout statistic,
the teacher-forced one is the rollout one where the steered tokens do not change, and the
prediction from jets agrees with the teacher-forced statistic at a small budget."""

from __future__ import annotations

import importlib
import json
import math

import numpy as np
import pytest
import torch
from conftest import char_tokenizer, saved_tiny_model, tiny_model

import stable_regions as sr
from stable_regions.cli import main
from stable_regions.errors import InvalidParameterError, StableRegionsError
from stable_regions.geometry.log_log import solve_log_log

PROMPTS = ["hello there", "the cat sat"]
LAYER = 1


@pytest.fixture(scope="module")
def adapter():
    return sr.wrap(tiny_model("llama", seed=3, dtype=torch.float32), char_tokenizer())


@pytest.fixture(scope="module")
def vector(adapter):
    g = torch.Generator().manual_seed(11)
    return torch.randn(adapter.model.config.hidden_size, generator=g)


def _continuation(model, ids: torch.Tensor, tokens: int) -> list[int]:
    """Greedy tokens by a loop of full forward passes (no cache, no generate)."""
    seq = ids.clone()
    eos = model.generation_config.eos_token_id
    for _ in range(tokens):
        nxt = int(model(seq).logits[0, -1].argmax())
        seq = torch.cat([seq, torch.tensor([[nxt]])], 1)
        if nxt == eos:
            break
    return seq[0, ids.shape[1] :].tolist()


def _kl_rows(q_logits: torch.Tensor, p_logits: torch.Tensor) -> np.ndarray:
    logq = torch.log_softmax(q_logits.double(), -1)
    logp = torch.log_softmax(p_logits.double(), -1)
    return (logq.exp() * (logq - logp)).sum(-1).numpy()


def _statistic(adapter, vector, c: float, tokens: int, stat: str, rollout: bool) -> float:
    """Per-token KL(steered || base) pooled over PROMPTS: along the steered greedy tokens
    (``rollout``) or along the base ones, each scored by two full passes."""
    hook = adapter.hook_for_layer(LAYER)
    kls = []
    with torch.no_grad():
        for text in PROMPTS:
            ids = adapter.tokenize(text)
            if rollout:
                with adapter.added(hook, c * vector):
                    new = _continuation(adapter.model, ids, tokens)
            else:
                new = _continuation(adapter.model, ids, tokens)
            seq = torch.cat([ids, torch.tensor([new[:-1]], dtype=ids.dtype)], 1)
            start = ids.shape[1] - 1
            base = adapter.model(seq).logits[0, start:]
            with adapter.added(hook, c * vector):
                steered = adapter.model(seq).logits[0, start:]
            kls.append(_kl_rows(steered, base))
    kl = np.concatenate(kls)
    return float(np.mean(kl) if stat == "mean" else np.percentile(kl, int(stat[1:])))


def test_solver_finds_roots_jumps_and_says_when_a_target_is_out_of_reach():
    calls = []

    def power(c):
        calls.append(c)
        return 0.3 * c**2.4, np.array([c])

    found = solve_log_log(power, 2.0, start=1.0, rtol=1e-3)
    assert found.reached and abs(0.3 * found.coef**2.4 / 2.0 - 1) < 1e-3
    assert found.evaluations <= 6 and found.evaluations == len(calls)

    def jump(c):  # a greedy token changing at c = 3: the statistic leaps past the target
        return (0.01 * c if c < 3.0 else 5.0), np.array([])

    found = solve_log_log(jump, 1.0, start=1.0, rtol=1e-3, max_evaluations=60)
    assert found.reached and abs(found.coef - 3.0) < 1e-4 and found.value == 5.0

    def flat(c):  # saturates below the target
        return 1.0 - math.exp(-c), np.array([])

    found = solve_log_log(flat, 2.0, start=1.0)
    assert not found.reached and math.isnan(found.coef) and found.value <= 1.0
    assert found.evaluations <= 8


@pytest.mark.parametrize("stat", ["p90", "mean"])
def test_rollout_coefficient_is_a_crossing_of_the_rollout_statistic(adapter, vector, stat):
    """coef_rollout meets the target as the statistic computed here defines it, or sits at a
    jump of that statistic across the target (a greedy token changing)."""
    target, tokens = 0.3, 5
    result = sr.iso_kl(
        adapter, PROMPTS, vector=vector, layer=LAYER, target=target, stat=stat,
        tokens=tokens, forms=("rollout",), rtol=0.01,
    )  # fmt: skip
    row = result.to_frame().iloc[0]
    c = float(row.coef_rollout)
    assert row.reached and c > 0
    at = _statistic(adapter, vector, c, tokens, stat, rollout=True)
    below = _statistic(adapter, vector, c * 0.995, tokens, stat, rollout=True)
    assert abs(at / target - 1) < 0.011 or (below < target <= at), (below, at)
    assert row.forward_tokens_rollout > 0 and row.evaluations_rollout >= 1
    assert row.forward_tokens_measured == 0 and math.isnan(row.coef_measured)


def test_teacher_forced_is_the_rollout_definition_while_the_tokens_stay(adapter, vector):
    """At a budget small enough that no greedy token changes, the teacher-forced statistic is
    the rollout statistic: the two coefficients agree, and the rollout statistic computed here
    at the answer is ``kl_confirmed``, which cost no rollout (the teacher-forced pass showed
    every steered top token to be the base one): the base continuations, then one pass per
    coefficient tried."""
    target, tokens = 2e-4, 4
    result = sr.iso_kl(
        adapter, PROMPTS, vector=vector, layer=LAYER, target=target, stat="p90",
        tokens=tokens, forms=("rollout", "measured"), rtol=0.005,
    )  # fmt: skip
    row = result.to_frame().iloc[0]
    assert abs(row.coef_measured / row.coef_rollout - 1) < 0.01, row
    assert abs(row.kl_confirmed / target - 1) < 0.006
    forced = _statistic(adapter, vector, row.coef_measured, tokens, "p90", rollout=False)
    assert abs(forced / target - 1) < 0.006
    rolled = _statistic(adapter, vector, row.coef_measured, tokens, "p90", rollout=True)
    # the library's base logits come from the cached generation, these from full passes:
    # float32 roundoff, at a KL of 2e-4 a few parts in 1e5
    assert abs(rolled / row.kl_confirmed - 1) < 1e-4
    cost = 0
    for text in PROMPTS:
        ids = adapter.tokenize(text)
        cost += ids.shape[1] + len(_continuation(adapter.model, ids, tokens)) - 1
    assert row.forward_tokens_measured == cost * (1 + row.evaluations_measured)


def test_a_rollout_is_skipped_only_where_no_steered_top_token_changes(adapter, vector):
    """The teacher-forced pass's first changed position: before it, a rollout by full passes,
    run here, keeps the base tokens; where it says none changed, the rollout is the base
    continuation."""
    from stable_regions.studies.iso_kl import _Clock, _forced_statistic
    from stable_regions.studies.rollouts import greedy

    hook = adapter.hook_for_layer(LAYER)
    bases = [greedy(adapter, adapter.tokenize(t), 5, hook) for t in PROMPTS]
    passes: dict = {}
    evaluate = _forced_statistic(adapter, bases, hook, vector, "p90", _Clock(), passes)
    changed = []
    for c in (1e-3, 0.3, 3.0, 30.0):
        evaluate(c)
        with torch.no_grad(), adapter.added(hook, c * vector):
            steered = [_continuation(adapter.model, b.ids, 5) for b in bases]
        for s, b, first in zip(steered, bases, passes[c].first_changed, strict=True):
            base = b.new.tolist()
            assert s[:first] == base[:first], (c, s, base, first)
            if first == len(base):
                assert s == base, (c, s, base)
        changed.append(any(s != b.new.tolist() for s, b in zip(steered, bases, strict=True)))
    assert not changed[0] and changed[-1]  # both cases occur


@pytest.mark.parametrize(
    "arch, model_dtype",
    [("llama", torch.float32), ("llama", torch.float64), ("gemma3", torch.float64)],
)
def test_confirmation_from_the_changed_token_is_the_rollout_statistic(vector, arch, model_dtype):
    """The confirming rollout generates only from each prompt's first changed token, on the
    teacher-forced pass's keys and values, and re-scores the new tokens on the base
    continuation's: its statistic is the one computed here by full passes without a cache,
    at coefficients where tokens change, for less than a rollout from the prompt costs.
    Gemma-3's window of 4 tokens is shorter than these sequences: there the whole rollout
    runs, and the statistic is the same."""
    from stable_regions.studies.iso_kl import _Clock, _confirmed, _forced_statistic
    from stable_regions.studies.rollouts import greedy, resumable

    model = sr.wrap(tiny_model(arch, seed=3, dtype=model_dtype), char_tokenizer())
    hook, tokens = model.hook_for_layer(LAYER), 6
    reuse = resumable(model, len(PROMPTS[0]) + tokens)
    assert reuse == (arch == "llama")
    bases = [greedy(model, model.tokenize(t), tokens, hook, keep=True) for t in PROMPTS]
    assert all(b.key_values is not None for b in bases)
    passes: dict = {}
    evaluate = _forced_statistic(model, bases, hook, vector, "mean", _Clock(), passes)
    resumed = 0
    for c in (0.5, 3.0, 30.0):
        evaluate(c)
        clock = _Clock()
        value, kl = _confirmed(model, bases, passes[c], hook, c * vector, "mean", tokens, clock)
        reference = _statistic(model, vector, c, tokens, "mean", rollout=True)
        # the library keeps logits in float32: a few parts in 1e8 even for a float64 model
        assert abs(value / reference - 1) < (1e-4 if model_dtype == torch.float32 else 1e-6)
        full = sum(2 * b.cost for b in bases)
        assert clock.tokens.get("measured", 0) < full or not reuse
        resumed += any(f < len(b.new) for f, b in zip(passes[c].first_changed, bases, strict=True))
    assert resumed  # a token changed somewhere: the resumed path ran
    # the first pass's logits, keys and values were dropped after two newer passes: whole
    # rollouts, the same statistic
    assert not passes[0.5].logits
    clock = _Clock()
    value, _ = _confirmed(model, bases, passes[0.5], hook, 0.5 * vector, "mean", tokens, clock)
    reference = _statistic(model, vector, 0.5, tokens, "mean", rollout=True)
    assert abs(value / reference - 1) < (1e-4 if model_dtype == torch.float32 else 1e-6)


def test_prediction_agrees_with_the_teacher_forced_statistic_at_a_small_budget(adapter, vector):
    """From one pass of jets: at 1e-3 nats the tangent paths are the model to a few parts in
    a hundred, so the predicted coefficient meets the statistic computed here by passes."""
    target, tokens = 1e-3, 4
    result = sr.iso_kl(
        adapter, PROMPTS, vector=vector, layer=LAYER, target=target, stat="mean",
        tokens=tokens, forms=("predicted",), rtol=1e-3,
    )  # fmt: skip
    row = result.to_frame().iloc[0]
    forced = _statistic(adapter, vector, row.coef_predicted, tokens, "mean", rollout=False)
    assert abs(forced / target - 1) < 0.02, forced
    assert row.forward_tokens_predicted > 0 and row.reliable in (True, False)


def test_tangent_path_is_the_central_difference_of_the_model(vector):
    """The prediction's logits path ``z0 + c a1``: ``z0`` the plain pass, ``a1`` the central
    difference of two passes with ``+-h v`` at every position (no jets; a float64 model)."""
    from stable_regions.studies.rollouts import greedy, tangent_paths

    exact = sr.wrap(tiny_model("llama", seed=3, dtype=torch.float64), char_tokenizer())
    hook = exact.hook_for_layer(LAYER)
    run = greedy(exact, exact.tokenize(PROMPTS[0]), 4, hook)
    paths = tangent_paths(exact, run, hook, vector)
    start, h = run.ids.shape[1] - 1, 1e-6
    with torch.no_grad():
        plain = exact.model(run.sequence()).logits[0, start:]
        ends = []
        for sign in (1, -1):
            with exact.added(hook, sign * h * vector):
                ends.append(exact.model(run.sequence()).logits[0, start:].double())
    difference = (ends[0] - ends[1]) / (2 * h)
    assert torch.allclose(paths.z0.double(), plain, atol=1e-5)
    scale = float(difference.abs().max())
    assert scale > 1e-3  # the vector moves the logits: the comparison means something
    assert float((paths.a1.double() - difference).abs().max()) < 1e-3 * scale
    # the KL along the path: the quadratic form at small c, growing with |c|
    kl = [paths.kl(c) for c in (1e-5, 1e-2, 1e-1)]
    assert np.allclose(kl[0], 0.5e-10 * paths.fisher(), rtol=1e-3)
    assert np.all(kl[0] <= kl[1]) and np.all(kl[1] <= kl[2])


def test_many_vectors_share_the_base_continuations(adapter, vector):
    vectors = {"a": vector, "b": 2 * vector}
    result = sr.iso_kl(
        adapter, PROMPTS, vector=vectors, layer=LAYER, target=1e-3, stat="mean",
        tokens=3, forms=("predicted",),
    )  # fmt: skip
    frame = result.to_frame()
    assert frame.vector.tolist() == ["a", "b"]
    # twice the vector: half the coefficient, to the solver's tolerance
    a, b = frame.coef_predicted
    assert abs(2 * b / a - 1) < 0.03
    assert set(result.summary().columns) >= {"coef_predicted", "predicted_over_rollout"}


def test_several_layers_in_one_call(adapter, vector, monkeypatch):
    """One vector at two layers, and a per-layer source (``{layer: vector}``): one row per
    layer and vector, each as a call for that layer alone gives it, the base continuations
    generated once for all; the plot labels each row with its layer."""
    module = importlib.import_module("stable_regions.studies.iso_kl")
    unsteered, greedy = [], module.greedy

    def counted(*args, **kwargs):  # the base continuations: no vector added
        delta = args[4] if len(args) > 4 else kwargs.get("delta")
        unsteered.append(delta is None)
        return greedy(*args, **kwargs)

    monkeypatch.setattr(module, "greedy", counted)
    options = dict(target=1e-3, stat="mean", tokens=3, forms=("predicted", "measured"))
    other = torch.roll(vector, 5)
    result = sr.iso_kl(
        adapter, PROMPTS, vector={"v": vector, "per_layer": {0: other, LAYER: -vector}},
        layer=[0, LAYER], **options,
    )  # fmt: skip
    assert sum(unsteered) == len(PROMPTS)
    frame = result.to_frame()
    assert list(zip(frame.layer, frame.vector, strict=True)) == [
        ("0", "v"), ("0", "per_layer"), (str(LAYER), "v"), (str(LAYER), "per_layer"),
    ]  # fmt: skip
    assert result.layer == f"0, {LAYER}"
    for lay, name, v in [(0, "v", vector), (0, "per_layer", other), (LAYER, "per_layer", -vector)]:
        alone = sr.iso_kl(adapter, PROMPTS, vector=v, layer=lay, **options).to_frame().iloc[0]
        row = frame[(frame.layer == str(lay)) & (frame.vector == name)].iloc[0]
        for column in ("coef_predicted", "coef_measured", "forward_tokens_predicted"):
            assert row[column] == pytest.approx(alone[column], rel=1e-9), (lay, name, column)
    assert len(result.per_token) == 4
    fig = result.plot()
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels[2].startswith(f"layer {LAYER}\nv\n")
    with pytest.raises(InvalidParameterError, match="one or more layers"):
        sr.iso_kl(adapter, PROMPTS, vector=vector, layer=[], **options)


def test_unreachable_target_is_a_result_not_a_crash(adapter, vector):
    result = sr.iso_kl(
        adapter, PROMPTS[:1], vector=vector, layer=LAYER, target=1e5, stat="mean",
        tokens=2, forms=("rollout",), max_evaluations=8,
    )  # fmt: skip
    row = result.to_frame().iloc[0]
    assert not row.reached and math.isnan(row.coef_rollout)


def test_a_numpy_integer_is_a_token_count(adapter, vector):
    """A count read from an array or a frame is a numpy integer: taken as the int it is."""
    result = sr.iso_kl(
        adapter, PROMPTS[:1], vector=vector, layer=LAYER, target=1e-3, stat="mean",
        tokens=np.int64(2), forms=("predicted",),
    )  # fmt: skip
    assert result.to_frame().new_tokens.iloc[0] == 2
    assert type(result.to_json()["rows"][0]["new_tokens"]) is int


@pytest.mark.parametrize(
    "change, words",
    [
        ({"target": 0.0}, "KL target must be a positive number"),
        ({"target": float("nan")}, "KL target must be a positive number"),
        ({"stat": "p99"}, "unknown statistic 'p99'"),
        ({"tokens": 0}, "tokens must be a whole number >= 1"),
        ({"tokens": True}, "tokens must be a whole number >= 1"),
        ({"tokens": 2.0}, "tokens must be a whole number >= 1"),
        ({"vector": torch.ones(3)}, "has shape (3,), but the residual stream"),
        ({"vector": torch.full((32,), float("nan"))}, "NaN"),
        ({"layer": 99}, "out of range"),
        ({"prompts": ["x" * 62]}, "with 5 more it would pass the model's context of 64"),
    ],
)
def test_bad_input_is_one_line(adapter, vector, change, words):
    options = dict(prompts=PROMPTS, vector=vector, layer=LAYER, target=0.1, tokens=5)
    options.update(change)
    prompts = options.pop("prompts")
    with pytest.raises((InvalidParameterError, StableRegionsError)) as info:
        sr.iso_kl(adapter, prompts, forms=("predicted",), **options)
    message = str(info.value)
    assert words in message and "\n" not in message, message


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = saved_tiny_model(tmp_path_factory.mktemp("iso") / "model")
    path = folder / "v.npy"
    g = torch.Generator().manual_seed(11)
    np.save(path, torch.randn(32, generator=g).numpy())
    return folder, path


def test_cli_steer_iso_kl(saved, capsys):
    folder, path = saved
    args = ["steer", "hello there", "--model", str(folder), "--layer", str(LAYER)]
    args += ["--vector", str(path), "--iso-kl", "0.01", "--stat", "mean", "--tokens", "3"]
    assert main([*args, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["kl_target"] == 0.01 and doc["kl_stat"] == "mean" and doc["new_tokens"] == 3
    (row,) = doc["rows"]
    for form in ("rollout", "measured", "predicted"):
        assert row[f"coef_{form}"] > 0 and row[f"forward_tokens_{form}"] > 0
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "coef_rollout" in out and "coef_predicted" in out


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--iso-kl", "0"], "KL target must be a positive number"),
        (["--iso-kl", "lots"], "KL target must be a positive number"),
        (["--iso-kl", "1", "--stat", "p99"], "unknown statistic"),
        (["--iso-kl", "1", "--tokens", "0"], "tokens must be a whole number >= 1"),
    ],
)
def test_cli_iso_kl_bad_input_is_one_line(saved, capsys, extra, words):
    folder, path = saved
    args = ["steer", "hi", "--model", str(folder), "--layer", "1", "--vector", str(path)]
    assert main([*args, *extra]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and len(lines) == 1 and words in lines[0], captured.err


def test_cli_iso_kl_at_several_layers_gives_each_its_row(saved, tmp_path, capsys):
    """``steer --iso-kl --layer 0 --layer 1`` with a ``{layer: vector}`` file: one row per layer, each
    the library's answer for that layer and its own vector alone."""
    from stable_regions.studies.vectors import write_vector_file

    folder, path = saved
    g = torch.Generator().manual_seed(5)
    per_layer = {0: torch.randn(32, generator=g).numpy(), LAYER: np.load(path)}
    both = write_vector_file(tmp_path / "both.safetensors", per_layer)
    args = ["steer", "hello there", "--model", str(folder), "--layer", "0", "--layer", str(LAYER)]
    args += ["--vector", str(both), "--iso-kl", "0.01", "--stat", "mean", "--tokens", "3"]
    assert main([*args, "--json"]) == 0
    rows = {row["layer"]: row for row in json.loads(capsys.readouterr().out)["rows"]}
    assert sorted(rows) == ["0", str(LAYER)]
    model = sr.load(str(folder))
    for layer, v in per_layer.items():
        alone = sr.iso_kl(
            model, ["hello there"], vector=torch.from_numpy(v), layer=layer, target=0.01,
            stat="mean", tokens=3,
        ).rows[0]  # fmt: skip
        for form in ("rollout", "measured", "predicted"):
            got = rows[str(layer)][f"coef_{form}"]
            assert got == pytest.approx(alone[f"coef_{form}"], rel=1e-9), (layer, form)
    assert rows["0"]["coef_rollout"] != pytest.approx(rows[str(LAYER)]["coef_rollout"], rel=1e-3)


def test_cli_iso_kl_at_several_layers_takes_the_mean_difference_at_each(saved, tmp_path, capsys):
    """``--positive`` / ``--negative`` with two ``--layer``: each row steers with the mean
    difference at its own layer (``sr.mean_difference`` there, alone)."""
    folder, _ = saved
    pos, neg = tmp_path / "pos.txt", tmp_path / "neg.txt"
    pos.write_text("I love it\ngreat fun\n")
    neg.write_text("I hate it\nawful\n")
    args = ["steer", "hello there", "--model", str(folder), "--layer", "0", "--layer", "1"]
    args += ["--positive", str(pos), "--negative", str(neg), "--iso-kl", "0.01"]
    assert main([*args, "--stat", "mean", "--tokens", "3", "--json"]) == 0
    rows = {row["layer"]: row for row in json.loads(capsys.readouterr().out)["rows"]}
    model = sr.load(str(folder))
    for layer in (0, 1):
        v = sr.mean_difference(
            model, ["I love it", "great fun"], ["I hate it", "awful"], layer=layer
        )
        alone = sr.iso_kl(
            model, ["hello there"], vector=v, layer=layer, target=0.01, stat="mean", tokens=3,
            forms=("rollout",),
        ).rows[0]  # fmt: skip
        assert rows[str(layer)]["coef_rollout"] == pytest.approx(alone["coef_rollout"], rel=1e-9)


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--layer", "0", "--layer", "1", "--no-exact"], "several layers go with --iso-kl"),
        (["--layer", "1", "--layer", "1", "--iso-kl", "0.1"], "--layer 1 given more than once"),
        (
            ["--layer", "0", "--layer", "1", "--iso-kl", "0.1", "--save-vector", "OUT"],
            "--save-vector writes one layer's vector and budget: give one --layer",
        ),
    ],
)
def test_cli_several_layers_bad_input_is_one_line(saved, tmp_path, capsys, extra, words):
    folder, path = saved
    out = tmp_path / "v.safetensors"
    extra = [str(out) if x == "OUT" else x for x in extra]
    assert main(["steer", "hi", "--model", str(folder), "--vector", str(path), *extra]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and len(lines) == 1 and words in lines[0], captured.err
    assert not out.exists()


def test_the_budget_travels_with_the_vector(saved, tmp_path, capsys):
    """``steer --iso-kl --save-vector`` writes the vector with its coefficient where a library
    reads it (.safetensors metadata, repeng's .gguf layout: tests/test_repeng.py reads that
    one with repeng); ``steer --vector`` reads it back, says what it carries, and files
    without a budget read as before."""
    from stable_regions.studies.vectors import read_budget, read_vector_file, write_vector_file

    folder, path = saved
    base = ["steer", "hello there", "--model", str(folder), "--layer", str(LAYER)]
    for suffix in (".safetensors", ".gguf"):
        out = tmp_path / f"v{suffix}"
        args = [*base, "--vector", str(path), "--iso-kl", "0.01", "--stat", "mean"]
        assert main([*args, "--tokens", "3", "--json", "--save-vector", str(out)]) == 0
        (row,) = json.loads(capsys.readouterr().out)["rows"]
        budget = read_budget(out)
        assert float(budget["coefficient"]) == pytest.approx(row["coef_rollout"], rel=1e-12)
        assert budget["kl_stat"] == "mean" and budget["layer"] == str(LAYER)
        np.testing.assert_array_equal(read_vector_file(out, LAYER), np.load(path))
        assert main([*base, "--vector", str(out), "--no-exact"]) == 0
        assert f"carries coefficient {budget['coefficient']}" in capsys.readouterr().err
    assert read_budget(path) == {}  # a .npy has none
    plain = write_vector_file(tmp_path / "plain.safetensors", {LAYER: np.load(path)})
    assert read_budget(plain) == {}
    np.testing.assert_array_equal(read_vector_file(plain, LAYER), np.load(path))
    with pytest.raises(InvalidParameterError, match="no metadata; save as .safetensors"):
        write_vector_file(tmp_path / "x.npy", np.load(path), budget={"coefficient": 1.0})


def _drift_passes(monkeypatch) -> list:
    """The ``SteeringDrift`` processors ``generate`` makes, as it makes them."""
    from stable_regions.studies.steering_drift import SteeringDrift

    made, init = [], SteeringDrift.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(SteeringDrift, "__init__", spy)
    return made


def _check_drift_by_full_passes(adapter, prompt, frame, vector, coefficient, layer):
    """Each step's ``kl_steer`` against two plain passes (base, steered) over the prompt and
    the tokens generated before it: no cache, no ``generate``."""
    hook = adapter.hook_for_layer(layer)
    ids = adapter.tokenize(prompt)
    frame = frame.sort_values("step")
    tokens = frame.chosen_token_id.tolist()
    with torch.no_grad():
        for t, kl in zip(frame.step, frame.kl_steer, strict=True):
            seq = torch.cat([ids, torch.tensor([tokens[:t]], dtype=ids.dtype)], 1)
            base = adapter.model(seq).logits[0, -1]
            with adapter.added(hook, coefficient * vector):
                steered = adapter.model(seq).logits[0, -1]
            want = float(_kl_rows(steered[None], base[None])[0])
            assert kl == pytest.approx(want, rel=1e-4, abs=1e-9), (t, kl, want)


def test_generation_with_steering_reports_each_tokens_drift(adapter, vector, monkeypatch):
    """``generate(steering=...)``: each step's KL between the steered and the base
    distribution, against two plain passes over the same tokens; the base model runs on its
    own cache (the prompt, then one token per step); left padding changes nothing (the
    short prompt's row in a batch equals its run alone); the running sum and the spike flag
    follow."""
    made = _drift_passes(monkeypatch)
    steering = {"vector": vector, "layer": LAYER, "coefficient": 0.05, "spike_kl": 0.01}
    alone = sr.generate(adapter, "a", max_new_tokens=4, steering=steering).to_frame()
    _check_drift_by_full_passes(adapter, "a", alone, vector, 0.05, LAYER)
    assert len(alone) == 4 and made[-1].forward_tokens == adapter.tokenize("a").shape[1] + 3
    assert alone.kl_steer.max() > 1e-4  # the steering does something
    np.testing.assert_allclose(alone.kl_steer_cumulative, np.cumsum(alone.kl_steer))
    assert (alone.kl_spike == (alone.kl_steer > 0.01)).all()
    batch = sr.generate(adapter, ["hello there", "a"], max_new_tokens=4, steering=steering)
    padded = batch.to_frame()
    padded = padded[padded.sequence == 1].sort_values("step")
    np.testing.assert_allclose(padded.kl_steer, alone.kl_steer, rtol=1e-4, atol=1e-9)
    with pytest.raises(InvalidParameterError, match="unknown steering key"):
        sr.generate(adapter, "a", max_new_tokens=2, steering={**steering, "coef": 1})


def test_steering_drift_past_a_sliding_window_and_after_a_rewrite():
    """Gemma-3's sliding layers (a window of 4) on the base model's cache, for more steps
    than the window, against full passes; a sequence that is not the last one plus a token
    (a decoding strategy that rewrites it) is passed whole again, with the right value."""
    from stable_regions.studies.steering_drift import SteeringDrift, check_steering

    gemma = sr.wrap(tiny_model("gemma3", seed=5, dtype=torch.float32), char_tokenizer())
    v = torch.randn(gemma.model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    steering = {"vector": v, "layer": 1, "coefficient": 0.5}
    frame = sr.generate(gemma, "hello", max_new_tokens=8, steering=steering).to_frame()
    assert len(frame) == 8
    _check_drift_by_full_passes(gemma, "hello", frame, v, 0.5, 1)

    spec = check_steering(gemma, steering)
    ids = gemma.tokenize("hello")
    drift = SteeringDrift(gemma, spec, torch.ones_like(ids))
    longer = torch.cat([ids, torch.tensor([[7, 9]])], 1)
    rewritten = torch.cat([ids, torch.tensor([[8, 9, 3]])], 1)  # longer, not an extension
    hook = gemma.hook_for_layer(1)
    with torch.no_grad(), gemma.added(hook, spec.delta):
        for seq in (ids, longer, rewritten):
            drift(seq, gemma.model(seq).logits[:, -1])
    assert drift.forward_tokens == ids.shape[1] + 2 + rewritten.shape[1]
    with torch.no_grad():
        base = gemma.model(rewritten).logits[:, -1]
        with gemma.added(hook, spec.delta):
            steered = gemma.model(rewritten).logits[:, -1]
    assert drift.steps[-1][0] == pytest.approx(_kl_rows(steered, base)[0], rel=1e-4)


def test_cli_generate_with_a_vector_that_carries_its_coefficient(saved, tmp_path, capsys):
    """``generate --steer-vector FILE`` uses the coefficient the file carries (the same rows
    as giving it with --steer-coef), and says what it saw."""
    from stable_regions.studies.vectors import write_vector_file

    folder, path = saved
    carried = write_vector_file(
        tmp_path / "v.safetensors", {LAYER: np.load(path)}, budget={"coefficient": 0.03}
    )
    base = ["generate", "hello", "--model", str(folder), "--max-new-tokens", "3", "--json"]
    base += ["--steer-layer", str(LAYER)]
    assert main([*base, "--steer-vector", str(carried)]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert main([*base, "--steer-vector", str(path), "--steer-coef", "0.03"]) == 0
    explicit = json.loads(capsys.readouterr().out)["rows"]
    assert [r["kl_steer"] for r in rows] == pytest.approx([r["kl_steer"] for r in explicit])
    assert all(r["kl_steer"] > 0 for r in rows)
    assert main([*base, "--steer-vector", str(path), "--steer-coef", "x"]) == 2
    assert "--steer-coef must be a number" in capsys.readouterr().err
