"""The examples run as written, on the bundled models: the README's and the quickstart's
Python blocks (each page's blocks in order, as one script) and every script in examples/."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.real_model, pytest.mark.slow]
PAGES = [
    "README.md",
    "docs/quickstart.md",
    "docs/index.md",
    "docs/how-to/scan.md",
    "docs/monitor.md",
    "docs/certify.md",
    "docs/iso-kl.md",
]
# pages whose blocks run with one line replaced: the local model directory they name
LOCAL_MODEL = 'path = "/models/Llama-3.2-1B"                      # a local model directory'
SUBSTITUTED = {"docs/wrappers.md": LOCAL_MODEL}
# pages whose blocks cannot run here, and why
NOT_RUN = {
    "docs/gpu.md": "it loads a 7B model on CUDA from the Hub",
    "docs/steering-libraries.md": "it saves a vector trained by another library",
    "docs/vllm.md": "it needs vLLM, in its own environment: tests/serving_check.py makes the "
    "same calls there (tests/test_vllm.py)",
}


def python_blocks(page: str | Path) -> list[str]:
    return re.findall(r"```python\n(.+?)\n```", (ROOT / page).read_text(), flags=re.S)


def run_script(script: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(script)],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"},
        stdin=subprocess.DEVNULL,
        timeout=1200,
    )


def test_every_python_block_in_the_docs_runs_or_says_why_not():
    pages = {str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md") if python_blocks(p)}
    assert pages <= set(PAGES) | set(SUBSTITUTED) | set(NOT_RUN), sorted(pages)


@pytest.mark.wrappers
def test_wrapper_page_runs_on_the_bundled_model_directory(tmp_path):
    from stable_regions.models.store import model_dir

    page = "docs/wrappers.md"
    text = "\n\n".join(python_blocks(page))
    assert text.count(LOCAL_MODEL) == 1
    script = tmp_path / "page.py"
    script.write_text(text.replace(LOCAL_MODEL, f"path = {str(model_dir('smollm2-135m'))!r}"))
    proc = run_script(script, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_pages_have_python_examples():
    for page in PAGES:
        blocks = python_blocks(page)
        assert blocks and "sr." in blocks[0], page


@pytest.mark.parametrize("page", PAGES)
def test_page_examples_run_as_written(page, tmp_path):
    """One script of a page's blocks (later blocks use the names the first defines), in an
    empty working directory."""
    script = tmp_path / "page.py"
    script.write_text("\n\n".join(python_blocks(page)), encoding="utf-8")
    proc = run_script(script, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if page == "docs/quickstart.md":
        for name in ("analyze.json", "analyze.parquet", "analyze.png"):
            assert (tmp_path / "analysis" / name).stat().st_size > 0, name


@pytest.mark.parametrize("script", sorted((ROOT / "examples").glob("*.py")), ids=lambda p: p.name)
def test_examples_run(script, tmp_path):
    proc = run_script(script, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip()
