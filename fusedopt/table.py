"""The validated tensor table of a bucket: what the kernel is launched with, and the proof, at
every step, that each address still holds what the table says.

A :class:`TensorTable` is built from tensors the bucket has checked (param, grad, states and
scalar states of each param with a grad). It remembers, for every one of them, its address and
its layout (dtype, device, shape, strides), and compares both with the live tensors before a
launch, in bulk C++ calls where torch has them (CUDA-graph trees' pointer check, dynamo's
tensor guards), else in Python. A tensor whose storage was rebound (``t.data = ...``),
re-viewed at the same address (``p.data = p.data.t()``), resized or re-typed fails the check,
and the bucket rebuilds its table from scratch, with every check, before anything runs.

What is checked when:

* **params and grads**, which user code holds: at every step. Grads that are new objects
  (``zero_grad(set_to_none=True)`` and a backward) take :meth:`TensorTable.check_new_grads`:
  they must have the layout of the grads they replace, and share no memory with what the step
  writes.
* **states and scalar states**, which are the optimizer's: user code reaches them only through
  ``optimizer.state`` (whose dicts count every read that hands one out: "exposures") or
  through a reference it kept. So they are checked at the first step after an exposure or a
  rebuild; and if at that check someone outside holds one of them (its Python reference count
  is above the table's own), at every step until nobody does. Otherwise they cannot have
  changed, and a step does not look at them: the check costs O(params), not O(tensors).

:class:`WrittenMemory` refuses, before any bucket runs, tensors one launch would write twice or
read while writing, across every bucket of the optimizer: two params (or states) sharing
memory, a grad sharing memory with a param or a state.
"""

from __future__ import annotations

import array
import operator
import sys
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fusedopt.tensors import local, overlapping

_bulk_pointers = getattr(torch._C, "_tensors_data_ptrs_at_indices_equal", None)
try:  # dynamo's C++ tensor guard: dtype, device, shape, strides (and requires_grad, keys)
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except ImportError:  # pragma: no cover - every torch fusedopt supports has it
    _TensorGuards = None


def _own_references() -> int:
    """The reference count a state tensor has when only the optimizer holds it: its state dict
    entry, the table's per-param list and flat list, and the count's own argument. Measured on
    a probe held the same way, so that it holds whatever the interpreter counts."""
    probe = torch.empty(0)
    entry, per_param, flat = {"state": probe}, [probe], [probe]
    del probe
    count = next(map(sys.getrefcount, flat))
    del entry, per_param
    return count


OWN_REFERENCES = _own_references()


class Addresses:
    """The data pointers of a list of tensors, and a check that they are unchanged."""

    def __init__(self, tensors: list[Tensor]):
        self.pointers = [t.data_ptr() for t in tensors]
        self.indices = list(range(len(tensors)))

    def same(self, tensors: list[Tensor]) -> bool:
        try:
            if _bulk_pointers is not None:
                return _bulk_pointers(tensors, self.pointers, self.indices)
            return list(map(Tensor.data_ptr, tensors)) == self.pointers
        except RuntimeError:  # e.g. a sparse tensor has no data pointer: not the same
            return False


class Layouts:
    """The dtype, device, shape and strides of a list of tensors, and a check that a list of
    tensors has exactly these (the same tensors at a later step, or their replacements)."""

    def __init__(self, tensors: list[Tensor]):
        self.guard = None
        if _TensorGuards is not None and tensors:
            try:
                self.guard = _TensorGuards(
                    *tensors, dynamic_dims_sizes=[list(t.shape) for t in tensors],
                    dynamic_dims_strides=[list(t.stride()) for t in tensors])
            except Exception:  # noqa: BLE001 - another torch's guard API: check in Python
                self.guard = None
        self.expected = None if self.guard else [_layout(t) for t in tensors]

    def same(self, tensors: list[Tensor]) -> bool:
        try:
            if self.guard is not None:
                return self.guard.check(*tensors)
            return [_layout(t) for t in tensors] == self.expected
        except RuntimeError:  # e.g. a sparse tensor has no strides: not the same
            return False


def _layout(t: Tensor) -> tuple:
    return t.dtype, t.device, t.shape, t.stride()


class WrittenMemory:
    """The memory a step writes (params, states, scalar states, over every bucket), as sorted
    byte spans, and the checks that nothing shares it: pairwise when the tables are (re)built,
    against new grads at every step that brings some (one vectorised search).

    ``written``: (span, description) of each tensor the step writes; meta tensors (no memory)
    are left out by the caller.
    """

    def __init__(self, written: list[tuple[tuple[int, int], Callable[[], str]]], owner: str):
        self.owner = owner
        clash = overlapping([span for span, _ in written])
        if clash is not None:
            first, second = (written[i][1]() for i in clash)
            raise ValueError(f"{owner}: {first} and {second} share memory; each parameter (and "
                             "each of its states) must have its own memory (a parameter given "
                             "twice, or storage shared by hand?)")
        spans = sorted(span for span, _ in written if span[1] > span[0])
        # a sentinel span before every address, so that every grad has a span before it
        self.starts = torch.tensor([-1] + [s for s, _ in spans], dtype=torch.int64)
        self.ends = torch.tensor([-1] + [e for _, e in spans], dtype=torch.int64)

    def check_grads(self, pointers: list[int], sizes: torch.Tensor,
                    name_of: Callable[[int], str]) -> None:
        """ValueError if a grad (its address and size in bytes) overlaps written memory: the
        last span starting before the grad's end must end before its start."""
        if not pointers:
            return
        starts = torch.frombuffer(array.array("q", pointers), dtype=torch.int64)
        ends = starts + sizes
        before = torch.searchsorted(self.starts, ends) - 1
        hits = (self.ends[before] > starts) & (ends > starts)
        if hits.any():
            raise ValueError(f"{self.owner}: the grad of {name_of(int(hits.nonzero()[0]))} "
                             "shares memory with a parameter or an optimizer state, which the "
                             "step writes")


class TensorTable:
    """The tensors of one launch, checked, with their addresses and layouts remembered.

    ``params``, ``grads``: each param with a grad, and its grad; ``states[k]``,
    ``scalars[k]``: the k-th param's state tensors and float32 scalar states; ``name_of(k)``:
    a readable name of the k-th param, for errors. With ``sharded`` (FSDP2's DTensors), the
    memory checked and addressed is each tensor's local shard: ``local_params``,
    ``local_grads``, ``local_states`` (the same lists otherwise). ``own_weak_references``:
    the container of the optimizer's own weak references to state tensors (``in`` tells).
    """

    def __init__(self, params: list[Tensor], grads: list[Tensor], states: list[list[Tensor]],
                 scalars: list[list[Tensor]], name_of: Callable[[int], str], owner: str,
                 sharded: bool = False, own_weak_references: Any = ()):
        self.params, self.grads, self.name_of, self.owner = params, grads, name_of, owner
        self.own_weak_references = own_weak_references
        self.states, self.scalars, self.sharded = states, scalars, sharded
        self.local_params = self._local(params)
        self.local_grads = self._local(grads)
        self.local_states = [self._local(ss) for ss in states]
        self.owned = [*(s for ss in self.local_states for s in ss),
                      *(s for ss in scalars for s in ss)]
        # params and grads are checked together at every step; the grads' layouts stay
        # those of the first grads (new grads must match them), their addresses follow them
        self.watched_addresses = Addresses([*self.local_params, *self.local_grads])
        self.watched_layouts = Layouts([*self.local_params, *self.local_grads])
        self.param_addresses = Addresses(self.local_params)
        self.param_layouts = Layouts(self.local_params)
        self.grad_layouts = Layouts(self.local_grads)
        self.owned_addresses = Addresses(self.owned)
        self.owned_layouts = Layouts(self.owned)
        self.owned_checked = False  # no step has checked the states since the table was built
        self.grad_bytes = torch.tensor([g.numel() * g.element_size() for g in self.local_grads],
                                       dtype=torch.int64)

    def _local(self, tensors: list[Tensor]) -> list[Tensor]:
        return [local(t) for t in tensors] if self.sharded else tensors

    # ---- the per-step checks ------------------------------------------------------------------

    def intact(self, grads: list[Tensor], exposed: bool = True) -> bool:
        """The table as it was: every param and every grad (``grads``: this step's, the very
        objects of the table) at its address with its layout; the states and scalars too when
        they may have been reached (see :meth:`_owned_intact`)."""
        watched = self.local_params + self._local(grads)
        return (self.watched_addresses.same(watched) and self.watched_layouts.same(watched)
                and self._shards_intact() and self._owned_intact(exposed))

    def params_intact(self, exposed: bool = True) -> bool:
        """As :meth:`intact`, for everything but the grads (which are about to be replaced)."""
        return (self.param_addresses.same(self.local_params)
                and self.param_layouts.same(self.local_params) and self._shards_intact()
                and self._owned_intact(exposed))

    def _shards_intact(self) -> bool:
        """FSDP2: each param still has the local shard the table holds."""
        return not self.sharded or all(map(operator.is_, self._local(self.params),
                                           self.local_params))

    def _owned_intact(self, exposed: bool) -> bool:
        """The states and scalars at their addresses with their layouts, checked when they may
        have changed: after an exposure (``exposed``), or while someone outside holds one
        (their Python reference count is above the optimizer's own), or at the first step of
        the table. Otherwise nobody can have reached them since the last check."""
        if not exposed and self.owned_checked:
            return True
        if not (self.owned_addresses.same(self.owned) and self.owned_layouts.same(self.owned)):
            return False
        # Held by nobody else, not even weakly (the optimizer's own weak references: the
        # new-state flags are keyed by the first state of a param)
        ours = self.own_weak_references
        self.owned_checked = not self.sharded and all(
            map(operator.eq, map(sys.getrefcount, self.owned),
                [OWN_REFERENCES] * len(self.owned))) and all(
            weakref.getweakrefcount(t) == (t in ours) for t in self.owned)
        return True

    def check_new_grads(self, grads: list[Tensor]) -> list[int] | None:
        """New grad objects for the same params: their addresses if they have the layout of
        the grads they replace (so the checks made of those still hold); None if a layout
        differs (the caller then checks them one by one and rebuilds). Changes nothing: see
        :meth:`take_grads`. (That they share no memory with what the step writes is
        :class:`WrittenMemory`'s check.)"""
        local_grads = self._local(grads)
        if not self.grad_layouts.same(local_grads):
            return None
        return list(map(Tensor.data_ptr, local_grads))

    def take_grads(self, grads: list[Tensor], pointers: list[int]) -> None:
        """Make checked new grads (:meth:`check_new_grads`) the table's."""
        self.grads = grads
        self.local_grads = self._local(grads)
        n = len(self.params)
        self.watched_addresses.pointers[n:] = pointers

    @property
    def grad_pointers(self) -> list[int]:
        return self.watched_addresses.pointers[len(self.params):]
