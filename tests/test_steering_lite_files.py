"""Our ``.safetensors`` vector files in steering-lite's layout, and its files read by us.

steering-lite is not on the package index this project installs from, so its side is
written out here from its source, as a reference independent of our reader: ``Vector.load``
reads the ``cfg`` metadata as JSON and each tensor ``layer{i}.{key}``; its ``mean_diff``
method, attached with a forward hook on block ``i``, returns the block's output plus
``cfg.coeff * state["v"]`` (cast to ``cfg.dtype``) at every position.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import char_tokenizer, tiny_model
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from safetensors.torch import save_file as save_torch

import stable_regions as sr
from stable_regions.errors import StableRegionsError
from stable_regions.studies.vectors import read_budget, read_vector_file, write_vector_file


def _steering_lite_load(path) -> tuple[dict, dict[int, dict[str, np.ndarray]]]:
    """``Vector.load``: the config and ``{layer: {key: tensor}}``."""
    with safe_open(str(path), framework="numpy") as handle:
        cfg = json.loads(handle.metadata()["cfg"])
    state: dict[int, dict[str, np.ndarray]] = {}
    for key, value in load_file(str(path)).items():
        layer, _, sub = key.partition(".")
        state.setdefault(int(layer.removeprefix("layer")), {})[sub] = value
    return cfg, state


def _steering_lite_logits(model, ids, cfg, state) -> torch.Tensor:
    """The model's logits with ``mean_diff`` attached: ``y + coeff * v`` on each block's
    output."""
    dtype = getattr(torch, cfg["dtype"])
    handles = []
    for layer in cfg["layers"]:
        v = torch.from_numpy(state[layer]["v"]).to(dtype)

        def hook(_block, _args, out, v=v):
            if isinstance(out, tuple):
                return (out[0] + cfg["coeff"] * v.to(out[0]), *out[1:])
            return out + cfg["coeff"] * v.to(out)

        handles.append(model.model.layers[layer].register_forward_hook(hook))
    try:
        with torch.no_grad():
            return model(ids).logits[0].double()
    finally:
        for h in handles:
            h.remove()


def test_our_files_load_and_steer_as_steering_lite_reads_them(tmp_path):
    """A vector with its budget, written by us, loaded the way steering-lite loads it and
    steered its way, gives the logits of ``c * v`` at ``blocks.{i}.hook_resid_post``; the
    budget still reads back, and a file written without one reads as before."""
    adapter = sr.wrap(tiny_model("llama", seed=7, dtype=torch.float32), char_tokenizer())
    v = np.random.default_rng(0).normal(size=adapter.d_resid).astype(np.float32)
    path = write_vector_file(tmp_path / "v.safetensors", {1: v}, budget={"coefficient": 0.75})
    cfg, state = _steering_lite_load(path)
    assert cfg["method"] == "mean_diff" and cfg["layers"] == [1] and cfg["coeff"] == 0.75
    np.testing.assert_array_equal(state[1]["v"], v)
    ids = adapter.tokenize("The cat sat on")
    theirs = _steering_lite_logits(adapter.model, ids, cfg, state)
    with torch.no_grad(), adapter.added("blocks.1.hook_resid_post", 0.75 * torch.from_numpy(v)):
        ours = adapter.forward(ids).logits[0].double()
    with torch.no_grad():
        plain = adapter.forward(ids).logits[0].double()
    assert (ours - plain).abs().max() > 1e-2  # the steering does something
    torch.testing.assert_close(theirs, ours, rtol=1e-6, atol=1e-6)
    assert read_budget(path)["coefficient"] == "0.75"
    np.testing.assert_array_equal(read_vector_file(path, 1), v)

    plain_path = write_vector_file(tmp_path / "plain.safetensors", {1: v, 2: 2 * v})
    assert read_budget(plain_path) == {}
    assert _steering_lite_load(plain_path)[0]["coeff"] == 1.0
    np.testing.assert_array_equal(read_vector_file(plain_path, 2), 2 * v)


def test_steering_lite_files_read_with_their_coefficient(tmp_path):
    """A file as steering-lite's ``Vector.save`` writes one: its vector at each layer, its
    calibrated ``coeff`` as the coefficient (none where it is the default 1); a method that
    does not add its vector is refused in one line."""
    v = np.arange(8, dtype=np.float32)
    cfg = {
        "method": "mean_diff", "layers": [3, 5], "target": "residual",
        "target_submodule": None, "coeff": 2.5, "dtype": "bfloat16", "seed": 0,
        "normalize": True, "subtract_corpus_mean": False,
    }  # fmt: skip
    path = tmp_path / "theirs.safetensors"
    save_file({"layer3.v": v, "layer5.v": -v}, str(path), metadata={"cfg": json.dumps(cfg)})
    np.testing.assert_array_equal(read_vector_file(path, 5), -v)
    assert read_budget(path) == {"coefficient": "2.5"}
    save_file({"layer3.v": v}, str(path), metadata={"cfg": json.dumps({**cfg, "coeff": 1.0})})
    assert read_budget(path) == {}
    half = torch.from_numpy(v).to(torch.bfloat16)  # steering-lite's default dtype
    save_torch({"layer3.v": half}, str(path), metadata={"cfg": json.dumps(cfg)})
    np.testing.assert_array_equal(read_vector_file(path, 3), half.float().numpy())
    spherical = {**cfg, "method": "spherical"}
    save_file({"layer3.v": v}, str(path), metadata={"cfg": json.dumps(spherical)})
    with pytest.raises(StableRegionsError, match="method 'spherical', which does not add"):
        read_vector_file(path, 3)


def test_generate_steers_with_a_steering_lite_files_coefficient(tmp_path, capsys):
    """``generate --steer-vector`` on a steering-lite file uses its ``cfg.coeff``: the same
    rows as the raw vector with ``--steer-coef``."""
    from conftest import saved_tiny_model

    from stable_regions.cli import main

    folder = saved_tiny_model(tmp_path / "model")
    v = np.random.default_rng(3).normal(size=32).astype(np.float32)
    np.save(tmp_path / "v.npy", v)
    cfg = {"method": "mean_diff", "layers": [1], "coeff": 0.04, "dtype": "float32"}
    theirs = tmp_path / "theirs.safetensors"
    save_file({"layer1.v": v}, str(theirs), metadata={"cfg": json.dumps(cfg)})
    base = ["generate", "hello", "--model", str(folder), "--max-new-tokens", "3", "--json"]
    base += ["--steer-layer", "1"]
    assert main([*base, "--steer-vector", str(theirs)]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert main([*base, "--steer-vector", str(tmp_path / "v.npy"), "--steer-coef", "0.04"]) == 0
    explicit = json.loads(capsys.readouterr().out)["rows"]
    assert [r["kl_steer"] for r in rows] == pytest.approx([r["kl_steer"] for r in explicit])
    assert all(r["kl_steer"] > 0 for r in rows)
