"""Models by Hugging Face Hub id, from a real cache layout (``models--org--name/`` with
``blobs/``, ``snapshots/<commit>/`` of links into them and ``refs/<name>``), offline; and each
bad input is one line, exit 2, nothing written."""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest
import torch
from conftest import char_tokenizer, tiny_model

import stable_regions as sr
from stable_regions.cli import main
from stable_regions.errors import ModelNotInstalledError, StableRegionsError

pytestmark = pytest.mark.low_end  # CI runs these at both ends of the ranges

MAIN = "a" * 40
TAGGED = "b" * 40


def cache_model(cache, repo_id: str, commit: str, seed: int, refs=("main",), pickle=False):
    """``repo_id`` at ``commit`` in a Hugging Face cache, as huggingface_hub lays it out."""
    folder = cache / ("models--" + repo_id.replace("/", "--"))
    staging = cache.parent / f"staging-{commit[:6]}"
    model = tiny_model("llama", seed=seed, dtype=torch.float32)
    model.save_pretrained(staging)
    char_tokenizer().save_pretrained(staging)
    if pickle:
        state = model.state_dict()
        (staging / "model.safetensors").unlink()
        torch.save(state, staging / "pytorch_model.bin")
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (folder / "blobs").mkdir(exist_ok=True)
    for file in staging.iterdir():
        blob = folder / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    shutil.rmtree(staging)
    (folder / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (folder / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub(tmp_path, monkeypatch):
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    cache_model(cache, "someone/tiny-llama", MAIN, seed=1)
    cache_model(cache, "someone/tiny-llama", TAGGED, seed=2, refs=("v1",))
    return cache


def one_line_exit_2(code: int, err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], err


def test_a_cached_hub_id_loads_offline_at_each_revision(hub):
    main_model = sr.load("someone/tiny-llama", device="cpu")
    assert main_model.name == "someone/tiny-llama"
    direct = sr.wrap(tiny_model("llama", seed=1, dtype=torch.float32), char_tokenizer())
    for seed, revision in [(1, None), (1, "main"), (2, "v1"), (2, TAGGED)]:
        model = sr.load("someone/tiny-llama", revision=revision, device="cpu")
        expected = tiny_model("llama", seed=seed, dtype=torch.float32).lm_head.weight
        torch.testing.assert_close(model.unembed.weight, expected, rtol=0, atol=0)
    ours = sr.analyze(main_model, "Hello", eps=[0.1], positions="last").to_frame()
    theirs = sr.analyze(direct, "Hello", eps=[0.1], positions="last").to_frame()
    assert ours.radius_exact.iloc[0] == pytest.approx(theirs.radius_exact.iloc[0], rel=1e-5)


def test_the_cache_is_found_where_huggingface_hub_looks(tmp_path, monkeypatch):
    home = tmp_path / "home"
    cache_model(home / "hub", "org/m", MAIN, seed=1)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    assert sr.load("org/m", device="cpu").vocab_size == 128
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cache_model(tmp_path / "xdg" / "huggingface" / "hub", "org/x", MAIN, seed=1)
    assert sr.load("org/x", device="cpu").vocab_size == 128


def test_the_cli_takes_a_hub_id_and_a_revision(hub, capsys):
    assert (
        main(
            [
                "analyze",
                "Hi",
                "--model",
                "someone/tiny-llama",
                "--revision",
                "v1",
                "--no-exact",
                "--json",
            ]
        )
        == 0
    )
    assert '"radius_curve"' in capsys.readouterr().out


def test_a_hub_id_not_in_the_cache_is_one_line(hub, capsys):
    code = main(["analyze", "Hi", "--model", "someone/missing"])
    one_line_exit_2(
        code,
        capsys.readouterr().err,
        "not in the Hugging Face cache",
        str(hub),
        "stable-regions models download someone/missing",
    )
    with pytest.raises(ModelNotInstalledError):
        sr.load("someone/missing")


def test_an_unknown_revision_is_one_line_naming_the_cached_ones(hub, capsys):
    code = main(["analyze", "Hi", "--model", "someone/tiny-llama", "--revision", "v9"])
    one_line_exit_2(code, capsys.readouterr().err, "revision 'v9'", "main, v1")
    code = main(["analyze", "Hi", "--model", "someone/tiny-llama", "--revision", "c" * 40])
    one_line_exit_2(code, capsys.readouterr().err, "not in the Hugging Face cache")


def test_a_snapshot_with_pickle_weights_only_is_refused(hub, capsys):
    cache_model(hub, "someone/pickled", MAIN, seed=1, pickle=True)
    code = main(["analyze", "Hi", "--model", "someone/pickled"])
    one_line_exit_2(code, capsys.readouterr().err, "pickle weights")


def test_download_offline_is_one_line_and_leaves_nothing(hub, capsys, monkeypatch):
    before = sorted(p.name for p in hub.iterdir())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["analyze", "Hi", "--model", "someone/elsewhere", "--download"])
    one_line_exit_2(code, capsys.readouterr().err, "HF_HUB_OFFLINE")
    # no network (a closed local port as the Hub): refused, and no half-made folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    code = main(["models", "download", "someone/elsewhere"])
    one_line_exit_2(code, capsys.readouterr().err, "could not download someone/elsewhere")
    assert sorted(p.name for p in hub.iterdir()) == before


def test_revision_and_download_apply_to_hub_ids_only(hub, tmp_path, capsys):
    with pytest.raises(StableRegionsError, match="Hub id"):
        sr.load("smollm2-135m", revision="main")
    with pytest.raises(StableRegionsError, match="Hub id"):
        sr.load(str(tmp_path), download=True)
    code = main(["models", "download", "not-a-hub-id"])
    one_line_exit_2(code, capsys.readouterr().err, "not a Hub id")
