"""The command line and the model store, on a small random model saved to disk."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import char_tokenizer, saved_tiny_model, tiny_model

import stable_regions as sr
from stable_regions.cli import main
from stable_regions.errors import ModelNotInstalledError
from stable_regions.models import store


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return saved_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-gemma2", "gemma2")


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stable_regions", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
        timeout=300,
    )


def test_cli_json_is_one_document_with_the_dataframe_columns(model_dir, capsys):
    assert (
        main(["analyze", "Hi there", "--model", str(model_dir), "--eps", "0.05", "0.5", "--json"])
        == 0
    )
    out = capsys.readouterr().out
    doc = json.loads(out)  # exactly one JSON document on stdout
    assert doc["model"] == str(model_dir)
    assert len(doc["rows"]) == len("Hi there") * 2
    df = sr.analyze(sr.load(str(model_dir)), "Hi there", eps=[0.05, 0.5]).to_frame()
    assert set(df.columns) <= set(doc["rows"][0])
    assert [r["radius_exact"] for r in doc["rows"]] == pytest.approx(
        df.radius_exact.tolist(), rel=1e-9
    )


def test_cli_table_and_positions(model_dir, capsys):
    assert (
        main(["analyze", "abcd", "--model", str(model_dir), "--positions", "1,3", "--no-exact"])
        == 0
    )
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "radius_curve" in line).split()
    assert header == [
        "position",
        "token",
        "next_token",
        "eps",
        "radius_pade",
        "radius_curve",
        "reliable",
    ]
    # one section per analysed position, its position printed once
    firsts = [line.split()[:2] for line in out.splitlines() if re.match(r"\s+\d+\s+[a-z]\s", line)]
    assert firsts == [["1", "b"], ["3", "d"]]
    assert main(["analyze", "abcd", "--model", str(model_dir), "--positions", "1,3", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert sorted({r["position"] for r in rows}) == [1, 3]


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["analyze", ""], "prompt is empty"),
        (["analyze", "hi", "--eps", "0"], "eps must be"),
        (["analyze", "hi", "--eps", "nan"], "eps must be"),
        (["analyze", "hi", "--positions", "9"], "out of range"),
        (["analyze", "hi", "--layer", "12"], "out of range"),
        (["analyze", "x" * 70], "context"),
        (["analyze", "hi", "--model", "/nonexistent/model"], "not found"),
    ],
)
def test_cli_bad_input_is_one_line_no_traceback(model_dir, args, message):
    if "--model" not in args:
        args = [*args, "--model", str(model_dir)]
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_bundled_model_names_the_install_command(tmp_path):
    proc = run_cli("analyze", "hi", env={"STABLE_REGIONS_CACHE": str(tmp_path)})
    assert proc.returncode == 2
    assert "stable-regions models install smollm2-135m" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    with pytest.raises(ModelNotInstalledError):
        os.environ["STABLE_REGIONS_CACHE"] = str(tmp_path)
        try:
            sr.load("gemma3-270m")
        finally:
            del os.environ["STABLE_REGIONS_CACHE"]


def test_models_list_json(tmp_path):
    proc = run_cli("models", "list", "--json", env={"STABLE_REGIONS_CACHE": str(tmp_path)})
    assert proc.returncode == 0
    rows = json.loads(proc.stdout)
    assert {r["name"] for r in rows} == {"smollm2-135m", "gemma3-270m"}
    assert not any(r["converted"] for r in rows)


def test_conversion_is_atomic(tmp_path, monkeypatch):
    """A conversion interrupted while writing leaves nothing that loads; a full one loads."""
    import transformers

    tiny = tiny_model("llama", dtype=torch.float32)
    tok = char_tokenizer()
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tok)
    fake_gguf = tmp_path / "fake.gguf"
    fake_gguf.write_bytes(b"GGUF")
    target = tmp_path / "models" / "tiny"

    original = type(tok).save_pretrained

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(tok), "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.convert_gguf(fake_gguf, target, {}, log=lambda m: None)
    assert not target.exists()
    assert list((tmp_path / "models").iterdir()) == []  # no partial directory left behind

    monkeypatch.setattr(type(tok), "save_pretrained", original)
    store.convert_gguf(fake_gguf, target, {"name": "tiny"}, log=lambda m: None)
    assert store.is_converted(target)
    assert json.loads((target / store.MARKER).read_text())["name"] == "tiny"
    monkeypatch.undo()
    adapter = sr.load(str(target))
    ids = adapter.tokenize("abc")
    with torch.no_grad():
        assert torch.allclose(
            adapter.model(input_ids=ids).logits, tiny(input_ids=ids).logits, atol=1e-6
        )


@pytest.mark.parametrize("layer", ["1", "embed"])
def test_cli_inner_layer_json(model_dir, capsys, layer):
    assert (
        main(
            [
                "analyze",
                "Hi there",
                "--model",
                str(model_dir),
                "--layer",
                layer,
                "--positions",
                "last",
                "--eps",
                "0.1",
                "--json",
            ]
        )
        == 0
    )
    doc = json.loads(capsys.readouterr().out)
    (row,) = doc["rows"]
    assert row["layer"] == layer and row["position"] == len("Hi there") - 1
    # inside the network the curve is the logits' Taylor path: near the measured boundary
    assert abs(row["radius_curve"] / row["radius_exact"] - 1) < 0.05
    assert row["radius_relative"] == pytest.approx(row["radius_curve"] / row["activation_norm"])
    agree = abs(row["radius_pade"] / row["radius_curve"] - 1) <= 0.02
    assert row["reliable"] is (row["radius_relative"] <= 0.1 and agree)
    assert (row["unreliable_reason"] == "") is row["reliable"]
    assert (
        row["lambda_max"] > 0
        and row["radius_exact"] not in (None, "inf")
        and row["radius_exact"] > 0
    )
    api = sr.analyze(
        sr.load(str(model_dir)),
        "Hi there",
        eps=[0.1],
        positions="last",
        layer=int(layer) if layer.isdigit() else layer,
    )
    assert row["radius_exact"] == pytest.approx(api.rows[0]["radius_exact"], rel=1e-9)
