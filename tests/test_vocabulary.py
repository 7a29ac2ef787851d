"""One name per concept: every study writes only columns the vocabulary defines, the same
column carries the same number wherever two studies compute it, and files written under
earlier names still read."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import char_tokenizer, saved_tiny_model, tiny_model

import stable_regions as sr
from stable_regions.calibration import Calibration
from stable_regions.cli import main
from stable_regions.studies.scan import scan_corpus
from stable_regions.studies.validation import RESULT_COLUMNS
from stable_regions.vocabulary import (
    COLUMNS,
    FORMS,
    RENAMED,
    OldNamesWarning,
    check_known,
    markdown,
    upgrade,
)

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The cat sat on the mat"


@pytest.fixture(scope="module")
def adapter():
    return sr.wrap(tiny_model("llama", seed=3), char_tokenizer(), name="tiny")


def test_docs_column_page_is_generated_from_the_vocabulary():
    page = (ROOT / "docs" / "columns.md").read_text(encoding="utf-8")
    assert page == markdown(), (
        "regenerate docs/columns.md from stable_regions.vocabulary.markdown()"
    )
    for form in FORMS:
        assert f"`radius_{form}`" in page and f"`coef_{form}`" in page


def test_no_two_columns_share_a_name_and_renames_point_to_todays_names():
    names = [c.name for c in COLUMNS.values()]
    assert len(names) == len(set(names))
    for study, renames in RENAMED.items():
        for old, new in renames.items():
            if study == "forms":
                assert new in FORMS and old not in FORMS
            else:
                # an old name may mean something else today (analyze's ``norm`` was the
                # activation's norm; certify's ``norm`` is the ball's): renames are per study
                assert new in COLUMNS and old != new, (study, old)


def test_every_study_writes_only_defined_columns_with_their_meanings(adapter, tmp_path):
    vector = torch.randn(adapter.d_resid, generator=torch.Generator().manual_seed(0))
    frames = {
        "analyze final": sr.analyze(adapter, PROMPT, eps=[0.1], positions="last").to_frame(),
        "analyze block": sr.analyze(
            adapter, PROMPT, eps=[0.1], positions="last", layer=1
        ).to_frame(),
        "certify": sr.certify(adapter, PROMPT, eps=[0.1], positions="last").to_frame(),
        "steer": sr.steering_budget(adapter, PROMPT, vector=vector, layer=1, eps=[0.1]).to_frame(),
        "steer summary": sr.steering_budget(
            adapter, PROMPT, vector=vector, layer=1, eps=[0.1], exact=False
        ).summary(),
        "generate": sr.generate(adapter, "Hi", max_new_tokens=2).frame,
        "scan": scan_corpus(adapter, [PROMPT], out=tmp_path / "scan").frame,
        "jacobian": sr.jacobian_profile(adapter, PROMPT, k=1).to_frame(),
    }
    for name, frame in frames.items():
        check_known(frame.columns)
        if name != "steer summary":
            assert set(frame.attrs["columns"]) == set(frame.columns), name
    check_known(RESULT_COLUMNS)
    summary = json.loads((tmp_path / "scan" / "summary.json").read_text())
    check_known(summary["documents"][0])
    with pytest.raises(KeyError, match="radius_corrected"):
        check_known(["radius_corrected"])


def test_the_same_column_is_the_same_number_in_every_study(adapter, tmp_path):
    """``radius_curve`` of the last position: analyze (float64, the exact root along the top
    eigenvector) and the exact-mode monitor of generate (its first step sees the same
    distribution; its float32 search finds the direction to ~1e-3 in the radius). At eps 1
    and 2 the Pade form differs from the curve by 2-13% here, so a column that meant the Pade
    form in one study and the curve in the other would fail. ``radius_pade`` and
    ``lambda_max``: analyze and a scan (float32 search)."""
    eps = [1.0, 2.0]
    res = sr.analyze(adapter, PROMPT, eps=eps, positions="last", exact=False).to_frame()
    assert ((res.radius_pade / res.radius_curve - 1).abs() > 0.02).all()
    steps = sr.generate(
        adapter, PROMPT, max_new_tokens=1, eps=eps, mode="exact", eig_tol=1e-7
    ).frame
    for col, rtol in (("radius_curve", 5e-3), ("lambda_max", 1e-4), ("next_prob", 1e-6)):
        np.testing.assert_allclose(steps[col], res[col], rtol=rtol, err_msg=col)
    scan = scan_corpus(adapter, [PROMPT], out=tmp_path / "s", eps=eps).frame
    last = scan[scan.position == res.position.iloc[0]]
    # the scan's search direction is good to ~3e-3 in the Pade radius here: far from the
    # 2-13% a different form would differ by
    for col in ("radius_pade", "lambda_max", "radius_quadratic"):
        np.testing.assert_allclose(last[col], res[col], rtol=1e-2, err_msg=col)


def test_a_calibration_written_under_earlier_names_reads_the_same(tmp_path):
    from stable_regions.calibration import load_calibration

    bundled = ROOT / "src" / "stable_regions" / "calibrators" / "smollm2-135m-final.json"
    doc = json.loads(bundled.read_text())
    old = json.loads(json.dumps(doc))
    for band in old["bands"]:
        band["feature"] = band["feature"].replace("pade", "corrected").replace("curve", "taylor")
    assert any("corrected" in b["feature"] for b in old["bands"])
    (tmp_path / "old.json").write_text(json.dumps(old))
    with pytest.warns(OldNamesWarning, match="corrected"):
        then = load_calibration(tmp_path / "old.json")
    now = Calibration.from_json(doc)
    x = np.geomspace(0.01, 10, 7)
    for band in now.bands:
        args = (band.eps, x, 1.1 * x, np.full_like(x, 2.0), 0.9 * x)
        np.testing.assert_array_equal(then.predict(*args), now.predict(*args))


def test_a_scan_written_under_earlier_names_resumes_under_todays(adapter, tmp_path):
    docs = [PROMPT, "hello there"]
    out = tmp_path / "scan"
    fresh = scan_corpus(adapter, docs, out=tmp_path / "fresh").frame
    scan_corpus(adapter, docs, out=out)
    part = out / "parts" / "00000.parquet"
    pd.read_parquet(part).rename(columns={"radius_pade": "radius_corrected"}).to_parquet(part)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.warns(OldNamesWarning, match="radius_corrected -> radius_pade"):
        again = scan_corpus(adapter, docs, out=out, resume=True).frame
    pd.testing.assert_frame_equal(again, fresh)


def test_upgrade_leaves_todays_frames_alone_and_renames_old_ones():
    today = pd.DataFrame({"radius_pade": [1.0], "radius_exact": [2.0]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert upgrade(today, "validate") is today
    old = pd.DataFrame({"corrected": [1.0], "empirical": [2.0], "taylor": [3.0]})
    with pytest.warns(OldNamesWarning):
        new = upgrade(old, "validate")
    assert list(new.columns) == ["radius_pade", "radius_exact", "radius_curve"]


def test_the_cli_prints_an_old_names_warning_as_one_note(tmp_path, capsys):
    model = saved_tiny_model(tmp_path / "m")
    sr.validate(
        sr.load(str(model)),
        ["The cat sat.", "A dog ran.", "Hi you."],
        out=tmp_path / "v",
        eps=[0.1],
    )
    path = tmp_path / "v" / "calibration-final.json"
    doc = json.loads(path.read_text())
    for band in doc["bands"]:
        band["feature"] = "corrected"  # what an earlier version called the Pade form
    path.write_text(json.dumps(doc))
    argv = ["analyze", "The cat", "--model", str(model), "--eps", "0.1", "--no-exact"]
    assert main([*argv, "--calibration", str(path), "--json"]) == 0
    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "'pade'" in notes[0], captured.err
    assert json.loads(captured.out)["rows"]
