"""scripts/device_check.py, the GPU run of issue 15, kept working between the sessions that
have a GPU: its logic at tiny shapes on the CPU, as a child process with only ``src`` on the
path (as the GPU machine runs it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_device_check_runs_small_on_cpu_and_its_checks_hold(tmp_path):
    out = tmp_path / "device.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    cmd = [sys.executable, str(ROOT / "scripts" / "device_check.py"), "--small", "--device", "cpu"]
    done = subprocess.run(
        [*cmd, "--out", str(out)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert [m["model"] for m in doc["models"]] == ["llama3-8b-shape", "gemma2-9b-shape"]
    for model in doc["models"]:
        tasks = model["tasks"]
        assert tasks["final_analysis"]["lambda_max_rel_err_vs_float64"] < 1e-4
        assert tasks["inner_position"]["lambda_max_rel_err_vs_float64"] < 1e-2
        certify = tasks["certify"]
        assert certify["violations"] == 0
        assert certify["worst_kl_over_eps_at_certified_radius"] <= 1.0
        assert set(tasks) == {"final_analysis", "inner_position", "certify", "scan"}
    assert "refused" in doc["models"][1]["tasks"]["scan"]  # the softcapped head
