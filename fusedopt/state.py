"""Optimizer state: the dicts that count their own changes, and the resolution of a bucket's
state (found in ``optimizer.state``, checked, created where missing).

``optimizer.state`` is a :class:`WatchedStates` of :class:`WatchedDict`, which count two things
in O(1):

* **changes**: every assignment or deletion, at either level, so the engine knows that the user
  replaced or deleted a state tensor (a reset, an offload, ``load_state_dict``) and rebuilds;
* **exposures**: every read that hands a state tensor out (``opt.state[p]["exp_avg"]``,
  ``.get``, ``.values()``, ``.items()``, iteration, copies, pickling, ``state_dict()``). State
  tensors are the optimizer's: user code can only reach them through these reads (or through
  references it already holds, which the table sees in their reference counts). So a step
  after which nothing was handed out, and nobody held anything, need not look at them again:
  the tensor table checks their addresses and layouts only when an exposure happened, or while
  someone outside holds one (see :meth:`fusedopt.table.TensorTable.intact`).

A state dict the user assigns by hand (``opt.state[p] = {...}``) is a plain dict whose later
changes nobody counts: the engine lists those (:attr:`StateOfBucket.unwatched`) and compares
their contents at every step. The engine's own reads go through ``dict``'s methods directly,
so they count as neither.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from fusedopt.kernels import quantization
from fusedopt.kernels.variant import MASTER, QUANTIZED
from fusedopt.tensors import describe


class WatchedDict(dict):
    """A param's state dict that counts its changes and the reads that hand its tensors out.
    It pickles and copies as a plain dict, so checkpoints stay torch.optim's."""

    def __init__(self, changes: list[int], exposures: list[int], *args: Any):
        super().__init__(*args)
        self.changes = changes  # counters shared by the optimizer's whole state
        self.exposures = exposures

    def __reduce__(self):
        self.exposures[0] += 1
        return dict, (dict.copy(self),)


class WatchedStates(defaultdict):
    """``optimizer.state``: param -> :class:`WatchedDict`, counting changes at both levels
    (and, through its dicts, exposures)."""

    def __init__(self, state: dict):
        self.changes = [0]
        self.exposures = [0]
        super().__init__(lambda: WatchedDict(self.changes, self.exposures))
        for key, value in state.items():
            dict.__setitem__(self, key, WatchedDict(self.changes, self.exposures, value))

    def __reduce__(self):
        return defaultdict, (dict,), None, None, iter(self.items())


def _counting(method_name: str) -> Callable:
    base = getattr(dict, method_name)

    def method(self, *args: Any, **kwargs: Any) -> Any:
        self.changes[0] += 1
        return base(self, *args, **kwargs)

    method.__name__ = method_name
    return method


def _exposing(method_name: str) -> Callable:
    base = getattr(dict, method_name)

    def method(self, *args: Any, **kwargs: Any) -> Any:
        self.exposures[0] += 1
        return base(self, *args, **kwargs)

    method.__name__ = method_name
    return method


for _cls in (WatchedDict, WatchedStates):
    for _name in ("__setitem__", "__delitem__", "__ior__", "clear", "pop", "popitem",
                  "setdefault", "update"):
        setattr(_cls, _name, _counting(_name))
# (overriding __iter__ also routes dict(d) and {**d} through __getitem__)
for _name in ("__getitem__", "get", "values", "items", "__iter__", "copy", "__or__",
              "__ror__"):
    setattr(WatchedDict, _name, _exposing(_name))
del _cls, _name


def stored_dtype(p: Tensor, name: str, dtype_of: Callable[[str], torch.dtype] | None
                ) -> torch.dtype:
    """The dtype state ``name`` of ``p`` is kept in: ``dtype_of(name)`` (a variant's, which
    names real dtypes: a complex param's states are complex, of that real dtype's width), or
    the param's."""
    dtype = dtype_of(name) if dtype_of is not None else p.dtype
    if p.is_complex() and dtype == p.real.dtype:
        return p.dtype
    return dtype


def same_memory_order(a: Tensor, b: Tensor) -> bool:
    """Whether dense tensors of one shape lay their elements out in the same order (strides
    may differ on dims of size 1)."""
    return a.shape == b.shape and all(x == y for x, y, n in zip(a.stride(), b.stride(), a.shape)
                                      if n > 1)


def scalar_device(p: Tensor) -> torch.device:
    """Where a param's scalar states live: next to it (the kernels read and write them), but
    on the CPU for meta params, as torch keeps them (a meta scalar has no value to read)."""
    return torch.device("cpu") if p.device.type == "meta" else p.device


class StateOfBucket:
    """The states and scalar states of a bucket's params with grads, in kernel order.

    ``states[k]``: the state tensors of the k-th param, in the order the bucket's variant
    names them; ``scalars[k]``: its float32 0-dim scalar states in the algorithm's order;
    ``fresh[k]``: its "state created, not yet updated" flag (an int64 device scalar, or None).
    Missing state is created at the spec's initial value, in the param's layout and in the
    dtype ``dtype_of(name)`` gives (the param's by default); a precision mode's ``extras``
    start from the param (``master_param``, in fp32) or at zero (``kahan_comp``). Existing
    state is used as it is, the very tensor (torch updates that object, whatever its
    layout). What this step created is remembered (``created``) so that a step that fails
    before its update can forget it again.
    """

    def __init__(self, opt, params: list[Tensor], groups: list[int], names: tuple[str, ...],
                 dtype_of: Callable[[str], torch.dtype] | None = None,
                 extras: tuple[str, ...] = ()):
        self.opt = opt
        algorithm = opt.algorithm
        self.names = names
        self.dtype_of = dtype_of
        self.extras = extras
        self.created: list[tuple[dict, str]] = []
        self.states: list[list[Tensor]] = []
        self.scalars: list[list[Tensor]] = []
        self.fresh: list[Tensor | None] = []
        self.dicts: list[dict | None] = []
        # State created and not yet updated (SGD's first momentum step sets buf = g): an int64
        # device flag per such state, kept by the optimizer and keyed by the state's first
        # tensor, so that it outlives rebuilds of the buckets and goes with the state. A step
        # that AMP skips leaves it set, as torch.optim, which is then not stepped at all,
        # would have no state yet; the step that runs clears it.
        flags = opt.__dict__.setdefault("_new_state", WeakIdKeyDictionary())
        for p, g in zip(params, groups):
            if not names and not algorithm.scalars:
                self.states.append([])
                self.scalars.append([])
                self.fresh.append(None)
                self.dicts.append(None)  # SGD without momentum: torch keeps no state either
                continue
            state = opt.state[p]
            group = opt.param_groups[g]
            tensors, created = self._tensors(p, state, group)
            self.states.append(tensors)
            self.scalars.append(self._scalars(p, state, group))
            self._torch_key_order(state)
            if tensors and created:
                flags[tensors[0]] = torch.ones((), dtype=torch.int64,
                                               device=scalar_device(p))
            self.fresh.append(flags.get(tensors[0]) if tensors else None)
            self.dicts.append(state)

    @property
    def unwatched(self) -> list[tuple[dict, list[Tensor | None]]]:
        """The state dicts nobody counts changes of (assigned by hand), with what they held."""
        names = (*self.names, *self.opt.algorithm.scalars)
        return [(d, [dict.get(d, n) for n in names]) for d in self.dicts
                if d is not None and type(d) is not WatchedDict]

    def _tensors(self, p: Tensor, state: dict, group: dict) -> tuple[list[Tensor], bool]:
        """The state tensors of ``p``, created where missing, and whether one of the
        algorithm's was created (the precision mode's extras do not make a state fresh)."""
        fresh = False
        tensors = []
        for name in self.names:
            value = dict.get(state, name)
            if value is None:
                dtype = stored_dtype(p, name, self.dtype_of)
                # (a precision mode's compensation starts at 0, not at the spec's initial
                # value: Adagrad's is its accumulator's)
                init = 0.0 if name in self.extras else self.opt._state_init(name, group)
                shape = self.opt._state_shape(name, p)
                if name == MASTER:  # the param's value, in full precision
                    value = p.detach().to(dtype, memory_format=torch.preserve_format, copy=True)
                elif dtype == QUANTIZED:  # 8-bit codes of the initial value, and their absmax
                    from fusedopt.precision import quantized

                    value, absmax = quantized(torch.full_like(
                        p, init, dtype=torch.float32, memory_format=torch.preserve_format), name)
                    scale = quantization.absmax_name(name)
                    if dict.get(state, scale) is None:
                        self.created.append((state, scale))
                    state[scale] = absmax
                elif shape != p.shape:  # a factored state (Adafactor's row and column factors)
                    value = torch.full(shape, init, dtype=dtype, device=p.device)
                else:
                    value = (torch.full_like(p, complex(init, init) if p.is_complex() else init,
                                             dtype=dtype, memory_format=torch.preserve_format)
                             if init else torch.zeros_like(p, dtype=dtype,
                                                           memory_format=torch.preserve_format))
                fresh = fresh or name not in self.extras
                self.created.append((state, name))
                state[name] = value
            elif value.dtype == QUANTIZED and not same_memory_order(value, p):
                old, value = value, self._quantized_in_params_layout(p, state, name, value)
                flags = self.opt.__dict__.get("_new_state")
                if flags is not None and old in flags:  # (SGD's fresh buffer stays fresh)
                    flags[value] = flags.pop(old)
            tensors.append(value)  # (in its own layout: the triton runner copes, see there)
        return tensors, fresh

    @staticmethod
    def _quantized_in_params_layout(p: Tensor, state: dict, name: str, codes: Tensor
                                    ) -> Tensor:
        """8-bit codes laid out otherwise than their param (the param re-laid through
        ``p.data``, a checkpoint of another layout), quantized again in the param's layout:
        their blocks are runs of memory, which the kernel walks in the param's order. (Codes
        and absmax were checked: check_existing_state.)"""
        from fusedopt.precision import dequantized, quantized

        scale = quantization.absmax_name(name)
        values = torch.empty_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        values.copy_(dequantized(codes, dict.get(state, scale), name))
        codes, state[scale] = quantized(values, name)
        state[name] = codes
        return codes

    def _scalars(self, p: Tensor, state: dict, group: dict) -> list[Tensor]:
        scalars = []
        device = scalar_device(p)
        for name in self.opt.algorithm.scalars:
            value = dict.get(state, name)
            if (not isinstance(value, Tensor) or value.dtype != torch.float32
                    or value.device != device or value.dim() != 0):
                # torch keeps these on the CPU unless fused; here the kernel reads and writes
                # them, so they live next to the param (as torch's fused and capturable do).
                initial = self.opt._scalar_init(name, group) if value is None else value
                value = torch.tensor(float(initial), dtype=torch.float32, device=device)
                if name not in state:
                    self.created.append((state, name))
                state[name] = value
            scalars.append(value)
        return scalars

    def _torch_key_order(self, state: dict) -> None:
        """torch's key order: the scalars (step first), then the states."""
        order = [k for k in (*self.opt.algorithm.scalars, *self.names) if k in state]
        if list(dict.keys(state))[:len(order)] != order:
            others = {k: v for k, v in dict.items(state) if k not in order}
            entries = {k: dict.__getitem__(state, k) for k in order}
            state.clear()
            state.update(entries, **others)

    def forget_created(self) -> None:
        """Undo this step's state creation (the step failed before its update ran)."""
        for state, name in self.created:
            state.pop(name, None)
        self.created = []


def check_existing_state(opt, p: Tensor, names: tuple[str, ...], owner: str, where: str,
                         dtype_of: Callable[[str], torch.dtype] | None = None) -> None:
    """State a param already has must match it: dtype (the param's, or ``dtype_of(name)``),
    shape, device, layout or not."""
    state = opt.state.get(p, {})
    for name in names:
        value = dict.get(state, name)
        if value is None:
            codes = dict.get(state, name.removesuffix(quantization.ABSMAX_SUFFIX))
            if (name.endswith(quantization.ABSMAX_SUFFIX) and isinstance(codes, Tensor)
                    and codes.dtype == QUANTIZED):
                raise ValueError(f"{owner}: state {name!r} of {where} is missing, and the "
                                 "8-bit state cannot be read without it (delete both to "
                                 "start that state afresh)")
            continue
        if not isinstance(value, Tensor):
            raise ValueError(f"{owner}: state {name!r} of {where} is a "
                             f"{type(value).__name__}, not a tensor")
        shape = opt._state_shape(name, p)
        dtype = stored_dtype(p, name, dtype_of)
        if value.dtype != dtype or value.device != p.device or value.shape != shape:
            expected = "" if shape == p.shape else f" (so {name!r} has shape {tuple(shape)})"
            kept = ("the parameter's dtype" if dtype == p.dtype else
                    f"{dtype} (its precision options)")
            raise ValueError(
                f"{owner}: state {name!r} is {describe(value)}, but its parameter ({where}) "
                f"is {describe(p)}{expected}; fusedopt keeps state {name!r} in {kept} and on "
                "the parameter's device, shaped as torch.optim does (move the optimizer's "
                "state along with the model)")
        if value.layout != torch.strided:
            raise ValueError(f"{owner}: state {name!r} of {where} is a {value.layout} tensor")
        if name.endswith(quantization.ABSMAX_SUFFIX) and not value.is_contiguous():
            raise ValueError(f"{owner}: state {name!r} of {where} is not contiguous (strides "
                             f"{value.stride()}); the kernels read it as one value per block")
