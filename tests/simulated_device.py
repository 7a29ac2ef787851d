"""A second device on the CPU, for tests: code that mixes devices as CUDA would refuse fails
here, on a machine with no GPU.

``on_simulated_device(model)`` moves a model's weights to the simulated device (``lazy:0``, a
device type that CPU builds of torch know, with a device guard for autograd, that nothing
else here uses). Its tensors are ``OnDevice`` wrappers around CPU tensors: they report the
simulated device, compute on the CPU, and follow PyTorch's rules for a CUDA tensor:

- an operation may mix a device tensor with CPU tensors only where PyTorch allows it: a CPU
  tensor of zero dimensions (a "CPU scalar") joins any operation, and the indices of
  ``x[idx]`` / ``x[idx] = v`` may live on the CPU; anything else raises, as CUDA does
  ("Expected all tensors to be on the same device");
- a CPU operation may not take a device tensor of any size (CUDA refuses a CUDA scalar in a
  CPU operation too);
- ``.numpy()`` of a device tensor raises (as for CUDA); ``.item()``, ``.tolist()``,
  ``float()`` and ``.cpu()`` work and are counted as host-device synchronisations;
- factory functions given ``device=`` the simulated device make device tensors.

The mode is active only inside ``with SimulatedDevice() as sim:``; nothing outside it changes.
"""

from __future__ import annotations

import threading
from collections import Counter

import numpy as np
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

DEVICE = torch.device("lazy", 0)
_CROSS_DEVICE = {
    torch.ops.aten._to_copy.default,
    torch.ops.aten.copy_.default,
    torch.ops.aten.copy.default,
    torch.ops.aten._copy_from.default,
    torch.ops.aten._copy_from_and_resize.default,
    torch.ops.aten._local_scalar_dense.default,
}
# indexing takes CPU indices (torch moves them); the first argument and the values must agree
_CPU_INDICES = {
    torch.ops.aten.index.Tensor,
    torch.ops.aten.index_put.default,
    torch.ops.aten.index_put_.default,
    torch.ops.aten._index_put_impl_.default,
    torch.ops.aten._unsafe_index.Tensor,
    torch.ops.aten._unsafe_index_put.default,
}


class DeviceMixingError(RuntimeError):
    """What CUDA would raise: tensors on two devices in one operation."""


class OnDevice(torch.Tensor):
    """A tensor on the simulated device: a CPU tensor (``elem``) that reports ``lazy:0``."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> OnDevice:
        assert type(elem) is torch.Tensor and elem.device.type == "cpu", type(elem)
        out = torch.Tensor._make_wrapper_subclass(
            cls,
            elem.shape,
            strides=elem.stride(),
            storage_offset=elem.storage_offset(),
            dtype=elem.dtype,
            layout=elem.layout,
            device=DEVICE,
            requires_grad=False,
        )
        out.elem = elem
        return out

    def __repr__(self) -> str:
        return f"OnDevice({self.elem!r})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(t not in _PLAIN for t in types):
            return NotImplemented  # another subclass (a jet) answers first
        if func is torch.Tensor.numpy:
            raise TypeError(
                "can't convert a simulated-device tensor to numpy (CUDA refuses this too): "
                "use Tensor.cpu() first"
            )
        if func is torch.Tensor.tolist:
            _counted("tolist")
            return args[0].elem.tolist()
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__):
            # torch builds a list's index tensor below the dispatcher (no mode sees it): make
            # it here, on the CPU, as a CPU index is allowed
            args = (args[0], _index_tensors(args[1]), *args[2:])
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # torch.func transforms run their inner operations below the mode's reach: the
        # subclass applies the same rules there
        return _dispatch(func, types, args, kwargs or {})


_PLAIN = (OnDevice, torch.Tensor, torch.nn.Parameter)
_state = threading.local()


class Tally:
    """What a harness saw: synchronisations by kind, the largest device tensor's bytes."""

    def __init__(self) -> None:
        self.syncs: Counter = Counter()
        self.largest = 0
        self.largest_made_by = ""


def _counted(kind: str, size: int = 0, made_by: str = "") -> None:
    tally = getattr(_state, "tally", None)
    if tally is None:
        return
    if kind == "largest":
        if size > tally.largest:
            tally.largest, tally.largest_made_by = size, made_by
    else:
        tally.syncs[kind] += 1


def _index_tensors(index):
    if isinstance(index, tuple):
        return tuple(_index_tensors(i) for i in index)
    if isinstance(index, list):
        return torch.tensor(index)
    if isinstance(index, np.ndarray):
        return torch.from_numpy(index)
    return index


def _is_cpu_scalar(x) -> bool:
    return type(x) is torch.Tensor and x.device.type == "cpu" and x.dim() == 0


def _on_device(x) -> bool:
    return isinstance(x, OnDevice)


def _unwrap(x):
    return x.elem if isinstance(x, OnDevice) else x


def _sim_device(x) -> bool:
    return isinstance(x, torch.device) and x.type == DEVICE.type


_FROM_DATA = {torch.tensor, torch.as_tensor, torch.asarray, torch.Tensor.new_tensor}


class _FromData(TorchFunctionMode):
    """``torch.tensor(data, device=...)`` copies its data to the device below the dispatcher,
    where no mode sees it: made on the CPU here, then moved through the dispatcher."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FROM_DATA and _sim_device(_as_device(kwargs.get("device"))):
            made = func(*args, **dict(kwargs, device="cpu"))
            return made.to(DEVICE)
        return func(*args, **kwargs)


def _as_device(d):
    if d is None or isinstance(d, torch.device):
        return d
    try:
        return torch.device(d)
    except (RuntimeError, TypeError):
        return None


class SimulatedDevice(TorchDispatchMode):
    """The simulated second device's rules, for every operation while active.

    ``syncs`` counts the host-device synchronisations seen (``item``, ``tolist``, copies to
    the CPU), by kind; ``largest`` is the size in bytes of the largest tensor made on the
    device (a memory bound a test can check without a GPU).
    """

    def __init__(self, tally: Tally | None = None) -> None:
        super().__init__()
        self.tally = Tally() if tally is None else tally

    @property
    def syncs(self) -> Counter:
        return self.tally.syncs

    @property
    def largest(self) -> int:
        return self.tally.largest

    @property
    def largest_made_by(self) -> str:
        """The operation, shape and dtype of the largest tensor made."""
        return self.tally.largest_made_by

    def __enter__(self):
        self._outer = getattr(_state, "tally", None)
        _state.tally = self.tally
        self._from_data = _FromData()
        self._from_data.__enter__()
        # a device is visible from every thread (the monitor's worker, a data loader): threads
        # started while the harness is active run under it too
        self._run = threading.Thread.run
        if not getattr(self._run, "simulated", False):
            threading.Thread.run = _run_simulated(self._run, self.tally)
        return super().__enter__()

    def __exit__(self, *exc):
        _state.tally = self._outer
        threading.Thread.run = self._run
        out = super().__exit__(*exc)
        self._from_data.__exit__(*exc)
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _dispatch(func, types, args, kwargs or {})


def _run_simulated(run, tally: Tally):
    def simulated_run(thread):
        with SimulatedDevice(tally):
            run(thread)

    simulated_run.simulated = True
    return simulated_run


def _dispatch(func, types, args, kwargs):
    if any(t not in _PLAIN for t in types):
        return NotImplemented  # another subclass (a jet) answers first
    to_device = _sim_device(kwargs.get("device"))
    if to_device:
        kwargs = dict(kwargs, device=torch.device("cpu"))
    flat = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
    device_in = any(_on_device(x) for x in flat)
    if func not in _CROSS_DEVICE:
        _check(func, args, kwargs, flat, device_in)
    elif func is torch.ops.aten._local_scalar_dense.default and device_in:
        _counted("item")
    elif func is torch.ops.aten._to_copy.default and device_in and not to_device:
        target = kwargs.get("device")
        if target is not None and target.type == "cpu":
            _counted("to_cpu")
            return func(*tree_map(_unwrap, args), **kwargs)
        to_device = True
    elif func in (torch.ops.aten.copy_.default, torch.ops.aten.copy.default):
        # dst.copy_(src) crosses devices: the result lives where dst does
        dst = args[0]
        if not _on_device(dst) and _on_device(args[1]):
            _counted("to_cpu")
        to_device = _on_device(dst)
    if (to_device or device_in) and kwargs.get("generator") is not None:
        raise DeviceMixingError(
            f"Expected a '{DEVICE.type}' device type for generator but found 'cpu' ({func})"
        )
    unwrapped_args = tree_map(_unwrap, args)
    unwrapped_kwargs = tree_map(_unwrap, kwargs)
    out = func(*unwrapped_args, **unwrapped_kwargs)
    if not (to_device or device_in):
        return out
    # an output that is an input's own tensor (in place, out=) returns that input's wrapper
    inputs = {id(x.elem): x for x in flat if _on_device(x)}
    return tree_map(lambda o: _rewrap(o, inputs, func), out)


def _check(func, args, kwargs, flat, device_in) -> None:
    if not device_in:
        return
    if func in _CPU_INDICES:
        indices = args[1] if len(args) > 1 else kwargs.get("indices")
        skip = {id(i) for i in (indices or []) if isinstance(i, torch.Tensor)}
        flat = [x for x in flat if id(x) not in skip]
    for x in flat:
        if not _on_device(x) and not _is_cpu_scalar(x):
            raise DeviceMixingError(
                f"Expected all tensors to be on the same device, but found at least two "
                f"devices, {DEVICE} and cpu! ({func}, a CPU tensor of shape "
                f"{tuple(x.shape)})"
            )


def _rewrap(out, inputs: dict, func=None):
    if not isinstance(out, torch.Tensor):
        return out
    same = inputs.get(id(out))
    if same is not None:
        return same
    _counted("largest", out.untyped_storage().nbytes(), f"{func} {tuple(out.shape)} {out.dtype}")
    return OnDevice(out)


def on_simulated_device(model: torch.nn.Module) -> torch.nn.Module:
    """Move a model's parameters and buffers to the simulated device (call inside the mode)."""
    return model.to(DEVICE)


def to_host(x):
    """A result tensor back on the CPU (outside the mode a wrapper cannot compute)."""
    return tree_map(lambda t: t.elem.clone() if isinstance(t, OnDevice) else t, x)
