"""Numerics we can trust for small KLs and higher derivatives, for our own computation only.

1. Hugging Face eager attention computes its softmax in float32 (``softmax(..., dtype=float32)``)
   and RMSNorms cast to float32, even when the model is float64. That caps a "float64" model
   at float32 accuracy (~1e-7 relative). With ``float64=True`` those casts are no-ops for
   float64 tensors; float32 and lower-precision tensors are untouched.
2. PyTorch's forward-mode derivative of ``F.layer_norm`` is wrong at second order: on a random
   8-vector a nested ``jvp`` disagreed with autograd by up to 0.14, while the same function in
   elementary ops agrees to 1e-16. It would corrupt third-order terms on GPT-2, GPT-NeoX, OPT.
   Inside the context ``F.layer_norm`` is computed from elementary ops.
3. Speed, not accuracy: PyTorch's forward-mode rule for ``F.linear`` copies the weight matrix
   (or fills a zero tangent of its size) on every call: a JVP through SmolLM2's 49k x 576 head
   took 75 ms against 7 ms for the forward. Inside the context, ``F.linear`` with a constant
   weight is a custom Function whose JVP is one more matmul (16 ms), exact to the last bit.

4. Width, for 16-bit models: where our pass widened the activations (float32 deltas added at
   the hook, ``ModelAdapter.compute_dtype``), a ``linear`` or ``addmm`` whose weights are
   bfloat16 or float16 multiplies them upcast to the activations' dtype, one matrix at a time.
   The blocks after the hook then compute in float32 on the model's own weights, and a
   recorded pass (``vjp``, the replayed products) keeps the 16-bit weights, not wide copies:
   each product upcasts again.

All four are a ``torch.overrides.TorchFunctionMode``: torch keeps its stack of such modes
per thread, so only the calls made on the thread that entered the context (our forward
passes) see them. Nothing in ``torch`` is replaced: another thread computing during our call,
or the user's own code after it, sees torch as it is. Contexts nest.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .products import wide_linear
from .taylor import Jet

_linear = F.linear
_layer_norm_torch = F.layer_norm
_softmax = F.softmax
_to = torch.Tensor.to
_float = torch.Tensor.float
_addmm = torch.addmm


def _layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    dims = tuple(range(-len(normalized_shape), 0))
    centered = x - x.mean(dims, keepdim=True)
    y = centered * torch.rsqrt((centered * centered).mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


class _Weights:
    """Weight and bias handed to ``_ConstantLinear`` as a non-tensor, so that torch.func
    does not make (and fill) a zero tangent of the weight's size for it, with the dtype the
    product runs in. A 16-bit weight is upcast for each product and dropped after it: a
    recorded pass (``vjp``) keeps the model's own weight, never a wide copy of it."""

    __slots__ = ("weight", "bias", "dtype")

    def __init__(self, weight, bias, dtype) -> None:
        self.weight = weight
        self.bias = bias
        self.dtype = dtype

    def product(self, x):
        return wide_linear(x, self.weight, self.bias, self.dtype)


class _ConstantLinear(torch.autograd.Function):
    """``x W^T + b`` for a weight that needs no gradient: JVP ``x_t W^T``, VJP ``g W``."""

    @staticmethod
    def forward(x, weights: _Weights):
        return weights.product(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.weight, ctx.dtype = inputs[1].weight, inputs[1].dtype

    @staticmethod
    def jvp(ctx, x_t, _):
        # Applied through the Function again, so that nested jvp levels stay fast and exact.
        return _ConstantLinear.apply(x_t, _Weights(ctx.weight, None, ctx.dtype))

    @staticmethod
    def backward(ctx, grad):
        return _ConstantLinear.apply(grad, _Weights(ctx.weight.t(), None, ctx.dtype)), None

    @staticmethod
    def vmap(info, in_dims, x, weights: _Weights):
        # The product acts on the last dimension: any batch dimension in front goes through
        # (``torch.func.vmap`` over a replayed pass, ``SuffixBatch.linearization``).
        dim = in_dims[0]
        if dim is None:
            return _ConstantLinear.apply(x, weights), None
        return _ConstantLinear.apply(x.movedim(dim, 0), weights), 0


def _widest(*tensors) -> torch.dtype | None:
    """The widest floating dtype among the tensor arguments (None if there is none)."""
    floats = [t.dtype for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return max(floats, key=lambda t: torch.finfo(t).bits, default=None)


def _constant_linear(x, weight, bias=None):
    wide = _widest(x, weight, bias)
    x = x.to(wide)
    trained = weight.requires_grad or (bias is not None and bias.requires_grad)
    if trained and torch.is_grad_enabled():  # the weight's own gradient is wanted
        return _linear(x, weight.to(wide), None if bias is None else bias.to(wide))
    return _ConstantLinear.apply(x, _Weights(weight, bias, wide))


def _constant_addmm(bias, x, weight, *, beta=1, alpha=1):
    """``addmm(b, x, W) = x W + b`` (GPT-2's Conv1D) with a model weight ``W``: the constant
    linear of ``W^T``, so that a recorded pass keeps no wide copy of a 16-bit ``W`` either."""
    plain = beta == 1 and alpha == 1 and bias.ndim == 1
    if plain and isinstance(weight, torch.nn.Parameter) and not weight.requires_grad:
        return _constant_linear(x, weight.t(), bias)
    return _addmm(*_widened((bias, x, weight), {}), beta=beta, alpha=alpha)


class ExactNumerics(TorchFunctionMode):
    """Elementary-op layer norm and fast-JVP linear always; with ``float64``, float64 tensors
    kept float64 through Hugging Face's float32 casts. Active on the entering thread only."""

    def __init__(self, float64: bool = True) -> None:
        super().__init__()
        self.float64 = float64

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func is _linear or func is _addmm or func is _layer_norm_torch) and any(
            issubclass(t, Jet) for t in types
        ):  # Taylor mode (``taylor.Jet``) has its own rules for these
            return func(*args, **kwargs)
        if func is _linear:
            return _constant_linear(*args, **kwargs)
        if func is _addmm:
            return _constant_addmm(*args, **kwargs)
        if func is _layer_norm_torch:
            return _layer_norm(*args, **kwargs)
        if self.float64:
            if func is _softmax and kwargs.get("dtype") is not None:
                if args[0].dtype == torch.float64:
                    kwargs = {**kwargs, "dtype": None}
            elif func is _to:
                if (
                    args[0].dtype == torch.float64
                    and not kwargs
                    and len(args) == 2
                    and args[1] is torch.float32
                ):
                    return args[0]
            elif func is _float and args[0].dtype == torch.float64:
                return args[0]
        return func(*args, **kwargs)


def _widened(args, kwargs) -> list:
    """The tensor arguments of a matrix product in the widest floating dtype among them: a
    16-bit model whose activations were widened at the hook (``compute_dtype``) multiplies
    its weights there in float32, upcast one matrix at a time (never a copy of the model)."""
    args = [*args, *kwargs.values()]
    wide = _widest(*args)
    return [a.to(wide) if isinstance(a, torch.Tensor) and a.dtype != wide else a for a in args]


def exact_numerics(float64: bool = True) -> ExactNumerics:
    """The context: ``with exact_numerics(): model(...)``."""
    return ExactNumerics(float64)


# PyTorch's float32 matrix-product settings (``torch.set_float32_matmul_precision``, or the
# per-backend ``fp32_precision``): "tf32" on a GPU and "bf16" in oneDNN on a CPU keep about
# 1e-3 of a product, which a user may choose for their own model. Our float32 sums over the
# vocabulary and our small KLs need full float32: every study pins it for its own duration
# and puts the user's setting back. (These settings are process-wide, not per thread: code
# the user runs on another thread during our call computes in full float32 too.)
_FP32_BACKENDS = ("cuda.matmul", "mkldnn.matmul")


def _backend(path: str):
    obj = torch.backends
    for name in path.split("."):
        obj = getattr(obj, name, None)
    return obj if obj is not None and hasattr(obj, "fp32_precision") else None


@contextmanager
def full_float32_products() -> Iterator[None]:
    """Full-precision float32 matrix products inside (no TF32, no bfloat16 passes); the
    user's setting restored after. Usable as a decorator."""
    backends = [b for b in map(_backend, _FP32_BACKENDS) if b is not None]
    saved = [b.fp32_precision for b in backends]
    legacy = None
    if not backends:  # torch before the per-backend setting
        legacy = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
    for backend in backends:
        backend.fp32_precision = "ieee"
    try:
        yield
    finally:
        for backend, value in zip(backends, saved, strict=True):
            backend.fp32_precision = value
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy)
