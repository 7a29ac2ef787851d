"""The command line's thread count on a busy machine (cli.threads): read from /proc/stat,
chosen, given back; the library never changes it."""

from __future__ import annotations

import torch

from stable_regions.cli import main, threads

STAT = """cpu  10 0 10 100 0 0 0 0 0 0
cpu0 {u0} 0 0 {i0} 0 0 0 0 0 0
cpu1 {u1} 0 0 {i1} 5 0 0 0 0 0
intr 1 2 3
"""


def test_cpu_times_are_read_per_cpu(tmp_path):
    path = tmp_path / "stat"
    path.write_text(STAT.format(u0=30, i0=70, u1=50, i1=45))
    assert threads.read_cpu_times(str(path)) == {0: (70, 100), 1: (50, 100)}
    assert threads.read_cpu_times(str(tmp_path / "missing")) == {}


def test_idle_cores_from_two_samples():
    samples = iter(
        [
            {0: (0, 0), 1: (0, 0), 2: (0, 0)},
            {0: (100, 100), 1: (25, 100), 2: (0, 100)},  # idle, a quarter idle, busy
        ]
    )
    idle = threads.idle_cores({0, 1, 5}, read=lambda: next(samples), sample_s=0.0)
    assert idle == 1.25  # cpu 5 is not ours to read; cpu 2 is not ours
    assert threads.idle_cores({0}, read=lambda: {}, sample_s=0.0) is None


def test_threads_chosen():
    assert threads.threads_for("auto", 2, 0.0) == 1
    assert threads.threads_for("auto", 2, 1.4) == 1
    assert threads.threads_for("auto", 2, 1.6) == 2
    assert threads.threads_for("auto", 4, 9.0) == 4  # never more than torch would use
    assert threads.threads_for("auto", 2, None) == 2
    assert threads.threads_for("3", 2, 0.0) == 3


def test_a_busy_machine_gets_fewer_threads_for_the_command_and_the_setting_back(
    monkeypatch, capsys, tmp_path
):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("STABLE_REGIONS_THREADS", raising=False)
    before = torch.get_num_threads()
    seen = []
    monkeypatch.setattr(threads, "idle_cores", lambda cpus: 0.2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    # a command that fails on its input still runs inside the fitted threads, and its error
    # stays one line: the note comes only after long work
    assert main(["analyze", "x", "--eps", "-1"]) == 2
    assert seen == [1, 2]  # one thread for the command, then torch's own setting back
    err = capsys.readouterr().err
    assert "busy" not in err and err.count("\n") == 1
    monkeypatch.setattr(threads, "NOTE_AFTER_S", 0.0)
    seen.clear()
    assert main(["analyze", "x", "--eps", "-1"]) == 2
    assert seen == [1, 2] and "the machine was busy" in capsys.readouterr().err
    monkeypatch.setattr(threads, "NOTE_AFTER_S", 10.0)
    seen.clear()
    monkeypatch.setenv("STABLE_REGIONS_THREADS", "2")
    assert main(["analyze", "x", "--eps", "-1"]) == 2
    assert seen == [2, 2] and "busy" not in capsys.readouterr().err
    seen.clear()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert main(["analyze", "x", "--eps", "-1"]) == 2
    assert seen == []  # the user's OpenMP setting decides
    monkeypatch.undo()
    assert torch.get_num_threads() == before


def test_progress_off_a_terminal_speaks_while_a_stage_runs_and_estimates_the_rest(monkeypatch):
    """A log gets a line at least every HEARTBEAT_S even inside one long stage, and counted
    work says how long the rest should take."""
    import io
    import time as clock

    from rich.console import Console

    from stable_regions.cli import console

    monkeypatch.setattr(console, "HEARTBEAT_S", 0.2)
    out = io.StringIO()
    err = Console(file=out, force_terminal=False, width=200)
    with console.progress(err, "mapping") as (tick, stage):
        tick(1, 4)
        stage("curvature")
        clock.sleep(1.3)  # one long stage: heartbeats, no tick
        tick(4, 4)
    lines = out.getvalue().splitlines()
    beats = [x for x in lines if x.startswith("mapping (curvature): 1/4")]
    assert len(beats) >= 4, lines  # the stage's own line, then one every 0.2-0.3 s
    assert "s left" in beats[0]
    assert lines[-1].startswith("mapping (curvature): 4/4") and "left" not in lines[-1]
