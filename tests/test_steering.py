"""Steering budgets on small random models: measured against full forward passes, and bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import char_tokenizer, saved_tiny_model, tiny_model

import stable_regions as sr
from stable_regions.cli import main
from stable_regions.errors import StableRegionsError
from stable_regions.models.precision import exact_numerics
from stable_regions.studies.steering import load_vector, mean_difference, steering_budget


@pytest.fixture(scope="module")
def adapter():
    return sr.wrap(tiny_model("llama", seed=3), char_tokenizer())


def test_mean_difference_is_the_mean_of_hidden_states(adapter):
    pos, neg = ["I love it", "great fun!"], ["I hate it", "awful"]
    vec = mean_difference(adapter, pos, neg, layer=1)

    def mean_last(prompts):
        with torch.no_grad(), exact_numerics():
            hs = [
                adapter.model(
                    input_ids=adapter.tokenize(p), output_hidden_states=True
                ).hidden_states[2][0, -1]
                for p in prompts
            ]
        return torch.stack(hs).mean(0)

    assert torch.allclose(vec, mean_last(pos) - mean_last(neg), atol=1e-12)


def test_mean_difference_at_several_layers_shares_each_prompts_pass(adapter, monkeypatch):
    """``layer=[...]`` gives ``{layer: vector}``, each the one-layer answer (itself checked
    against the hidden states above), from one forward pass per prompt."""
    pos, neg = ["I love it", "great fun!"], ["I hate it", "awful"]
    layers = [1, "embed", "final"]
    alone = {layer: mean_difference(adapter, pos, neg, layer=layer) for layer in layers}
    passes = []
    forward = adapter.forward
    monkeypatch.setattr(adapter, "forward", lambda *a, **k: passes.append(1) or forward(*a, **k))
    together = mean_difference(adapter, pos, neg, layer=layers)
    assert list(together) == layers and len(passes) == len(pos) + len(neg)
    for layer in layers:
        assert torch.equal(together[layer], alone[layer]), layer
    assert not torch.allclose(together[1], together["final"])


@pytest.mark.parametrize("layer", [1, "embed", "final"])
def test_budget_measured_against_full_forward(adapter, layer):
    prompts = ["Hello world", "The cat sat"]
    hook = adapter.hook_for_layer(layer)
    vec = torch.randn(
        adapter.hook_dim(hook), dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    vec = 3.0 * vec
    res = steering_budget(
        adapter, prompts, vector=vec, layer=layer, eps=[0.01, 0.1], positions=[2, -1]
    )
    df = res.to_frame()
    assert len(df) == 2 * 2 * 2 and np.allclose(df.vector_norm, float(vec.norm()))
    for _, row in df.iterrows():
        ids = adapter.tokenize(prompts[row.prompt_id])
        c = row.coef_exact
        assert math.isfinite(c) and c > 0
        coefs = torch.tensor([0.0, 0.2, 0.5, 0.8, 0.999, 1.001], dtype=torch.float64) * c
        logits = adapter.perturbed_logits(ids, hook, int(row.position), coefs[:, None] * vec[None])
        logq = torch.log_softmax(logits, -1)
        kl = (logq[0].exp() * (logq[0] - logq)).sum(-1)
        assert kl[:-1].max() < row.eps and kl[-1] >= row.eps
        # quadratic coefficient: sqrt(2 eps / u^T G u) / |vec| with G from an autograd Jacobian
        u = vec / vec.norm()

        def f(delta, ids=ids, pos=int(row.position)):
            with adapter.perturbation(hook, pos, delta[None]), exact_numerics():
                return adapter.model(input_ids=ids[:, : pos + 1]).logits[0, pos]

        Ju = torch.autograd.functional.jvp(f, torch.zeros_like(u), u)[1]
        p = logq[0].exp()
        quad = (p * (Ju - (p * Ju).sum()) ** 2).sum()
        assert math.isclose(
            row.coef_quadratic,
            math.sqrt(2 * row.eps / float(quad)) / float(vec.norm()),
            rel_tol=1e-8,
        )
    # at eps 0.01 the Pade form is close to the measured budget, the Taylor path closer
    small = df[df.eps == 0.01]
    assert ((small.coef_pade / small.coef_exact - 1).abs() < 0.05).all()
    assert ((small.coef_curve / small.coef_exact - 1).abs() < 0.01).all()
    if layer == "final":  # a linear head: the curve is the exact KL along the ray
        assert np.allclose(df.coef_curve, df.coef_exact, rtol=1e-5)
    assert df.coef_calibrated.isna().all()  # no calibration given
    # the move the curve allows, relative to the activation there
    for _, row in df.iterrows():
        ids = adapter.tokenize(prompts[row.prompt_id])
        store = []
        with adapter.capture(hook, store), torch.no_grad():
            adapter.forward(ids, use_cache=False)
        h = store[0][0, int(row.position)].to(torch.float64)
        want = row.coef_curve * float(vec.norm()) / float(h.norm())
        assert row.radius_relative == pytest.approx(want, rel=1e-9)
    summary = res.summary()
    assert list(summary.eps) == [0.01, 0.1]
    assert (summary.coef_exact_p05 <= summary.coef_exact_median).all()


def test_vector_files_and_bad_vectors(adapter, tmp_path):
    d = adapter.hook_dim("blocks.1.hook_resid_post")
    good = np.arange(d, dtype=np.float32) + 1
    np.save(tmp_path / "v.npy", good)
    assert torch.allclose(
        load_vector(tmp_path / "v.npy", d), torch.tensor(good, dtype=torch.float64)
    )
    from safetensors.numpy import save_file

    save_file({"steer": good.reshape(1, d)}, str(tmp_path / "v.safetensors"))
    assert torch.allclose(
        load_vector(tmp_path / "v.safetensors", d), torch.tensor(good, dtype=torch.float64)
    )
    save_file({"a": good, "b": good}, str(tmp_path / "two.safetensors"))
    np.save(tmp_path / "short.npy", good[:-1])
    np.save(tmp_path / "nan.npy", np.where(np.arange(d) == 3, np.nan, good))
    np.save(tmp_path / "zero.npy", 0 * good)
    np.save(tmp_path / "obj.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    for name, message in [
        ("two.safetensors", "exactly one"),
        ("short.npy", "dimension"),
        ("nan.npy", "NaN"),
        ("zero.npy", "zeros"),
        ("obj.npy", "could not read"),
        ("missing.npy", "not found"),
    ]:
        with pytest.raises(StableRegionsError, match=message):
            load_vector(tmp_path / name, d)
    with pytest.raises(StableRegionsError, match="non-empty"):
        mean_difference(adapter, ["a"], [], layer=1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return saved_tiny_model(tmp_path_factory.mktemp("steer") / "tiny-llama", seed=3)


def test_cli_steer_json_from_prompt_files(model_dir, tmp_path, capsys):
    (tmp_path / "pos.txt").write_text("I love it\ngreat fun\n")
    (tmp_path / "neg.txt").write_text("I hate it\nawful\\nreally\n")
    (tmp_path / "prompts.txt").write_text("Hello world\nThe cat\n")
    args = [
        "steer",
        "--model",
        str(model_dir),
        "--layer",
        "1",
        "--positive",
        str(tmp_path / "pos.txt"),
        "--negative",
        str(tmp_path / "neg.txt"),
        "--prompts",
        str(tmp_path / "prompts.txt"),
        "--eps",
        "0.05",
        "--save-vector",
        str(tmp_path / "v.npy"),
        "--json",
    ]
    assert main(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["rows"]) == 2 and doc["summary"][0]["n"] == 2
    assert all(r["coef_exact"] > 0 for r in doc["rows"])
    # the saved vector reproduces the result through --vector
    assert (
        main(
            [
                "steer",
                "Hello world",
                "--model",
                str(model_dir),
                "--layer",
                "1",
                "--vector",
                str(tmp_path / "v.npy"),
                "--eps",
                "0.05",
                "--json",
            ]
        )
        == 0
    )
    again = json.loads(capsys.readouterr().out)
    assert again["rows"][0]["coef_exact"] == pytest.approx(doc["rows"][0]["coef_exact"], rel=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--vector", "{tmp}/short.npy"], "dimension"),
        (["--vector", "{tmp}/nan.npy"], "NaN"),
        (["--positive", "{tmp}/pos.txt", "--negative", "{tmp}/empty.txt"], "no prompts"),
        (["--positive", "{tmp}/pos.txt"], "go together"),
        (
            [
                "--vector",
                "{tmp}/short.npy",
                "--positive",
                "{tmp}/pos.txt",
                "--negative",
                "{tmp}/pos.txt",
            ],
            "either",
        ),
        (["--vector", "{tmp}/nan.npy", "--layer", "7"], "out of range"),
    ],
)
def test_cli_steer_bad_input(model_dir, tmp_path, extra, message):
    np.save(tmp_path / "short.npy", np.ones(5))
    np.save(tmp_path / "nan.npy", np.full(32, np.nan))
    (tmp_path / "pos.txt").write_text("good\n")
    (tmp_path / "empty.txt").write_text("\n  \n")
    args = [a.format(tmp=tmp_path) for a in extra]
    if "--layer" not in args:
        args += ["--layer", "1"]
    proc = subprocess.run(
        [sys.executable, "-m", "stable_regions", "steer", "hi", "--model", str(model_dir), *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env=dict(os.environ),
        timeout=300,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr


def write_repeng_gguf(path, directions: dict[int, np.ndarray], model_type="llama"):
    """A control vector file as repeng 0.4's ``ControlVector.export_gguf`` writes it (the
    same gguf calls; repeng itself cannot be imported beside numpy 2)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", model_type)
    writer.add_uint32("controlvector.layer_count", len(directions))
    for layer, vector in directions.items():
        writer.add_tensor(f"direction.{layer}", vector.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_control_vectors_and_layered_files_give_the_raw_vectors_budget(adapter, tmp_path):
    """repeng's file and object, and a safetensors file of {layer: vector}: each picks the
    vector of the layer asked for, and the budget (in repeng's coefficient) equals the one of
    that raw vector."""
    from dataclasses import dataclass

    from safetensors.numpy import save_file

    d = adapter.hook_dim("blocks.1.hook_resid_post")
    gen = np.random.default_rng(0)
    directions = {0: gen.normal(size=d), 1: gen.normal(size=d)}
    directions = {k: v.astype(np.float32) for k, v in directions.items()}

    @dataclass
    class ControlVector:  # repeng's dataclass: model_type, directions {layer: array}
        model_type: str
        directions: dict

    write_repeng_gguf(tmp_path / "cv.gguf", directions)
    save_file({"layer.0": directions[0], "1": directions[1]}, str(tmp_path / "layers.safetensors"))
    reference = steering_budget(
        adapter, ["The cat sat"], vector=directions[1], layer=1, eps=[0.1, 1.0]
    )
    for source in [
        load_vector(tmp_path / "cv.gguf", d, 1),
        load_vector(tmp_path / "layers.safetensors", d, 1),
        ControlVector("llama", directions),
        {1: directions[1], 0: directions[0]},
    ]:
        got = steering_budget(adapter, ["The cat sat"], vector=source, layer=1, eps=[0.1, 1.0])
        for col in ("coef_quadratic", "coef_curve", "coef_exact"):
            np.testing.assert_allclose(got.to_frame()[col], reference.to_frame()[col], rtol=1e-9)
    assert not torch.allclose(
        load_vector(tmp_path / "cv.gguf", d, 0), load_vector(tmp_path / "cv.gguf", d, 1)
    )
    for source in (tmp_path / "cv.gguf", tmp_path / "layers.safetensors"):
        with pytest.raises(StableRegionsError, match="no vector at layer 2 .*layers 0, 1"):
            load_vector(source, d, 2)
    with pytest.raises(StableRegionsError, match="no vector at layer 2"):
        steering_budget(adapter, ["x"], vector=ControlVector("llama", directions), layer=2)
    # a GGUF model file is not a control vector
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "model.gguf"), "llama")
    writer.add_tensor("token_embd.weight", np.ones((4, d), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(StableRegionsError, match="not a control vector"):
        load_vector(tmp_path / "model.gguf", d, 1)


def test_cli_steer_with_a_control_vector_file(model_dir, tmp_path, capsys):
    d = 32
    directions = {1: np.linspace(-1, 1, d), 2: np.ones(d)}
    write_repeng_gguf(tmp_path / "cv.gguf", directions)

    def steer(layer: str) -> int:
        argv = ["steer", "The cat sat", "--model", str(model_dir), "--no-exact", "--json"]
        return main([*argv, "--layer", layer, "--vector", str(tmp_path / "cv.gguf")])

    assert steer("1") == 0
    doc = json.loads(capsys.readouterr().out)
    norm = float(np.linalg.norm(directions[1]))
    assert doc["rows"][0]["vector_norm"] == pytest.approx(norm, rel=1e-6)
    assert steer("0") == 2
    err = capsys.readouterr().err.strip()
    assert "no vector at layer 0" in err and "\n" not in err


def test_added_steers_every_position(adapter):
    """``added`` (the libraries' way of steering) shifts the activation at every position,
    and the next layer sees the shifted stream."""
    ids = adapter.tokenize("The cat sat")
    hook = adapter.hook_for_layer(1)
    delta = torch.linspace(-1, 1, adapter.hook_dim(hook), dtype=torch.float64)
    plain, steered = [], []
    with adapter.capture(hook, plain), torch.no_grad():
        base = adapter.forward(ids, use_cache=False).logits
    with adapter.added(hook, delta), adapter.capture(hook, steered), torch.no_grad():
        moved = adapter.forward(ids, use_cache=False).logits
    assert torch.allclose(steered[0], plain[0] + delta, atol=1e-12)
    assert not torch.allclose(moved, base)


def test_cli_analyze_along_a_direction_of_ones_own(model_dir, tmp_path, capsys):
    """``analyze --direction FILE``: the radii along +u at an inner layer, checked against the
    model run with the perturbation added (KL below eps just inside radius_exact, at eps just
    outside), and the table on screen names the direction."""
    model = sr.load(str(model_dir))
    hook = model.hook_for_layer(1)
    vec = np.random.default_rng(4).normal(size=model.hook_dim(hook)) * 2.0
    np.save(tmp_path / "u.npy", vec)
    args = ["analyze", "Hello world", "--model", str(model_dir), "--layer", "1"]
    args += ["--direction", str(tmp_path / "u.npy"), "--eps", "0.05", "--positions", "2,5"]
    assert main([*args, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["direction"] == str(tmp_path / "u.npy") and len(doc["rows"]) == 2
    u = torch.as_tensor(vec / np.linalg.norm(vec))
    ids = model.tokenize("Hello world")
    for row in doc["rows"]:
        r = row["radius_exact"]
        assert "coef_exact" not in row and math.isfinite(r) and r > 0
        steps = torch.tensor([0.0, 0.999, 1.001], dtype=torch.float64) * r  # row 0: p itself
        logits = model.perturbed_logits(ids, hook, row["position"], steps[:, None] * u[None])
        logq = torch.log_softmax(logits.to(torch.float64), -1)
        kl = (logq[0].exp() * (logq[0] - logq)).sum(-1)
        assert kl[1] < 0.05 <= kl[2]
        assert row["radius_curve"] == pytest.approx(r, rel=0.2)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "radius along +u" in out and "u.npy" in out
    assert main([*args, "--trace", "exact"]) == 2
    assert "leave them out with --direction" in capsys.readouterr().err
