"""What a new user hit on the command line, each fixed: output paths checked before any
model is loaded, bad prompts and prompt files, resume without a run, tables that fit an
80-column terminal, --version, --columns, --csv, hook names as layers."""

from __future__ import annotations

import io
import json

import pandas as pd
import pytest
from conftest import saved_tiny_model

from stable_regions.cli import main

MISSING_MODEL = "/nonexistent/model-dir"  # an output check that runs first never gets here


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(saved_tiny_model(tmp_path_factory.mktemp("front") / "tiny", seed=2))


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["analyze", "Hi", "--html", "/proc/x.html"], "cannot write '/proc/x.html'"),
        (["analyze", "Hi", "--html", "{tmp}/out.txt"], "ending in .html"),
        (["generate", "Hi", "--html", "/proc/g.html"], "cannot write '/proc/g.html'"),
        (["certify", "Hi", "--plot", "/proc/p.png"], "cannot write '/proc/p.png'"),
        (["map", "Hi", "--out", "/proc/mapdir"], "cannot write '/proc/mapdir'"),
        (["map", "Hi", "--out", "{tmp}/file.txt"], "is a file"),
        (
            [
                "steer",
                "Hi",
                "--layer",
                "1",
                "--vector",
                "{tmp}/v.npy",
                "--save-vector",
                "/proc/v.npy",
            ],
            "cannot write '/proc/v.npy'",
        ),
        (
            ["validate", "--prompts", "{tmp}/p.txt", "--out", "/proc/run"],
            "cannot write '/proc/run'",
        ),
        (["scan", "{tmp}/p.txt", "--out", "{tmp}/new", "--resume"], "holds no run to continue"),
        (
            ["validate", "--prompts", "{tmp}/p.txt", "--out", "{tmp}/new", "--resume"],
            "holds no run to continue",
        ),
    ],
)
def test_output_paths_are_checked_before_the_model_loads(argv, needle, tmp_path, capsys):
    import numpy as np

    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "p.txt").write_text("one prompt\n")
    np.save(tmp_path / "v.npy", np.ones(8))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv] + ["--model", MISSING_MODEL]
    code, _, err = run(capsys, *argv)
    assert code == 2 and err.count("\n") == 1, err
    assert needle in err and "not found" not in err, err  # the model was never looked for


def test_resume_flag_names_the_cli_option(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("one prompt\n")
    code, _, err = run(capsys, "scan", tmp_path / "p.txt", "--out", tmp_path / "new", "--resume")
    assert code == 2 and "--resume" in err and "resume=True" not in err


def test_bad_prompts_and_prompt_files_are_one_line(model_dir, tmp_path, capsys):
    undecodable = b"caf\xe9".decode("utf-8", "surrogateescape")  # what a shell passes through
    code, _, err = run(capsys, "analyze", undecodable, "--model", model_dir, "--no-exact")
    assert code == 2 and "not valid UTF-8" in err and err.count("\n") == 1
    folder = tmp_path / "prompts"
    folder.mkdir()
    code, _, err = run(capsys, "validate", "--prompts", folder, "--model", model_dir)
    assert code == 2 and "is a directory" in err
    code, _, err = run(capsys, "scan", folder, "--model", model_dir, "--out", tmp_path / "s")
    assert code == 2 and "is a folder" in err


def test_version(capsys):
    from importlib import metadata

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"stable-regions {metadata.version('stable-regions')}"


def test_default_tables_fit_an_80_column_terminal(model_dir, capsys, monkeypatch):
    """On a terminal of 80 columns the default table keeps every column and every number
    whole (no ellipsis), and its lines fit."""
    from rich.console import Console

    from stable_regions.cli import tables

    buffer = io.StringIO()
    monkeypatch.setattr(
        tables, "console", lambda stderr=False: Console(file=buffer, width=80, force_terminal=False)
    )
    argv = ["analyze", "The cat sat on the mat", "--model", model_dir, "--eps", "0.01", "1"]
    assert main([*argv, "--positions", "0,-1"]) == 0
    capsys.readouterr()
    text = buffer.getvalue()
    table = text.split("\n\n")[0] if "\n\n" in text else text
    lines = [line for line in text.splitlines() if "│" in line or "radius_curve" in line]
    header = next(line for line in text.splitlines() if "radius_curve" in line)
    for name in (
        "position",
        "token",
        "next_token",
        "eps",
        "radius_curve",
        "radius_exact",
        "reliable",
    ):
        assert name in header, (name, header)
    assert "…" not in table
    assert all(
        len(line) <= 80
        for line in text.splitlines()
        if not line.startswith(" ") or "radius" in line
    )
    assert lines


def test_columns_and_csv_use_the_frames_names(model_dir, capsys):
    argv = ["analyze", "The cat", "--model", model_dir, "--eps", "0.1", "--positions", "last"]
    code, out, _ = run(capsys, *argv, "--csv")
    assert code == 0
    frame = pd.read_csv(io.StringIO(out))
    code, out, _ = run(capsys, *argv, "--json")
    doc = json.loads(out)
    assert list(frame.columns) == list(doc["rows"][0])
    code, out, _ = run(capsys, *argv, "--columns", "token,lambda_max,radius_pade")
    header = next(line for line in out.splitlines() if "lambda_max" in line)
    assert header.split() == ["token", "lambda_max", "radius_pade"]
    code, _, err = run(capsys, *argv, "--columns", "token,radius_corrected")
    assert code == 2 and "radius_corrected" in err


def test_hook_names_are_layers(model_dir, capsys):
    argv = ["analyze", "The cat", "--model", model_dir, "--eps", "0.1", "--positions", "last"]
    by_index = json.loads(run(capsys, *argv, "--layer", "1", "--json", "--no-exact")[1])
    by_hook = json.loads(
        run(capsys, *argv, "--layer", "blocks.1.hook_resid_post", "--json", "--no-exact")[1]
    )
    by_pre = json.loads(
        run(capsys, *argv, "--layer", "blocks.2.hook_resid_pre", "--json", "--no-exact")[1]
    )
    assert by_index["layer"] == by_hook["layer"] == by_pre["layer"] == "1"
    assert by_index["rows"][0]["radius_curve"] == by_hook["rows"][0]["radius_curve"]
    assert by_index["rows"][0]["radius_curve"] == by_pre["rows"][0]["radius_curve"]


def test_a_prompt_file_for_analyze_and_certify(model_dir, tmp_path, capsys):
    """Each prompt in turn, with the same rows as one call per prompt."""
    (tmp_path / "p.txt").write_text("The cat sat\nHello\\nthere\n")
    common = ["--model", model_dir, "--eps", "0.1", "--positions", "last"]
    code, out, _ = run(
        capsys, "analyze", "--prompts", tmp_path / "p.txt", *common, "--no-exact", "--json"
    )
    docs = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [d["prompt"] for d in docs] == ["The cat sat", "Hello\nthere"]
    alone = json.loads(run(capsys, "analyze", "Hello\nthere", *common, "--no-exact", "--json")[1])
    assert docs[1]["rows"] == alone["rows"]
    code, out, _ = run(capsys, "certify", "--prompts", tmp_path / "p.txt", *common, "--csv")
    frame = pd.read_csv(io.StringIO(out))
    assert code == 0 and frame.columns[0] == "prompt_id" and set(frame.prompt_id) == {0, 1}
    code, _, err = run(capsys, "analyze", "--model", model_dir)
    assert code == 2 and "--prompts FILE" in err


TEMPLATE = (
    "{% for m in messages %}Q: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}A:{% endif %}"
)


def test_chat_puts_the_prompt_in_the_template(tmp_path, capsys):
    """``chat=True`` (``--chat``) analyses the templated tokens, assistant turn opened, as
    the tokenizer's own ``apply_chat_template`` gives them; a tokenizer without a template
    is one line."""
    import torch
    from conftest import char_tokenizer, tiny_model

    import stable_regions as sr
    from stable_regions.errors import InvalidParameterError

    tokenizer = char_tokenizer()
    model = tiny_model("llama", seed=2, dtype=torch.float32)
    plain = sr.wrap(model, tokenizer)
    with pytest.raises(InvalidParameterError, match="no chat template"):
        sr.analyze(plain, "Hi", eps=0.1, chat=True)
    tokenizer.chat_template = TEMPLATE
    adapter = sr.wrap(model, tokenizer)
    result = sr.analyze(adapter, "Hi", eps=0.1, chat=True, exact=False)
    assert "".join(result.to_frame().token) == "Q: Hi\nA:"
    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True
    )
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert adapter.tokenize("Hi", chat=True)[0].tolist() == list(expected)
    generated = sr.generate(adapter, "Hi", max_new_tokens=2, chat=True)
    assert len(generated.frame.step.unique()) == 2
    folder = tmp_path / "chat-model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    argv = ["analyze", "Hi", "--model", folder, "--eps", "0.1", "--no-exact", "--chat", "--json"]
    code, out, _ = run(capsys, *argv)
    assert code == 0 and "".join(r["token"] for r in json.loads(out)["rows"]) == "Q: Hi\nA:"
