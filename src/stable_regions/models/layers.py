"""Layers by name: the one place that turns what a user writes into a layer and a hook point.

A layer is written as ``"final"`` (the pre-logit vector, the unembedding's input), ``"embed"``
(the input of block 0), a block index ``i`` (the output of block ``i``) or a TransformerLens
hook name: ``ln_final.hook_normalized``, ``blocks.{i}.hook_resid_post``, and
``blocks.{i}.hook_resid_pre`` (the same vector as block ``i - 1``'s output, or ``embed`` for
``i = 0``). Every study labels a layer the same way: ``"final"``, ``"embed"`` or ``"i"``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..errors import InvalidParameterError

PRELOGIT = "ln_final.hook_normalized"
EMBED_HOOK = "blocks.0.hook_resid_pre"
# a residual-stream hook: its block index, and pre or post
BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")


def is_final(hook: str) -> bool:
    """Whether ``hook`` is the pre-logit vector, where the head alone maps the activation to
    the logits (and everything is exact from ``p`` and ``W``); every study asks this here."""
    return hook == PRELOGIT


def layer_name(layer: str | int, n_layers: int | None = None) -> str:
    """The study's label of ``layer``: ``"final"``, ``"embed"`` or a block index as text;
    checked against ``n_layers`` blocks where it is given."""
    text = str(layer).strip()
    if text in ("final", "prelogit", PRELOGIT):
        return "final"
    if text == "embed":
        return "embed"
    match = BLOCK_HOOK.match(text)
    if match:
        index = int(match.group(1)) - (match.group(2) == "pre")
        label = "embed" if index < 0 else str(index)
    elif re.fullmatch(r"-?\d+", text) and not isinstance(layer, bool):
        label = str(int(text))
    else:
        raise InvalidParameterError(
            f"unknown layer {layer!r}: use 'final', 'embed', a block index or a hook name "
            "(blocks.{i}.hook_resid_post)"
        )
    if label != "embed":
        index = int(label)
        top = "" if n_layers is None else f" 0..{n_layers - 1}"
        if index < 0 or (n_layers is not None and index >= n_layers):
            raise InvalidParameterError(
                f"layer {index} is out of range: this model has blocks{top or ' numbered from 0'}"
            )
    return label


def hook_of(label: str) -> str:
    """The hook point of a layer label (``layer_name``'s output)."""
    if label == "final":
        return PRELOGIT
    if label == "embed":
        return EMBED_HOOK
    return f"blocks.{int(label)}.hook_resid_post"


def check_layers(
    layers: Sequence[str | int] | str | int | None,
    n_layers: int | None = None,
    *,
    default: Sequence[str | int] = ("final",),
) -> list[str]:
    """Layer labels, in the order given, each once: ``None`` is ``default``; ``"all"`` is
    ``embed``, every block and ``final`` (it needs ``n_layers``); one layer may be given
    bare."""
    if layers is None:
        layers = default
    if isinstance(layers, (str, int)):
        layers = [layers]
    layers = list(layers)
    if layers == ["all"]:
        if n_layers is None:
            raise InvalidParameterError("layers='all' needs the model: pass the layers by name")
        layers = ["embed", *range(n_layers), "final"]
    out = [layer_name(x, n_layers) for x in layers]
    if not out:
        raise InvalidParameterError(
            "no layers given: use e.g. `layers=['embed', 7, 'final']`, or `layers='all'`"
        )
    repeated = sorted({x for x in out if out.count(x) > 1})
    if repeated:
        raise InvalidParameterError(f"layer {repeated[0]} is given twice: name each layer once")
    return out
