"""Where each supported decoder keeps its blocks, final norm and embedding."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UnsupportedModelError


@dataclass(frozen=True)
class ArchSpec:
    """Attribute paths from the ``*ForCausalLM`` module."""

    family: str
    layers: str
    final_norm: str | None
    embed: str
    # The blocks before a hook may run once per position and be widened to the rows at the
    # hook (``widening``): not for GPT-2, whose model reshapes its output by the input's shape.
    widenable: bool = True


_LLAMA_LIKE = dict(layers="model.layers", final_norm="model.norm", embed="model.embed_tokens")

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec("Llama", **_LLAMA_LIKE),
    "mistral": ArchSpec("Mistral", **_LLAMA_LIKE),
    "qwen2": ArchSpec("Qwen2", **_LLAMA_LIKE),
    "qwen3": ArchSpec("Qwen3", **_LLAMA_LIKE),
    "phi3": ArchSpec("Phi-3", **_LLAMA_LIKE),
    "gemma2": ArchSpec("Gemma-2", **_LLAMA_LIKE),
    "gemma3_text": ArchSpec("Gemma-3", **_LLAMA_LIKE),
    "gpt2": ArchSpec(
        "GPT-2",
        layers="transformer.h",
        final_norm="transformer.ln_f",
        embed="transformer.wte",
        widenable=False,
    ),
    "gpt_neox": ArchSpec(
        "GPT-NeoX",
        layers="gpt_neox.layers",
        final_norm="gpt_neox.final_layer_norm",
        embed="gpt_neox.embed_in",
    ),
    "opt": ArchSpec(
        "OPT",
        layers="model.decoder.layers",
        final_norm="model.decoder.final_layer_norm",
        embed="model.decoder.embed_tokens",
    ),
}


def supported_names() -> str:
    return ", ".join(f"{s.family} ({t})" for t, s in ARCHITECTURES.items())


def arch_for(model_type: str | None) -> ArchSpec:
    if model_type not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not a supported causal decoder; supported: {supported_names()}"
        )
    return ARCHITECTURES[model_type]


def get_path(root: object, path: str | None) -> object | None:
    if path is None:
        return None
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj
