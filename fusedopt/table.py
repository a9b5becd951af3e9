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

The table also refuses, when built, tensors the kernel would write twice or read while writing:
two params (or states) sharing memory, a grad sharing memory with a param or state.
"""

from __future__ import annotations

import array
import operator
import sys
from collections.abc import Callable

import torch
from torch import Tensor

from fusedopt.tensors import local, overlapping, span

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


class TensorTable:
    """The tensors of one launch, checked, with their addresses and layouts remembered.

    ``params``, ``grads``: each param with a grad, and its grad; ``states[k]``,
    ``scalars[k]``: the k-th param's state tensors and float32 scalar states; ``name_of(k)``:
    a readable name of the k-th param, for errors. With ``sharded`` (FSDP2's DTensors), the
    memory checked and addressed is each tensor's local shard: ``local_params``,
    ``local_grads``, ``local_states`` (the same lists otherwise).
    """

    def __init__(self, params: list[Tensor], grads: list[Tensor], states: list[list[Tensor]],
                 scalars: list[list[Tensor]], name_of: Callable[[int], str], owner: str,
                 sharded: bool = False):
        self.params, self.grads, self.name_of, self.owner = params, grads, name_of, owner
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
        self._check_aliasing()

    def _local(self, tensors: list[Tensor]) -> list[Tensor]:
        return [local(t) for t in tensors] if self.sharded else tensors

    # ---- memory the kernel writes -------------------------------------------------------------

    def _check_aliasing(self) -> None:
        """No two written tensors (params, states, scalars) share memory, and no grad shares
        memory with a written one: the kernel would race with itself (torch.optim, a loop
        over params, would update such memory twice, or read a grad it already changed)."""
        if not self.params or self.params[0].device.type == "meta":
            return  # nothing is written on the meta device
        written = [span(t) for t in (*self.local_params, *self.owned)]
        clash = overlapping(written)
        if clash is not None:
            raise ValueError(f"{self.owner}: {self._what(clash[0])} and {self._what(clash[1])} "
                             "share memory; each parameter (and each of its states) must have "
                             "its own (a parameter given twice, or storage shared by hand?)")
        spans = sorted((s, e) for s, e in written if e > s)
        # a sentinel span before every address, so that every grad has a span before it
        self._written_starts = torch.tensor([-1] + [s for s, _ in spans], dtype=torch.int64)
        self._written_ends = torch.tensor([-1] + [e for _, e in spans], dtype=torch.int64)
        self._grad_bytes = torch.tensor([g.numel() * g.element_size()
                                         for g in self.local_grads], dtype=torch.int64)
        self._check_grads_apart(self.watched_addresses.pointers[len(self.params):])

    def _check_grads_apart(self, grad_pointers: list[int]) -> None:
        """No grad overlaps a written span: the last span starting before a grad's end must
        end before its start (one vectorised search over the sorted spans)."""
        starts = torch.frombuffer(array.array("q", grad_pointers), dtype=torch.int64)
        ends = starts + self._grad_bytes
        before = torch.searchsorted(self._written_starts, ends) - 1
        hits = (self._written_ends[before] > starts) & (ends > starts)
        if hits.any():
            k = int(hits.nonzero()[0])
            raise ValueError(f"{self.owner}: the grad of {self.name_of(k)} shares memory with a "
                             "parameter or an optimizer state, which the step writes")

    def _what(self, index: int) -> str:
        n = len(self.params)
        if index < n:
            return f"parameter {self.name_of(index)}"
        flat = [(k, "state") for k, ss in enumerate(self.states) for _ in ss]
        flat += [(k, "scalar state") for k, ss in enumerate(self.scalars) for _ in ss]
        k, kind = flat[index - n]
        return f"a {kind} of {self.name_of(k)}"

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
        self.owned_checked = not self.sharded and all(
            map(operator.eq, map(sys.getrefcount, self.owned),
                [OWN_REFERENCES] * len(self.owned)))
        return True

    def check_new_grads(self, grads: list[Tensor]) -> list[int] | None:
        """New grad objects for the same params: their addresses if they have the layout of
        the grads they replace (so the checks made of those still hold) and share no memory
        with what the step writes (else ValueError); None if a layout differs (the caller
        then checks them one by one and rebuilds). Changes nothing: see :meth:`take_grads`."""
        local_grads = self._local(grads)
        if not self.grad_layouts.same(local_grads):
            return None
        pointers = list(map(Tensor.data_ptr, local_grads))
        if hasattr(self, "_written_starts"):
            self._check_grads_apart(pointers)
        return pointers

    def take_grads(self, grads: list[Tensor], pointers: list[int]) -> None:
        """Make checked new grads (:meth:`check_new_grads`) the table's."""
        self.grads = grads
        self.local_grads = self._local(grads)
        n = len(self.params)
        self.watched_addresses.pointers[n:] = pointers

    @property
    def grad_pointers(self) -> list[int]:
        return self.watched_addresses.pointers[len(self.params):]
