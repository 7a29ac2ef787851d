"""Eager attention for the passes we differentiate, whatever the model was loaded with.

``transformers`` loads models with fused attention by default (SDPA; flash attention on a
GPU where installed). Those kernels give no forward-mode derivative and no double backward
(PyTorch: "derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
implemented"; the CUDA kernels likewise), and our inner-layer passes need both. Every
attention module reads ``config._attn_implementation`` on each call, so setting it to
``eager`` on the model's configs for the duration of a pass switches the whole model, and
restoring it leaves the user's model as it was. The passes that need no derivative (the
prefix cache, scans, the generation monitor) keep the fused kernels: eager attention at 8k
tokens holds about 8.6 GB of scores per layer for Llama-3-8B.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from ..errors import StableRegionsError, one_line

_INTERNAL = "_attn_implementation_internal"


def switchable_configs(model: nn.Module) -> list:
    """The distinct configs of the model and its submodules whose attention is not eager."""
    seen: dict[int, object] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        value = getattr(config, _INTERNAL, None)
        if isinstance(value, str) and value != "eager":
            seen.setdefault(id(config), config)
    return list(seen.values())


@contextmanager
def eager_attention(configs: list) -> Iterator[None]:
    """Eager attention on ``configs`` while inside; their own setting restored after."""
    saved = [getattr(c, _INTERNAL) for c in configs]
    for config in configs:
        setattr(config, _INTERNAL, "eager")
    try:
        yield
    finally:
        for config, value in zip(configs, saved, strict=True):
            setattr(config, _INTERNAL, value)


@contextmanager
def derivatives_explained(model_name: str) -> Iterator[None]:
    """A kernel without the derivative we take (an attention implementation that does not read
    the config, a custom fused kernel) fails in one line that says what to do."""
    try:
        yield
    except (RuntimeError, NotImplementedError) as exc:
        text = str(exc)
        if "derivative for" in text and "not implemented" in text:
            raise StableRegionsError(
                f"{model_name} runs an operation without the derivatives inner-layer analysis "
                f"takes ({one_line(exc)}): load the model with attn_implementation='eager'"
            ) from None
        raise
