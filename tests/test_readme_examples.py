"""The README's Python examples run as written, on the bundled models, in order."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.real_model


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.+?)\n```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_has_python_examples():
    blocks = python_blocks()
    assert len(blocks) >= 2 and all("sr." in b for b in blocks)


def test_readme_python_examples_run_as_written(tmp_path):
    """One script of every block (later blocks use the names the first defines), in an empty
    working directory; the files the examples say they write are there afterwards."""
    script = tmp_path / "readme_examples.py"
    script.write_text("\n\n".join(python_blocks()), encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdin=subprocess.DEVNULL,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for written in (
        "jacobian.png",
        "out/map.json",
        "out/map.png",
        "validation-smollm2/report.html",
    ):
        assert (tmp_path / written).stat().st_size > 0, written
