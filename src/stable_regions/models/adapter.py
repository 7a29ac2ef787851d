"""One object per loaded model: its head as plain tensors, its hook points, its perturbations.

Hook points use TransformerLens names:

* ``blocks.{i}.hook_resid_pre``  - the residual stream entering block i (``embed`` = block 0's)
* ``blocks.{i}.hook_resid_post`` - the residual stream leaving block i
* ``ln_final.hook_normalized``   - the pre-logit vector: the input of the unembedding
  (after the final norm, and after OPT's ``project_out`` where present)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ..budget import rows_within
from ..errors import InvalidParameterError, StableRegionsError, UnsupportedModelError
from ..geometry import LogitHead, WideRows
from .architectures import ArchSpec, arch_for, get_path
from .attention import derivatives_explained, eager_attention, switchable_configs
from .layers import BLOCK_HOOK, PRELOGIT, hook_of, layer_name
from .precision import exact_numerics
from .wrappers import cache_handoff, component, old_name_cache_readers


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """``requires_grad`` off for the model's parameters while inside, restored after (the
    user's model may be training)."""
    thawed = [p for p in model.parameters() if p.requires_grad]
    for p in thawed:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in thawed:
            p.requires_grad_(True)


class ModelAdapter:
    """A supported causal decoder LM and its tokenizer, seen through hook points."""

    def __init__(self, model: nn.Module, tokenizer, name: str | None = None) -> None:
        config = getattr(model, "config", None)
        if config is None:
            raise UnsupportedModelError(
                "expected a transformers PreTrainedModel (it has no .config)"
            )
        if getattr(config, "is_encoder_decoder", False):
            raise UnsupportedModelError(
                f"{type(model).__name__} is an encoder-decoder model; stable-regions needs a causal decoder LM"
            )
        self.arch: ArchSpec = arch_for(getattr(config, "model_type", None))
        # A TransformerLens bridge replaces the head by a bridge module: hooks go on the module
        # the model calls, the weights are read from the Linear inside it.
        head_module = (
            model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        )
        unembed = component(head_module)
        if not isinstance(unembed, nn.Linear):
            raise UnsupportedModelError(
                f"{type(model).__name__} has no language-model head; load it as a *ForCausalLM model"
            )
        layers = get_path(model, self.arch.layers)
        if layers is None:
            raise UnsupportedModelError(
                f"{type(model).__name__} does not look like a {self.arch.family} causal LM (no {self.arch.layers})"
            )
        _check_placement(model, unembed)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name or getattr(config, "name_or_path", None) or type(model).__name__
        self.layers: nn.ModuleList = layers
        self.unembed: nn.Linear = unembed
        self._head_module: nn.Module = head_module
        # None for OPT variants that normalise before each block only (do_layer_norm_before=False)
        self.final_norm: nn.Module | None = component(get_path(model, self.arch.final_norm))
        softcap = getattr(config, "final_logit_softcapping", None)
        self.logit_softcap: float | None = float(softcap) if softcap else None
        self._head: LogitHead | None = None
        self._head32: LogitHead | None = None
        self._cache_name: str | None = None
        self._keeps_logits: bool | None = None
        self._cache_readers = old_name_cache_readers(model)  # TransformerLens bridges
        # Higher derivatives by Taylor mode (``models.taylor``) until a pass meets an
        # operation that has no rule there; then by nested forward mode, and this says why.
        self.taylor_mode: bool = True
        self.taylor_mode_off: str = ""
        # fused attention (the transformers default) has no higher derivatives: our
        # differentiated passes switch these configs to eager while they run (``attention``)
        self._fused_attention = switchable_configs(model)

    # ------------------------------------------------------------------ head
    @property
    def stored_head(self) -> LogitHead:
        """The head as the model stores it: its own tensors, no copy (float32 for most)."""
        bias = self.unembed.bias
        return LogitHead(
            weight=self.unembed.weight.detach(),
            bias=None if bias is None else bias.detach(),
            scale=1.0,
            softcap=self.logit_softcap,
        )

    @property
    def head(self) -> LogitHead:
        """The head in float64: a copy made on first use (226 MB for SmolLM2, 1.3 GB for
        Gemma-3's 262k vocabulary), kept until ``release_copies``. For references (the bench's
        baselines, tests); the library's own paths use ``stored_head`` and float64
        arithmetic where it matters."""
        if self._head is None:
            self._head = self.stored_head.to(torch.float64)
        return self._head

    @property
    def float32_head(self) -> LogitHead:
        """The head in float32: the stored one where it is float32, else the stored weight
        read in float32 a vocabulary chunk at a time (``geometry.WideRows``: never a whole
        copy; 2 GiB for Llama-3-8B's head) with a float32 bias."""
        head = self.stored_head
        if head.weight.dtype == torch.float32:
            return head
        if self._head32 is None:
            bias = None if head.bias is None else head.bias.to(torch.float32)
            self._head32 = LogitHead(WideRows(head.weight), bias, head.scale, head.softcap)
        return self._head32

    @property
    def summing_head(self) -> LogitHead:
        """The head for products and sums: as stored for float32 / float64, the float32 head
        for a 16-bit one (its own products would lose the sums)."""
        head = self.stored_head
        return head if head.weight.dtype in (torch.float32, torch.float64) else self.float32_head

    def head_in(self, dtype: torch.dtype):
        """The head's weight in ``dtype`` without a new copy where one exists: the stored
        weight, or the float32 head's (a ``WideRows`` for a 16-bit head)."""
        if self.unembed.weight.dtype == dtype:
            return self.unembed.weight.detach()
        if dtype == torch.float32:
            return self.float32_head.weight
        return self.unembed.weight.detach().to(dtype)

    def release_copies(self) -> None:
        """Drop the float64 copy of the head (made again on next use)."""
        self._head = None
        self._head32 = None

    # ----------------------------------------------------------------- facts
    @property
    def config(self):
        return self.model.config

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        """Width of the pre-logit vector (OPT's ``project_out`` can make it differ from the residual)."""
        return self.unembed.weight.shape[1]

    @property
    def d_resid(self) -> int:
        """Width of the residual stream between blocks."""
        for attr in ("hidden_size", "n_embd", "d_model"):
            value = getattr(self.config, attr, None)
            if isinstance(value, int):
                return value
        return self.d_model

    def hook_dim(self, hook: str) -> int:
        """Width of the activation at a hook point."""
        self._resolve(hook)
        return self.d_model if hook == PRELOGIT else self.d_resid

    @property
    def input_embedding(self) -> Tensor:
        """The token embedding matrix (V_in, d) as the model stores it (no copy)."""
        return component(self.model.get_input_embeddings()).weight.detach()

    @property
    def vocab_size(self) -> int:
        return self.unembed.weight.shape[0]

    @property
    def context_length(self) -> int | None:
        for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
            value = getattr(self.config, attr, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    @property
    def device(self) -> torch.device:
        return self.unembed.weight.device

    def hook_points(self) -> list[str]:
        names = []
        for i in range(self.n_layers):
            names += [f"blocks.{i}.hook_resid_pre", f"blocks.{i}.hook_resid_post"]
        return names + [PRELOGIT]

    def hook_for_layer(self, layer: str | int) -> str:
        """The hook point of a layer (``models.layers``): ``final`` -> the pre-logit vector,
        ``embed`` -> block 0's input, ``i`` or a hook name -> ``blocks.{i}.hook_resid_post``."""
        return hook_of(layer_name(layer, self.n_layers))

    def layer_name(self, layer: str | int) -> str:
        """The label every study writes for ``layer``: ``final``, ``embed`` or ``"i"``."""
        return layer_name(layer, self.n_layers)

    # ------------------------------------------------------------ tokens
    def tokenize(self, prompt: str, *, any_length: bool = False, chat: bool = False) -> Tensor:
        """Token ids (1, n) as the model would see the prompt (special tokens included);
        longer than the model's context only with ``any_length`` (documents cut in windows).
        ``chat``: the prompt as one user message in the tokenizer's chat template, with the
        assistant's turn opened (what an instruct model expects before it answers)."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidParameterError("the prompt is empty: give some text to analyze")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as exc:  # bytes a shell passed through undecoded
            raise InvalidParameterError(
                f"the prompt is not valid UTF-8 text (an undecodable byte at character "
                f"{exc.start}): give UTF-8 text"
            ) from None
        if self.tokenizer is None:
            raise StableRegionsError(
                "this model has no tokenizer: pass one to stable_regions.wrap(model, tokenizer)"
            )
        if chat:
            ids = self._chat_ids(prompt)
        else:
            ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"]
        limit = self.context_length
        if limit is not None and ids.shape[1] > limit and not any_length:
            raise StableRegionsError(
                f"the prompt is {ids.shape[1]} tokens, longer than the model's context of {limit}: shorten it"
            )
        return ids.to(self.device)

    def _chat_ids(self, prompt: str) -> Tensor:
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidParameterError(
                f"{self.name}'s tokenizer has no chat template: drop `chat=True` (a base model "
                "reads the prompt as it is)"
            )
        messages = [{"role": "user", "content": prompt}]
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True
        )
        if hasattr(ids, "keys"):  # newer transformers return a BatchEncoding
            ids = ids["input_ids"]
        return torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)

    def token_strings(self, ids: Tensor | Sequence[int]) -> list[str]:
        ids = ids.reshape(-1).tolist() if isinstance(ids, Tensor) else list(ids)
        if self.tokenizer is None:
            return [str(i) for i in ids]
        return [self.tokenizer.decode([i]) for i in ids]

    # ------------------------------------------------------------ running
    def cache_kwarg(self, cache) -> dict:
        """The keyword that hands a key/value cache to this model's forward: ``cache`` from
        transformers 5.24 on (``past_key_values`` is deprecated there and goes in 5.40),
        ``past_key_values`` before."""
        if self._cache_name is None:
            import inspect

            params = inspect.signature(self.model.forward).parameters
            self._cache_name = "cache" if "cache" in params else "past_key_values"
        return {self._cache_name: cache}

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype our passes through the network compute in from a hook on: float64 for a
        float64 model, else float32 (a 16-bit model's weights are upcast per matrix product,
        see ``precision``)."""
        return torch.float64 if self.is_float64 else torch.float32

    @property
    def is_float64(self) -> bool:
        return self.unembed.weight.dtype == torch.float64

    def forward(self, ids: Tensor, **kwargs):
        """The model's forward pass; a float64 model runs in float64 throughout (``exact_numerics``)."""
        with self.running():
            return self.model(input_ids=ids, **kwargs)

    @contextmanager
    def running(self) -> Iterator[None]:
        """What every call into the model (forward, ``generate``) runs inside: float64 kept
        float64 (``exact_numerics``), and a key/value cache handed to TransformerLens bridge
        attention under the name it reads (``wrappers.cache_handoff``)."""
        with exact_numerics(self.is_float64):
            if not self._cache_readers:
                yield
                return
            with cache_handoff(self._cache_readers):
                yield

    def eager_attention(self):
        """A context in which the model's attention runs eager (``attention.eager_attention``):
        the suffix passes, whose logits the differentiated passes are compared with."""
        return eager_attention(self._fused_attention)

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """A context with the weights' ``requires_grad`` off (restored after): for derivatives
        in the activations. Enter it outside any torch.func transform (``jvp``, ``vjp``).
        Attention runs eager inside (``attention.eager_attention``), and an operation without
        the derivative taken fails in one line (``attention.derivatives_explained``).

        A weight that requires grad makes every ``jvp``/``vjp`` record (and keep) the weight's
        side too, and disables the fast constant-weight linear of ``exact_numerics``: third-order
        directional derivatives of 16 positions from SmolLM2's embedding took 2.9 GB peak and
        5.3 s with the weights thawed, 1.1 GB and 2.9 s frozen (measured)."""
        with (
            frozen_parameters(self.model),
            eager_attention(self._fused_attention),
            derivatives_explained(self.name),
        ):
            yield

    @torch.no_grad()
    def prelogits(self, ids: Tensor, dtype: torch.dtype | None = torch.float64) -> Tensor:
        """The pre-logit vectors (n, d) of every position, in ``dtype`` (float64 by default;
        ``None``: the model's own). The head then sees only the last one: no n x V logits."""
        captured: list[Tensor] = []

        def keep(x: Tensor) -> Tensor:
            captured.append(x.detach())
            return x[:, -1:]

        with self._on_activation(PRELOGIT, keep):
            self.forward(ids, use_cache=False)
        return captured[0][0] if dtype is None else captured[0][0].to(dtype)

    @torch.no_grad()
    def next_token_alternatives(self, ids: Tensor, k: int = 5) -> tuple[list[list[str]], Tensor]:
        """The ``k`` likeliest next tokens (strings) and their probabilities (n, k) at every
        position of ``ids`` (1, n): one forward pass to the pre-logit vectors, then the head
        and a float64 softmax a block of positions at a time (never n x V at once)."""
        h = self.prelogits(ids, dtype=None)
        head = self.stored_head
        k = min(k, head.vocab_size)
        names, probs = [], []
        step = rows_within(head.vocab_size)
        for s in range(0, len(h), step):
            logits = head.logits(h[s : s + step])
            p, top = torch.softmax(logits.to(torch.float64), -1).topk(k)
            names += [self.token_strings(row) for row in top]
            probs.append(p.cpu())
        return names, torch.cat(probs)

    def last_logits_only(self) -> dict:
        """The forward keyword that makes the head map the last position only, where the
        model takes one (``logits_to_keep``)."""
        if self._keeps_logits is None:
            import inspect

            params = inspect.signature(self.model.forward).parameters
            self._keeps_logits = "logits_to_keep" in params
        return {"logits_to_keep": 1} if self._keeps_logits else {}

    @contextmanager
    def perturbation(
        self, hook: str, position: int, deltas: Tensor, seq_len: int | None = None
    ) -> Iterator[None]:
        """Add ``deltas[b]`` (batch, d) to the activation at ``hook``, position ``position``, batch row b.

        ``seq_len``: the prompt length, needed when the model hands the head only the last
        positions (``logits_to_keep``): the index is then counted from the end.
        """

        def add(x: Tensor) -> Tensor:
            index = position if seq_len is None else position - (seq_len - x.shape[1])
            index = index % x.shape[1]
            if x.shape[0] == 1 < deltas.shape[0]:  # one prompt, many deltas (perturbed_logits)
                x = x.expand(deltas.shape[0], -1, -1)
            # Out of place, so that autograd and torch.func transforms (jvp, vjp) see through it.
            row = x[:, index : index + 1, :] + deltas.to(dtype=x.dtype, device=x.device)[:, None, :]
            return torch.cat([x[:, :index, :], row, x[:, index + 1 :, :]], dim=1)

        with self._on_activation(hook, add):
            yield

    @contextmanager
    def added(self, hook: str, delta: Tensor) -> Iterator[None]:
        """Add ``delta`` (d,) to the activation at ``hook`` at every position (how repeng and
        steering-vectors steer)."""
        with self._on_activation(hook, lambda x: x + delta.to(dtype=x.dtype, device=x.device)):
            yield

    @contextmanager
    def capture(self, hook: str, store: list[Tensor]) -> Iterator[None]:
        """Append the activation (batch, seq, d) seen at ``hook`` to ``store`` on each forward."""
        with self._on_activation(hook, lambda x: store.append(x.detach())):
            yield

    @contextmanager
    def _on_activation(self, hook: str, fn) -> Iterator[None]:
        """Call ``fn(x)`` on the activation at ``hook`` in each forward; a tensor it returns replaces x."""
        module, kind = self._resolve(hook)
        if kind == "pre":

            def pre_hook(_module, args, kwargs):
                if args:
                    out = fn(args[0])
                    return None if out is None else ((out, *args[1:]), kwargs)
                key = "hidden_states" if "hidden_states" in kwargs else "input"
                out = fn(kwargs[key])
                return None if out is None else (args, {**kwargs, key: out})

            handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        else:

            def post_hook(_module, _args, output):
                out = fn(output[0] if isinstance(output, tuple) else output)
                if out is None:
                    return None
                return (out, *output[1:]) if isinstance(output, tuple) else out

            handle = module.register_forward_hook(post_hook)
        try:
            yield
        finally:
            handle.remove()

    @torch.no_grad()
    def perturbed_logits(self, ids: Tensor, hook: str, position: int, deltas: Tensor) -> Tensor:
        """Next-token logits (batch, V) at ``position`` after adding each delta at ``hook``.

        Runs the whole model on the prompt prefix up to ``position`` (causal: later tokens
        cannot change it), one batch row per delta. At the pre-logit vector the blocks run
        once and the head's input is widened to one row per delta: nothing before the head
        sees the deltas.
        """
        prefix = ids[:, : position + 1]
        if hook != PRELOGIT:
            prefix = prefix.expand(deltas.shape[0], -1)
        with self.perturbation(hook, position, deltas, seq_len=position + 1):
            out = self.forward(prefix, use_cache=False, logits_to_keep=1)
        return out.logits[:, -1, :].to(torch.float64)

    def hook_site(self, hook: str) -> tuple[nn.Module, str]:
        """The module a hook point is on and how: ``pre`` (its input) or ``post`` (its output)."""
        return self._resolve(hook)

    def blocks_after(self, hook: str) -> list[nn.Module]:
        """The blocks that run after the activation at ``hook`` (a ``resid_pre`` hook's own
        block included; none after the pre-logit vector)."""
        if hook == PRELOGIT:
            return []
        self._resolve(hook)
        m = BLOCK_HOOK.match(hook)
        start = int(m.group(1)) + (m.group(2) == "post")
        return list(self.layers)[start:]

    def _resolve(self, hook: str) -> tuple[nn.Module, str]:
        if hook == PRELOGIT:
            return self._head_module, "pre"
        m = BLOCK_HOOK.match(hook)
        if m is None:
            raise InvalidParameterError(
                f"unknown hook point {hook!r}: use one of blocks.{{i}}.hook_resid_pre/post or {PRELOGIT}"
            )
        index = int(m.group(1))
        if not 0 <= index < self.n_layers:
            raise InvalidParameterError(
                f"block {index} is out of range: this model has blocks 0..{self.n_layers - 1}"
            )
        return self.layers[index], m.group(2)


def _check_placement(model: nn.Module, unembed: nn.Linear) -> None:
    """One real device: weights that are not loaded (meta) or a model dispatched over several
    devices are refused in one line."""
    devices = {p.device for p in model.parameters()}
    if any(d.type == "meta" for d in devices):
        raise UnsupportedModelError(
            "the model's weights are on the meta device (not loaded): load them first, e.g. "
            "from_pretrained without init_empty_weights, or model.to_empty(...) and a state dict"
        )
    mapped = {str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}
    if len(devices) > 1 or len(mapped) > 1:
        names = sorted({str(d) for d in devices} | mapped)
        raise UnsupportedModelError(
            f"the model is dispatched over several devices ({', '.join(names)}): stable-regions "
            f"runs a model on one device; load it with device_map={{'': '{unembed.weight.device}'}} "
            "or .to(one device)"
        )
