"""scripts/device_check.py, the GPU check, kept working between the sessions that have a
GPU: its logic at tiny shapes on the CPU, as a child process with only ``src`` on the path
(as the GPU machine runs it); and a failed check makes it exit 1 with the failure named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
TASKS = {"final_analysis", "inner_position", "certify", "scan", "generate"}


def run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    cmd = [sys.executable, str(ROOT / "scripts" / "device_check.py"), "--small", "--device", "cpu"]
    return subprocess.run(
        [*cmd, "--out", str(out), *extra], env=env, capture_output=True, text=True, timeout=900
    )


def test_device_check_runs_small_on_cpu_and_its_checks_hold(tmp_path):
    out = tmp_path / "device.json"
    done = run(out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1].startswith("device check: 10/10 tasks passed")
    doc = json.loads(out.read_text())
    assert doc["passed"] and [m["model"] for m in doc["models"]] == [
        "llama3-8b-shape",
        "gemma2-9b-shape",
    ]
    for model in doc["models"]:
        assert set(model["tasks"]) == TASKS
        for task in model["tasks"].values():
            assert task["passed"] and all(c["passed"] for c in task["checks"].values())
    llama = doc["models"][0]["tasks"]
    assert llama["inner_position"]["checks"]["lambda_max_vs_float64_suffix"]["value"] < 3e-2
    assert llama["generate"]["checks"]["user_random_state_unchanged"]["value"] == 1.0
    assert "refused_for_a_softcapped_head" in doc["models"][1]["tasks"]["scan"]["checks"]


def test_a_failed_check_exits_1_and_names_it(tmp_path):
    done = run(
        tmp_path / "d.json", "--models", "llama3-8b-shape", "--tolerance", "scan_lambda_max=0"
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1].endswith("failed: llama3-8b-shape/scan")
