"""The exact peak of live tensor bytes on CPU: what torch.cuda.max_memory_allocated is on CUDA.

A TorchDispatchMode sees every aten op the step runs (autograd's backward and autocast's casts included: the
Python key sits below both) and counts each untyped storage once, from the first op that returns or reads it
until its last reference dies (a weakref finalizer on the storage object; torch keeps a storage's Python object
alive as long as the C++ storage, so the callback fires at the free). Views share their base's storage and are
not counted again; an in-place op adds nothing; a storage resized in place is re-measured when next seen.

To compare with CUDA's counter, which counts everything allocated, the tensors alive before the phase started
(model weights, 4-bit quant states, optimizer state) are registered as a baseline from the roots the caller
names. The approach is the storage bookkeeping of torch.distributed._tools.mem_tracker.MemTracker without its
per-module attribution.

What it cannot see: scratch buffers a kernel allocates and frees inside one op (oneDNN/BLAS workspaces) and
storages built without an aten op (torch.frombuffer, a safetensors mmap) until an op touches them. The
profiler's allocator events see the first kind; tests hold the two against each other (tests/test_tensorpeak.py).
"""

from __future__ import annotations

import weakref
from typing import Iterable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_iter

_ROOT_DEPTH = 8
"""How deep `tensors_in` follows containers and plain attributes below a module: _parameters -> Params4bit ->
__dict__ -> QuantState -> its __dict__ -> state2 (double quant) -> its __dict__ -> code is 7 levels."""


def tensors_in(obj, depth: int = _ROOT_DEPTH, _seen: set | None = None) -> Iterator[torch.Tensor]:
    """Every tensor reachable from `obj`: an nn.Module (parameters, their .grad and 4-bit quant states, buffers,
    tensor attributes), a torch optimizer (its state), or nested dicts/lists/tuples and plain objects of them."""
    # `seen` holds ids of the caller's long-lived objects only (never of a container made here, whose id a later
    # temporary could reuse), so each tensor and module is visited once.
    seen = set() if _seen is None else _seen
    if id(obj) in seen or depth < 0:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
        if obj.is_leaf and obj.grad is not None:  # .grad of a non-leaf is always None (and warns)
            yield obj.grad
        # bitsandbytes' Params4bit keeps absmax and the code book in .quant_state, Int8Params in .CB/.SCB
        yield from tensors_in(getattr(obj, "__dict__", {}), depth - 1, seen)
    elif isinstance(obj, torch.nn.Module):
        for m in obj.modules():
            if id(m) not in seen or m is obj:
                seen.add(id(m))
                for k, v in vars(m).items():
                    if k != "_modules":  # modules() walks the children
                        yield from tensors_in(v, depth - 1, seen)
    elif isinstance(obj, torch.optim.Optimizer):
        for state in obj.state.values():  # param -> {"exp_avg": ..., "state1": ...}
            yield from tensors_in(state, depth - 1, seen)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_in(v, depth - 1, seen)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            yield from tensors_in(v, depth - 1, seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type) and not callable(obj):
        yield from tensors_in(vars(obj), depth - 1, seen)


class TensorPeakTracker(TorchDispatchMode):
    """Live and peak tensor bytes on one device type while entered (`with tracker:`).

    Args:
        device_type: the storages counted ('cpu'); tensors elsewhere (meta, another device) are ignored.
    """

    def __init__(self, device_type: str = "cpu"):
        super().__init__()
        self.device_type = device_type
        self.live_bytes = 0
        self.peak_bytes = 0
        self.baseline_bytes = 0
        """Bytes registered by `add_roots` (alive before the phase), counted in live_bytes until freed."""
        self._sizes: dict[int, int] = {}
        """id(storage object) -> bytes counted for it."""
        self._refs: dict[int, weakref.ref] = {}
        """id(storage object) -> a weak reference whose callback uncounts it: held here, not in a global registry,
        so a tracker that is dropped leaves no callbacks behind on the model's storages."""

    def _track(self, t: torch.Tensor) -> int:
        """Count t's storage if new (or grown); returns the bytes added."""
        if t.device.type != self.device_type:
            return 0
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without storage (functional wrappers)
            return 0
        key, n = id(st), st.nbytes()
        old = self._sizes.get(key)
        if old is None:
            if n == 0:
                return 0
            self._sizes[key] = n
            self._refs[key] = weakref.ref(st, lambda _, key=key: self._free(key))
        elif old != n:  # resized in place (resize_, out= ops)
            self._sizes[key] = n
        else:
            return 0
        self.live_bytes += n - (old or 0)
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes = self.live_bytes
        return n - (old or 0)

    def _free(self, key: int) -> None:
        self._refs.pop(key, None)
        self.live_bytes -= self._sizes.pop(key, 0)

    def add_roots(self, roots: Iterable) -> int:
        """Count the storages reachable from `roots` (modules, optimizers, tensors) as live; returns the bytes added."""
        added = 0
        for obj in roots:
            if obj is not None:
                for t in tensors_in(obj):
                    added += self._track(t)
        self.baseline_bytes += added
        return added

    def reset_peak(self) -> None:
        """Start a new peak from what is live now (torch.cuda.reset_peak_memory_stats's meaning)."""
        self.peak_bytes = self.live_bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Inputs too: a tensor made before the phase and not under a root is counted from its first use.
        for t in tree_iter((out, args, kwargs)):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out
