"""repeng itself, not a stand-in: its ``ControlVector`` object and its ``export_gguf`` file give
the raw vector's budget, its ``ControlModel`` steers exactly as ``coeff * directions[i]``
added at ``blocks.{i}.hook_resid_post``, our coefficient convention, and its ``import_gguf``
reads the control vector files we write with a coefficient.

repeng 0.4.0 (the current release) declares ``numpy < 2`` and names ``np.float_`` in its
annotations, which numpy 2 removed: it is installed with ``--no-deps`` (the README's test
command) and imported in a child process that restores that one alias before the import.
Nothing of it reaches this test process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np

    np.float_ = np.float64  # repeng 0.4.0's annotations; this child process only
    import repeng
    import torch

    sys.path.insert(0, sys.argv[1])
    from conftest import char_tokenizer, tiny_model

    import stable_regions as sr
    from stable_regions.studies.vectors import read_vector_file

    model = tiny_model("llama", seed=7, dtype=torch.float32)
    adapter = sr.wrap(model, char_tokenizer())
    gen = np.random.default_rng(0)
    directions = {i: gen.normal(size=32).astype(np.float32) for i in range(3)}
    vector = repeng.ControlVector(model_type="llama", directions=directions)
    path = sys.argv[2] + "/cv.gguf"
    vector.export_gguf(path)

    # repeng's own file, read without repeng: every layer's vector, bit for bit
    for layer, direction in directions.items():
        assert np.array_equal(read_vector_file(path, layer), direction), layer

    # the object and the file give the raw vector's budget
    prompt = "The cat sat on"
    raw = sr.steering_budget(adapter, prompt, vector=directions[1], layer=1, eps=[0.1, 1.0]).to_frame()
    for source in (vector, read_vector_file(path, 1)):
        got = sr.steering_budget(adapter, prompt, vector=source, layer=1, eps=[0.1, 1.0]).to_frame()
        for col in ("coef_quadratic", "coef_curve", "coef_exact"):
            np.testing.assert_allclose(got[col], raw[col], rtol=1e-9, err_msg=col)

    # the convention: repeng's ControlModel at coeff c is c * directions[1] added to the
    # output of block 1 at every position
    coeff = float(raw["coef_exact"].iloc[0])
    ids = adapter.tokenize(prompt)
    with torch.no_grad(), adapter.added(
        "blocks.1.hook_resid_post", coeff * torch.from_numpy(directions[1])
    ):
        ours = adapter.forward(ids).logits[0].double()
    with torch.no_grad():
        plain = adapter.forward(ids).logits[0].double()
    controlled = repeng.ControlModel(model, [1])
    controlled.set_control(repeng.ControlVector("llama", {1: directions[1]}), coeff)
    with torch.no_grad():
        theirs = controlled(input_ids=ids).logits[0].double()
    assert (ours - plain).abs().max() > 1e-2  # the steering does something
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)

    # our control vector file with a budget: repeng's import_gguf reads it as its own, and
    # the coefficient travels beside the directions
    from stable_regions.studies.vectors import read_budget, write_vector_file

    ours_path = sys.argv[2] + "/budget.gguf"
    write_vector_file(ours_path, directions, budget={"coefficient": 1.25}, model_hint="llama")
    back = repeng.ControlVector.import_gguf(ours_path)
    assert back.model_type == "llama" and sorted(back.directions) == [0, 1, 2]
    for layer, direction in directions.items():
        assert np.array_equal(np.asarray(back.directions[layer]), direction), layer
    assert read_budget(ours_path)["coefficient"] == "1.25" and read_budget(path) == {}
    print("ok")
    """
)


@pytest.mark.slow
def test_repeng_vectors_and_convention(tmp_path):
    tests = str(Path(__file__).parent)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, tests, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
