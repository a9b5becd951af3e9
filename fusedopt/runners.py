"""The two backends behind one ``run()``: who does the arithmetic of a bucket's step.

Both take the same checked :class:`~fusedopt.table.TensorTable`, the groups' hyperparameters
by name, and AMP's and clipping's device scalars; they differ only in who computes:

* :class:`ReferenceRunner`: one readable per-tensor function per algorithm
  (:mod:`fusedopt.reference`), in torch ops, anywhere torch runs;
* :class:`TritonRunner`: the one multi-tensor kernel (:mod:`fusedopt.kernels`), launched once
  per step over a device-resident copy of the table, patched where the table changes.
"""

from __future__ import annotations

import array
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor

from fusedopt import reference
from fusedopt.kernels import interpreting
from fusedopt.kernels.quantization import absmax_name, code_table
from fusedopt.kernels.variant import Precision
from fusedopt.table import TensorTable
from fusedopt.tensors import real


def python_hyper(hyper: dict[str, Any]) -> dict[str, Any]:
    """A group's hyperparameters for the reference functions: numbers as Python floats (a
    tensor lr is read), the rest (Muon's coefficients, step count and lr rule) as they are."""
    return {k: float(v) if isinstance(v, (Tensor, float, int)) else v for k, v in hyper.items()}


class ReferenceRunner:
    """The readable path: the algorithm's reference function, param by param (through
    :func:`fusedopt.reference.precise_update` in a precision mode)."""

    rng: Tensor | None = None  # stochastic rounding's (seed, launch count, programs done)

    def __init__(self, variant, table: TensorTable, groups: list[int],
                 fresh: list[Tensor | None]):
        self.variant, self.table, self.groups, self.fresh = variant, table, groups, fresh
        self.update = getattr(reference, variant.algorithm.name)

    def accept_grads(self, pointers: list[int]) -> None:
        pass  # the reference reads the table's grads as they are

    def run(self, hyper: list[dict[str, Any]], grad_scale: Tensor | None,
            found_inf: Tensor | None, clip_coef: Tensor | None, capturable: bool) -> None:
        if found_inf is not None and found_inf.item() != 0:
            return  # AMP saw an inf or NaN: GradScaler skips this step
        algorithm = self.variant.algorithm
        table = self.table
        grads = table.grads
        if grad_scale is not None:  # GradScaler's unscale: times its float32 1/scale
            inv_scale = grad_scale.double().reciprocal().float()
            grads = [g * inv_scale.to(g.device) for g in grads]
        if clip_coef is not None:  # clip_grad_norm_'s coefficient, as torch multiplies by it
            grads = [g * clip_coef.to(g.device, g.dtype) for g in grads]
        hyper = [python_hyper(h) for h in hyper]
        flags = dict(zip(algorithm.flags, self.variant.flags))
        absent = {s: None for s in algorithm.states if s not in self.variant.states}
        mode = self.variant.precision
        if self.rng is not None:
            seed, count, _ = self.rng.tolist()
        for k, (p, g) in enumerate(zip(table.params, grads)):
            states = dict(zip(self.variant.tensors, (real(s) for s in table.states[k])))
            scalars = dict(zip(algorithm.scalars, table.scalars[k]))
            if "step" in scalars:  # torch counts the step before using it
                scalars["step"] = scalars["step"].add_(1).item()
            fresh = {"fresh": bool(self.fresh[k])} if algorithm.reads_fresh else {}
            arguments = {**hyper[self.groups[k]], **scalars, **fresh, **flags}
            if mode == Precision():
                self.update(real(p), real(g), **{**absent, **states}, **arguments)
                continue
            extra = states.pop(mode.extras[0]) if mode.extras else None
            scales = {name: states.pop(absmax_name(name)) for name in self.variant.states
                      if mode.quantized}
            reference.precise_update(
                self.update, real(p), real(g), {**absent, **states}, extra, write=mode.write,
                rng=(seed, count, k) if self.rng is not None else None, scales=scales,
                **arguments)
        for flag in self.fresh:
            if flag is not None:
                flag.zero_()
        if self.rng is not None:
            self.rng[1] += 1  # the launch count, as the kernel advances it


class TritonRunner:
    """The kernel path: a device copy of the table (addresses, sizes, groups, the fresh flags
    and scalar addresses), the chunk work list, and one launch per step."""

    rng: Tensor | None = None  # stochastic rounding's (seed, launch count, programs done)

    def __init__(self, variant, table: TensorTable, groups: list[int],
                 fresh: list[Tensor | None], device: torch.device):
        from fusedopt import kernels

        self.kernels = kernels
        self.variant, self.table, self.device = variant, table, device
        # what the FRESH column points at for state that is not new (the kernel only reads it)
        self.not_new = torch.zeros((), dtype=torch.int64, device=device)
        self.fresh = fresh
        n = len(table.params)
        names = kernels.columns(len(variant.tensors), len(variant.algorithm.scalars))
        self.columns = {name: i for i, name in enumerate(names)}
        cols: dict[str, list[int]] = {name: [0] * n for name in names}
        self.state_copies: list[tuple[Tensor, Tensor]] = []
        for k, p in enumerate(table.local_params):
            cols["PARAM"][k] = p.data_ptr()
            cols["NUMEL"][k] = real(p).numel()
            cols["GROUP"][k] = groups[k]
            cols["FRESH"][k] = (fresh[k] if fresh[k] is not None else self.not_new).data_ptr()
            for j, s in enumerate(table.local_states[k]):
                if j < len(variant.element_tensors) and s.stride() != p.stride():
                    # The kernel indexes param and states alike: a state laid out otherwise
                    # (assigned by hand, torch updates it by logical index) is updated through
                    # a copy in the param's layout, copied back after the launch.
                    copy = torch.empty_like(p, dtype=s.dtype)
                    self.state_copies.append((s, copy))
                    s = copy
                cols[f"STATE{j}"][k] = s.data_ptr()
            for j, s in enumerate(table.scalars[k]):
                cols[f"SCALAR{j}"][k] = s.data_ptr()
        self.tensors = torch.tensor([cols[name] for name in names],
                                    dtype=torch.int64).to(device, non_blocking=True)
        self.num_tensors = n
        from fusedopt.kernels import skeleton

        self.work, self.num_work = kernels.work_list(cols["NUMEL"], device,
                                                     skeleton.chunk_elements(variant))
        self.done_counts = torch.zeros(n, dtype=torch.int32, device=device)
        # per-tensor sums in the opmath dtype; the update launch re-zeroes them
        self.sums = (torch.zeros(n, len(variant.algorithm.sums), device=device,
                                 dtype=variant.compute) if variant.algorithm.sums else None)
        self.codes = (code_table(device) if variant.precision.quantized else None)
        self.param_strides = [p.stride() for p in table.local_params]
        self.hyper_rows: list[tuple] | None = None
        self.hyper: Tensor | None = None
        self.prepared: dict = {}  # this bucket's compiled kernels, launched without the JIT
        self.grad_copies: dict[int, Tensor] | None = None
        self.accept_grads(table.grad_pointers)

    def accept_grads(self, pointers: list[int]) -> None:
        """New grad addresses: re-point the grad column. The kernel indexes param and grad
        alike, so a grad laid out otherwise than its param is read from a copy in the param's
        layout (a copy each step: autograd never produces this, but an assigned grad may).
        New grads have their predecessors' layouts (the table checked), so the copies made
        for the first grads serve every later one."""
        if self.grad_copies is None:
            grads = self.table.local_grads
            self.grad_copies = {k: torch.empty_like(self.table.local_params[k])
                                for k, (g, stride) in enumerate(zip(grads, self.param_strides))
                                if g.stride() != stride}
        upload_grad_pointers(self.tensors[self.columns["GRAD"]], pointers, self.grad_copies)

    def run(self, hyper: list[dict[str, Any]], grad_scale: Tensor | None,
            found_inf: Tensor | None, clip_coef: Tensor | None, capturable: bool) -> None:
        for k, copy in self.grad_copies.items():
            copy.copy_(self.table.local_grads[k])
        for state, copy in self.state_copies:
            copy.copy_(state)
        self._update_hyper_table(hyper, capturable)
        variant = self.variant.with_amp(grad_scale is not None, found_inf is not None,
                                        clip_coef is not None)
        # Triton launches on the current CUDA device: make it this bucket's.
        with torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext():
            self.kernels.launch(
                variant, tensors=self.tensors, num_tensors=self.num_tensors, work=self.work,
                num_work=self.num_work, hyper=self.hyper, done_counts=self.done_counts,
                sums=self.sums, grad_scale=grad_scale, found_inf=found_inf,
                clip_coef=clip_coef, rng=self.rng, codes=self.codes, interpreting=interpreting(),
                prepared=self.prepared)
        for state, copy in self.state_copies:
            state.copy_(copy)

    def _update_hyper_table(self, hyper: list[dict[str, Any]], capturable: bool) -> None:
        self.hyper, self.hyper_rows = device_hyper_table(
            [tuple(h.values()) for h in hyper], self.hyper_rows, self.hyper, self.device,
            capturable)


def upload_grad_pointers(column: Tensor, pointers: list[int],
                         copies: dict[int, Tensor]) -> None:
    """Copy grad addresses into a table's device column; a grad read through a copy (another
    layout than the kernel indexes) is pointed at its copy."""
    if copies:
        pointers = list(pointers)
        for k, copy in copies.items():
            pointers[k] = copy.data_ptr()
    # array -> frombuffer is ~10x faster than torch.tensor(list) for thousands of ints;
    # non_blocking: torch skips the stream synchronisation a blocking copy ends with (the
    # driver stages the pageable source, so these small tables go without waiting)
    host = torch.frombuffer(array.array("q", pointers), dtype=torch.int64)
    column.copy_(host, non_blocking=True)


def device_hyper_table(rows: list[tuple], seen: list[tuple] | None, table: Tensor | None,
                       device: torch.device, capturable: bool) -> tuple[Tensor, list[tuple]]:
    """The groups' numeric hyperparameters (one row per group) as a float64 device table:
    ``(table, rows seen)``, re-uploaded only when a value changed since ``seen``. Tensor
    values on an accelerator (a CUDA lr), and with capturable every tensor value, are not read
    on the host (that would sync) but copied into their slots on the device at every step, so
    a CUDA graph replays the copies with the current values. CPU tensors are read."""

    def in_slot(value: Any) -> bool:
        return isinstance(value, Tensor) and (capturable or value.device.type != "cpu")

    slots = [(r, c, v) for r, row in enumerate(rows) for c, v in enumerate(row) if in_slot(v)]
    rows = [tuple(None if in_slot(v) else float(v) for v in row) for row in rows]
    if rows != seen or table is None:
        values = [[0.0 if v is None else v for v in row] for row in rows]
        table = torch.tensor(values, dtype=torch.float64).to(device, non_blocking=True)
    for r, c, value in slots:  # (reshape: torch takes any one-element tensor)
        table[r, c].copy_(value.reshape(()), non_blocking=True)
    return table, rows


class SparseRunner:
    """The params of a bucket with sparse grads, for one step: the algorithm's element-wise
    update on the rows each coalesced grad holds (the rows it does not hold are left alone,
    as torch's sparse updates leave them). ``triton``: one launch of
    :mod:`fusedopt.kernels.sparse` over every row of every grad; ``reference``: the
    algorithm's reference function on each param's gathered rows, scattered back."""

    def __init__(self, variant, params: list[Tensor], grads: list[Tensor],
                 states: list[list[Tensor]], scalars: list[list[Tensor]], groups: list[int],
                 device: torch.device, backend: str):
        self.variant, self.params, self.grads = variant, params, grads
        self.states, self.scalars, self.groups = states, scalars, groups
        self.device, self.backend = device, backend

    def run(self, hyper: list[dict[str, Any]], grad_scale: Tensor | None,
            found_inf: Tensor | None) -> None:
        if self.backend == "triton":
            self._launch(hyper, grad_scale, found_inf)
        else:
            self._reference(hyper, grad_scale, found_inf)

    @staticmethod
    def _rows(grad: Tensor) -> tuple[Tensor, Tensor, int]:
        """(row numbers, values as rows, row width) of a coalesced grad: its sparse dims
        flattened into the row number of the param's row-major (rows x width) view."""
        sparse_dims = grad.sparse_dim()
        indices, values = grad._indices(), grad._values()
        shape = grad.shape
        width = 1
        for n in shape[sparse_dims:]:
            width *= n
        if sparse_dims == 0:  # one "row", the whole tensor (held or not: nnz is 0 or 1)
            rows = torch.zeros(indices.shape[1], dtype=torch.int64, device=indices.device)
        elif sparse_dims == 1:
            rows = indices[0]
        else:
            multipliers = [1] * sparse_dims
            for d in range(sparse_dims - 2, -1, -1):
                multipliers[d] = multipliers[d + 1] * shape[d + 1]
            rows = (indices * torch.tensor(multipliers, device=indices.device)[:, None]).sum(0)
        return rows.contiguous(), values.reshape(values.shape[0], width).contiguous(), width

    def _launch(self, hyper, grad_scale, found_inf) -> None:
        from fusedopt.kernels import sparse

        copies = []  # the kernel indexes row-major memory: other layouts go through copies

        def row_major(t: Tensor) -> Tensor:
            if t.is_contiguous():
                return t
            copy = t.contiguous()
            copies.append((t, copy))
            return copy

        n = len(self.params)
        names = sparse.columns(len(self.variant.states), len(self.variant.algorithm.scalars))
        cols: dict[str, list[int]] = {name: [0] * n for name in names}
        keep = []  # the row numbers and values, alive until the launch is queued
        counts = []
        for k, (p, g) in enumerate(zip(self.params, self.grads)):
            rows, values, width = self._rows(g)
            keep += [rows, values]
            counts.append(rows.numel())
            cols["PARAM"][k] = row_major(p).data_ptr()
            cols["VALUES"][k] = values.data_ptr()
            cols["ROW_INDEX"][k] = rows.data_ptr()
            cols["NNZ"][k] = rows.numel()
            cols["WIDTH"][k] = width
            cols["GROUP"][k] = self.groups[k]
            for j, s in enumerate(self.states[k]):
                cols[f"STATE{j}"][k] = row_major(s).data_ptr()
            for j, s in enumerate(self.scalars[k]):
                cols[f"SCALAR{j}"][k] = s.data_ptr()
        tensors = torch.tensor([cols[name] for name in names],
                               dtype=torch.int64).to(self.device, non_blocking=True)
        table, _ = device_hyper_table([tuple(h.values()) for h in hyper], None, None,
                                      self.device, False)
        done_counts = torch.zeros(n, dtype=torch.int32, device=self.device)
        with torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext():
            sparse.launch(self.variant, tensors=tensors, num_tensors=n,
                          work=sparse.work_list(counts, self.device), hyper=table,
                          done_counts=done_counts, grad_scale=grad_scale, found_inf=found_inf,
                          interpreting=interpreting())
        for original, copy in copies:
            original.copy_(copy)
        del keep

    def _reference(self, hyper, grad_scale, found_inf) -> None:
        if found_inf is not None and found_inf.item() != 0:
            return  # AMP saw an inf or NaN: GradScaler skips this step
        algorithm = self.variant.algorithm
        update = getattr(reference, algorithm.name)
        flags = dict(zip(algorithm.flags, self.variant.flags))
        absent = {s: None for s in algorithm.states if s not in self.variant.states}
        for k, (p, g) in enumerate(zip(self.params, self.grads)):
            # the held rows, over the sparse dims (none: the whole tensor is the one row)
            whole = g.sparse_dim() == 0
            index = ((torch.zeros(g._nnz(), dtype=torch.int64, device=p.device),) if whole
                     else tuple(g._indices()))
            values = g._values()
            if grad_scale is not None:  # GradScaler's unscale: times its float32 1/scale
                values = values * grad_scale.double().reciprocal().float().to(values.device)

            def rows_of(t: Tensor, whole=whole) -> Tensor:
                return t.unsqueeze(0) if whole else t

            rows = rows_of(p)[index]
            held = {name: rows_of(s)[index]
                    for name, s in zip(self.variant.states, self.states[k])}
            scalars = dict(zip(algorithm.scalars, self.scalars[k]))
            if "step" in scalars:  # torch counts the step before using it
                scalars["step"] = scalars["step"].add_(1).item()
            group = python_hyper(hyper[self.groups[k]])
            fresh = {"fresh": False} if algorithm.reads_fresh else {}
            update(rows, values, **{**absent, **held}, **group, **scalars, **fresh, **flags)
            rows_of(p)[index] = rows
            for name, s in zip(self.variant.states, self.states[k]):
                rows_of(s)[index] = held[name]
