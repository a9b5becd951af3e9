"""The second kind of runner: whole-tensor updates (per-tensor reductions, matrix work) on the
tile kernels of :mod:`fusedopt.kernels.tiles`.

The contract is :mod:`fusedopt.runners`' (the engine does not tell them apart): built from a
bucket's checked :class:`~fusedopt.table.TensorTable`, ``accept_grads(pointers)`` when only
the grads are new, ``run(hyper, grad_scale, found_inf, clip_coef, capturable)`` for a step.
What differs is what one step launches: a small fixed number of tile launches over every
tensor of the bucket (plus, for Muon, the batched Newton-Schulz matmuls of each shape), so
the count does not grow with the number of tensors.

The tile kernels index each tensor as row-major matrices: a param, grad or state laid out
otherwise (a transposed weight) goes through a contiguous copy, copied back after the step.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor

from fusedopt.kernels import interpreting
from fusedopt.reference import muon_lr
from fusedopt.runners import device_hyper_table, upload_grad_pointers
from fusedopt.table import TensorTable


class TiledRunner:
    """What every tile runner shares: the tensor table on the device (with the spec's
    columns), the tile work list, contiguous stand-ins, the hyperparameter table and AMP."""

    columns: tuple[str, ...]
    #: the hyperparameters the kernels read from the device table, in its column order
    device_hyper: tuple[str, ...]

    def __init__(self, variant, table: TensorTable, groups: list[int], device: torch.device):
        from fusedopt.kernels import tiles

        self.tiles = tiles
        self.variant, self.table, self.groups, self.device = variant, table, groups, device
        params = table.local_params
        self.n = n = len(params)
        # contiguous stand-ins of params and states laid out otherwise: (original, copy)
        self.copies: list[tuple[Tensor, Tensor]] = []
        self.params = [self._contiguous(p) for p in params]
        # addresses only: a reference held here would make the engine re-check the states at
        # every step (it counts who holds them, see fusedopt.table)
        self.state_addresses = [[self._contiguous(s).data_ptr() for s in states]
                                for states in table.local_states]
        self.shapes = [self.matrix_shape(p) for p in params]
        self.work = tiles.tile_work(self.shapes, device)
        self.num_tiles = len(self.work)
        self.cols = {name: [0] * n for name in self.columns}
        for k, (p, (_, rows, cols)) in enumerate(zip(self.params, self.shapes)):
            self.cols["PARAM"][k] = p.data_ptr()
            self.cols["ROWS"][k] = rows
            self.cols["COLS"][k] = cols
            self.cols["GROUP"][k] = groups[k]
        self.fill_columns()
        self.upload()
        self.hyper: Tensor | None = None
        self.hyper_rows: list[tuple] | None = None
        self.grad_copies: dict[int, Tensor] | None = None
        self.accept_grads(table.grad_pointers)

    def _contiguous(self, t: Tensor) -> Tensor:
        if t.is_contiguous():
            return t
        copy = torch.empty(t.shape, dtype=t.dtype, device=t.device)
        self.copies.append((t, copy))
        return copy

    def matrix_shape(self, p: Tensor) -> tuple[int, int, int]:
        """``(B, R, C)``: how the kernels see ``p``."""
        raise NotImplementedError

    def fill_columns(self) -> None:
        """Fill the spec's own columns of ``self.cols`` (and any scratch)."""
        raise NotImplementedError

    def upload(self) -> None:
        self.tensors = torch.tensor([self.cols[name] for name in self.columns],
                                    dtype=torch.int64).to(self.device, non_blocking=True)

    def accept_grads(self, pointers: list[int]) -> None:
        """New grad addresses: re-point the grad column (grads not row-major: a copy)."""
        if self.grad_copies is None:
            self.grad_copies = {k: torch.empty(g.shape, dtype=g.dtype, device=g.device)
                                for k, g in enumerate(self.table.local_grads)
                                if not g.is_contiguous()}
        upload_grad_pointers(self.tensors[self.columns.index("GRAD")], pointers,
                             self.grad_copies)

    def run(self, hyper: list[dict[str, Any]], grad_scale: Tensor | None,
            found_inf: Tensor | None, clip_coef: Tensor | None, capturable: bool) -> None:
        for k, copy in self.grad_copies.items():
            copy.copy_(self.table.local_grads[k])
        for original, copy in self.copies:
            copy.copy_(original)
        self.hyper, self.hyper_rows = device_hyper_table(
            [tuple(h[name] for name in self.device_hyper) for h in hyper], self.hyper_rows,
            self.hyper, self.device, capturable)
        amp_constexprs = {"UNSCALE": grad_scale is not None, "SKIP_ON_INF": found_inf is not None,
                          "CLIP": clip_coef is not None}
        # unused pointer arguments get any float tensor: they are never read
        amp = tuple(t if t is not None else self.hyper for t in (grad_scale, found_inf, clip_coef))
        with torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext():
            self.launch(hyper, amp, amp_constexprs)
        for original, copy in self.copies:
            original.copy_(copy)

    def launch(self, hyper: list[dict[str, Any]], amp: tuple, amp_constexprs: dict) -> None:
        raise NotImplementedError

    def _kernel(self, kernel, *args: Any, **constexprs: Any) -> None:
        """One launch over every tile of the bucket."""
        kernel[(self.num_tiles,)](
            self.tensors, self.n, self.work, self.hyper, self.hyper.shape[1], *args,
            **self.tiles.storage_and_compute(self.variant.dtype),
            ROUND_BF16_BY_HAND=interpreting(), TR=self.tiles.TILE_ROWS,
            TC=self.tiles.TILE_COLS, num_warps=self.tiles.NUM_WARPS, **constexprs)
        self.tiles.count_launches()


class AdafactorRunner(TiledRunner):
    """Adafactor over a bucket of factored (2+ dims) or of vector params: four launches
    (three for vectors) after zeroing the scratch. See :func:`fusedopt.reference.adafactor`."""

    device_hyper = ("lr", "beta2_decay", "eps1", "eps2", "d", "weight_decay")

    def __init__(self, variant, table, groups, device):
        from fusedopt.kernels.tiles import ADAFACTOR_COLUMNS

        self.columns = ADAFACTOR_COLUMNS
        self.factored = variant.states == ("row_var", "col_var")
        super().__init__(variant, table, groups, device)

    def matrix_shape(self, p: Tensor) -> tuple[int, int, int]:
        if p.dim() > 1:
            return math.prod(p.shape[:-2]), p.shape[-2], p.shape[-1]
        return 1, 1, p.numel()

    def fill_columns(self) -> None:
        n = self.n
        offset = 3 * n  # [0, 3n): ||theta||^2, ||U||^2, this step's number, per tensor
        for k, ((b, r, c), states, scalars) in enumerate(zip(self.shapes, self.state_addresses,
                                                             self.table.scalars)):
            self.cols["ROW_VAR"][k] = states[0]
            self.cols["STEP"][k] = scalars[0].data_ptr()
            if self.factored:
                self.cols["COL_VAR"][k] = states[1]
                self.cols["ROW_SUMS"][k] = offset
                self.cols["COL_SUMS"][k] = offset + b * r
                self.cols["MEANS"][k] = offset + b * r + b * c
                offset += b * r + b * c + b
        self.acc = torch.zeros(offset, dtype=self.variant.compute, device=self.device)
        self.numels = torch.tensor([p.numel() for p in self.params],
                                   dtype=torch.int64).to(self.device, non_blocking=True)

    def launch(self, hyper, amp, amp_constexprs) -> None:
        tiles = self.tiles
        maximize = dict(zip(self.variant.algorithm.flags, self.variant.flags))["maximize"]
        self.acc.zero_()
        self._kernel(tiles.adafactor_sums, self.acc, *amp, FACTORED=self.factored,
                     **amp_constexprs)
        if self.factored:
            self._kernel(tiles.adafactor_factors, self.acc, *amp, **amp_constexprs)
        self._kernel(tiles.adafactor_norms, self.acc, *amp, FACTORED=self.factored,
                     MAXIMIZE=maximize, **amp_constexprs)
        self._kernel(tiles.adafactor_apply, self.acc, self.numels, *amp,
                     FACTORED=self.factored, MAXIMIZE=maximize, **amp_constexprs)


class _Batch:
    """The matrices of one wide shape ``m x n`` (tall ones transposed) whose groups share
    their Newton-Schulz settings: updated together, by batched matmuls, in two bf16 buffers
    (the iterations alternate between them) with their Gram scratch."""

    def __init__(self, count: int, m: int, n: int, first_slot: int, settings: tuple,
                 device: torch.device):
        self.slots = slice(first_slot, first_slot + count)
        self.coefficients, self.steps, self.eps = settings
        self.x = torch.zeros(2, count, m, n, dtype=torch.bfloat16, device=device)
        self.gram = torch.empty(2, count, m, m, dtype=torch.bfloat16, device=device)

    def slot_address(self, buffer: int, index: int) -> int:
        return self.x[buffer, index].data_ptr()

    @property
    def final(self) -> int:
        """The buffer the last iteration writes."""
        return self.steps % 2

    def orthogonalise(self, norms: Tensor, clamped: Tensor) -> None:
        """X / max(||X||, eps) (as torch: the norm rounded to bf16), then the iterations."""
        a, b, c = self.coefficients
        norm = torch.clamp(norms[self.slots].sqrt().to(torch.bfloat16), min=self.eps,
                           out=clamped[self.slots])
        x = self.x[0]
        x.div_(norm.view(-1, 1, 1))
        gram, update = self.gram[0], self.gram[1]
        for i in range(self.steps):
            x, out = self.x[i % 2], self.x[(i + 1) % 2]
            torch.bmm(x, x.mT, out=gram)
            torch.baddbmm(gram, gram, gram, beta=b, alpha=c, out=update)
            torch.baddbmm(x, update, x, beta=a, out=out)


class MuonRunner(TiledRunner):
    """Muon over a bucket of matrices: the momentum launch, the Newton-Schulz iterations
    batched over every matrix of a shape (3 matmuls per iteration per batch, whatever the
    number of matrices in it), the apply launch. See :func:`fusedopt.reference.muon`."""

    device_hyper = ("lr", "weight_decay", "momentum")

    def __init__(self, variant, table, groups, device):
        from fusedopt.kernels.tiles import MUON_COLUMNS

        self.columns = MUON_COLUMNS
        self.plan_key: tuple | None = None
        super().__init__(variant, table, groups, device)

    def matrix_shape(self, p: Tensor) -> tuple[int, int, int]:
        return 1, p.shape[0], p.shape[1]

    def fill_columns(self) -> None:
        for k, states in enumerate(self.state_addresses):
            self.cols["BUF"][k] = states[0]
            self.cols["TRANSPOSED"][k] = int(self.shapes[k][1] > self.shapes[k][2])
            self.cols["SLOT"][k] = k
        self.norms = torch.zeros(self.n, dtype=torch.float32, device=self.device)
        self.clamped = torch.ones(self.n, dtype=torch.bfloat16, device=self.device)

    def _plan(self, hyper: list[dict[str, Any]]) -> None:
        """Batches for the groups' current Newton-Schulz settings and lr rules; slots are
        renumbered batch by batch. Re-planned when a group's settings change."""
        # (a negative ns_steps is torch's range(): no iteration)
        settings = [(tuple(h["ns_coefficients"]), max(int(h["ns_steps"]), 0), float(h["eps"]))
                    for h in hyper]
        rules = [h["adjust_lr_fn"] for h in hyper]
        key = (tuple(settings), tuple(rules))
        if key == self.plan_key:
            return
        members: dict[tuple, list[int]] = {}
        for k, (_, rows, cols) in enumerate(self.shapes):
            wide = (min(rows, cols), max(rows, cols))
            members.setdefault((wide, settings[self.groups[k]]), []).append(k)
        self.batches = []
        slot = 0
        for ((m, n), setting), ks in members.items():
            batch = _Batch(len(ks), m, n, slot, setting, self.device)
            for i, k in enumerate(ks):
                self.cols["SLOT"][k] = slot + i
                self.cols["X_IN"][k] = batch.slot_address(0, i)
                self.cols["X_OUT"][k] = batch.slot_address(batch.final, i)
            self.batches.append(batch)
            slot += len(ks)
        grads = self.tensors[self.columns.index("GRAD")].clone()
        self.upload()
        self.tensors[self.columns.index("GRAD")].copy_(grads)
        self.lr_ratios = torch.tensor(
            [muon_lr(1.0, rules[self.groups[k]], p.shape) for k, p in enumerate(self.params)],
            dtype=torch.float64).to(self.device, non_blocking=True)
        self.plan_key = key

    def launch(self, hyper, amp, amp_constexprs) -> None:
        tiles = self.tiles
        self._plan(hyper)
        flags = dict(zip(self.variant.algorithm.flags, self.variant.flags))
        self.norms.zero_()
        self._kernel(tiles.muon_momentum, self.norms, *amp, NESTEROV=flags["nesterov"],
                     **amp_constexprs)
        for batch in self.batches:
            batch.orthogonalise(self.norms, self.clamped)
        # torch's bf16 Newton-Schulz input is the momentum buffer itself when it is already
        # bf16 and not Nesterov-mixed: torch then leaves it divided by its norm
        normalise = self.variant.dtype == torch.bfloat16 and not flags["nesterov"]
        self._kernel(tiles.muon_apply, self.lr_ratios, self.clamped, *amp,
                     NORMALISE_BUFFER=normalise, **amp_constexprs)
