"""The generation monitor against independent references: a dense eigendecomposition of the
curvature under teacher forcing, brute-force KL along rays, the argmax flip by moving the
real pre-logit vector, and the same sequences generated one at a time."""

from __future__ import annotations

import json
import math
import threading

import numpy as np
import pytest
import torch
from conftest import char_tokenizer, tiny_model
from transformers import LogitsProcessor

import stable_regions as sr
from stable_regions.cli import main
from stable_regions.errors import StableRegionsError

PROMPTS = ["The capital of France is", "Once upon a time, in a small"]
EPS = [0.01, 0.1, 1.0]


@pytest.fixture(scope="module")
def smollm():
    return sr.load()


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model("llama", seed=3)
    # eager attention in transformers 5.24 turns left-padded rows into NaN; SDPA does not
    model.set_attn_implementation("sdpa")
    return sr.wrap(model, char_tokenizer(), name="tiny-llama")


def teacher_forced(adapter, prompt: str, frame) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 pre-logit vectors and logits of the positions that produced each generated
    token, from one forward pass over prompt + generated tokens."""
    steps = frame.drop_duplicates("step").sort_values("step")
    prompt_ids = adapter.tokenize(prompt)
    new = torch.tensor(steps["chosen_token_id"].tolist())[None]
    ids = torch.cat([prompt_ids, new], 1)
    with torch.no_grad():
        out = adapter.model(ids, output_hidden_states=True)
    n0 = prompt_ids.shape[1]
    h = out.hidden_states[-1][0, n0 - 1 : n0 - 1 + new.shape[1]].to(torch.float64)
    logits = out.logits[0, n0 - 1 : n0 - 1 + new.shape[1]].to(torch.float64)
    return h, logits


def dense_top(W: torch.Tensor, p: torch.Tensor) -> tuple[float, torch.Tensor]:
    mu = p @ W
    H = W.T @ (p[:, None] * W) - torch.outer(mu, mu)
    values, vectors = torch.linalg.eigh(H)
    return float(values[-1]), vectors[:, -1]


def kl_along(z: torch.Tensor, b: torch.Tensor, t: float) -> float:
    logp = torch.log_softmax(z, -1)
    logq = torch.log_softmax(z + t * b, -1)
    return float((logp.exp() * (logp - logq)).sum())


def bisect_root(z, b, eps, hi=1.0) -> float:
    """First crossing of eps along z + t b by a scan and bisection (no CGF, no Newton)."""
    t_prev, t = 0.0, hi / 64
    while kl_along(z, b, t) < eps:
        t_prev, t = t, t * 1.25
        assert t < 1e6
    lo, hi = t_prev, t
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if kl_along(z, b, mid) < eps else (lo, mid)
    return hi


@pytest.mark.real_model
def test_exact_mode_equals_dense_recomputation_under_teacher_forcing(smollm):
    texts, frame = sr.generate(smollm, PROMPTS, max_new_tokens=4, eps=EPS, mode="exact")
    W = smollm.unembed.weight.detach().to(torch.float64)
    bias = smollm.unembed.bias
    offset = 0.0 if bias is None else bias.detach().double()
    checked = 0
    for seq, prompt in enumerate(PROMPTS):
        rows = frame[frame.sequence == seq]
        h, logits = teacher_forced(smollm, prompt, rows)
        for i, (_, by_step) in enumerate(rows.groupby("step")):
            z = logits[i]
            p = torch.softmax(z, -1)
            lam, v = dense_top(W, p)
            first = by_step.iloc[0]
            assert first.lambda_max == pytest.approx(lam, rel=1e-3)
            assert first.lambda_lower <= lam * (1 + 1e-9) <= first.lambda_upper * (1 + 2e-9)
            assert first.chosen_prob == pytest.approx(float(p[first.chosen_token_id]), rel=1e-4)
            assert first.chosen_token_id == int(z.argmax())  # greedy
            b = W @ v
            for _, row in by_step.iterrows():
                assert row.radius_quadratic == pytest.approx(math.sqrt(2 * row.eps / lam), rel=1e-3)
                nearest = min(bisect_root(z, b, row.eps), bisect_root(z, -b, row.eps))
                assert row.radius_curve == pytest.approx(nearest, rel=1e-3)
            # the flip radius: moving h by it along the best direction changes the argmax
            top = int(z.argmax())
            diff = W - W[top]
            dist = diff.norm(dim=-1)
            gaps = (z[top] - z) / dist.clamp_min(1e-300)
            gaps[top] = math.inf
            j = int(gaps.argmin())
            # the monitor reads generate's incremental float32 logits, the reference a full
            # pass's: they differ by float32 roundoff of |z|, which a small gap magnifies
            roundoff = 8 * torch.finfo(torch.float32).eps * float(z[top].abs() + z[j].abs())
            assert first.radius_flip == pytest.approx(
                float(gaps[j]), rel=1e-4, abs=roundoff / float(dist[j])
            )
            u = diff[j] / dist[j]
            inside = W @ (h[i] + 0.999 * first.radius_flip * u) + offset
            beyond = W @ (h[i] + 1.001 * first.radius_flip * u) + offset
            assert int(inside.argmax()) == top and int(beyond.argmax()) != top
            checked += 1
    assert checked == 2 * 4
    assert all(isinstance(t, str) and t for t in texts)


@pytest.mark.real_model
def test_certified_radius_holds_against_brute_force(smollm):
    _, frame = sr.generate(smollm, PROMPTS[0], max_new_tokens=3, eps=EPS, mode="exact")
    W = smollm.unembed.weight.detach().to(torch.float64)
    h, logits = teacher_forced(smollm, PROMPTS[0], frame)
    gen = torch.Generator().manual_seed(0)
    for i, (_, by_step) in enumerate(frame.groupby("step")):
        z = logits[i]
        p = torch.softmax(z, -1)
        _, v = dense_top(W, p)
        dirs = torch.randn(500, W.shape[1], generator=gen, dtype=torch.float64)
        dirs = torch.cat([dirs / dirs.norm(dim=-1, keepdim=True), v[None], -v[None]])
        logp = torch.log_softmax(z, -1)
        tangents = dirs @ W.T  # (n, V)
        for _, row in by_step.iterrows():
            r = row.radius_certified
            assert 0 < r < row.radius_curve
            logq = torch.log_softmax(z + r * tangents, -1)
            kl = (logp.exp() * (logp - logq)).sum(-1)
            assert float(kl.max()) <= row.eps


@pytest.mark.real_model
def test_fast_mode_brackets_the_dense_eigenvalue(smollm):
    _, frame = sr.generate(smollm, PROMPTS[1], max_new_tokens=3, eps=[0.1], mode="fast")
    assert "radius_certified" not in frame.columns
    W = smollm.unembed.weight.detach().to(torch.float64)
    _, logits = teacher_forced(smollm, PROMPTS[1], frame)
    for i, row in enumerate(frame.sort_values("step").itertuples()):
        lam, _ = dense_top(W, torch.softmax(logits[i], -1))
        assert row.lambda_lower <= lam <= row.lambda_upper
        # the variance along the start direction over the likeliest tokens: a lower bound
        # on lambda_max (float32 sums), and at least the bracket's lower end
        assert row.lambda_lower * (1 - 1e-5) <= row.lambda_max <= lam * (1 + 1e-5)


def test_batched_equals_one_at_a_time(tiny):
    prompts = ["The cat sat", "Q: why?\nA: because it", "zebra"]  # left padding differs
    for mode in ("fast", "exact"):
        texts, batched = sr.generate(tiny, prompts, max_new_tokens=5, eps=[0.1, 1.0], mode=mode)
        for seq, prompt in enumerate(prompts):
            text, alone = sr.generate(tiny, prompt, max_new_tokens=5, eps=[0.1, 1.0], mode=mode)
            assert text == texts[seq]
            mine = batched[batched.sequence == seq].reset_index(drop=True)
            assert len(mine) == len(alone) > 0
            assert mine.chosen_token_id.tolist() == alone.chosen_token_id.tolist()
            for col in ["chosen_prob", "entropy", "lambda_max", "radius_curve", "radius_flip"]:
                np.testing.assert_allclose(mine[col], alone[col], rtol=1e-6, err_msg=col)


class Recorder(LogitsProcessor):
    def __init__(self):
        self.seen = []

    def __call__(self, input_ids, scores):
        self.seen.append(scores.clone())
        return scores


@pytest.mark.parametrize(
    "options",
    [dict(do_sample=False), dict(do_sample=True, top_k=20), dict(num_beams=3, do_sample=False)],
    ids=["greedy", "sampling", "beams"],
)
def test_scores_untouched_and_every_step_recorded(tiny, options):
    ids = tiny.tokenize("The cat")
    monitor = sr.StabilityMonitor(tiny, eps=[0.1], mode="fast")
    after = Recorder()
    runs = []
    for processors in ([after], [monitor, after]):
        torch.manual_seed(0)
        out = tiny.model.generate(
            ids,
            max_new_tokens=6,
            logits_processor=processors,
            pad_token_id=0,
            min_new_tokens=6,
            **options,
        )
        runs.append(out)
    monitor.finish(runs[1])
    assert torch.equal(runs[0], runs[1])
    plain, watched = after.seen[:6], after.seen[6:]
    assert all(torch.equal(a, b) for a, b in zip(plain, watched, strict=True))
    frame = monitor.to_frame()
    rows = 3 if "num_beams" in options else 1
    assert len(frame) == 6 * rows
    assert sorted(frame.step.unique()) == list(range(6))
    assert (frame.lambda_lower <= frame.lambda_upper).all()
    if "num_beams" not in options:  # one row: every token known, and it is the output's
        assert (
            frame.sort_values("step").chosen_token_id.tolist()
            == runs[1][0, ids.shape[1] :].tolist()
        )
    else:  # the final beam descends from one recorded row per step
        assert (frame.chosen_token_id >= 0).sum() >= 6


def test_callback_stream_and_directions(tiny):
    d = tiny.d_model
    rng = torch.Generator().manual_seed(1)
    u = torch.randn(d, generator=rng, dtype=torch.float64)
    seen = []
    monitor = sr.StabilityMonitor(
        tiny, eps=[0.1, 1.0], mode="exact", directions={"mine": u}, callback=seen.append
    )
    streamed = []
    consumer = threading.Thread(target=lambda: streamed.extend(monitor.stream(timeout=60)))
    consumer.start()
    ids = tiny.tokenize("Bonjour")
    out = tiny.model.generate(
        ids,
        max_new_tokens=4,
        logits_processor=[monitor],
        pad_token_id=0,
        min_new_tokens=4,
        do_sample=False,
    )
    monitor.finish(out)
    consumer.join(timeout=60)
    frame = monitor.to_frame()
    assert [r["chosen_token_id"] for r in seen] == out[0, ids.shape[1] :].tolist()
    assert [r["chosen_token_id"] for r in streamed] == [r["chosen_token_id"] for r in seen]
    first = frame[frame.step == 0].set_index("eps")
    assert seen[0]["radius_curve"][1.0] == pytest.approx(first.loc[1.0, "radius_curve"])
    # the user direction's radius: an independent bisection along +-W u
    W = tiny.unembed.weight.detach().to(torch.float64)
    with torch.no_grad():
        z = tiny.model(ids).logits[0, -1].to(torch.float64)
    b = W @ (u / u.norm())
    for eps in (0.1, 1.0):
        expected = min(bisect_root(z, b, eps), bisect_root(z, -b, eps))
        assert first.loc[eps, "radius_mine"] == pytest.approx(expected, rel=1e-5)


def test_rows_without_a_distribution_are_nan_not_an_error(tiny):
    monitor = sr.StabilityMonitor(tiny, eps=[0.1], mode="exact", background=False)
    V = tiny.vocab_size
    scores = torch.randn(3, V, generator=torch.Generator().manual_seed(0))
    scores[1, 5] = math.nan  # eager attention over left padding gives such rows
    scores[2] = -math.inf  # every token masked
    ids = torch.ones(3, 4, dtype=torch.long)
    out = monitor(ids, scores)
    assert out is scores
    frame = monitor.to_frame()
    assert frame.loc[1:2, "lambda_max"].isna().all() and frame.loc[1:2, "radius_curve"].isna().all()
    assert (frame.loc[1:2, "next_token_id"] == -1).all()
    assert np.isfinite(
        frame.loc[0, ["lambda_max", "radius_curve", "radius_flip"]].astype(float)
    ).all()


def test_bad_monitor_input(tiny):
    d = tiny.d_model
    with pytest.raises(StableRegionsError, match="expected \\(32,\\)"):
        sr.StabilityMonitor(tiny, directions=torch.ones(d + 1))
    with pytest.raises(StableRegionsError, match="NaN"):
        sr.StabilityMonitor(tiny, directions=torch.full((d,), math.nan))
    with pytest.raises(StableRegionsError, match="unknown mode"):
        sr.StabilityMonitor(tiny, mode="slow")
    with pytest.raises(StableRegionsError, match="max_new_tokens"):
        sr.generate(tiny, "x", max_new_tokens=0)
    softcapped = sr.wrap(tiny_model("gemma2"), char_tokenizer())
    with pytest.raises(StableRegionsError, match="linear head"):
        sr.StabilityMonitor(softcapped)


def test_cli_generate_text_has_no_colour_off_a_terminal(capsys):
    assert main(["generate", "The capital of France is", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "\x1b[" not in out and "most fragile tokens" in out
    assert out.startswith("The capital of France is")


def test_cli_generate_json_and_html(tmp_path, capsys):
    page = tmp_path / "g.html"
    code = main(
        [
            "generate",
            "The capital of France is",
            "--max-new-tokens",
            "5",
            "--eps",
            "0.1",
            "1",
            "--json",
            "--html",
            str(page),
        ]
    )
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) >= {"model", "prompt", "text", "rows"}
    assert len(doc["rows"]) == 5 * 2
    need = {
        "sequence",
        "step",
        "chosen_token_id",
        "chosen_token",
        "chosen_prob",
        "entropy",
        "lambda_max",
        "eps",
        "radius_quadratic",
        "radius_curve",
        "fragile",
        "lambda_lower",
        "lambda_upper",
    }
    assert need <= set(doc["rows"][0])
    assert doc["text"] == "".join(r["chosen_token"] for r in doc["rows"] if r["eps"] == 0.1)
    html = page.read_text()
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in html and "<link" not in html and " src=" not in html


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max-new-tokens", "0"], "max_new_tokens"),
        (["--mode", "slow"], "unknown mode"),
        (["--eps", "0"], "eps must be"),
        (["--html", "/no/such/dir/x.html"], "does not exist"),
    ],
)
def test_cli_generate_bad_input(argv, message, capsys, tmp_path):
    code = main(["generate", "hello", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error:") and message in err and "\n" not in err


def test_cli_bad_direction_writes_nothing(tmp_path, capsys):
    bad = tmp_path / "d.txt"
    bad.write_text("1 2 nan\n")
    page = tmp_path / "out.html"
    code = main(["generate", "hello", "--direction", str(bad), "--html", str(page)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "shape" in err and "\n" not in err
    assert not page.exists() and list(tmp_path.iterdir()) == [bad]


def test_bracket_and_flip_radius_against_dense_truth():
    """Random heads, peaked and flat distributions, some tokens masked, and far-away rows
    whose small ratio makes an unlikely token the first to overtake."""
    from stable_regions.geometry import HeadSpread, curvature_bracket, flip_radius

    gen = torch.Generator().manual_seed(4)
    V, d = 600, 24
    W = torch.randn(V, d, generator=gen, dtype=torch.float64) + 2.0  # a shared offset
    W[[500, 550]] *= 40.0  # far rows
    W = W.float().double()  # the float32 head the monitor reads, exactly
    spread = HeadSpread.of(W.float())
    z = torch.randn(40, V, generator=gen, dtype=torch.float64) * torch.linspace(0.5, 6, 40)[:, None]
    z[::7, 100:140] = -math.inf  # masked by a processor
    z = z.float().double()  # float32 scores, as generate hands them
    for dtype in (torch.float64, torch.float32):
        p = torch.softmax(z, -1).to(dtype)
        bracket = curvature_bracket(W.float(), p, spread, tokens=16)
        likeliest = p.topk(16, dim=-1).indices
        flips = flip_radius(z.float(), likeliest, W.float(), spread)
        far_wins = 0
        for i in range(len(z)):
            q = torch.softmax(z[i], -1)
            mu = q @ W
            lam = torch.linalg.eigvalsh(W.T @ (q[:, None] * W) - torch.outer(mu, mu))[-1]
            assert bracket.lower[i] <= lam <= bracket.upper[i]
            top = int(z[i].argmax())
            ratio = (z[i, top] - z[i]) / (W - W[top]).norm(dim=-1)
            ratio[top] = math.inf
            truth = float(ratio.nan_to_num(math.inf).min())
            assert float(flips[i]) == pytest.approx(truth, rel=1e-5)
            far_wins += int(ratio.argmin()) not in likeliest[i].tolist()
        assert far_wins > 0  # the screen beyond the likeliest tokens was needed


def test_each_call_to_generate_is_its_own_generation(tiny):
    """A second prompt exactly one token longer than the first run's last input is still a
    new generation (its rows extend none of the last step's)."""
    monitor = sr.StabilityMonitor(tiny, eps=[0.1], background=False)
    first = tiny.tokenize("ab")
    second = tiny.tokenize("xyzwvuts")[:, : first.shape[1] + 3]
    assert second.shape[1] == first.shape[1] + 3
    for ids in (first, second):
        out = tiny.model.generate(
            ids,
            max_new_tokens=3,
            min_new_tokens=3,
            do_sample=False,
            pad_token_id=0,
            logits_processor=[monitor],
        )
        monitor.finish(out)
    frame = monitor.to_frame()
    assert frame.generation.tolist() == [0, 0, 0, 1, 1, 1]
    assert frame.step.tolist() == [0, 1, 2, 0, 1, 2]
    assert (frame.chosen_token_id >= 0).all()
