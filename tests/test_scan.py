"""Corpus scans: windows, per-position results against each window's own forward pass and a
dense float64 eigendecomposition, resuming, and the command line."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from conftest import char_tokenizer, tiny_model

import stable_regions as sr
from stable_regions.cli import main
from stable_regions.geometry import FisherOperator, RayCurve, radius_pade
from stable_regions.prompts import Prompt, read_documents
from stable_regions.studies.scan import document_windows, scan_corpus

DOCS = [
    Prompt("a", "the quick brown fox jumps over the lazy dog"),
    Prompt("b", "pack my box with five dozen liquor jugs"),
    Prompt("c", "hi"),
]


@pytest.fixture(scope="module")
def adapter():
    return sr.wrap(tiny_model("llama", seed=4, dtype=torch.float32), char_tokenizer(), name="tiny")


@pytest.mark.parametrize(
    "n, window, overlap", [(1, 8, 3), (8, 8, 3), (9, 8, 3), (40, 8, 3), (40, 5, 0)]
)
def test_windows_report_every_position_once_with_context(n, window, overlap):
    reported = []
    for start, stop, first in document_windows(n, window, overlap):
        assert 0 < stop - start <= window
        assert first == start if start == 0 else first - start == overlap
        reported += range(first, stop)
    assert reported == list(range(n))


@pytest.mark.parametrize("window, overlap", [(1, 0), (8, 8), (8, -1)])
def test_bad_window_sizes_fail(window, overlap):
    with pytest.raises(sr.StableRegionsError, match="window"):
        document_windows(10, window, overlap)


def test_scan_matches_each_window_forward_and_dense_float64(adapter, tmp_path):
    eps = [0.01, 0.1]
    run = scan_corpus(adapter, DOCS, out=tmp_path / "scan", eps=eps, window=12, overlap=4)
    frame = run.frame
    assert list(frame.doc_id.unique()) == ["a", "b", "c"]
    for doc in DOCS:
        ids = adapter.tokenize(doc.text, any_length=True)
        rows = frame[frame.doc_id == doc.id]
        assert sorted(rows.position.unique()) == list(range(ids.shape[1]))
        assert len(rows) == ids.shape[1] * len(eps)
        for start, stop, first in document_windows(ids.shape[1], 12, 4):
            # the reference: this window run alone, its float64 head, a dense eigendecomposition
            h = adapter.prelogits(ids[:, start:stop])[first - start :]
            op = FisherOperator.from_head(adapter.head, h)
            lam_all, vec_all = torch.linalg.eigh(op.dense())
            lam, v = lam_all[:, -1], vec_all[:, :, -1]
            p = op.p
            got = rows[rows.position.between(first, stop - 1)]
            for e in eps:
                g = got[got.eps == e].sort_values("position")
                torch.testing.assert_close(
                    torch.tensor(g.next_prob.values), p.max(-1).values, rtol=1e-5, atol=0
                )
                entropy = -(p * p.log()).sum(-1)
                torch.testing.assert_close(
                    torch.tensor(g.entropy.values), entropy, rtol=1e-4, atol=1e-7
                )
                assert g.next_token.tolist() == adapter.token_strings(p.argmax(-1))
                torch.testing.assert_close(
                    torch.tensor(g.lambda_max.values), lam, rtol=1e-2, atol=0
                )
                both = []
                for sign in (1.0, -1.0):
                    c2, c3, c4 = RayCurve.from_head(adapter.head, h, sign * v).coefficients()
                    both.append(radius_pade(c2, c3, e, c4))
                torch.testing.assert_close(
                    torch.tensor(g.radius_pade.values), torch.minimum(*both), rtol=2e-2, atol=0
                )
                torch.testing.assert_close(
                    torch.tensor(g.radius_quadratic.values),
                    (2 * e / torch.tensor(g.lambda_max.values)).sqrt(),
                )
    summary = json.loads((tmp_path / "scan" / "summary.json").read_text())
    assert [d["doc_id"] for d in summary["documents"]] == ["a", "b", "c"]
    for d in summary["documents"]:
        rows = frame[(frame.doc_id == d["doc_id"]) & (frame.eps == 0.01)]
        assert d["min_radius_pade"] == rows.radius_pade.min()
    assert (tmp_path / "scan" / "radius.png").stat().st_size > 0
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "scan" / "results.parquet"), frame)


def test_an_interrupted_scan_resumes_without_redoing_finished_documents(adapter, tmp_path):
    first_doc_tokens = adapter.tokenize(DOCS[0].text).shape[1]

    def interrupt(done: int, total: int) -> None:
        if done > first_doc_tokens:
            raise KeyboardInterrupt

    out = tmp_path / "scan"
    with pytest.raises(KeyboardInterrupt):
        scan_corpus(adapter, DOCS, out=out, window=12, overlap=4, progress=interrupt)
    part = out / "parts" / "00000.parquet"
    assert part.exists() and not (out / "parts" / "00001.parquet").exists()
    stamp = part.stat().st_mtime_ns
    with pytest.raises(sr.StableRegionsError, match="unfinished run"):
        scan_corpus(adapter, DOCS, out=out, window=12, overlap=4)
    with pytest.raises(sr.StableRegionsError, match="different settings"):
        scan_corpus(adapter, DOCS, out=out, window=10, overlap=4, resume=True)
    resumed = scan_corpus(adapter, DOCS, out=out, window=12, overlap=4, resume=True)
    assert part.stat().st_mtime_ns == stamp
    fresh = scan_corpus(adapter, DOCS, out=tmp_path / "fresh", window=12, overlap=4)
    pd.testing.assert_frame_equal(resumed.frame, fresh.frame)


def test_duplicate_document_ids_fail_before_any_work(adapter, tmp_path):
    with pytest.raises(sr.StableRegionsError, match="appears twice"):
        scan_corpus(adapter, [DOCS[0], DOCS[0]], out=tmp_path / "scan")
    assert not (tmp_path / "scan").exists()


def test_documents_from_text_and_jsonl_files(tmp_path):
    (tmp_path / "one.txt").write_text("line one\nline two\n", encoding="utf-8")
    (tmp_path / "many.jsonl").write_text('{"text": "x"}\n{"id": "k", "text": "y"}\n')
    docs = read_documents([tmp_path / "one.txt", tmp_path / "many.jsonl"])
    assert [d.text for d in docs] == ["line one\nline two\n", "x", "y"]
    assert docs[2].id.endswith("many.jsonl:k")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(sr.StableRegionsError, match="empty"):
        read_documents([tmp_path / "empty.txt"])
    with pytest.raises(sr.StableRegionsError, match="twice"):
        read_documents([tmp_path / "one.txt", tmp_path / "one.txt"])


def test_cli_scan_writes_results_and_lists_fragile_positions(tmp_path, capsys):
    model_dir = tmp_path / "tiny-llama"
    tiny_model("llama", seed=4, dtype=torch.float32).save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    doc = tmp_path / "doc.txt"
    doc.write_text(DOCS[0].text, encoding="utf-8")
    out = tmp_path / "out"
    args = ["scan", str(doc), "--model", str(model_dir), "--out", str(out), "--window", "16"]
    assert main([*args, "--top", "3"]) == 0
    printed = capsys.readouterr().out
    assert "3 most fragile positions" in printed
    assert str(out / "results.parquet") in printed
    frame = pd.read_parquet(out / "results.parquet")
    assert len(frame) == len(char_tokenizer()(DOCS[0].text)["input_ids"])  # one eps: 0.1
    assert set(frame.eps) == {0.1}
    assert main(args) == 2  # the scan is there: --resume or another --out
    assert "pass --resume" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--window", "1"], "window"),
        (["--overlap", "2000"], "overlap"),
        (["--eps", "0"], "eps must be"),
    ],
)
def test_cli_scan_bad_input_is_one_line(tmp_path, capsys, args, message):
    doc = tmp_path / "doc.txt"
    doc.write_text("hello", encoding="utf-8")
    assert main(["scan", str(doc), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_cli_scan_missing_document_fails_before_loading(tmp_path, capsys):
    assert main(["scan", str(tmp_path / "nope.txt"), "--model", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "document" in err and "nope.txt not found" in err  # not the missing model
