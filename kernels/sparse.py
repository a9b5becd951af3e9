"""The rows of sparse grads: one launch applies an algorithm's element-wise update (the very
``@triton.jit`` update of :mod:`fusedopt.kernels.updates` the skeleton calls) to the rows of
every param of a bucket that its coalesced sparse grad holds, whatever the number of params.

A sparse COO grad of a param of shape ``(n_0, ..., n_{k-1}, *dense)`` with ``k`` sparse dims
is seen as the rows of the param's row-major ``(n_0 ... n_{k-1}) x prod(dense)`` matrix: its
values are ``nnz`` rows of ``width = prod(dense)`` elements, and the host turns its indices into
row numbers. The grad is coalesced first (torch's SparseAdam and Adagrad do so too), so no row
appears twice and no two programs write the same element. Rows the grad does not hold are not
touched, as torch's sparse updates leave them.

The table has one column per field (``table[column * num_tensors + tensor]``): the param, the
grad's values, its row numbers, ``nnz``, ``width``, the group, the states and the scalar states.
The work list: ``(tensor, first row)`` per ``ROWS`` rows (one item for a grad without rows, so
that its step still advances, as torch's does).
"""

import torch
import triton
import triton.language as tl

from fusedopt.kernels import skeleton
from fusedopt.kernels.skeleton import _TL_DTYPES, _amp, _finish, _per_tensor, _to_storage

ROWS = 8
COLS = 128
NUM_WARPS = 4
FIXED_COLUMNS = ("PARAM", "VALUES", "ROW_INDEX", "NNZ", "WIDTH", "GROUP")


def columns(num_states: int, num_scalars: int) -> tuple[str, ...]:
    return (*FIXED_COLUMNS, *(f"STATE{i}" for i in range(num_states)),
            *(f"SCALAR{i}" for i in range(num_scalars)))


def work_list(row_counts: list[int], device: torch.device) -> torch.Tensor:
    """``int64[num_work, 2]``: (tensor, first row) per ``ROWS`` rows of each tensor."""
    counts = torch.tensor(row_counts, dtype=torch.int64)
    items = torch.clamp((counts + ROWS - 1) // ROWS, min=1)
    tensor_of = torch.repeat_interleave(torch.arange(len(row_counts)), items)
    first = torch.cumsum(items, 0) - items
    starts = (torch.arange(len(tensor_of)) - first[tensor_of]) * ROWS
    return torch.stack([tensor_of, starts], dim=1).contiguous().to(device, non_blocking=True)


@triton.jit(do_not_specialize=["num_tensors", "hyper_stride"])
def sparse_rows_step(tensors, num_tensors, work, hyper, hyper_stride, done_counts, grad_scale,
                     found_inf, clip_coef, UPDATE: tl.constexpr, ADVANCE: tl.constexpr,
                     FLAGS: tl.constexpr, NUM_STATES: tl.constexpr, NUM_HYPER: tl.constexpr,
                     NUM_SCALARS: tl.constexpr, USES_STEP: tl.constexpr,
                     UNSCALE: tl.constexpr, SKIP_ON_INF: tl.constexpr, CLIP: tl.constexpr,
                     STORAGE: tl.constexpr, COMPUTE: tl.constexpr,
                     ROUND_BF16_BY_HAND: tl.constexpr, ROWS: tl.constexpr,
                     COLS: tl.constexpr):
    """Update ``ROWS`` rows of one tensor; the grid is the work list."""
    run, scaling = _amp(grad_scale, found_inf, clip_coef, UNSCALE, SKIP_ON_INF, CLIP)
    if run:
        pid = tl.program_id(0).to(tl.int64)
        t = tl.load(work + 2 * pid)
        r0 = tl.load(work + 2 * pid + 1)
        param = tl.load(tensors + t).to(tl.pointer_type(STORAGE))
        values = tl.load(tensors + num_tensors + t).to(tl.pointer_type(STORAGE))
        row_index = tl.load(tensors + 2 * num_tensors + t).to(tl.pointer_type(tl.int64))
        nnz = tl.load(tensors + 3 * num_tensors + t)
        width = tl.load(tensors + 4 * num_tensors + t)
        group = tl.load(tensors + 5 * num_tensors + t)
        states = ()
        for i in tl.static_range(NUM_STATES):
            states = states + (tl.load(tensors + (6 + i) * num_tensors + t)
                               .to(tl.pointer_type(STORAGE)),)
        scalar_ptrs = ()
        for i in tl.static_range(NUM_SCALARS):
            scalar_ptrs = scalar_ptrs + (tl.load(tensors + (6 + NUM_STATES + i) * num_tensors
                                                 + t).to(tl.pointer_type(tl.float32)),)
        nothing = tl.full([], 0, tl.int64)
        hyper_values, scalars, advanced, sums = _per_tensor(
            hyper + group * hyper_stride, scalar_ptrs, done_counts, t, nothing, FLAGS,
            NUM_HYPER, NUM_SCALARS, USES_STEP, ADVANCE, 0)
        rows = r0 + tl.arange(0, ROWS)
        held = rows < nnz
        index = tl.load(row_index + rows, mask=held, other=0)
        c0 = 0
        while c0 < width:  # (a loop on a loaded bound: triton 3.6's interpreter has no range)
            cols = c0 + tl.arange(0, COLS)
            mask = held[:, None] & (cols < width)[None, :]
            at = index[:, None] * width + cols[None, :]
            p = tl.load(param + at, mask=mask).to(COMPUTE)
            g = tl.load(values + rows[:, None] * width + cols[None, :], mask=mask).to(COMPUTE)
            if UNSCALE or CLIP:
                g = g * scaling.to(COMPUTE)
            held_states = ()
            for i in tl.static_range(NUM_STATES):
                held_states = held_states + (tl.load(states[i] + at, mask=mask).to(COMPUTE),)
            p, held_states = UPDATE(p, g, held_states, hyper_values, scalars, (), nothing, FLAGS)
            tl.store(param + at, _to_storage(p, STORAGE, ROUND_BF16_BY_HAND), mask=mask)
            for i in tl.static_range(NUM_STATES):
                tl.store(states[i] + at, _to_storage(held_states[i], STORAGE,
                                                     ROUND_BF16_BY_HAND), mask=mask)
            c0 += COLS
        _finish(t, nnz, done_counts, scalar_ptrs, advanced, done_counts, nothing, done_counts,
                NUM_SCALARS, 0, ROWS)


def launch(variant, *, tensors: torch.Tensor, num_tensors: int, work: torch.Tensor,
           hyper: torch.Tensor, done_counts: torch.Tensor, grad_scale=None, found_inf=None,
           clip_coef=None, interpreting: bool = False) -> None:
    """One launch over the rows of every sparse grad of a bucket (see the module docstring)."""
    alg = variant.algorithm
    amp = tuple(t if t is not None else hyper for t in (grad_scale, found_inf, clip_coef))
    compute = torch.float64 if variant.dtype == torch.float64 else torch.float32
    sparse_rows_step[(len(work),)](
        tensors, num_tensors, work, hyper, hyper.shape[1], done_counts, *amp,
        UPDATE=skeleton.adapter(alg, "update", variant.states),
        ADVANCE=skeleton.adapter(alg, "advance", variant.states) if alg.advanced else None,
        FLAGS=tuple(bool(f) for f in variant.flags), NUM_STATES=len(variant.states),
        NUM_HYPER=len(alg.hyper), NUM_SCALARS=len(alg.scalars), USES_STEP=alg.uses_step,
        UNSCALE=grad_scale is not None, SKIP_ON_INF=found_inf is not None,
        CLIP=clip_coef is not None, STORAGE=_TL_DTYPES[variant.dtype],
        COMPUTE=_TL_DTYPES[compute], ROUND_BF16_BY_HAND=interpreting, ROWS=ROWS, COLS=COLS,
        num_warps=NUM_WARPS)
    skeleton._launches += 1
