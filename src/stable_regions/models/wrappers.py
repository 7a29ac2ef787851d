"""The model inside the wrappers our users already hold: TransformerLens and nnsight.

Both wrap a ``transformers`` causal LM and keep running it, so stable-regions works on that
model itself, with the wrapper's tokenizer:

* TransformerLens 4's ``TransformerBridge`` (``TransformerBridge.boot_transformers``) swaps
  bridge modules into its ``original_model`` in place (each keeps the module it replaced as
  ``original_component``, and runs it between TransformerLens hook points). Running the
  original model runs the bridge, with or without ``enable_compatibility_mode()``, so the
  activations at our hook points are the bridge's ``blocks.{i}.hook_resid_post`` and
  ``ln_final.hook_normalized``.
* nnsight's ``LanguageModel`` (an ``Envoy``) keeps the model as ``_module`` and leaves its
  modules as they are.

Recognised by what they hold, not by importing either library (neither is a dependency).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from ..errors import UnsupportedModelError

SUPPORTED = (
    "a transformers causal LM (*ForCausalLM), a TransformerLens TransformerBridge "
    "(TransformerBridge.boot_transformers), an nnsight TransformersModel or LanguageModel"
)


def _is_transformers_model(obj: object) -> bool:
    return isinstance(obj, nn.Module) and getattr(obj, "config", None) is not None


def unwrap(obj: object, tokenizer=None):
    """``(model, tokenizer, kind)``: the ``transformers`` model to run, the tokenizer (the
    one given, else the wrapper's) and what was wrapped (``transformers``, ``TransformerBridge``
    or ``nnsight``)."""
    kind = type(obj).__name__
    if kind == "TransformerBridge" or (
        hasattr(obj, "original_model") and hasattr(obj, "hook_dict")
    ):
        inner = getattr(obj, "original_model", None)
        if not _is_transformers_model(inner):
            raise UnsupportedModelError(
                f"this TransformerBridge holds a {type(inner).__name__}, not a transformers "
                "model (a natively booted bridge): boot it with "
                "TransformerBridge.boot_transformers(...), or wrap the transformers model itself"
            )
        return inner, tokenizer or getattr(obj, "tokenizer", None), "TransformerBridge"
    if kind == "HookedTransformer":
        raise UnsupportedModelError(
            "TransformerLens' HookedTransformer (TransformerLens 3 and older) is not supported: "
            "TransformerLens 4 replaced it with TransformerBridge; wrap "
            "TransformerBridge.boot_transformers(...) or the transformers model"
        )
    envoy_module = _envoy_module(obj)
    if envoy_module is not None:
        if not _is_transformers_model(envoy_module):
            raise UnsupportedModelError(
                f"this nnsight wrapper holds a {type(envoy_module).__name__}, not a transformers "
                "causal LM: use nnsight.LanguageModel on a *ForCausalLM model"
            )
        return envoy_module, tokenizer or getattr(obj, "tokenizer", None), "nnsight"
    if _is_transformers_model(obj):
        return obj, tokenizer, "transformers"
    raise UnsupportedModelError(f"cannot use a {kind}: expected {SUPPORTED}")


def _envoy_module(obj: object) -> nn.Module | None:
    """The module an nnsight ``Envoy`` (``LanguageModel``, ``NNsight``) wraps, else None.
    ``_module`` is read from the instance's own attributes: an Envoy forwards unknown names
    to its module, so ``getattr`` alone would accept anything."""
    if not any(c.__name__ == "Envoy" for c in type(obj).__mro__):
        return None
    module = vars(obj).get("_module")
    return module if isinstance(module, nn.Module) else None


def component(module: nn.Module | None) -> nn.Module | None:
    """The plain module inside a TransformerLens bridge component (itself otherwise): its
    weights are the ones the bridge runs."""
    inner = getattr(module, "original_component", None)
    return inner if isinstance(inner, nn.Module) else module


def _reads_cache_by_old_name(module: nn.Module) -> bool:
    """TransformerLens 4.3's attention bridges read the key/value cache from
    ``past_key_values`` (``_update_kv_cache``), the keyword transformers 5.24 renamed
    ``cache``: under 5.24 they would attend to the current tokens only."""
    return callable(getattr(type(module), "_update_kv_cache", None))


@contextmanager
def cache_handoff(modules: list[nn.Module]) -> Iterator[None]:
    """While inside, ``modules`` (attention bridges) that are called with ``cache=`` also get
    it as ``past_key_values=``. Hooks on these modules only, removed on exit."""

    def pre_hook(_module, args, kwargs):
        if kwargs.get("cache") is not None and kwargs.get("past_key_values") is None:
            return args, {**kwargs, "past_key_values": kwargs["cache"]}
        return None

    handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for m in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def old_name_cache_readers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if _reads_cache_by_old_name(m)]
